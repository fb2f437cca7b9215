"""pretrain's flags for the reference implementation's behaviour (docs/reference-differences.md):
--count-zero-codes (the MLSM loss's denominator) and --decay-1d (weight decay on every parameter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlsm.core.bert import BertConfig, Student
from mlsm.core.config import PretrainConfig
from mlsm.core.errors import MLSMError
from mlsm.trainer import train
from mlsm.trainer.heldout import heldout_loss
from mlsm.trainer.objectives import mlsm_kl_loss

# --------------------------------------------------------------------------- --count-zero-codes


def _targets(rows: list[dict[int, float]]):
    """CSR of per-row {atom: weight} targets, normalised; {} is an all-zero code."""
    indptr, idx, val = [0], [], []
    for r in rows:
        s = sum(r.values())
        for j, v in sorted(r.items()):
            idx.append(j)
            val.append(v / s)
        indptr.append(len(idx))
    return torch.tensor(indptr), torch.tensor(idx, dtype=torch.long), torch.tensor(val, dtype=torch.float64)


ROWS = [{0: 1.0, 3: 2.0}, {}, {1: 0.5}, {}, {}, {2: 1.0, 4: 1.0, 5: 3.0}, {0: 0.2}]


def test_count_zero_codes_averages_over_every_masked_row():
    z = torch.randn(len(ROWS), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ip, ix, v = _targets(ROWS)
    default, n_default = mlsm_kl_loss(z, ip, ix, v)
    counted, n_all = mlsm_kl_loss(z, ip, ix, v, count_zero_codes=True)
    with_targets = sum(1 for r in ROWS if r)
    assert (n_default, n_all) == (with_targets, len(ROWS))
    assert float(counted) == pytest.approx(float(default) * with_targets / len(ROWS), rel=1e-12)
    # the same mean written out: per-row KL over rows with a target, summed, over all rows
    logp = torch.log_softmax(z, -1)
    kl = sum(sum(t / sum(r.values()) * (np.log(t / sum(r.values())) - float(logp[i, j])) for j, t in r.items())
             for i, r in enumerate(ROWS) if r)
    assert float(counted) == pytest.approx(kl / len(ROWS), rel=1e-10)
    empty, n = mlsm_kl_loss(z[:2], torch.zeros(3, dtype=torch.long), ix[:0], v[:0], count_zero_codes=True)
    assert float(empty) == 0.0 and n == 2


SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=16)


def _micro(rows):
    T = 8
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 40, (2, T), generator=g)
    masked_index = torch.tensor([1, 2, 4, 6, 9, 11, 13])[:len(rows)]
    ip, ix, v = _targets(rows)
    return {"input_ids": ids, "attention_mask": torch.ones(2, T, dtype=torch.long), "masked_index": masked_index,
            "target_indptr": ip, "target_indices": ix, "target_values": v.float(),
            "n_targets": sum(1 for r in rows if r), "n_masked": len(rows), "n_tokens": 2 * T}


def test_count_zero_codes_reaches_the_training_step_and_the_heldout_loss():
    torch.manual_seed(0)
    model = Student(BertConfig(vocab_size=50, **SMALL), 6, mlm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    micro = _micro(ROWS)
    share = micro["n_targets"] / micro["n_masked"]
    losses = {}
    for flag in (False, True):
        spec = train.StepSpec(use_mlsm=True, use_mlm=False, count_zero_codes=flag)
        torch.manual_seed(1)  # the same dropout for both
        step = train.train_step(model, opt, [micro], spec).mlsm_loss
        losses[flag] = (step, heldout_loss(model, [micro], spec)["heldout_mlsm_loss"])
    assert losses[True][0] == pytest.approx(losses[False][0] * share, rel=1e-5)
    assert losses[True][1] == pytest.approx(losses[False][1] * share, rel=1e-5)
    cfg = PretrainConfig(data=Path("x"), out_dir=Path("y"), count_zero_codes=True)
    assert train.StepSpec.of(cfg, bf16=False).count_zero_codes


def test_new_pretrain_flags_are_recorded_and_a_resume_with_another_value_is_refused():
    old = PretrainConfig(data=Path("x"), out_dir=Path("y"), precision="fp32").to_json()
    assert old["count_zero_codes"] is False and old["decay_1d"] is False
    for key in ("count_zero_codes", "decay_1d"):
        new = {**old, key: True}
        with pytest.raises(MLSMError, match=key):
            train._check_resume_config(old, new, 0)
        # a run started before the flag existed resumes while it keeps the default
        train._check_resume_config({k: v for k, v in old.items() if k != key}, old, 0)


# --------------------------------------------------------------------------- --decay-1d


def test_decay_1d_puts_biases_and_layernorm_weights_in_the_decayed_group():
    student = Student(BertConfig(vocab_size=50, **SMALL), 20, mlm=True)
    names = {id(p): n for n, p in student.named_parameters()}
    decay, no_decay = train.param_groups(student, 0.01, decay_1d=True)
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and not no_decay["params"]
    assert any(n.endswith("bias") for n in decayed) and any("LayerNorm.weight" in n for n in decayed)
    assert len(decay["params"]) == len(list(student.parameters()))
    default, _ = train.param_groups(student, 0.01)
    assert not any(p.ndim == 1 for p in default["params"])


def test_the_cli_offers_the_flags():
    from click.testing import CliRunner

    from mlsm.cli import cli as group

    pre = CliRunner().invoke(group, ["pretrain", "--help"]).output
    assert "--count-zero-codes" in pre and "--decay-1d" in pre
