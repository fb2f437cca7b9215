import h5py
import numpy as np

from mlsm.pipeline.codes import dense_to_csr, merge_parts, write_part


def test_parts_merge_into_the_design_layout(tmp_path):
    rng = np.random.default_rng(0)
    dense, parts, tokens = [], [], []
    for i, n_seq in enumerate((3, 4)):
        lengths = rng.integers(3, 9, n_seq)
        n = int(lengths.sum())
        a = rng.random((n, 40)) * (rng.random((n, 40)) < 0.1)
        a[0] = 0  # a token with no target
        counts, idx, vals = dense_to_csr(a, np.float32)
        tok = rng.integers(0, 1000, n).astype(np.int32)
        write_part(tmp_path / f"part-{i}.h5", tok, lengths, counts, idx, vals, rel_gap=np.full(n, 1e-5))
        parts.append(tmp_path / f"part-{i}.h5")
        dense.append(a), tokens.append(tok)
    stats = merge_parts(parts, tmp_path / "codes.h5", {"K": 40, "lambda": 0.05})
    dense, tokens = np.concatenate(dense), np.concatenate(tokens)
    with h5py.File(tmp_path / "codes.h5") as f:
        assert f["tokens"].dtype == np.int32 and f["codes/indices"].dtype == np.uint16
        np.testing.assert_array_equal(f["tokens"][:], tokens)
        offsets = f["seq_offsets"][:]
        assert offsets[0] == 0 and offsets[-1] == len(tokens) and len(offsets) == 8
        ptr, idx, val = f["codes/indptr"][:], f["codes/indices"][:], f["codes/values"][:]
        rebuilt = np.zeros_like(dense)
        for r in range(len(dense)):
            rebuilt[r, idx[ptr[r]:ptr[r + 1]]] = val[ptr[r]:ptr[r + 1]]
        np.testing.assert_allclose(rebuilt, dense, rtol=1e-6)
        assert f.attrs["K"] == 40 and f["tokens"].compression == "gzip"
    assert stats["nnz"] == int((dense > 0).sum()) and stats["gap_max"] <= 1e-5 + 1e-12


def test_top_k_keeps_the_largest_atoms_of_each_row_in_atom_order():
    from mlsm.pipeline.codes import top_k_codes

    rng = np.random.default_rng(3)
    a = rng.random((50, 30)) * (rng.random((50, 30)) < 0.4)
    a[0] = 0
    counts, idx, vals = dense_to_csr(a)
    for k in (1, 3, 8, 100):
        c, j, v = top_k_codes(counts, idx, vals, k)
        rebuilt = np.zeros_like(a)
        rows = np.repeat(np.arange(len(a)), c)
        rebuilt[rows, j] = v
        for r in range(len(a)):
            nz = np.flatnonzero(a[r])
            want = nz[np.argsort(-a[r, nz], kind="stable")[:k]]
            np.testing.assert_array_equal(np.flatnonzero(rebuilt[r]), np.sort(want))
        assert (np.diff(j.astype(int))[np.diff(rows) == 0] > 0).all()  # indices ascending within a row
        np.testing.assert_allclose(rebuilt[rebuilt > 0], a[rebuilt > 0], rtol=1e-6)


def test_truncation_kl_is_the_kl_of_the_renormalised_top_k_target():
    from mlsm.pipeline.codes import truncation_kl

    rng = np.random.default_rng(4)
    a = rng.random((20, 12)) * (rng.random((20, 12)) < 0.6)
    a[5] = 0
    counts, idx, vals = dense_to_csr(a)
    for k in (1, 2, 5, 12):
        kl = truncation_kl(counts, vals, k)
        assert len(kl) == 19
        want = []
        for r in range(20):
            if a[r].sum() == 0:
                continue
            t = a[r] / a[r].sum()
            keep = np.argsort(-a[r], kind="stable")[:k]
            tk = np.zeros_like(t)
            tk[keep] = t[keep]
            tk /= tk.sum()
            m = tk > 0
            want.append(float((tk[m] * np.log(tk[m] / t[m])).sum()))
        np.testing.assert_allclose(kl, want, rtol=1e-5, atol=1e-6)
    assert np.allclose(truncation_kl(counts, vals, 12), 0)
