"""trainer/probe.py: the logistic probe learns what is linearly there and nothing else; runs are deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlsm.cli import cli
from mlsm.core.config import ProbeConfig
from mlsm.core.errors import MLSMError
from mlsm.trainer.probe import never_trained_encoder, probe_checkpoint, probe_layer, resolve_layers, run_probe
from tests.test_finetune import N_WORDS, _write_token_task, _write_topic_task, model_dir  # noqa: F401
from tests.test_train import one_thread  # noqa: F401  (autouse: tiny models on one thread)

GRID = (1e-4, 1e-2)


def _blobs(n: int, classes: int, dim: int, seed: int, separable: bool):
    """Gaussian clusters around far-apart class means; with separable=False the labels ignore the features."""
    g = torch.Generator().manual_seed(seed)
    means = 6.0 * torch.eye(classes, dim)
    y = torch.randint(classes, (n,), generator=g)
    X = means[y] + torch.randn(n, dim, generator=g)
    if not separable:
        y = torch.randint(classes, (n,), generator=g)
    return X, y


def _splits(classes: int, separable: bool):
    parts = {s: _blobs(400, classes, 16, seed, separable) for seed, s in enumerate(("train", "dev", "test"))}
    return {s: x for s, (x, _) in parts.items()}, {s: y for s, (_, y) in parts.items()}


def test_probe_separates_linearly_separable_classes():
    X, y = _splits(4, separable=True)
    r = probe_layer(X, y, 4, GRID, max_iter=100)
    assert r["test"]["accuracy"] > 0.97 and r["dev"]["accuracy"] > 0.97
    assert r["l2"] in GRID and set(r["dev_accuracy_by_l2"]) == {repr(x) for x in GRID}
    assert r["test"]["n"] == 400


def test_probe_cannot_beat_chance_on_labels_that_ignore_the_features():
    X, y = _splits(4, separable=False)
    r = probe_layer(X, y, 4, GRID, max_iter=100)
    # chance is 1/4; 400 test units give a standard error of about 0.022
    assert r["test"]["accuracy"] < 0.25 + 0.08


def _write_random_tags(folder, seed=0):
    """The control task: a word's tag is a coin flip per occurrence, so no feature can predict it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 150), ("dev", 40), ("test", 40)):
        with open(folder / f"{split}.conll", "w") as f:
            for _ in range(n):
                for w in rng.integers(N_WORDS, size=int(rng.integers(3, 12))):
                    f.write(f"w{w}\t{'A' if rng.random() < 0.5 else 'B'}\n")
                f.write("\n")
    return folder


def test_token_probe_reads_word_identity_and_not_coin_flips(tmp_path, model_dir):  # noqa: F811
    parity = _write_token_task(tmp_path / "parity")  # tag = parity of the word's index
    coins = _write_random_tags(tmp_path / "coins")
    r = run_probe(ProbeConfig(model=str(model_dir), tasks=(parity, coins), layers="all", l2_grid=GRID,
                              device="cpu", progress=False))
    assert r["layers"] == [0, 1, 2]
    p, c = r["tasks"]["parity"], r["tasks"]["coins"]
    assert p["kind"] == "token" and p["units"]["train"] > 500
    assert p["majority"]["test"]["accuracy"] < 0.6
    # the embedding layer holds the word's identity (45 words in 32 dims plus positions: not all separable)
    assert p["layers"]["0"]["test"]["accuracy"] > 0.8 > p["majority"]["test"]["accuracy"] + 0.2
    for layer in ("0", "1", "2"):
        assert c["layers"][layer]["test"]["accuracy"] < 0.62  # chance 0.5, ~300 test words


def test_sequence_probe_on_mean_pooled_features(tmp_path, model_dir):  # noqa: F811
    topics = _write_topic_task(tmp_path / "topics")
    r = probe_checkpoint(model_dir, [topics], layers=[0], l2_grid=GRID, device="cpu", progress=False)
    t = r["tasks"]["topics"]
    assert t["kind"] == "sequence" and t["units"]["test"] == 60
    assert t["layers"]["0"]["test"]["accuracy"] > 0.9 > t["majority"]["test"]["accuracy"] + 0.3


def _without_timings(d):
    if isinstance(d, dict):
        return {k: _without_timings(v) for k, v in d.items() if k not in ("fit_s", "extract_s")}
    return d


def test_probe_is_deterministic(tmp_path, model_dir):  # noqa: F811
    task = _write_token_task(tmp_path / "parity", n_train=60, n_eval=20)
    cfg = ProbeConfig(model=str(model_dir.parent), tasks=(task,), l2_grid=GRID, device="cpu", progress=False)
    a, b = run_probe(cfg), run_probe(cfg)
    assert _without_timings(a) == _without_timings(b)
    assert a["model_name"] == f"run/{model_dir.name}"  # a run folder resolves to its latest checkpoint


def test_never_trained_student_is_seeded():
    a, _ = never_trained_encoder("tiny", None, seed=0)
    b, _ = never_trained_encoder("tiny", None, seed=0)
    c, _ = never_trained_encoder("tiny", None, seed=1)
    wa, wb, wc = (m.embeddings.word_embeddings.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 128
    with pytest.raises(MLSMError, match="preset"):
        never_trained_encoder("huge", None, seed=0)


def test_layer_specs():
    assert resolve_layers("last", 4) == [4]
    assert resolve_layers("all", 2) == [0, 1, 2]
    assert resolve_layers("2,0", 4) == [0, 2]
    with pytest.raises(MLSMError, match="do not exist"):
        resolve_layers("5", 4)


def test_cli_writes_json_and_table_and_explains_missing_inputs(tmp_path, model_dir):  # noqa: F811
    task = _write_token_task(tmp_path / "parity", n_train=40, n_eval=10)
    out = tmp_path / "probe"
    res = CliRunner().invoke(cli, ["probe", "--model", str(model_dir), "--task", str(task), "--out", str(out),
                                   "--l2", "1e-3", "--layers", "0,2", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "probe.json").read_text())
    assert sorted(saved["tasks"]["parity"]["layers"]) == ["0", "2"]
    assert saved["config"]["l2_grid"] == [1e-3]
    assert (out / "probe.md").read_text().count("| parity |") == 2
    res = CliRunner().invoke(cli, ["probe", "--model", str(model_dir), "--task", str(tmp_path / "nope")])
    assert isinstance(res.exception, MLSMError) and "make eval-data" in str(res.exception)
    res = CliRunner().invoke(cli, ["probe", "--model", str(tmp_path / "no-run"), "--task", str(task)])
    assert isinstance(res.exception, MLSMError) and "is not a model" in str(res.exception)
    res = CliRunner().invoke(cli, ["probe", "--model", str(model_dir), "--task", str(task), "--layers", "x"])
    assert res.exit_code != 0 and "layer numbers" in res.output
