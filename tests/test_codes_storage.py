import h5py
import numpy as np

from pipeline.codes import dense_to_csr, merge_parts, write_part


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
