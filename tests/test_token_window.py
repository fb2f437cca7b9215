"""The loader reads the token stream by window, as it reads the codes: batches are those of the
fully loaded arrays, and memory does not grow with the stream."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mlsm.core.errors import MLSMError
from mlsm.core.ranks import Rank
from mlsm.pipeline import codes as codes_mod
from mlsm.pipeline.codes import TokenData
from mlsm.trainer.data import BatchIterator, Masking, _seed_of, codes_to_distributions, csr_take, get_batch, mask_tokens
from tests.test_data import CLS, MASK, PAD, SEP, SPECIALS, VOCAB

K = 20
MASKING = Masking(0.15, "bert", MASK, VOCAB, (CLS, SEP, PAD, MASK))


def _stream(n_seq: int, seed: int = 0, max_len: int = 24):
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, max_len + 1, size=n_seq)
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    tokens = rng.integers(len(SPECIALS), VOCAB, size=int(offsets[-1])).astype(np.int32)
    tokens[offsets[:-1]], tokens[offsets[1:] - 1] = CLS, SEP
    counts = rng.integers(0, 4, size=len(tokens))
    indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
    indices = rng.integers(0, K, size=int(indptr[-1])).astype(np.uint16)
    values = (rng.random(int(indptr[-1])) * (rng.random(int(indptr[-1])) > 0.1)).astype(np.float16)
    return tokens, offsets, indptr, indices, values


def write_file(path: Path, layout: str, *, codes: bool = True, n_seq: int = 300, seed: int = 0) -> Path:
    """A training set stored `contiguous` (plain datasets), `chunked` (gzip, as merge_parts writes)
    or `virtual` (/tokens and /codes/{indices,values} virtual datasets over three part files)."""
    tokens, offsets, indptr, indices, values = _stream(n_seq, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = {"contiguous": {}, "chunked": dict(chunks=(64,), compression="gzip", shuffle=True)}.get(layout, {})
    with h5py.File(path, "w") as f:
        f.create_dataset("seq_offsets", data=offsets, **store)
        if codes:
            f.create_dataset("codes/indptr", data=indptr, **store)
            f.attrs.update(K=K, layer=3, **{"lambda": 0.05})
        arrays = {"tokens": tokens, "codes/indices": indices, "codes/values": values} if codes else {"tokens": tokens}
        if layout != "virtual":
            for name, a in arrays.items():
                f.create_dataset(name, data=a, **store)
            return path
        cuts = {"tokens": [0, len(tokens) // 3, 2 * len(tokens) // 3, len(tokens)]}
        cuts["codes/indices"] = cuts["codes/values"] = [int(indptr[c]) for c in cuts["tokens"]]
        for name, a in arrays.items():
            vl = h5py.VirtualLayout(shape=a.shape, dtype=a.dtype)
            c = cuts[name]
            for p in range(3):
                part = path.parent / f"part-{p}.h5"
                with h5py.File(part, "a") as pf:
                    pf.create_dataset(name, data=a[c[p] : c[p + 1]], chunks=True, compression="gzip")
                vl[c[p] : c[p + 1]] = h5py.VirtualSource(part.name, name, shape=(c[p + 1] - c[p],))
            f.create_virtual_dataset(name, vl, fillvalue=-1 if name == "tokens" else 0)
    return path


def reference_batches(path: Path, it: BatchIterator, steps: int) -> list[list[dict]]:
    """What the loader gave when /tokens, /seq_offsets and the CSR were loaded whole: each global
    batch padded from the arrays, masked as one, then cut into this rank's micro-batches."""
    with h5py.File(path) as f:
        tokens, offs = f["tokens"][:], f["seq_offsets"][:]
        csr = [f[k][:] for k in ("codes/indptr", "codes/indices", "codes/values")] if it.with_targets else None
    lens = np.diff(offs)
    special = torch.tensor(sorted(set(it.masking.special_ids)))
    epoch, batch, out = it.epoch, it.batch, []
    for _ in range(steps):
        glob = it.epoch_order(epoch)[batch * it.batch_size : (batch + 1) * it.batch_size]
        T = int(lens[glob].max())
        valid = np.arange(T)[None, :] < lens[glob][:, None]
        index = np.where(valid, offs[glob][:, None] + np.arange(T)[None, :], 0)
        ids = torch.from_numpy(np.where(valid, tokens[index], PAD).astype(np.int64))
        attn = torch.from_numpy(valid.astype(np.int64))
        gen = torch.Generator().manual_seed(_seed_of(it.seed, epoch, batch, 2))
        masked, mi = mask_tokens(ids, attn, torch.isin(ids, special), it.masking, gen)
        selected = torch.zeros(ids.numel(), dtype=torch.bool)
        selected[mi] = True
        selected = selected.view(ids.shape)
        local = it.batch_size // it.world_size
        mine = np.arange(it.rank * local, (it.rank + 1) * local)
        mine = mine[np.argsort(lens[glob[mine]], kind="stable")]
        micro = []
        for rows in np.array_split(mine, it.micro_batches):
            t = int(lens[glob[rows]].max())
            r = torch.from_numpy(rows)
            m_index = selected[r, :t].reshape(-1).nonzero().squeeze(1)
            m = {"seq_ids": glob[rows], "input_ids": masked[r, :t], "attention_mask": attn[r, :t],
                 "masked_index": m_index, "mlm_labels": ids[r, :t].reshape(-1)[m_index]}
            if csr is not None:
                g = index[rows, :t].reshape(-1)[m_index.numpy()]
                ip, ix, val = codes_to_distributions(*csr_take(*csr, g))
                m.update(target_indptr=ip, target_indices=ix.astype(np.int64), target_values=val)
            micro.append(m)
        out.append(micro)
        batch += 1
        if batch >= it.batches_per_epoch:
            epoch, batch = epoch + 1, 0
    return out


def _same(got: dict, want: dict) -> None:
    for k, v in want.items():
        a = got[k].numpy() if torch.is_tensor(got[k]) else np.asarray(got[k])
        b = v.numpy() if torch.is_tensor(v) else np.asarray(v)
        assert a.dtype.kind == b.dtype.kind and np.array_equal(a, b), k


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "virtual"])
@pytest.mark.parametrize("split", [dict(world_size=1), dict(world_size=2, micro_batches=2), dict(world_size=4)])
@pytest.mark.parametrize("codes", [True, False])
def test_batches_equal_those_of_the_loaded_arrays(tmp_path, layout, split, codes):
    path = write_file(tmp_path / layout / ("codes.h5" if codes else "tokens.h5"), layout, codes=codes)
    world, micro = split["world_size"], split.get("micro_batches", 1)
    with TokenData(path) as data:
        assert isinstance(data.seq_offsets, np.memmap) == (layout != "chunked")  # virtual: offsets are plain
        for rank in range(world):
            it = BatchIterator(data, 16, seed=3, masking=MASKING, micro_batches=micro, rank=Rank(rank, world),
                               with_targets=codes, block_size=8, shuffle_window=64)
            steps = it.batches_per_epoch + 3  # several windows, and across an epoch boundary
            want = reference_batches(path, it, steps)
            for w in want:
                got = next(it)
                assert len(got) == len(w) == micro
                for g, x in zip(got, w, strict=True):
                    _same(g, x)


def test_get_batch_reads_what_it_needs_and_checks_a_given_window(tmp_path):
    path = write_file(tmp_path / "codes.h5", "chunked")
    with TokenData(path) as data, h5py.File(path) as f:
        tokens, offs = f["tokens"][:], f["seq_offsets"][:]
        seq_ids = np.array([250, 3, 4, 120, 5, 299])
        b = get_batch(data, seq_ids)  # no window: it reads its own
        for row, s in enumerate(seq_ids):
            n = offs[s + 1] - offs[s]
            assert b.input_ids[row, :n].tolist() == tokens[offs[s] : offs[s + 1]].tolist()
            assert (b.input_ids[row, n:] == data.pad_id).all() and int(b.attention_mask[row].sum()) == n
        half = get_batch(data, seq_ids, data.read_window(seq_ids[:3]), rows=[0, 1, 2])
        assert torch.equal(half.input_ids[:3], b.input_ids[:3]) and half.input_ids.shape == b.input_ids.shape
        assert int(half.attention_mask[3:].sum()) == 0 and (half.token_index[3:] == -1).all()
        with pytest.raises(ValueError, match="does not hold"):
            get_batch(data, seq_ids, data.read_window(seq_ids[:3]))
        with pytest.raises(ValueError, match="without codes"):
            get_batch(data, seq_ids, data.read_window(seq_ids, with_codes=False))
        assert get_batch(data, seq_ids, with_codes=False).codes is None


def test_max_token_id_from_the_attribute_or_a_chunked_scan(tmp_path, monkeypatch):
    path = write_file(tmp_path / "codes.h5", "chunked")
    with h5py.File(path) as f:
        want = int(f["tokens"][:].max())
    reads = []
    monkeypatch.setattr(codes_mod, "SCAN_ROWS", 100)
    with TokenData(path) as data:
        real = data._read_tokens.read
        monkeypatch.setattr(data._read_tokens, "read", lambda lo, hi: reads.append(slice(lo, hi)) or real(lo, hi))
        assert data.max_token_id == want
        assert len(reads) > 10 and all(k.stop - k.start <= 128 for k in reads), "scanned in chunk-aligned slices"
        n = len(reads)
        assert data.max_token_id == want and len(reads) == n, "the scan is remembered"
    with h5py.File(path, "a") as f:
        f.attrs["max_token_id"] = 12345
    with TokenData(path) as data:
        data._tokens = data._read_tokens = None  # the attribute is enough: the stream is not read
        assert data.max_token_id == 12345


def test_fingerprint_and_sizes_do_not_depend_on_the_layout(tmp_path):
    fps = set()
    for layout in ("contiguous", "chunked", "virtual"):
        with TokenData(write_file(tmp_path / layout / "codes.h5", layout)) as data:
            fps.add(data.fingerprint())
            sizes = (data.num_tokens, data.num_sequences, data.max_seq_len)
    tokens, offsets = _stream(300)[:2]
    assert len(fps) == 1 and sizes == (len(tokens), len(offsets) - 1, int(np.diff(offsets).max()))


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_loader_does_not_hold_the_stream(tmp_path, layout):
    """Opening a 2M-token codes.h5 and training through a few windows allocates under a quarter of
    the stream's 8 MB (about 1.4 MB: the epoch order and one window; the loader that held /tokens
    allocated all 8 MB on opening)."""
    rng = np.random.default_rng(0)
    n_seq = 2_000_000 // 64
    lens = rng.integers(16, 113, size=n_seq)
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    N = int(offsets[-1])
    path = tmp_path / "codes.h5"
    with h5py.File(path, "w") as f:
        tokens = rng.integers(len(SPECIALS), VOCAB, size=N).astype(np.int32)
        tokens[offsets[:-1]], tokens[offsets[1:] - 1] = CLS, SEP
        arrays = {"tokens": tokens, "seq_offsets": offsets, "codes/indptr": np.arange(N + 1, dtype=np.int64),
                  "codes/indices": (tokens % K).astype(np.uint16), "codes/values": np.ones(N, np.float16)}
        for name, a in arrays.items():  # chunked: as merge_parts writes them
            store = {} if layout == "contiguous" else dict(chunks=(min(len(a), 1 << 16),), compression="gzip")
            f.create_dataset(name, data=a, **store)
        f.attrs.update(K=K, layer=3, **{"lambda": 0.05})
    del tokens
    assert N > 1_900_000
    with TokenData(path) as data:  # modules imported on first use are not what is measured
        next(BatchIterator(data, 32, seed=0, masking=MASKING, block_size=64, shuffle_window=512))
    tracemalloc.start()
    try:
        with TokenData(path) as data:
            assert data.max_token_id == VOCAB - 1 and data.max_seq_len == int(lens.max())
            it = BatchIterator(data, 32, seed=0, masking=MASKING, block_size=64, shuffle_window=512)
            for _ in range(3 * 512 // 32 + 1):  # three windows and into a fourth
                micro = next(it)
            assert micro[0]["n_targets"] > 0
            big = [k for k, v in vars(data).items() if isinstance(v, np.ndarray) and v.size >= N // 2]
            assert not big, f"TokenData holds arrays the size of the stream: {big}"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < N, f"peak {peak / 1e6:.1f} MB for a stream of {4 * N / 1e6:.1f} MB"


@pytest.mark.parametrize("layout", ["contiguous", "virtual"])
def test_a_window_is_read_in_place(tmp_path, layout):
    """Reading a window allocates it once: slices read straight into the final arrays, not gathered
    in lists and concatenated (which held the window twice at its peak)."""
    path = write_file(tmp_path / "codes.h5", layout, n_seq=3000)
    with TokenData(path) as data:
        ids = np.flatnonzero(np.arange(data.num_sequences) // 100 % 2 == 0)  # every other block of 100: 15 runs
        data.read_window(ids[:10])  # modules imported on first use are not what is measured
        tracemalloc.start()
        try:
            w = data.read_window(ids, max_gap=0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        held = sum(a.nbytes for a in (w.tokens, w.indptr, w.indices, w.values, w.run_tok_starts, w.run_tok_ends,
                                      w.run_row_starts))
        assert len(w.run_tok_starts) == 15
        assert peak < 1.25 * held, f"reading a window of {held} bytes peaked at {peak}"
        whole = data.read_window(np.arange(data.num_sequences))
        sel = whole.rows_of(np.concatenate([np.arange(data.seq_offsets[i], data.seq_offsets[i + 1]) for i in ids]))
        assert np.array_equal(w.tokens, whole.tokens[sel])
        a, b = csr_take(whole.indptr, whole.indices, whole.values, sel), (w.indptr, w.indices, w.values)
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x, y)


def test_a_virtual_file_of_many_parts_keeps_few_open(tmp_path, monkeypatch):
    """HDF5 would keep every part it read open (a descriptor and caches each): the reader keeps
    OPEN_PARTS, whatever the number of parts, and reads the same rows as the merged arrays."""
    tokens, offsets, indptr, indices, values = _stream(600, seed=2)
    seq_cuts = np.linspace(0, 600, 41).astype(int)  # 40 parts
    parts = []
    for p in range(40):
        s0, s1 = seq_cuts[p], seq_cuts[p + 1]
        t0, t1 = int(offsets[s0]), int(offsets[s1])
        parts.append(tmp_path / "parts" / f"part-{p:05d}.h5")
        parts[-1].parent.mkdir(exist_ok=True)
        codes_mod.write_part(parts[-1], tokens[t0:t1], np.diff(offsets[s0 : s1 + 1]), np.diff(indptr[t0 : t1 + 1]),
                             indices[indptr[t0] : indptr[t1]], values[indptr[t0] : indptr[t1]],
                             np.zeros(t1 - t0, np.float32), attrs={"recon_err_sum": 0.0})
    path = tmp_path / "codes.h5"
    codes_mod.merge_parts(parts, path, {"K": K, "layer": 3, "lambda": 0.05}, np.float16, copy=False)
    monkeypatch.setattr(codes_mod, "OPEN_PARTS", 3)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    with TokenData(path) as data:
        assert data._parts.limit == 3
        ids = np.arange(0, 600, 7)  # every part
        w = data.read_window(ids, max_gap=0)
        assert len(data._parts._files) == 3 and fds() <= before + 4  # the codes.h5 itself and three parts
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in ids])
        assert np.array_equal(w.tokens, tokens[rows])
        got = csr_take(w.indptr, w.indices, w.values, np.arange(len(rows)))
        want = csr_take(indptr, indices, values, rows)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b)
    assert fds() == before


def test_memmapped_offsets_leave_the_file_usable(tmp_path):
    path = write_file(tmp_path / "codes.h5", "contiguous")
    data = TokenData(path)
    assert isinstance(data.seq_offsets, np.memmap) and not data.seq_offsets.flags.writeable
    with h5py.File(path) as f:
        assert np.array_equal(data.seq_offsets, f["seq_offsets"][:])
    data.close()
    os.replace(path, tmp_path / "moved.h5")  # nothing holds the file open for writing


def test_a_virtual_file_whose_part_is_gone_is_refused(tmp_path):
    path = write_file(tmp_path / "codes.h5", "virtual")
    with TokenData(path) as data:
        assert data.read_window([0, 299]).tokens[0] == CLS
    (tmp_path / "part-1.h5").unlink()
    with pytest.raises(MLSMError, match="part-1.h5"):
        TokenData(path)


@pytest.mark.parametrize("copy", [False, True])
def test_files_the_stage_writes_read_by_window(tmp_path, copy):
    """codes.h5 as merge_parts finalizes it: virtual datasets over the parts, or one standalone copy."""
    tokens, offsets, indptr, indices, values = _stream(300, seed=1)
    seq_cuts, parts = [0, 100, 180, 300], []
    for p in range(3):
        s0, s1 = seq_cuts[p], seq_cuts[p + 1]
        t0, t1 = int(offsets[s0]), int(offsets[s1])
        parts.append(tmp_path / "parts" / f"part-{p}.h5")
        parts[-1].parent.mkdir(exist_ok=True)
        codes_mod.write_part(parts[-1], tokens[t0:t1], np.diff(offsets[s0 : s1 + 1]), np.diff(indptr[t0 : t1 + 1]),
                             indices[indptr[t0] : indptr[t1]], values[indptr[t0] : indptr[t1]])
    path = tmp_path / "codes.h5"
    codes_mod.merge_parts(parts, path, {"K": K}, value_dtype=np.float16, copy=copy)
    with TokenData(path) as data:
        assert data.max_token_id == int(tokens.max()) and "max_token_id" in data.attrs
        it = BatchIterator(data, 16, seed=0, masking=MASKING, rank=Rank(1, 2), block_size=8, shuffle_window=64)
        for want in reference_batches(path, it, it.batches_per_epoch + 2):
            _same(next(it)[0], want[0])
