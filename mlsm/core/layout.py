"""The names of the files and folders the stages write, and the fingerprint that ties codes to a dictionary.

Every stage folder holds manifest.json when complete (progress.json while working); see DESIGN.md §2.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
WORKERS_DIR = "workers"  # one record per worker: what it finished
PARTS_DIR = "parts"  # per-shard code files before codes.h5 is assembled
TOKENIZER_DIR = "tokenizer"  # the auxiliary model's tokenizer, copied next to the data it tokenized
DICTIONARY = "dictionary.h5"
CODES = "codes.h5"
TOKENS = "tokens.h5"
SHARD_GLOB = "shard-*.parquet"

_STEP_RE = re.compile(r"^step-(\d+)$")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def part_name(index: int) -> str:
    return f"part-{index:05d}.h5"


def worker_name(index: int, count: int) -> str:
    return f"worker-{index:03d}-of-{count:03d}"


def step_name(step: int) -> str:
    """A checkpoint folder of a run: step-0001500."""
    return f"step-{step:07d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name, or None if it is not one."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def dictionary_fingerprint(D) -> str:
    """sha256 of the dictionary's float32 bytes: codes.h5 records it, consumers check it."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(D), dtype=np.float32).tobytes()).hexdigest()
