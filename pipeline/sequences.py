"""Corpus documents → packed `[CLS] ... [SEP]` token sequences, shared by extract and tokenize.

Packing is deterministic (same corpus, tokenizer and max_len give the same sequences in the same
order), which is what lets an interrupted stage skip the sequences it already finished.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)


def pack_documents(
    documents: Iterable[list[str]],
    tokenizer,
    max_len: int,
    cls_id: int,
    sep_id: int,
    lines_per_batch: int = 4096,
) -> Iterator[np.ndarray]:
    """Yield int32 sequences of at most max_len tokens, packing consecutive lines of one document.

    Lines are tokenized in large batches through the fast tokenizer's batch API (its Rust
    thread pool), so tokenization never starves the model. A line longer than a sequence is
    split into full-length chunks; sequences never cross document boundaries.
    """
    if max_len < 3:
        raise ValueError("max_len must leave room for [CLS], [SEP] and one token")
    cap = max_len - 2
    pending: list[list[str]] = []
    n_lines = 0
    for doc in documents:
        pending.append(doc)
        n_lines += len(doc)
        if n_lines >= lines_per_batch:
            yield from _pack_batch(pending, tokenizer, cap, cls_id, sep_id)
            pending, n_lines = [], 0
    if pending:
        yield from _pack_batch(pending, tokenizer, cap, cls_id, sep_id)


def _pack_batch(docs, tokenizer, cap, cls_id, sep_id) -> Iterator[np.ndarray]:
    flat = [line for doc in docs for line in doc]
    encodings = tokenizer.encode_batch(flat, add_special_tokens=False)
    i = 0
    for doc in docs:
        current: list[int] = []
        for enc in encodings[i : i + len(doc)]:
            ids = enc.ids
            if len(current) + len(ids) <= cap:
                current.extend(ids)
                continue
            if current:
                yield _wrap(current, cls_id, sep_id)
            while len(ids) > cap:
                yield _wrap(ids[:cap], cls_id, sep_id)
                ids = ids[cap:]
            current = list(ids)
        if current:
            yield _wrap(current, cls_id, sep_id)
        i += len(doc)


def _wrap(ids: list[int], cls_id: int, sep_id: int) -> np.ndarray:
    out = np.empty(len(ids) + 2, dtype=np.int32)
    out[0] = cls_id
    out[1:-1] = ids
    out[-1] = sep_id
    return out


def limit_tokens(sequences: Iterable[np.ndarray], max_tokens: int | None) -> Iterator[np.ndarray]:
    """Stop at the first sequence that would pass max_tokens (a slice of the corpus for quick runs)."""
    total = 0
    for seq in sequences:
        if max_tokens is not None and total + len(seq) > max_tokens:
            return
        total += len(seq)
        yield seq


def shard_bounds(seq_lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """(first, end) sequence ids of each shard: the cuts `extract.cut_shards` makes on the same stream.

    A shard closes at the first sequence that brings it to >= shard_tokens, so the cuts follow from
    the sequence lengths alone: a reader of the packed stream finds them without tokenizing.
    """
    cum = np.cumsum(np.asarray(seq_lengths, dtype=np.int64))
    bounds, first, base = [], 0, 0
    while first < len(cum):
        end = min(int(np.searchsorted(cum, base + shard_tokens, side="left")) + 1, len(cum))
        bounds.append((first, end))
        first, base = end, int(cum[end - 1])
    return bounds
