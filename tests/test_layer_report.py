"""pipeline/layer_report.py: measures checked by hand, and a lexical layer told apart from a noisy one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mlsm.core.config import LayerReportConfig
from mlsm.core.errors import MLSMError
from mlsm.core.layout import MANIFEST
from mlsm.core.manifest import write_json_atomic
from mlsm.pipeline.layer_report import atom_stats, aux_flops_per_token, layer_report
from mlsm.pipeline.shards import write_shard

D_HID, TYPES = 16, 8


def test_atom_stats_by_hand():
    codes = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.1, 0.0]])
    s = atom_stats(codes, np.array([7, 7, 8, 9]), few=1)
    assert s["atoms_used"] == 2 and s["atoms_dead_share"] == pytest.approx(1 / 3)
    # uses (2, 3): entropy of (0.4, 0.6)
    assert s["usage_entropy_bits"] == pytest.approx(-(0.4 * math.log2(0.4) + 0.6 * math.log2(0.6)))
    assert s["usage_entropy_norm"] == pytest.approx(s["usage_entropy_bits"] / math.log2(3))
    assert s["few_type_atom_share"] == pytest.approx(0.5)  # atom 0: one type; atom 1: three
    assert s["lexical_atom_share"] == pytest.approx(0.5)  # atom 0: 2/2 of one type; atom 1: 1/3
    assert s["types_per_used_atom_median"] in (1.0, 3.0)


def test_flops_by_hand():
    cfg = {"hidden_size": 4, "intermediate_size": 8}
    assert aux_flops_per_token(cfg, 2, 10) == 2 * 2 * (4 * 16 + 2 * 32 + 2 * 10 * 4)
    assert aux_flops_per_token(cfg, 0, 10) == 0


def _extract_dir(folder, n=2400):
    """Layer 1: each token type has its own direction (lexical); layer 2: isotropic noise."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(TYPES, size=n) + 10
    dirs = rng.standard_normal((TYPES, D_HID))
    h1 = dirs[tokens - 10] + 0.01 * rng.standard_normal((n, D_HID))
    h2 = rng.standard_normal((n, D_HID))
    folder.mkdir(parents=True)
    half = n // 2
    shards = []
    for i, sl in enumerate((slice(0, half), slice(half, n))):
        name = f"shard-{i:05d}.parquet"
        m = sl.stop - sl.start
        write_shard(folder / name, np.arange(m) // 16, np.arange(m) % 16, tokens[sl], {1: h1[sl], 2: h2[sl]})
        shards.append({"file": name, "tokens": m})
    write_json_atomic(folder / MANIFEST, {
        "stage": "extract", "complete": True, "aux": "toy", "shards": shards,
        "params": {"layers": [1, 2], "max_len": 16},
        "aux_config": {"hidden_size": D_HID, "intermediate_size": 32, "num_hidden_layers": 2},
    })
    return folder


def test_report_tells_lexical_layer_from_noise(tmp_path):
    ex = _extract_dir(tmp_path / "extract")
    rep = layer_report(LayerReportConfig(ex, tmp_path / "out", K=TYPES, lam=0.05, samples=1500, heldout=400, few=1,
                                         device="cpu", progress=False))
    by = {r["layer"]: r for r in rep["layers"]}
    assert by[1]["heldout_objective"] < 0.5 * by[2]["heldout_objective"]
    assert by[1]["lexical_atom_share"] > 0.8 > by[2]["lexical_atom_share"]
    assert by[1]["aux_cost_vs_last_layer"] == pytest.approx(0.5) and by[2]["aux_cost_vs_last_layer"] == 1.0
    assert rep["params"]["heldout"] == 400
    saved = json.loads((tmp_path / "out" / "layer_report.json").read_text())
    assert [r["layer"] for r in saved["layers"]] == [1, 2]
    assert (tmp_path / "out" / "layer_report.md").read_text().count("\n| ") == 3  # the header and two layers
    with pytest.raises(MLSMError, match="not \\[5\\]"):
        layer_report(LayerReportConfig(ex, None, layers=(5,), progress=False))
