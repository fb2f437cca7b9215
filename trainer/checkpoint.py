"""A run's checkpoints: saving them, finding the one to resume from, and restoring a run's state.

A checkpoint is a folder `step-XXXXXXX/` (core/layout.py) holding a Hugging Face model directory
(config.json, model.safetensors, tokenizer files) plus trainer_state.pt: optimizer, RNG states
(per rank under DDP), the data position and the counters of skipped steps. It is written under a
temporary name and renamed when complete, with checksums of its files written last; a checkpoint
damaged on disk later is noticed on resume, renamed aside (`damaged-step-...`, kept, never
loaded), and the previous one is used. Resuming from it is bit-identical on CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from mlsm.core import hf, manifest
from mlsm.core.layout import step_name, step_of
from mlsm.core.ranks import Rank

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
_DAMAGED = "damaged-"  # prefix a checkpoint that fails its checksums is renamed to


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rng(rng: dict, rank: Rank, device: torch.device) -> None:
    per_rank = rng.get("per_rank")
    if per_rank is not None and len(per_rank) == rank.count:
        rng = per_rank[rank.index]
    elif rank.index > 0:
        log.warning("the checkpoint holds RNG states for %s processes, this run has %d: dropout on rank %d "
                    "will differ from an uninterrupted run", len(per_rank or [0]), rank.count, rank.index)
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        cuda_state = rng["cuda"]
        if isinstance(cuda_state, (list, tuple)):  # written by get_rng_state_all
            cuda_state = cuda_state[device.index or 0]
        torch.cuda.set_rng_state(cuda_state, device)


def _load_problem(ck_dir: Path) -> str | None:
    """For checkpoints written before checksums existed: can its files be read at all?"""
    from safetensors.torch import load_file

    try:
        load_file(ck_dir / hf.SAFETENSORS)
        torch.load(ck_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
        json.loads((ck_dir / hf.CONFIG).read_text())
    except Exception as e:  # any damage: a cut file raises all sorts of errors
        return f"it cannot be read ({type(e).__name__}: {str(e)[:200]})"
    return None


class Checkpoints:
    """The step-XXXXXXX/ checkpoints of one run folder.

    keep_last > 0 keeps only that many periodic checkpoints; the steps in `keep` (milestones and
    the last step) are always kept.
    """

    def __init__(self, out_dir: Path, keep_last: int = 0, keep: set[int] = frozenset()):
        self.out_dir = Path(out_dir)
        self.keep_last = keep_last
        self.keep = set(keep)

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (they are written atomically, so present = complete)."""
        found = []
        if self.out_dir.is_dir():
            for sub in self.out_dir.iterdir():
                step = step_of(sub.name)
                if step is not None and sub.is_dir() and all(
                    (sub / f).is_file() for f in (TRAINER_STATE, hf.SAFETENSORS, hf.CONFIG)
                ):
                    found.append((step, sub))
        return sorted(found)

    def remove_stale(self) -> None:
        """Temp folders of saves a kill interrupted (the inner one of save_model_dir too)."""
        for stale in self.out_dir.glob(".*step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def latest_good(self) -> tuple[int, Path] | None:
        """The newest checkpoint whose files are intact. Damaged newer ones are renamed aside."""
        for step, path in reversed(self.complete()):
            problem = manifest.checksum_problem(path)
            if problem is None and not (path / manifest.CHECKSUMS).is_file():
                problem = _load_problem(path)
            if problem is None:
                return step, path
            aside = path.with_name(_DAMAGED + path.name)
            n = 1
            while aside.exists():
                aside, n = path.with_name(f"{_DAMAGED}{n}-{path.name}"), n + 1
            path.rename(aside)
            log.warning("checkpoint %s is damaged: %s. Moved it to %s; falling back to the previous checkpoint.",
                        path, problem, aside.name)
        return None

    def save(self, step: int, model, state: dict, tok_dir: Path, extra: dict, rank: Rank) -> Path:
        """Write step-XXXXXXX/ (rank 0; every rank must call it: the RNG states are gathered)."""
        final = self.out_dir / step_name(step)
        device = next(model.parameters()).device
        per_rank = rank.gather_object(rng_state(device))
        if not rank.is_main:
            return final
        state = {**state, "step": step, "world_size": rank.count,
                 "rng": {**per_rank[0], "per_rank": per_rank if rank.count > 1 else None}}
        extra["mlsm"]["step"] = step
        with manifest.atomic_path(final) as tmp:
            hf.save_model_dir(tmp, model.config, {**model.encoder_state_dict(), **model.head_state_dict()}, tok_dir,
                              extra_json=extra)
            torch.save(state, tmp / TRAINER_STATE)
            manifest.write_checksums(tmp)
        log.info("saved %s", final)
        if self.keep_last > 0:
            periodic = [p for s, p in self.complete() if s not in self.keep]
            for p in periodic[: -self.keep_last]:
                shutil.rmtree(p, ignore_errors=True)
        return final

    @staticmethod
    def restore(ck_dir: Path, opt: torch.optim.Optimizer, batches, rank: Rank, device: torch.device) -> dict:
        """Load optimizer, data position and this rank's RNG state; returns the saved trainer state."""
        state = torch.load(Path(ck_dir) / TRAINER_STATE, map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        _restore_rng(state["rng"], rank, device)
        return state
