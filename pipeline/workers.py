"""How extract and sparse-code split their shards among processes, and who merges the result.

Shard j of a stage belongs to worker j mod n. A worker is a `core.ranks.Rank`: given explicitly
(`--worker-index i --num-workers n`, e.g. one job per node of a cluster scheduler) or taken from
torchrun's RANK / WORLD_SIZE. Every worker records what it finished in its own file, so no two
processes ever write the same file; the worker that finds all shards done merges them. No lock is
taken: a merge writes under a temp name and renames, and two merges at once write the same bytes.
Re-running any worker after its work is done only retries the merge.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from mlsm.core.errors import MLSMError
from mlsm.core.layout import MANIFEST
from mlsm.core.manifest import prepare_stage
from mlsm.core.ranks import Rank

log = logging.getLogger(__name__)

# Rank 0 may learn the dictionary (hours at paper scale) while the other ranks wait at a barrier.
BARRIER_TIMEOUT = timedelta(hours=48)


def merge_once(folder: Path, stage: str, merge: Callable[[], dict | None]) -> dict | None:
    """The finished manifest, or `merge()` (which writes it, or returns None while work is missing).

    Safe to call from every worker at any time, with no lock (many cluster filesystems do not
    honour flock): merge() renames whole files into place, and two workers merging at once write
    the same bytes, so the second rename changes nothing.
    """
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        done = json.loads((folder / MANIFEST).read_text())
        if done.get("complete"):
            return done
    return merge()


def prepare_shared_stage(worker: Rank, out_dir: Path, stage: str, params: dict, inputs: dict, force: bool,
                         outputs: list[str]) -> tuple[str, dict | None]:
    """prepare_stage for one of several workers sharing out_dir: only one of them may clear it."""
    if force and worker.count > 1 and not worker.launched:
        raise MLSMError(f"--force with --num-workers {worker.count} would let one worker delete the others' work. "
                        f"Remove {out_dir} first, or launch the workers with torchrun (rank 0 clears it).")
    if worker.launched and worker.index != 0:
        worker.barrier()  # rank 0 has cleared (--force) and checked the folder
        force = False
    try:
        return prepare_stage(out_dir, stage, params, inputs, force, outputs)
    finally:
        if worker.launched and worker.index == 0:
            worker.barrier()


def read_records(folder: Path) -> list[dict]:
    """Every worker's record (JSON written atomically by that worker alone)."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("worker-*.json"))]


def missing_workers(records: list[dict], worker: Rank, final: Callable[[dict], bool]) -> list[int]:
    """Workers of this split (same count as `worker`) without a final record: the merge waits for them.

    Files on disk alone do not say a worker is done: it may have written its last shard but not
    yet its record, and a merge then would misstate who did what. Records of an earlier split
    (another count) do not count here; the shards they finished are honoured all the same.
    """
    have = {r["worker"] for r in records if r.get("workers") == worker.count and final(r)}
    return [i for i in range(worker.count) if i not in have]
