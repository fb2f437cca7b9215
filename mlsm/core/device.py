"""Which device a process computes on, the one rule for every stage (extract, sparse-code, pretrain).

Under torchrun each rank owns one GPU: LOCAL_RANK picks it, so `--device auto` (or plain `cuda`)
never puts two ranks of one node on the same card.
"""

from __future__ import annotations

import os

import torch

from mlsm.core.errors import MLSMError


def local_rank() -> int | None:
    """This process's rank on its node when launched by torchrun, else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def pick_device(name: str = "auto") -> torch.device:
    """auto -> cuda when torch sees a GPU, else cpu; 'cuda' without an index -> this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MLSMError(f"device {name!r} was asked for but torch sees no CUDA device; use --device cpu or auto.")
        if dev.index is None:
            rank = local_rank()
            dev = torch.device("cuda", rank % torch.cuda.device_count() if rank is not None else 0)
        if dev.index >= torch.cuda.device_count():
            raise MLSMError(f"device {name!r}: torch sees only {torch.cuda.device_count()} GPU(s).")
        torch.cuda.set_device(dev)
    return dev
