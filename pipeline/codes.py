"""Storage of the student's training set: the token stream and the CSR sparse codes (HDF5).

Layout (DESIGN §2.3), shared by `codes.h5` and the codes-less `tokens.h5`:
  /tokens int32 [N], /seq_offsets int64 [S+1],
  /codes/indptr int64 [N+1], /codes/indices uint16 [nnz], /codes/values float16|float32 [nnz].

Work is written as one part file per input shard (each atomic), then merged into the final
file (atomic too). Parts make the stage resumable after a kill and let workers code shards in
parallel; the merge is a sequential copy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from mlsm.core.errors import MLSMError
from mlsm.core.manifest import atomic_path

log = logging.getLogger(__name__)

CHUNK = 1 << 16
COMPRESSION = dict(compression="gzip", compression_opts=1, shuffle=True)


def _dataset(group, name, dtype, data=None):
    ds = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK,), **COMPRESSION)
    if data is not None and len(data):
        _append(ds, data)
    return ds


def _append(ds, data) -> None:
    n = ds.shape[0]
    ds.resize((n + len(data),))
    ds[n:] = data


def dense_to_csr(codes: np.ndarray, value_dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, K) non-negative dense codes → (counts per row, indices uint16, values)."""
    rows, cols = np.nonzero(codes)
    counts = np.bincount(rows, minlength=codes.shape[0]).astype(np.int64)
    return counts, cols.astype(np.uint16), codes[rows, cols].astype(value_dtype)


def _rank_in_row(row_counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each stored value, its rank (0 = largest) among the values of its row."""
    rows = np.repeat(np.arange(len(row_counts)), row_counts)
    order = np.lexsort((-values.astype(np.float64), rows))
    starts = np.repeat(np.cumsum(row_counts) - row_counts, row_counts)
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - starts
    return rank


def top_k_codes(row_counts: np.ndarray, indices: np.ndarray, values: np.ndarray, k: int):
    """Keep each row's k largest values (ties: lower atom index first), atom order preserved.

    The raw values are kept: the target t = a / sum(a) is thereby renormalised over the kept atoms.
    """
    keep = _rank_in_row(row_counts, values) < k
    rows = np.repeat(np.arange(len(row_counts)), row_counts)
    return np.bincount(rows[keep], minlength=len(row_counts)).astype(np.int64), indices[keep], values[keep]


def truncation_kl(row_counts: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Per row with a target, KL(t_k || t) between the top-k renormalised target and the full one.

    With t_k = t restricted to the kept atoms and rescaled by 1/m (m = kept mass of t), the KL is
    exactly -log m. (KL(t || t_k) is infinite whenever an atom is dropped.)
    """
    v = values.astype(np.float64)
    rows = np.repeat(np.arange(len(row_counts)), row_counts)
    total = np.bincount(rows, weights=v, minlength=len(row_counts))
    kept = np.bincount(rows, weights=np.where(_rank_in_row(row_counts, values) < k, v, 0.0), minlength=len(row_counts))
    has = total > 0
    return np.log(total[has] / kept[has])


def write_part(
    path: Path,
    tokens: np.ndarray,
    seq_lengths: np.ndarray,
    row_counts: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    values: np.ndarray | None = None,
    rel_gap: np.ndarray | None = None,
    attrs: dict | None = None,
) -> None:
    """One shard's worth of tokens (and codes), written atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=tokens.astype(np.int32))
            f.create_dataset("seq_lengths", data=seq_lengths.astype(np.int64))
            if row_counts is not None:
                f.create_dataset("row_counts", data=row_counts.astype(np.int64))
                f.create_dataset("indices", data=indices)
                f.create_dataset("values", data=values)
            if rel_gap is not None:
                f.create_dataset("rel_gap", data=rel_gap.astype(np.float32))
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            f.flush()
            os.fsync(f.id.get_vfd_handle())  # a part may be the only copy once its hidden states are deleted


def part_rows(path: Path) -> int | None:
    """Tokens in a part file that opens and reads back, else None: a resume redoes a damaged part."""
    try:
        with h5py.File(path, "r") as f:
            return int(f["tokens"].shape[0])
    except (OSError, KeyError) as e:
        if Path(path).exists():
            log.warning("%s is damaged (%s); it will be made again", path, e)
        return None


def read_part_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


def merge_parts(parts: Iterable[Path], out_path: Path, attrs: dict, value_dtype=np.float32) -> dict:
    """Concatenate part files into the final HDF5 file; returns counts and gap statistics."""
    parts = list(parts)
    gaps = []
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as out:
            tokens = _dataset(out, "tokens", np.int32)
            offsets = _dataset(out, "seq_offsets", np.int64, np.zeros(1, np.int64))
            with_codes = False
            with h5py.File(parts[0], "r") as first:
                with_codes = "row_counts" in first
            if with_codes:
                g = out.create_group("codes")
                indptr = _dataset(g, "indptr", np.int64, np.zeros(1, np.int64))
                indices = _dataset(g, "indices", np.uint16)
                values = _dataset(g, "values", value_dtype)
            n_tok = n_nnz = zero_rows = 0
            for p in parts:
                with h5py.File(p, "r") as f:
                    t = f["tokens"][:]
                    _append(tokens, t)
                    _append(offsets, n_tok + np.cumsum(f["seq_lengths"][:]))
                    if with_codes:
                        counts = f["row_counts"][:]
                        _append(indptr, n_nnz + np.cumsum(counts))
                        _append(indices, f["indices"][:])
                        _append(values, f["values"][:].astype(value_dtype))
                        n_nnz += int(counts.sum())
                        zero_rows += int(np.count_nonzero(counts == 0))
                    if "rel_gap" in f:
                        gaps.append(f["rel_gap"][:])
                    n_tok += len(t)
            stats = {"tokens": n_tok, "sequences": int(offsets.shape[0] - 1)}
            if with_codes:
                stats.update(nnz=n_nnz, zero_rows=zero_rows)
            if gaps:
                g_all = np.concatenate(gaps)
                stats.update(
                    gap_mean=float(g_all.mean()),
                    gap_p99=float(np.quantile(g_all, 0.99)),
                    gap_max=float(g_all.max()),
                )
            for k, v in {**attrs, **{k: v for k, v in stats.items()}}.items():
                out.attrs[k] = v
    stats["bytes"] = os.path.getsize(out_path)
    return stats


def open_codes(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise MLSMError(f"{path} is not a readable HDF5 file ({e}). Re-run `mlsm sparse-code --force`.") from e
