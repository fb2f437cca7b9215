"""DDP under torchrun: which process this is, and the few collectives the training loop needs.

`torchrun --nproc_per_node N -m mlsm.cli pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous address; without them the run is a single process and every helper here is a no-op.
NCCL drives GPUs, gloo drives CPUs (so tests can run two processes on a laptop).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlsm.core.errors import MLSMError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> DistInfo:
    """Join the torchrun group if there is one; returns this process's place in it."""
    if not launched_by_torchrun():
        return DistInfo()
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        raise MLSMError(f"this torch build has no {backend} backend; run one process, or install a torch with it.")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            **({"device_id": torch.device("cuda", local_rank)} if device.type == "cuda" else {}))
    log.info("DDP: rank %d of %d (%s)", rank, world_size, backend)
    return DistInfo(rank, world_size, local_rank, owns_group=True)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and info.active:
        return torch.device("cuda", info.local_rank)
    return device


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (in place, returned for chaining); asynchronous on GPU."""
    if info.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank (a small picklable value: a path, a step, an error text)."""
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.active:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
