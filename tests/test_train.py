"""The training loop on a tiny synthetic codes.h5: it learns, checkpoints, and resumes bit-identically."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsm.core import hf
from mlsm.core.bert import BertConfig, Student
from mlsm.core.config import PretrainConfig
from mlsm.core.errors import MLSMError
from mlsm.trainer import train
from mlsm.trainer.train import run_pretrain
from tests.test_data import SPECIALS, make_dataset, make_tokenizer_dir

SPECIAL_IDS = set(range(len(SPECIALS)))  # [PAD] [UNK] [CLS] [SEP] [MASK]: never masked

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
NO_DROPOUT = dict(SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TIMING = {"tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box spinning threads cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def codes_h5(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("codes"))


@pytest.fixture(scope="module")
def tokens_h5(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tokens"), n_seq=60, codes=False)


def _cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    args = dict(data=data, out_dir=out, steps=10, batch_size=8, lr=1e-2, warmup=0.1, model_overrides=SMALL,
                max_len=16, log_every=1, device="cpu", progress=False,
                milestones=False,  # checkpoints only where a test asks for them
                precision="fp32")  # exact arithmetic on any CPU (auto is bf16 where it is native)
    args.update(kw)
    return PretrainConfig(**args)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_is_written(codes_h5, tmp_path):
    run = tmp_path / "run"
    summary = run_pretrain(_cfg(codes_h5, run, steps=30, batch_size=32))
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert set(rows[0]) == {"step", "loss", "mlsm_loss", "mlm_loss", "lr", "grad_norm", "tokens_per_s",
                            "masked_tokens", "targets", "skipped_steps", "elapsed_s"}
    assert all(0 < r["targets"] < r["masked_tokens"] for r in rows), "some masked tokens have no target"
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert summary["initial_loss"] == rows[0]["loss"] and summary["final_loss"] == rows[-1]["loss"]
    assert summary["steps"] == 30 and summary["tokens_per_s"] > 0
    # the context-free baseline, recomputed densely here: KL of each non-special token's target to the mean target
    with h5py.File(codes_h5) as f:
        tokens, ip, ix, val = (f[k][:] for k in ("tokens", "codes/indptr", "codes/indices", "codes/values"))
    dense = np.zeros((len(tokens), 20))
    np.add.at(dense, (np.repeat(np.arange(len(tokens)), np.diff(ip)), ix.astype(int)), val.astype(np.float64))
    keep = ~np.isin(tokens, list(SPECIAL_IDS)) & (dense.sum(1) > 0)
    t = dense[keep] / dense[keep].sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.nansum(t * np.log(t / t.mean(0)), axis=1).mean()
    base = json.loads((run / "run.json").read_text())["context_free_baseline"]
    assert base["loss"] == pytest.approx(want, rel=1e-6) and summary["context_free_baseline"] == base["loss"]
    assert summary["loss_over_baseline"] == pytest.approx(summary["final_loss"] / want)

    ck = run / "step-0000030"
    assert Path(summary["last_checkpoint"]) == ck
    assert {p.name for p in ck.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt",
                                              "checksums.json"}
    assert [p.name for p in run.iterdir() if p.name.startswith("step-")] == ["step-0000030"]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["mlsm"]["objective"] == "mlsm" and cfg["mlsm"]["num_atoms"] == 20 and cfg["hidden_size"] == 32
    tensors = load_file(ck / "model.safetensors")
    assert "embeddings.word_embeddings.weight" in tensors and "mlsm_head.decoder.weight" in tensors
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert state["step"] == 30 and {"optimizer", "rng", "data", "scheduler", "config"} <= set(state)
    student = hf.load_student(ck, 20, mlm=False)
    torch.testing.assert_close(student.mlsm_head.decoder.weight, tensors["mlsm_head.decoder.weight"])

    again = run_pretrain(_cfg(codes_h5, run, steps=30, batch_size=32))  # finished: nothing to do
    assert again["start_step"] == 30 and len(_metrics(run)) == 30


def run_until_killed(cfg, monkeypatch, at_batch: int = 7) -> None:
    """run_pretrain(cfg), killed (an exception out of the loop) when it asks for batch `at_batch`."""

    class Killed(Exception):
        pass

    class DiesAt(train.BatchIterator):
        calls = 0

        def __next__(self):
            DiesAt.calls += 1
            if DiesAt.calls == at_batch:
                raise Killed
            return super().__next__()

    monkeypatch.setattr(train, "BatchIterator", DiesAt)
    with pytest.raises(Killed):
        run_pretrain(cfg)
    monkeypatch.undo()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 autocast too: same machine, same bits
def test_resume_is_bit_identical(codes_h5, tmp_path, monkeypatch, precision):
    kw = dict(grad_accum=2, mlm_weight=0.5, mask_policy="bert", save_every=5, precision=precision)  # dropout stays on
    straight = tmp_path / "straight"
    run_pretrain(_cfg(codes_h5, straight, **kw))

    resumed = tmp_path / "resumed"
    run_until_killed(_cfg(codes_h5, resumed, **kw), monkeypatch)
    assert [r["step"] for r in _metrics(resumed)] == list(range(1, 7))
    assert sorted(p.name for p in resumed.glob("step-*")) == ["step-0000005"]
    summary = run_pretrain(_cfg(codes_h5, resumed, **kw))
    assert summary["start_step"] == 5

    a = load_file(straight / "step-0000010" / "model.safetensors")
    b = load_file(resumed / "step-0000010" / "model.safetensors")
    assert a.keys() == b.keys() and "mlm_head.bias" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(_metrics(straight)) == strip(_metrics(resumed))
    sa = torch.load(straight / "step-0000010" / "trainer_state.pt", weights_only=True)
    sb = torch.load(resumed / "step-0000010" / "trainer_state.pt", weights_only=True)
    assert sa["data"] == sb["data"] and torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])

    with pytest.raises(MLSMError, match="other settings.*lr"):
        run_pretrain(_cfg(codes_h5, resumed, **dict(kw, lr=5e-3)))
    with pytest.raises(MLSMError, match="other settings.*shuffle_window"):  # it changes the data order
        run_pretrain(_cfg(codes_h5, resumed, **dict(kw, shuffle_window=64)))
    with pytest.raises(MLSMError, match="steps"):
        run_pretrain(_cfg(codes_h5, resumed, **dict(kw, steps=4)))
    longer = run_pretrain(_cfg(codes_h5, resumed, **dict(kw, steps=12)))  # only steps grows: allowed
    assert longer["start_step"] == 10 and longer["steps"] == 12


def test_grad_accum_equals_full_batch(codes_h5, tmp_path):
    """Micro-batches weigh by their share of the step's targets, so accumulation changes nothing."""
    kw = dict(steps=3, batch_size=16, model_overrides=NO_DROPOUT, mlm_weight=1.0)
    run_pretrain(_cfg(codes_h5, tmp_path / "one", **kw))
    run_pretrain(_cfg(codes_h5, tmp_path / "four", grad_accum=4, **kw))
    a = load_file(tmp_path / "one" / "step-0000003" / "model.safetensors")
    b = load_file(tmp_path / "four" / "step-0000003" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4, msg=k)
    for x, y in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "four"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["targets"] == y["targets"]


def test_mlm_objective_on_tokens_file(tokens_h5, tmp_path):
    run = tmp_path / "mlm"
    summary = run_pretrain(_cfg(tokens_h5, run, objective="mlm", steps=3))
    rows = _metrics(run)
    assert rows[-1]["mlsm_loss"] is None and rows[-1]["targets"] is None and rows[-1]["mlm_loss"] > 0
    assert summary["final_loss"] == rows[-1]["mlm_loss"]
    with h5py.File(tokens_h5) as f:
        tokens = f["tokens"][:]
    _, counts = np.unique(tokens[~np.isin(tokens, list(SPECIAL_IDS))], return_counts=True)
    p = counts / counts.sum()
    assert summary["context_free_baseline"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)  # unigram entropy
    tensors = load_file(run / "step-0000003" / "model.safetensors")
    assert "mlm_head.bias" in tensors and not any(k.startswith("mlsm_head.") for k in tensors)
    assert json.loads((run / "step-0000003" / "config.json").read_text())["mlsm"]["num_atoms"] is None


def test_mlsm_on_tokens_file_raises(tokens_h5, tmp_path):
    with pytest.raises(MLSMError, match="mlsm sparse-code"):
        run_pretrain(_cfg(tokens_h5, tmp_path / "x"))


def _model_dir(folder: Path, tok_dir: Path, seed: int) -> tuple[Path, Student]:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, **SMALL)
    student = Student(config, None, mlm=True)
    hf.save_model_dir(folder, config, {**student.encoder_state_dict(), **student.head_state_dict()}, tok_dir)
    return folder, student


def test_init_from_checks_the_tokenizer(codes_h5, tmp_path):
    other_tok = make_tokenizer_dir(tmp_path / "other_tok", words=[f"v{i}" for i in range(45)])
    bad, _ = _model_dir(tmp_path / "bad", other_tok, seed=1)
    with pytest.raises(MLSMError, match="another tokenizer"):
        run_pretrain(_cfg(codes_h5, tmp_path / "x", init_from=bad))

    good, init = _model_dir(tmp_path / "good", codes_h5.parent / "tokenizer", seed=2)
    run = tmp_path / "from_good"
    run_pretrain(_cfg(codes_h5, run, init_from=good, steps=1, lr=1e-7, mlm_weight=1.0))
    after = load_file(run / "step-0000001" / "model.safetensors")
    emb = init.encoder.embeddings.word_embeddings.weight.detach()
    torch.testing.assert_close(after["embeddings.word_embeddings.weight"], emb, rtol=0, atol=1e-5)
    torch.testing.assert_close(after["mlm_head.bias"], init.mlm_head.bias.detach(), rtol=0, atol=1e-5)
    assert "mlsm_head.decoder.weight" in after  # the new head, freshly initialised


def test_mismatched_tokenizer_folder_raises(tmp_path):
    data = make_dataset(tmp_path / "d", n_seq=20)
    make_tokenizer_dir(data.parent / "tokenizer", words=[f"v{i}" for i in range(45)])  # replace it
    with pytest.raises(MLSMError, match="not the one"):
        run_pretrain(_cfg(data, tmp_path / "x"))


def test_lr_schedule_and_decay_groups():
    cfg = PretrainConfig(data=Path("x"), out_dir=Path("y"), steps=100, lr=1.0, warmup=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and all(a > b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1 / 90)
    no_warm = PretrainConfig(data=Path("x"), out_dir=Path("y"), steps=10, lr=1.0, warmup=0.0)
    assert train.lr_at(0, no_warm) == 1.0

    student = Student(BertConfig(vocab_size=50, **SMALL), 20, mlm=True)
    decay, no_decay = train.param_groups(student, 0.01)
    names = {id(p): n for n, p in student.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("LayerNorm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"])
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(student.parameters()))


def test_plot_writes_a_png_of_both_runs(codes_h5, tokens_h5, tmp_path, monkeypatch):
    import matplotlib  # noqa: F401  (hard: the test extra installs it)

    from mlsm.trainer.plot import plot_runs, read_run

    run_pretrain(_cfg(codes_h5, tmp_path / "mlsm", steps=4, mlm_weight=1.0))
    run_pretrain(_cfg(tokens_h5, tmp_path / "mlm", objective="mlm", steps=4))
    with open(tmp_path / "mlm" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a kill is where reading stops
    assert [r["step"] for r in read_run(tmp_path / "mlm")] == [1, 2, 3, 4]
    png = plot_runs([tmp_path / "mlsm", tmp_path / "mlm"], tmp_path / "out" / "loss.png", smooth=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(MLSMError, match="no metrics.jsonl"):
        plot_runs([tmp_path], tmp_path / "x.png")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(MLSMError, match="make plot"):
        plot_runs([tmp_path / "mlsm"], tmp_path / "y.png")


def test_bf16_autocast_flag_on_cpu(codes_h5, tmp_path):
    """--precision bf16 runs the forward under bf16 autocast (so its losses differ from fp32 in low bits)."""
    kw = dict(steps=2, model_overrides=dict(NO_DROPOUT), mlm_weight=1.0)
    run_pretrain(_cfg(codes_h5, tmp_path / "fp32", precision="fp32", **kw))
    run_pretrain(_cfg(codes_h5, tmp_path / "bf16", precision="bf16", **kw))
    a, b = _metrics(tmp_path / "fp32"), _metrics(tmp_path / "bf16")
    assert all(r["loss"] == pytest.approx(s["loss"], rel=2e-2) for r, s in zip(a, b, strict=True))
    assert a[0]["loss"] != b[0]["loss"]
    with pytest.raises(MLSMError, match="precision"):
        run_pretrain(_cfg(codes_h5, tmp_path / "x", precision="fp8"))


def test_run_json_records_the_precision_used_and_a_resume_in_another_is_refused(codes_h5, tmp_path):
    run = tmp_path / "run"
    run_pretrain(_cfg(codes_h5, run, steps=2, save_every=1, precision="fp32"))
    assert json.loads((run / "run.json").read_text())["config"]["precision"] == "fp32"
    with pytest.raises(MLSMError, match=r"precision: 'fp32' -> 'bf16'"):
        run_pretrain(_cfg(codes_h5, run, steps=4, save_every=1, precision="bf16"))
    # A run recorded before the precision used was stored ("auto", which meant fp32 on a CPU) resumes in fp32.
    doc = json.loads((run / "run.json").read_text())
    doc["config"]["precision"] = "auto"
    (run / "run.json").write_text(json.dumps(doc))
    assert run_pretrain(_cfg(codes_h5, run, steps=3, save_every=1, precision="fp32"))["start_step"] == 2
