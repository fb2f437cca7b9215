"""Two processes under torchrun (gloo, CPU) train exactly what one process trains on the same global batch.

The test launches this file itself with `python -m torch.distributed.run`; the `__main__` block
below is the worker each rank runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsm.core.config import PretrainConfig
from mlsm.trainer.train import run_pretrain
from tests.test_data import make_dataset

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    args = dict(data=data, out_dir=out, steps=4, batch_size=16, lr=1e-2, warmup=0.25, model_overrides=NO_DROPOUT,
                mlm_weight=1.0, max_len=16, log_every=1, save_every=2, device="cpu", progress=False,
                milestones=False,  # checkpoints only where a test asks for them
                precision="fp32")  # exact arithmetic on any CPU (auto is bf16 where it is native)
    args.update(kw)
    return PretrainConfig(**args)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_gloo_processes_match_one(tmp_path):
    data = make_dataset(tmp_path / "data", n_seq=120)
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks do; restored so later tests keep their threads
    try:
        run_pretrain(_cfg(data, one))
    finally:
        torch.set_num_threads(threads)

    two = tmp_path / "two"
    proc = _torchrun(2, str(data), str(two), "2")  # 2 ranks x 2 micro-batches of 4 = the same 16 sequences
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr, "the worker did not run under DDP"

    for step in (2, 4):
        a = load_file(one / f"step-{step:07d}" / "model.safetensors")
        b = load_file(two / f"step-{step:07d}" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-5, msg=k)
    # The loss is the global batch's mean, not rank 0's share of it.
    for x, y in zip(_metrics(one), _metrics(two), strict=True):
        assert (x["targets"], x["masked_tokens"]) == (y["targets"], y["masked_tokens"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    state = torch.load(two / "step-0000004" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]["per_rank"]) == 2
    assert not (two / "step-0000004" / "trainer_state.pt.1").exists()
    assert sorted(p.name for p in two.iterdir()) == ["metrics.jsonl", "run.json", "step-0000002", "step-0000004"]


if __name__ == "__main__":  # one rank of the torchrun launch above
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    data_path, out_path, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run_pretrain(_cfg(Path(data_path), Path(out_path), grad_accum=accum))
