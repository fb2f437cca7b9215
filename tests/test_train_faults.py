"""Training under faults: non-finite steps are skipped and counted, damaged checkpoints are detected
and passed over, and `mlsm pretrain` killed with SIGKILL at random points still ends bit-identical."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsm.core import hf, manifest
from mlsm.core.config import PretrainConfig
from mlsm.core.errors import MLSMError
from mlsm.trainer import train
from mlsm.trainer.train import run_pretrain
from tests.test_train import TIMING, _metrics, codes_h5, one_thread  # noqa: F401  (fixtures shared with test_train)
from tests.test_train import _cfg as _train_cfg

ROOT = Path(__file__).resolve().parents[1]


def _cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    return _train_cfg(data, out, **{"steps": 6, "save_every": 1, **kw})


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"step-{step:07d}" / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- non-finite steps


def _poison(monkeypatch, nan_loss_steps: set[int], inf_grad_steps: set[int] = frozenset()):
    """NaN in the MLSM loss, or an infinite gradient norm, at these (1-based) steps."""
    calls = {"loss": 0, "clip": 0}
    real_kl, real_clip = train.mlsm_kl_loss, torch.nn.utils.clip_grad_norm_

    def kl(*a, **k):
        calls["loss"] += 1
        loss, n = real_kl(*a, **k)
        return (loss * math.nan, n) if calls["loss"] in nan_loss_steps else (loss, n)

    def clip(params, *a, **k):
        calls["clip"] += 1
        params = list(params)
        if calls["clip"] in inf_grad_steps:
            params[0].grad[0] = math.inf
        return real_clip(params, *a, **k)

    monkeypatch.setattr(train, "mlsm_kl_loss", kl)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_non_finite_steps_are_skipped_and_counted(codes_h5, tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, nan_loss_steps={3}, inf_grad_steps={4})
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mlsm.trainer.train"):
        summary = run_pretrain(_cfg(codes_h5, run))
    assert summary["skipped_steps"] == 2 and math.isfinite(summary["final_loss"])
    assert "step 3: the loss is nan" in caplog.text and "skipped" in caplog.text
    rows = _metrics(run)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert math.isnan(rows[2]["loss"]) and math.isinf(rows[3]["grad_norm"])
    # Skipped steps change neither the weights nor the optimizer; the next good step does.
    assert _same(_weights(run, 2), _weights(run, 3)) and _same(_weights(run, 2), _weights(run, 4))
    assert not _same(_weights(run, 4), _weights(run, 5))
    s2, s4 = (torch.load(run / f"step-000000{i}" / "trainer_state.pt", weights_only=True) for i in (2, 4))
    assert all(torch.equal(s2["optimizer"]["state"][i]["exp_avg"], s4["optimizer"]["state"][i]["exp_avg"])
               for i in s2["optimizer"]["state"])
    assert s4["skipped_steps"] == 2 and s4["bad_streak"] == 2 and s2["skipped_steps"] == 0


def test_consecutive_bad_steps_stop_the_run(codes_h5, tmp_path, monkeypatch):
    _poison(monkeypatch, nan_loss_steps=set(range(4, 100)))
    run = tmp_path / "run"
    with pytest.raises(MLSMError, match=r"stopped at step 6: 3 consecutive steps \(4\.\.6\).*of step 3\).*step-0000004") as e:
        run_pretrain(_cfg(codes_h5, run, steps=10, save_every=2, max_bad_steps=3))
    assert "--max-bad-steps" in str(e.value)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-0000002", "step-0000004"]
    for s in (2, 4):
        assert manifest.checksum_problem(run / f"step-000000{s}") is None
    # Step 4 was skipped, so the step-4 checkpoint holds the weights of step 3 of a clean run.
    monkeypatch.undo()
    ref = tmp_path / "ref"
    run_pretrain(_cfg(codes_h5, ref, steps=10, save_every=3, max_bad_steps=3))
    assert _same(_weights(run, 4), _weights(ref, 3))


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def _truncate_without_checksums(path: Path) -> None:  # a checkpoint written before checksums existed
    (path.parent / manifest.CHECKSUMS).unlink()
    _truncate(path)


@pytest.mark.parametrize("damage,file", [
    (_truncate, "model.safetensors"),
    (_truncate, "trainer_state.pt"),
    (_flip_byte, "model.safetensors"),
    (_truncate_without_checksums, "trainer_state.pt"),
])
def test_damaged_checkpoint_falls_back_to_the_previous_one(codes_h5, tmp_path, caplog, damage, file):
    straight = tmp_path / "straight"
    run_pretrain(_cfg(codes_h5, straight, save_every=2))
    run = tmp_path / "run"
    run_pretrain(_cfg(codes_h5, run, save_every=2))
    damage(run / "step-0000006" / file)

    with caplog.at_level(logging.WARNING, logger="mlsm.trainer.train"):
        summary = run_pretrain(_cfg(codes_h5, run, save_every=2))
    assert "step-0000006 is damaged" in caplog.text and "falling back to the previous checkpoint" in caplog.text
    assert summary["start_step"] == 4
    assert (run / "damaged-step-0000006" / file).is_file(), "the damaged checkpoint is kept aside, not deleted"
    assert _same(_weights(run, 6), _weights(straight, 6))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(_metrics(run)) == strip(_metrics(straight))
    # A run folder given as a model skips a damaged checkpoint too.
    damage(run / "step-0000006" / file) if damage is not _truncate_without_checksums else _truncate(run / "step-0000006" / file)
    assert hf.resolve_model_dir(str(run)).name == "step-0000004"


# --------------------------------------------------------------------------- SIGKILL at random points


def _pretrain_cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mlsm.cli", "pretrain", "--data", str(data), "--out", str(out), "--model", "tiny",
            "--steps", "24", "--batch-size", "8", "--lr", "1e-3", "--save-every", "3", "--log-every", "1",
            "--no-milestones", "--seed", "0", "--device", "cpu", "--no-progress"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def test_sigkill_at_random_points_then_resume_is_bit_identical(codes_h5, tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(_pretrain_cmd(codes_h5, straight), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    rng = np.random.default_rng(1)  # one seeded point in each third of the run: steps 4, 12, 22
    kill_at = [int(rng.integers(lo, hi)) for lo, hi in ((1, 8), (8, 16), (16, 24))]
    run = tmp_path / "killed"
    killed = 0
    for target in kill_at:
        proc = subprocess.Popen(_pretrain_cmd(codes_h5, run), env=_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and _logged_step(run) < target and time.time() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.communicate(timeout=60)
        # Whatever a kill interrupts, no checkpoint that looks complete is damaged.
        for ck in run.glob("step-*"):
            assert manifest.checksum_problem(ck) is None, ck
    assert killed >= 2, f"only {killed} of the runs were still going at their kill point"

    final = subprocess.run(_pretrain_cmd(codes_h5, run), env=_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert json.loads(final.stdout)["steps"] == 24
    assert _same(_weights(run, 24), _weights(straight, 24))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(_metrics(run)) == strip(_metrics(straight))
    assert not list(run.glob(".*.tmp")), "a killed save left its temporary folder behind"
    print(f"kill points (logged step reached): {kill_at}, killed {killed} times")
