"""--eval-sequences: the held-out sequences stay out of training, their loss is recorded, resuming stays exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mlsm.core import hf
from mlsm.pipeline.codes import TokenData
from mlsm.trainer.data import BatchIterator, Masking
from mlsm.trainer.heldout import heldout_batches
from mlsm.trainer.train import run_pretrain
from tests.test_data import PAD, make_dataset
from tests.test_train import NO_DROPOUT, TIMING, _cfg, _metrics, run_until_killed

HELD = 24
NO_TIMING = TIMING | {"heldout_s"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core box (as tests/test_train.py)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def codes_h5(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("codes"))


def _masking(data: TokenData) -> Masking:
    tok = hf.load_tokenizer(data.path.parent / "tokenizer")
    return Masking.of(hf.special_token_ids(tok), tok.get_vocab_size(with_added_tokens=True), 0.15, "mask")


def test_held_out_sequences_are_never_trained_on(codes_h5):
    with TokenData(codes_h5) as data:
        S = data.num_sequences
        it = BatchIterator(data, 8, seed=0, masking=_masking(data), held_out=HELD, with_targets=False)
        seen = set()
        for _ in range(3 * ((S - HELD) // 8)):  # three epochs
            seen.update(int(s) for m in next(it) for s in m["seq_ids"])
    assert max(seen) < S - HELD
    assert len(seen) >= S - HELD - 8  # all but an epoch's dropped last batch


def test_heldout_loss_is_recorded_and_matches_the_checkpoint(codes_h5, tmp_path):
    run = tmp_path / "run"
    summary = run_pretrain(_cfg(codes_h5, run, objective="mlm", steps=20, eval_sequences=HELD, eval_every=5,
                                model_overrides=NO_DROPOUT, save_every=20))
    rows = [r for r in _metrics(run) if "heldout_loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert len({r["heldout_loss"] for r in rows}) == 4  # scored on the weights of each step
    doc = json.loads((run / "run.json").read_text())
    assert doc["heldout"]["heldout_loss"] == rows[-1]["heldout_loss"] == summary["heldout"]["heldout_loss"]
    assert doc["heldout"]["sequences"] == HELD and doc["heldout"]["which"] == "last"

    # Run again with the same settings: it has nothing to do, and run.json keeps what the run recorded
    # (bench/compare.py reads `heldout` after a resumed sweep; layer_choice reads the baseline).
    again = run_pretrain(_cfg(codes_h5, run, objective="mlm", steps=20, eval_sequences=HELD, eval_every=5,
                              model_overrides=NO_DROPOUT, save_every=20))
    assert again["start_step"] == 20
    redone = json.loads((run / "run.json").read_text())
    assert redone["heldout"] == doc["heldout"]
    assert redone["context_free_baseline"] == doc["context_free_baseline"]

    # Recompute by hand from the saved weights: mean cross-entropy over every held-out masked token.
    student = hf.load_student(run / "step-0000020", None, True).eval()
    with TokenData(codes_h5) as data:
        data.pad_id = PAD
        batches = heldout_batches(data, HELD, 8, _masking(data), with_targets=False)
        assert set(np.concatenate([b["seq_ids"] for b in batches])) == set(range(data.num_sequences - HELD,
                                                                                  data.num_sequences))
    ce, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = student(b["input_ids"], b["attention_mask"], b["masked_index"])["mlm_logits"]
            ce += F.cross_entropy(logits, b["mlm_labels"], reduction="sum").item()
            n += len(b["mlm_labels"])
    assert abs(ce / n - rows[-1]["heldout_loss"]) < 1e-4


def test_evaluating_does_not_change_training_and_resume_stays_exact(codes_h5, tmp_path, monkeypatch):
    kw = dict(mlm_weight=0.5, eval_sequences=HELD, save_every=5, milestones=True)  # dropout stays on
    rarely = run_pretrain(_cfg(codes_h5, tmp_path / "rarely", **kw))
    often = tmp_path / "often"
    run_pretrain(_cfg(codes_h5, often, eval_every=1, **kw))
    a, b = load_file(tmp_path / "rarely" / "step-0000010" / "model.safetensors"), load_file(
        often / "step-0000010" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rarely["heldout"]["heldout_loss"] == json.loads((often / "run.json").read_text())["heldout"]["heldout_loss"]

    resumed = tmp_path / "resumed"
    run_until_killed(_cfg(codes_h5, resumed, eval_every=1, **kw), monkeypatch)
    run_pretrain(_cfg(codes_h5, resumed, eval_every=1, **kw))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in NO_TIMING} for r in rows]  # noqa: E731
    assert strip(_metrics(often)) == strip(_metrics(resumed))
    assert all("heldout_mlsm_loss" in r and "heldout_mlm_loss" in r for r in _metrics(resumed))
