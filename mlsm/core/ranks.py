"""Which process this is among those sharing one job: the one rank abstraction of stages and training.

A process is launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK and a rendezvous; collectives go
through torch.distributed), or named by flags as one of several separate jobs (`--worker-index i
--num-workers n`: no collectives, the shared folder and the workers' records coordinate them), or
it is the only one. Training joins with NCCL on GPUs and gloo on CPUs (so tests run two processes
on a laptop); preprocessing stages only ever need barriers, so they use gloo whatever the device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mlsm.core.config import worker_flag_problems
from mlsm.core.errors import MLSMError
from mlsm.core.layout import worker_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    index: int = 0
    count: int = 1
    local: int = 0  # LOCAL_RANK: this process's GPU on its node
    launched: bool = False  # by torchrun: barriers and reductions go through torch.distributed
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def active(self) -> bool:
        """Whether collectives are needed (and possible): several processes under torchrun."""
        return self.launched and self.count > 1

    @property
    def name(self) -> str:
        return worker_name(self.index, self.count)

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place, returned for chaining); asynchronous on GPU."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a small picklable value: a path, a step, an error text)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.count
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


ONE_PROCESS = Rank()  # the default: a single process, no collectives


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join(device: torch.device | None = None, index: int | None = None, count: int | None = None,
         timeout: timedelta | None = None) -> Rank:
    """This process's rank: torchrun's, joining its process group (NCCL for a CUDA `device`, else
    gloo); else the explicit `index` of `count` separate jobs; else the only one."""
    if launched_by_torchrun():
        if index is not None or count is not None:
            raise MLSMError("under torchrun each rank takes its share from RANK/WORLD_SIZE; "
                            "drop --worker-index/--num-workers.")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if dist.is_initialized():
            return Rank(dist.get_rank(), dist.get_world_size(), local, launched=True)
        cuda = device is not None and device.type == "cuda"
        backend = "nccl" if cuda else "gloo"
        if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
            raise MLSMError(f"this torch build has no {backend} backend; run one process, or install a torch with it.")
        kwargs = {"timeout": timeout} if timeout is not None else {}
        if cuda:
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        log.info("DDP: rank %d of %d (%s)", rank, world, backend)
        return Rank(rank, world, local, launched=True, owns_group=True)
    problems = worker_flag_problems(index, count)
    if problems:
        raise MLSMError(problems[0] + ".")
    return ONE_PROCESS if count is None else Rank(index, count)
