"""Which device a process computes on, the one rule for every stage (extract, sparse-code, pretrain).

Under torchrun each rank owns one GPU: LOCAL_RANK picks it, so `--device auto` (or plain `cuda`)
never puts two ranks of one node on the same card.
"""

from __future__ import annotations

import logging
import os

import torch

from mlsm.core.errors import MLSMError

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- precision

# CPU flags (Linux /proc/cpuinfo) of a native bfloat16 matmul: Intel AMX and AVX512-BF16, AMD Zen 4+
# AVX512-BF16, Arm's BF16 extension. Without one, torch emulates bf16 and runs slower than float32.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere, which reads as "no native bf16")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device, flags: frozenset[str] | None = None, capability: str | None = None) -> bool:
    """Whether bf16 matmuls run natively here. flags/capability default to this machine's (tests inject them).

    On CPU both must agree: the CPU has a bf16 instruction set (flags) and torch's kernels were built
    for a vector width that uses it (capability: AVX512 on x86; any on Arm, whose BF16 is its own flag).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if flags & {"amx_bf16", "avx512_bf16"}:
        return capability.upper().startswith("AVX512")
    return "bf16" in flags and not capability.upper().startswith("AVX")


def resolve_precision(name: str, device: torch.device, flags: frozenset[str] | None = None,
                      capability: str | None = None) -> str:
    """auto|bf16|fp32 -> bf16|fp32: auto is bf16 where it is native, fp32 elsewhere (emulated bf16 is slower)."""
    if name not in ("auto", "bf16", "fp32"):
        raise MLSMError(f"precision {name!r} is not one of auto, bf16, fp32.")
    if name == "fp32":
        return "fp32"
    native = native_bf16(device, flags, capability)
    if name == "bf16" and not native:
        log.warning("--precision bf16 on %s: this %s has no native bfloat16 matmul, so torch emulates it; it works "
                    "but runs slower than fp32 (auto picks fp32 here).", device,
                    "CPU" if device.type == "cpu" else "device")
    return "bf16" if name == "bf16" or native else "fp32"
