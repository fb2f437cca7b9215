"""The code store: the student's training set (token stream + CSR sparse codes, HDF5), written,
read and checked here and nowhere else.

Layout (DESIGN §2.3), shared by `codes.h5` and the codes-less `tokens.h5`:
  /tokens int32 [N], /seq_offsets int64 [S+1],
  /codes/indptr int64 [N+1], /codes/indices uint16 [nnz], /codes/values float16|float32 [nnz].

Writing: one part file per input shard (each atomic); finalizing then writes codes.h5 (atomic too)
as HDF5 virtual datasets over the parts, copying no code array, or, for tokens.h5 and
`mlsm finalize --merge`, as one self-contained file. Parts make the stage resumable after a kill
and let workers code shards in parallel.
Reading: `TokenData` opens a training set; `check_codes_file` ties a codes.h5 to the manifest and
dictionary next to it, which files copied between folders can break.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from mlsm.core.errors import MLSMError
from mlsm.core.layout import DICTIONARY, MANIFEST, dictionary_fingerprint
from mlsm.core.manifest import atomic_path, sha256_json

log = logging.getLogger(__name__)

CHUNK = 1 << 16
# Per-token arrays the loader slices a block of sequences at a time (a few thousand tokens): a
# smaller chunk decompresses less per slice (64k-element chunks cost the loader ~25%).
TOKEN_CHUNK = 1 << 13
COMPRESSION = dict(compression="gzip", compression_opts=1, shuffle=True)


def _dataset(group, name, dtype, data=None, chunk=CHUNK):
    ds = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,), **COMPRESSION)
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
    """One shard's worth of tokens (and codes), written atomically and compressed as codes.h5 is:
    the finalized codes.h5 reads its arrays from the parts."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _dataset(f, "tokens", np.int32, tokens, TOKEN_CHUNK)
            _dataset(f, "seq_lengths", np.int64, seq_lengths)
            if row_counts is not None:
                _dataset(f, "row_counts", np.int64, row_counts)
                _dataset(f, "indices", indices.dtype, indices)
                _dataset(f, "values", values.dtype, values)
            if rel_gap is not None:
                _dataset(f, "rel_gap", np.float32, rel_gap)
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


class _GapStats:
    """Mean, max and p99 of the certified gaps, part by part: memory stays fixed whatever the corpus.

    p99 is the upper edge of its bin in a log10 histogram of 0.01 decades (at most 2.3% above the
    exact quantile); gaps below 1e-12 share the first bin.
    """

    EDGES = np.concatenate([[0.0], 10.0 ** np.arange(-12, 2.001, 0.01)])

    def __init__(self):
        self.n, self.total, self.max = 0, 0.0, 0.0
        self.hist = np.zeros(len(self.EDGES), dtype=np.int64)

    def add(self, gaps: np.ndarray) -> None:
        g = gaps.astype(np.float64)
        self.n += len(g)
        self.total += float(g.sum())
        self.max = max(self.max, float(g.max(initial=0.0)))
        bins = np.minimum(np.searchsorted(self.EDGES, g, side="left"), len(self.EDGES) - 1)
        self.hist += np.bincount(bins, minlength=len(self.EDGES))

    def as_dict(self) -> dict:
        if not self.n:
            return {}
        k = int(np.searchsorted(np.cumsum(self.hist), 0.99 * self.n, side="left"))
        return {"gap_mean": self.total / self.n, "gap_p99": float(min(self.EDGES[k], self.max)), "gap_max": self.max}


# Fill values of the virtual datasets where a part is missing: a token id and an atom index no
# reader accepts (TokenData also refuses to open a file whose parts are not all there).
_MISSING_TOKEN, _MISSING_ATOM = -1, np.iinfo(np.uint16).max


def merge_parts(parts: Iterable[Path], out_path: Path, attrs: dict, value_dtype=np.float32,
                copy: bool = True) -> dict:
    """Assemble part files into the final HDF5 file (atomic); returns counts and gap statistics.

    copy=False writes only /seq_offsets and /codes/indptr (rebased over the parts); /tokens,
    /codes/indices and /codes/values are HDF5 virtual datasets over the parts (relative paths: the
    folder moves as a whole), so finalizing copies nothing of the codes. copy=True writes a
    self-contained file, as tokenize does for tokens.h5 (4 B/token).
    """
    parts = [Path(p) for p in parts]
    out_path = Path(out_path)
    gaps = _GapStats()
    sizes: list[tuple[int, int]] = []  # (tokens, nonzeros) per part
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as out:
            offsets = _dataset(out, "seq_offsets", np.int64, np.zeros(1, np.int64), TOKEN_CHUNK)
            tokens = _dataset(out, "tokens", np.int32, chunk=TOKEN_CHUNK) if copy else None
            with h5py.File(parts[0], "r") as first:
                with_codes = "row_counts" in first
                index_dtype = first["indices"].dtype if with_codes else None
            if with_codes:
                g = out.create_group("codes")
                indptr = _dataset(g, "indptr", np.int64, np.zeros(1, np.int64), TOKEN_CHUNK)
                if copy:
                    indices, values = _dataset(g, "indices", np.uint16), _dataset(g, "values", value_dtype)
            n_tok = n_nnz = zero_rows = max_token = 0
            for p in parts:
                with h5py.File(p, "r") as f:
                    t = f["tokens"][:]
                    _append(offsets, n_tok + np.cumsum(f["seq_lengths"][:]))
                    max_token = max(max_token, int(t.max(initial=0)))
                    nnz = 0
                    if with_codes:
                        counts = f["row_counts"][:]
                        nnz = int(counts.sum())
                        _append(indptr, n_nnz + np.cumsum(counts))
                        zero_rows += int(np.count_nonzero(counts == 0))
                        if f["values"].dtype != value_dtype or f["indices"].dtype != index_dtype:
                            raise MLSMError(f"{p} stores {f['values'].dtype} values, not {np.dtype(value_dtype)}: "
                                            f"it comes from a run with other --values-dtype. Delete it and code "
                                            f"its shard again.")
                    if copy:
                        _append(tokens, t)
                        if with_codes:
                            _append(indices, f["indices"][:])
                            _append(values, f["values"][:].astype(value_dtype))
                    if "rel_gap" in f:
                        gaps.add(f["rel_gap"][:])
                    sizes.append((len(t), nnz))
                    n_tok += len(t)
                    n_nnz += nnz
            if not copy:
                _virtual(out, "tokens", parts, out_path.parent, "tokens", [s[0] for s in sizes], np.int32,
                         _MISSING_TOKEN)
                if with_codes:
                    nnzs = [s[1] for s in sizes]
                    _virtual(out, "codes/indices", parts, out_path.parent, "indices", nnzs, index_dtype, _MISSING_ATOM)
                    _virtual(out, "codes/values", parts, out_path.parent, "values", nnzs, value_dtype, 0)
            stats = {"tokens": n_tok, "sequences": int(offsets.shape[0] - 1), "max_token_id": max_token}
            if with_codes:
                stats.update(nnz=n_nnz, zero_rows=zero_rows)
            stats.update(gaps.as_dict())
            for k, v in {**attrs, **stats}.items():
                out.attrs[k] = v
    stats["bytes"] = os.path.getsize(out_path) + (0 if copy else sum(os.path.getsize(p) for p in parts))
    return stats


def _virtual(out, name: str, parts: list[Path], folder: Path, source: str, lengths: list[int], dtype, fill) -> None:
    layout = h5py.VirtualLayout(shape=(sum(lengths),), dtype=dtype)
    start = 0
    for p, n in zip(parts, lengths, strict=True):
        if n:
            layout[start:start + n] = h5py.VirtualSource(os.path.relpath(p, folder), source, shape=(n,))
        start += n
    out.create_virtual_dataset(name, layout, fillvalue=fill)


def missing_sources(f: h5py.File) -> list[str]:
    """Source files of a file's virtual datasets that are not there (HDF5 would read fill values)."""
    folder = Path(f.filename).parent
    gone = set()

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for src in obj.virtual_sources():
                if not (folder / src.file_name).is_file():
                    gone.add(src.file_name)

    f.visititems(visit)
    return sorted(gone)


# --------------------------------------------------------------------------- reading


def _plain(v):
    """HDF5 attribute → JSON-able Python value."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


SCAN_ROWS = 1 << 18  # elements per read when a whole dataset must be scanned (1 MB of int32)


class WindowSlices:
    """Tokens (and CSR rows) of a set of sequences held in memory, read by `TokenData.read_window`,
    addressed by global token index (the position in the file's token stream).

    They come as runs of whole sequences: run r is the stream's tokens run_tok_starts[r] ..
    run_tok_ends[r]-1, held as rows run_row_starts[r].. of `tokens` and of the CSR (indptr,
    indices, values). The CSR is None when the window was read without codes.
    """

    def __init__(self, run_tok_starts, run_tok_ends, run_row_starts, tokens, indptr=None, indices=None, values=None):
        self.run_tok_starts, self.run_tok_ends = run_tok_starts, run_tok_ends
        self.run_row_starts = run_row_starts
        self.tokens = tokens
        self.indptr, self.indices, self.values = indptr, indices, values

    @property
    def has_codes(self) -> bool:
        return self.indptr is not None

    def _runs(self, token_index: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.run_tok_starts, token_index, side="right") - 1

    def holds(self, token_index: np.ndarray) -> np.ndarray:
        """Whether each of these stream positions is in the window."""
        token_index = np.asarray(token_index, dtype=np.int64)
        if not len(self.run_tok_ends):
            return np.zeros(token_index.shape, dtype=bool)
        r = self._runs(token_index)
        return (r >= 0) & (token_index < self.run_tok_ends[np.maximum(r, 0)])

    def rows_of(self, token_index: np.ndarray) -> np.ndarray:
        """Rows of `tokens` and of the CSR of these stream positions (which the window must hold)."""
        r = self._runs(token_index)
        return self.run_row_starts[r] + (token_index - self.run_tok_starts[r])


OPEN_PARTS = 8  # part files a reader keeps open at once


class _OpenFiles:
    """The few part files read last, open; the least recently used one is closed for a new one."""

    def __init__(self, limit: int | None = None):
        self.limit, self._files = limit or OPEN_PARTS, OrderedDict()  # path -> (file, {name: dataset})

    def dataset(self, path: Path, name: str) -> h5py.Dataset:
        """The dataset `name` of the part `path`; its handle is kept with the file (a lookup by name
        per slice costs more than small slices do)."""
        entry = self._files.pop(path, None)
        if entry is None:
            if len(self._files) >= self.limit:
                self._files.popitem(last=False)[1][0].close()
            entry = (h5py.File(path, "r"), {})
        self._files[path] = entry
        ds = entry[1].get(name)
        if ds is None:
            ds = entry[1][name] = entry[0][name]
        return ds

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1][0].close()


class SliceReader:
    """Reads slices of a 1-D dataset into given arrays; a virtual one straight from its sources.

    HDF5 keeps every source file of a virtual dataset that it has read from open, each with its own
    caches: about 9 MB and a file descriptor per part (measured: 190 MB after one 4,096-sequence
    window over 13 parts, against 27 MB for the merged file). Over the ~15,000 parts of a 3B-token
    corpus that is memory growing with the corpus and more descriptors than `ulimit -n` allows. So
    the mapping is read once (the virtual dataset's own metadata) and each slice is read from its
    part files, at most OPEN_PARTS of them open at a time.
    """

    def __init__(self, ds: h5py.Dataset, files: _OpenFiles):
        self.ds, self.files, self.sources = ds, files, None
        if not ds.is_virtual:
            return
        folder = Path(ds.file.filename).parent
        rows = []
        for vs in ds.virtual_sources():
            (start,), (stride,), (count,), (block,) = vs.vspace.get_regular_hyperslab()
            if count != 1 and stride != block:
                return  # not one contiguous block: leave it to HDF5
            src = 0
            if vs.src_space.get_select_type() == h5py.h5s.SEL_HYPERSLABS:
                (src,), _, (src_count,), _ = vs.src_space.get_regular_hyperslab()
                if src_count != 1:
                    return
            path = Path(ds.file.filename) if vs.file_name == "." else folder / vs.file_name
            rows.append((start, start + count * block, path, vs.dset_name, src))
        rows.sort(key=lambda r: r[0])
        self.sources = rows
        self._starts = np.array([r[0] for r in rows], dtype=np.int64)

    def read_into(self, out: np.ndarray, lo: int, hi: int, at: int) -> None:
        """out[at:at + hi - lo] = dataset[lo:hi]."""
        if self.sources is None:
            self.ds.read_direct(out, np.s_[lo:hi], np.s_[at:at + hi - lo])
            return
        i = int(np.searchsorted(self._starts, lo, side="right")) - 1
        while lo < hi:
            if i < 0 or i >= len(self.sources) or not self.sources[i][0] <= lo < self.sources[i][1]:
                raise MLSMError(f"{self.ds.file.filename}: {self.ds.name} maps no part file to row {lo}; the file is "
                                "damaged. Re-run `mlsm finalize` on its folder.")
            start, stop, path, name, src = self.sources[i]
            end = min(hi, stop)
            self.files.dataset(path, name).read_direct(out, np.s_[src + lo - start:src + end - start],
                                                   np.s_[at:at + end - lo])
            at, lo, i = at + end - lo, end, i + 1

    def read(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty(hi - lo, dtype=self.ds.dtype)
        self.read_into(out, lo, hi, 0)
        return out


def _mapped_or_loaded(ds: h5py.Dataset, path: Path) -> np.ndarray:
    """A 1-D int64 dataset as a read-only memmap of the file when its bytes lie there as they are
    (contiguous layout, no filters, no external or virtual storage, native int64), else loaded."""
    plain = (not ds.is_virtual and ds.chunks is None and ds.external is None and ds.compression is None
             and ds.id.get_create_plist().get_nfilters() == 0 and ds.dtype == np.dtype(np.int64) and ds.size)
    offset = ds.id.get_offset() if plain else None
    if offset is not None:
        return np.memmap(path, dtype=np.int64, mode="r", offset=offset, shape=ds.shape)
    return ds[:].astype(np.int64, copy=False)


def _step_range(offs: np.ndarray) -> tuple[int, int]:
    """Smallest and largest difference between consecutive offsets, SCAN_ROWS at a time."""
    lo, hi = None, None
    for i in range(0, len(offs) - 1, SCAN_ROWS):
        d = np.diff(offs[i : i + SCAN_ROWS + 1])
        lo = int(d.min()) if lo is None else min(lo, int(d.min()))
        hi = int(d.max()) if hi is None else max(hi, int(d.max()))
    return lo, hi


class TokenData:
    """An opened codes.h5 or tokens.h5; the token stream and the codes are read from disk on demand.

    Memory does not grow with the corpus but for /seq_offsets (8 B per sequence: 1/64 of the stream's
    bytes for 128-token sequences): a read-only memmap of the file when that dataset is stored contiguous and unfiltered,
    loaded into memory otherwise (chunked, compressed or virtual, as `mlsm sparse-code` writes it).
    `read_window` reads the tokens and codes of a set of sequences; /tokens, /codes/* are only ever
    sliced, so they may be virtual datasets over part files.
    """

    def __init__(self, path: str | Path, pad_id: int = 0):
        self.path = Path(path)
        self.pad_id = pad_id
        if not self.path.is_file():
            raise MLSMError(
                f"{self.path} does not exist. Point --data at the codes.h5 written by `mlsm sparse-code` "
                "(or tokens.h5 from `mlsm tokenize` for --objective mlm)."
            )
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise MLSMError(f"{self.path} is not a readable HDF5 file ({e}); re-create it with its stage's --force.") from e
        f = self._f
        for name in ("tokens", "seq_offsets"):
            if name not in f:
                self.close()
                raise MLSMError(f"{self.path} has no /{name}; it is not a training set. Re-run the stage that wrote it.")
        gone = missing_sources(f)  # HDF5 would read fill values in their place
        if gone:
            self.close()
            raise MLSMError(f"{self.path} reads its data from {len(gone)} part file(s) that are gone (e.g. "
                            f"{self.path.parent / gone[0]}). Restore them, or rebuild with the stage's --force.")
        self._tokens = f["tokens"]
        self._parts = _OpenFiles()
        self._read_tokens = SliceReader(self._tokens, self._parts)
        self.seq_offsets = _mapped_or_loaded(f["seq_offsets"], self.path)
        self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        offs = self.seq_offsets
        steps = _step_range(offs) if len(offs) >= 2 else (0, 0)
        if len(offs) < 2 or offs[0] != 0 or offs[-1] != self.num_tokens or steps[0] <= 0:
            self.close()
            raise MLSMError(f"{self.path} has inconsistent /seq_offsets; the file is damaged. Re-create it.")
        self.max_seq_len = steps[1]
        self._max_token_id: int | None = None
        self.has_codes = "codes" in f
        self.K: int | None = None
        if self.has_codes:
            g = f["codes"]
            self._indptr, self._indices, self._values = g["indptr"], g["indices"], g["values"]
            self._read_indices = SliceReader(self._indices, self._parts)
            self._read_values = SliceReader(self._values, self._parts)
            if self._indptr.shape[0] != self.num_tokens + 1:
                self.close()
                raise MLSMError(f"{self.path}: /codes/indptr does not have one row per token; re-run `mlsm sparse-code`.")
            if "K" not in self.attrs:
                self.close()
                raise MLSMError(f"{self.path} lacks the attribute K (number of atoms); re-run `mlsm sparse-code`.")
            self.K = int(self.attrs["K"])

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.shape[0])

    def lengths(self, seq_ids) -> np.ndarray:
        """Lengths of these sequences."""
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        return np.asarray(self.seq_offsets[seq_ids + 1] - self.seq_offsets[seq_ids])

    @property
    def max_token_id(self) -> int:
        """The file's attribute max_token_id when it has one, else one scan of /tokens (SCAN_ROWS at a
        time, never the whole stream at once); remembered either way."""
        if self._max_token_id is None:
            if "max_token_id" in self.attrs:
                self._max_token_id = int(self.attrs["max_token_id"])
            else:
                ds, n = self._tokens, self.num_tokens
                step = SCAN_ROWS if ds.chunks is None else max(1, SCAN_ROWS // ds.chunks[0]) * ds.chunks[0]
                self._max_token_id = max((int(self._read_tokens.read(i, min(n, i + step)).max())
                                          for i in range(0, n, step)), default=-1)
        return self._max_token_id

    def fingerprint(self) -> str:
        """Cheap identity of the data: attributes and sizes (hashing hundreds of GB is not cheap)."""
        nnz = int(self._indices.shape[0]) if self.has_codes else None
        attrs = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.attrs.items()}
        return sha256_json({"attrs": attrs, "tokens": self.num_tokens, "sequences": self.num_sequences, "nnz": nnz})

    def close(self) -> None:
        if getattr(self, "_parts", None) is not None:
            self._parts.close()
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> TokenData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_window(self, seq_ids, max_gap: int = 16, with_codes: bool = True) -> WindowSlices:
        """Read the tokens of these sequences, and their CSR rows when `with_codes` and the file has
        codes: one contiguous slice of each dataset per run of nearby ids.

        Runs separated by at most `max_gap` unwanted sequences are read as one slice: a few
        extra rows cost less than another HDF5 call (a DDP rank's share of a window is such a
        sieve of its blocks).
        """
        s = np.unique(np.asarray(seq_ids, dtype=np.int64))
        breaks = np.flatnonzero(np.diff(s) > max_gap + 1) + 1
        run_first = s[np.r_[0, breaks]] if len(s) else s
        run_last = s[np.r_[breaks - 1, len(s) - 1]] if len(s) else s
        tok_lo = np.asarray(self.seq_offsets[run_first], dtype=np.int64)
        tok_hi = np.asarray(self.seq_offsets[run_last + 1], dtype=np.int64)
        row_starts = np.cumsum(tok_hi - tok_lo) - (tok_hi - tok_lo)
        with_codes = with_codes and self.has_codes
        # Every array is allocated once at its final size and read into in place: a list of slices
        # then a concatenation would hold the window twice at its peak.
        tokens = np.empty(int((tok_hi - tok_lo).sum()), dtype=np.int32)
        runs = [(lo, hi, r0) for lo, hi, r0 in zip(tok_lo.tolist(), tok_hi.tolist(), row_starts.tolist(), strict=True)
                if hi > lo]
        for lo, hi, r0 in runs:
            self._read_tokens.read_into(tokens, lo, hi, r0)
        if not with_codes:
            log.debug("read %d sequences: %d slices, %d tokens", len(s), len(tok_lo), len(tokens))
            return WindowSlices(tok_lo, tok_hi, row_starts, tokens)
        indptr = np.zeros(len(tokens) + 1, dtype=np.int64)
        spans, nnz = [], 0  # per run: (first nonzero in the file, count, first nonzero in the window)
        for lo, hi, r0 in runs:
            ip = self._indptr[lo:hi + 1].astype(np.int64, copy=False)  # one run's row pointers: 8 B/token
            indptr[r0 + 1:r0 + 1 + hi - lo] = ip[1:] - ip[0] + nnz
            spans.append((int(ip[0]), int(ip[-1] - ip[0]), nnz))
            nnz += spans[-1][1]
        indices = np.empty(nnz, dtype=np.uint16)
        values = np.empty(nnz, dtype=self._values.dtype)
        for base, n, start in spans:
            if n:
                self._read_indices.read_into(indices, base, base + n, start)
                self._read_values.read_into(values, base, base + n, start)
        log.debug("read %d sequences: %d slices, %d tokens, %d nonzeros", len(s), len(tok_lo), len(tokens), nnz)
        if nnz and int(indices.max()) >= self.K:
            raise MLSMError(f"{self.path} has atom indices >= K={self.K}; the file is damaged. Re-run `mlsm sparse-code`.")
        return WindowSlices(tok_lo, tok_hi, row_starts, tokens, indptr, indices, values)


# --------------------------------------------------------------------------- checking


def rebuild_command(folder: Path, man: dict, force: bool = True) -> str:
    """The sparse-code command that (re)makes `folder`, from its manifest or progress record."""
    p = man.get("params", {})
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (("layer", p.get("layer")), ("K", p.get("K")))
                    if v is not None).replace("--K", "-k")
    src = (f"--from-tokens {man['tokens_dir']}" if man.get("tokens_dir")
           else f"--extract-dir {man.get('extract_dir', '<extract folder>')}")
    return f"mlsm sparse-code {src} --out {folder} {opts}" + (" --force" if force else "")


def check_dictionary(path: Path, d: int | None = None, K: int | None = None, fingerprint: str | None = None,
                     fix: str = "mlsm sparse-code --force") -> np.ndarray:
    """Load dictionary.h5 and check it is a d x K dictionary (and the very one a codes file names)."""
    try:
        with h5py.File(path, "r") as f:
            D = f["D"][:]
    except (OSError, KeyError) as e:
        raise MLSMError(f"{path} is not a readable dictionary ({e}). Rebuild it with `{fix}`.") from e
    if d is not None and D.shape[0] != d:
        raise MLSMError(f"{path} is a dictionary of d={D.shape[0]}, but the hidden states it must code have "
                        f"d={d} (another auxiliary model or layer width). Rebuild it with `{fix}`.")
    if K is not None and D.shape[1] != K:
        raise MLSMError(f"{path} has K={D.shape[1]} atoms, but K={K} is expected. Rebuild it with `{fix}`.")
    if fingerprint is not None:
        got = dictionary_fingerprint(D)
        if got != fingerprint:
            raise MLSMError(f"{path} is not the dictionary the codes were made with (fingerprint {got[:12]} vs "
                            f"{fingerprint[:12]}). Rebuild both with `{fix}`.")
    return D


def check_codes_file(codes_path: Path) -> None:
    """codes.h5 against its folder's sparse-code manifest.json and dictionary.h5, when they are there.

    A lone codes.h5 (no manifest) is accepted: its own attributes are all there is to go by.
    """
    codes_path = Path(codes_path)
    folder = codes_path.parent
    man_path = folder / MANIFEST
    if not man_path.is_file():
        return
    try:
        man = json.loads(man_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # the trainer reports unreadable data itself
    if man.get("stage") != "sparse-code":
        return
    fix = rebuild_command(folder, man)
    try:
        with h5py.File(codes_path, "r") as f:
            attrs = dict(f.attrs)
            if "codes" not in f:
                return
    except OSError as e:
        raise MLSMError(f"{codes_path} is not a readable HDF5 file ({e}); it may be truncated. "
                        f"Rebuild it with `{fix}`.") from e
    params = man.get("params", {})
    checks = [("layer", params.get("layer"), attrs.get("layer")), ("K", params.get("K"), attrs.get("K")),
              ("lambda", params.get("lambda"), attrs.get("lambda")),
              ("extract fingerprint", man.get("inputs", {}).get("extract_manifest"), attrs.get("extract_fingerprint")),
              ("tokens fingerprint", man.get("inputs", {}).get("tokens"), attrs.get("tokens_fingerprint"))]
    for name, want, got in checks:
        if want is None or got is None:
            continue
        same = (abs(float(want) - float(got)) <= 1e-12 * max(1.0, abs(float(want)))
                if isinstance(want, (int, float)) else str(want) == str(got))
        if not same:
            show = (lambda v: str(v)[:12]) if name.endswith("fingerprint") else str
            raise MLSMError(f"{codes_path} was built with {name} {show(got)}, but {man_path} says {name} "
                            f"{show(want)}: the file comes from another run. Rebuild it with `{fix}`, "
                            f"or point --data at the codes.h5 of the run you mean.")
    dict_path = folder / DICTIONARY
    if dict_path.is_file():
        check_dictionary(dict_path, d=(man.get("dictionary") or {}).get("d"), K=params.get("K"),
                         fingerprint=attrs.get("dictionary_fingerprint"), fix=fix)
