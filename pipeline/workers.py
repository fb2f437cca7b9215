"""How extract and sparse-code split their shards among processes, and who merges the result.

Shard j of a stage belongs to worker j mod n. A worker is either given explicitly
(`--shard-index i --num-shards n`, e.g. one job per node of a cluster scheduler) or taken from
torchrun's RANK / WORLD_SIZE. Every worker records what it finished in its own file, so no two
processes ever write the same file; the worker that finds all shards done merges them, under an
exclusive lock on `merge.lock` (an OS lock, released if the process dies, so a killed merge never
blocks the next try). Re-running any worker after its work is done only retries the merge.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

from mlsm.core.errors import MLSMError

log = logging.getLogger(__name__)

# Rank 0 may learn the dictionary (hours at paper scale) while the other ranks wait at a barrier.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Worker:
    index: int
    count: int
    distributed: bool = False  # launched by torchrun: barriers go through torch.distributed

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    @property
    def name(self) -> str:
        return f"worker-{self.index:03d}-of-{self.count:03d}"

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def resolve_worker(shard_index: int | None, num_shards: int | None) -> Worker:
    """The worker this process is: explicit flags, else torchrun's environment, else the only one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if shard_index is not None or num_shards is not None:
            raise MLSMError("under torchrun each rank takes its share from RANK/WORLD_SIZE; "
                            "drop --shard-index/--num-shards.")
        rank = int(os.environ["RANK"])
        _init_process_group()
        return Worker(rank, world, distributed=True)
    if (shard_index is None) != (num_shards is None):
        raise MLSMError("--shard-index and --num-shards go together (e.g. --shard-index 0 --num-shards 4).")
    if num_shards is None:
        return Worker(0, 1)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise MLSMError(f"--shard-index must be in 0..{num_shards - 1} and --num-shards >= 1 "
                        f"(got {shard_index} of {num_shards}).")
    return Worker(shard_index, num_shards)


def _init_process_group() -> None:
    """gloo is enough: ranks only exchange barriers, the data goes through the shared folder."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)


def finish(worker: Worker) -> None:
    if worker.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def merge_lock(folder: Path) -> Iterator[bool]:
    """Yield True if this process holds the folder's merge lock, False if another one does."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "merge.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_once(folder: Path, stage: str, merge: Callable[[], dict | None]) -> dict | None:
    """Run `merge` (which writes the stage's manifest, or returns None while work is missing) at most once.

    Safe to call from every worker at any time: one merges under the folder's lock; the others
    see the lock (None) or the finished manifest.
    """
    from mlsm.core.manifest import MANIFEST

    folder = Path(folder)
    with merge_lock(folder) as mine:
        if not mine:
            log.info("%s: another worker is merging %s", stage, folder)
            return None
        if (folder / MANIFEST).exists():
            done = json.loads((folder / MANIFEST).read_text())
            if done.get("complete"):
                return done
        return merge()


def prepare_shared_stage(worker: Worker, out_dir: Path, stage: str, params: dict, inputs: dict, force: bool,
                         outputs: list[str]) -> tuple[str, dict | None]:
    """prepare_stage for one of several workers sharing out_dir: only one of them may clear it."""
    from mlsm.core.manifest import prepare_stage

    if force and worker.count > 1 and not worker.distributed:
        raise MLSMError(f"--force with --num-shards {worker.count} would let one worker delete the others' work. "
                        f"Remove {out_dir} first, or launch the workers with torchrun (rank 0 clears it).")
    if worker.distributed and worker.index != 0:
        worker.barrier()  # rank 0 has cleared (--force) and checked the folder
        force = False
    try:
        return prepare_stage(out_dir, stage, params, inputs, force, outputs)
    finally:
        if worker.distributed and worker.index == 0:
            worker.barrier()


def read_records(folder: Path) -> list[dict]:
    """Every worker's record (JSON written atomically by that worker alone)."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("worker-*.json"))]


def missing_workers(records: list[dict], worker: Worker, final: Callable[[dict], bool]) -> list[int]:
    """Workers of this split (same count as `worker`) without a final record: the merge waits for them.

    Files on disk alone do not say a worker is done: it may have written its last shard but not
    yet its record, and a merge then would misstate who did what. Records of an earlier split
    (another count) do not count here; the shards they finished are honoured all the same.
    """
    have = {r["worker"] for r in records if r.get("workers") == worker.count and final(r)}
    return [i for i in range(worker.count) if i not in have]
