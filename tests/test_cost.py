"""Whole-cost accounting (trainer/cost.py) on synthetic runs and manifests."""

from __future__ import annotations

import json

import pytest

from mlsm.core.bert import BertConfig
from mlsm.trainer.cost import (
    cost_curve,
    cost_to_reach,
    preprocessing_cost,
    reach_ratio,
    student_flops_per_step,
    training_cost_by_step,
)


def test_student_flops_by_hand():
    c = BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    # per token and layer forward: 2 * (4*16 + 2*32) matmuls + 4 * T * H attention; heads on 3 masked tokens
    by_hand = 3 * (5 * 2 * (2 * (64 + 64) + 4 * 6 * 4) + 2 * (16 + 4 * 7) * 3 + 2 * (16 + 4 * 10) * 3)
    assert student_flops_per_step(c, tokens=5, seq_len=6, masked=3, head_widths=(7, 10)) == by_hand


def _write(folder, doc):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(doc))


def test_preprocessing_cost_reads_the_manifests(tmp_path):
    aux = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 6}
    _write(tmp_path / "ex", {"stage": "extract", "complete": True, "params": {"max_len": 10}, "aux_config": aux,
                             "tokens": 1000, "wall_s": 30.0})
    _write(tmp_path / "codes", {"stage": "sparse-code", "complete": True,
                                "report": {"dictionary_s": 5.0, "coding_s": 7.5, "finalize_s": 0.5}})
    pre = preprocessing_cost(tmp_path / "ex", tmp_path / "codes", layer=3)
    assert pre["seconds"] == 43.0
    assert pre["flops"] == 1000 * 3 * 2 * (4 * 16 + 2 * 32 + 2 * 10 * 4)


def test_training_cost_chains_a_resume_and_drops_eval_seconds(tmp_path):
    rows = [{"step": 1, "elapsed_s": 1.0}, {"step": 10, "elapsed_s": 10.0, "heldout_s": 2.0},
            {"step": 20, "elapsed_s": 4.0}, {"step": 30, "elapsed_s": 9.0, "heldout_s": 1.0}]  # resumed after 10
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by = training_cost_by_step(tmp_path, flops_per_step=100.0)
    assert {s: v["seconds"] for s, v in by.items()} == {1: 1.0, 10: 8.0, 20: 12.0, 30: 16.0}
    assert by[30]["flops"] == 3000.0


BY_STEP = {s: {"flops": 10.0 * s, "seconds": 1.0 * s} for s in (10, 20, 40)}


def test_cost_curve_adds_the_preprocessing_share():
    pre = {"flops": 100.0, "seconds": 50.0}
    full = cost_curve([(40, 0.7), (10, 0.5)], BY_STEP, pre)
    half = cost_curve([(40, 0.7), (10, 0.5)], BY_STEP, pre, amortised_over=2)
    assert [r["step"] for r in full] == [10, 40]
    assert [r["seconds"] for r in full] == [60.0, 90.0] and [r["flops"] for r in full] == [200.0, 500.0]
    assert [r["seconds"] for r in half] == [35.0, 65.0]
    assert [r["seconds"] for r in cost_curve([(20, 0.1)], BY_STEP, None)] == [20.0]


def test_reach_ratio_per_seed_and_not_reached():
    mlm = {0: cost_curve([(10, 0.5), (20, 0.6), (40, 0.6)], BY_STEP, None),  # best 0.6, first at step 20
           1: cost_curve([(10, 0.4), (20, 0.5), (40, 0.7)], BY_STEP, None)}  # best 0.7 at step 40
    mlsm = {0: cost_curve([(10, 0.62), (20, 0.7)], BY_STEP, {"flops": 0.0, "seconds": 5.0}),  # 15 s vs 20 s
            1: cost_curve([(10, 0.68), (20, 0.69)], BY_STEP, None)}  # never 0.7
    r = reach_ratio(mlm, mlsm, "seconds")
    assert r["per_seed"][0]["ratio"] == pytest.approx(15.0 / 20.0)
    assert r["per_seed"][1]["ratio"] is None and r["per_seed"][1]["mlm_cost"] == 40.0
    assert (r["reached"], r["seeds"], r["mean"], r["std"]) == (1, 2, pytest.approx(0.75), 0.0)
    assert cost_to_reach(mlsm[1], 0.7, "seconds") is None

    none = reach_ratio({0: mlm[1]}, {0: mlsm[1]}, "flops")
    assert none["reached"] == 0 and none["mean"] is None and none["std"] is None
    both = reach_ratio(mlm, {0: mlsm[0], 1: cost_curve([(40, 0.9)], BY_STEP, None)}, "flops")
    assert both["mean"] == pytest.approx((100 / 200 + 400 / 400) / 2) and both["std"] > 0
