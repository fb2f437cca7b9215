"""The sparse KL must equal the dense textbook KL, values and gradients, with empty rows skipped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlsm.trainer.objectives import dense_kl_reference, mlm_loss, mlsm_kl_loss


def _random_sparse_targets(M: int, K: int, seed: int):
    """Dense (M, K) targets with random supports, some rows empty, and their CSR form."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(M, K, generator=g, dtype=torch.float64)
    dense[torch.rand(M, K, generator=g) > 0.2] = 0
    dense[::4] = 0  # rows without a target
    dense = dense / dense.sum(1, keepdim=True).clamp(min=1e-300)
    rows, cols = dense.nonzero(as_tuple=True)
    indptr = torch.zeros(M + 1, dtype=torch.long)
    indptr[1:] = torch.bincount(rows, minlength=M).cumsum(0)
    return dense, indptr, cols, dense[rows, cols]


def test_sparse_kl_equals_dense_values_and_gradients():
    M, K = 37, 23
    dense, indptr, idx, val = _random_sparse_targets(M, K, seed=0)
    assert (indptr[1:] == indptr[:-1]).sum() >= 9
    z = torch.randn(M, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    sparse, n = mlsm_kl_loss(z1, indptr, idx, val)
    ref = dense_kl_reference(z2, dense)
    assert n == int((dense.sum(1) > 0).sum())
    torch.testing.assert_close(sparse, ref, rtol=1e-12, atol=1e-12)
    sparse.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(z1.grad[::4] == 0), "empty rows must not receive gradient"
    # and an independent check of the reference: KL via F.kl_div on the rows with targets
    has = dense.sum(1) > 0
    kl = F.kl_div(F.log_softmax(z[has], -1), dense[has], reduction="batchmean")
    torch.testing.assert_close(ref.detach(), kl, rtol=1e-12, atol=1e-12)


def test_kl_is_zero_at_the_target_and_positive_elsewhere():
    t = torch.rand(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    t = t / t.sum(1, keepdim=True)
    rows, cols = t.nonzero(as_tuple=True)
    indptr = torch.arange(0, 8 * 5 + 1, 5)
    at_target, n = mlsm_kl_loss(t.log() + 3.0, indptr, cols, t[rows, cols])  # logits up to a constant
    assert n == 8 and abs(float(at_target)) < 1e-12
    elsewhere, _ = mlsm_kl_loss(torch.zeros(8, 5, dtype=torch.float64), indptr, cols, t[rows, cols])
    assert float(elsewhere) > 0.01


def test_half_precision_logits_give_float32_loss():
    dense, indptr, idx, val = _random_sparse_targets(16, 12, seed=3)
    z = torch.randn(16, 12)
    loss32, _ = mlsm_kl_loss(z, indptr, idx, val.float())
    loss_bf16, _ = mlsm_kl_loss(z.bfloat16(), indptr, idx, val.float())
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss32, rtol=2e-2, atol=2e-2)


def test_no_targets_gives_zero_with_a_graph():
    z = torch.randn(4, 6, requires_grad=True)
    loss, n = mlsm_kl_loss(z, torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.all(z.grad == 0)


def test_mlm_loss_is_mean_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(10, 50, generator=g, dtype=torch.float64)
    labels = torch.randint(50, (10,), generator=g)
    manual = -logits.log_softmax(-1)[torch.arange(10), labels].mean()
    torch.testing.assert_close(mlm_loss(logits, labels), manual)
    assert mlm_loss(logits.bfloat16(), labels).dtype == torch.float32


def _codes_file(path, tokens, offsets, rows):
    """A codes.h5 with one CSR row (a dict atom -> value) per token."""
    import h5py
    import numpy as np

    indptr = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    with h5py.File(path, "w") as f:
        f["tokens"], f["seq_offsets"] = np.asarray(tokens, np.int32), np.asarray(offsets, np.int64)
        f["codes/indptr"] = indptr
        f["codes/indices"] = np.array([a for r in rows for a in r], np.uint16)
        f["codes/values"] = np.array([v for r in rows for v in r.values()], np.float32)
        f.attrs.update(K=4, layer=1, **{"lambda": 0.05})
    return path


def test_context_free_baselines_known_values(tmp_path):
    """One-hot targets on two atoms used equally cost log 2 against their mean; targets that are
    all the same cost 0. Special tokens ([CLS]=2, [SEP]=3 here) and empty codes do not count."""
    import math

    from mlsm.pipeline.codes import TokenData
    from mlsm.trainer.objectives import context_free_baselines

    special = [0, 2, 3]
    toks = [2, 10, 11, 10, 11, 12, 3]  # [CLS] a b a b c(no code) [SEP]
    rows = [{3: 1.0}, {0: 2.0}, {1: 0.5}, {0: 1.0}, {1: 3.0}, {}, {3: 1.0}]
    with TokenData(_codes_file(tmp_path / "a.h5", toks, [0, 7], rows)) as d:
        b = context_free_baselines(d, special)
    assert b["mlsm_marginal_kl"] == pytest.approx(math.log(2))
    assert b["tokens"] == 5 and b["unigram_entropy"] == pytest.approx(-(0.4 * math.log(0.4) * 2 + 0.2 * math.log(0.2)))
    same = [{3: 1.0}, {0: 1.0, 1: 3.0}, {0: 2.0, 1: 6.0}, {0: 0.5, 1: 1.5}, {0: 1.0, 1: 3.0}, {}, {3: 1.0}]
    with TokenData(_codes_file(tmp_path / "b.h5", toks, [0, 7], same)) as d:
        assert context_free_baselines(d, special)["mlsm_marginal_kl"] == pytest.approx(0.0, abs=1e-12)
