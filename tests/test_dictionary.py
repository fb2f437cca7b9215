"""Online dictionary learning: unit atoms, determinism, and a held-out objective that beats the baselines."""
import json

import numpy as np
import pytest
import torch

from mlsm.pipeline.dictionary import (
    DictOptions,
    DictResult,
    _reseed_dead,
    learn_dictionary,
    objective,
    spherical_kmeans_init,
)

LAM = 0.05


def _sparse_data(n, d=16, K=24, nnz=3, noise=0.02, seed=0):
    """x = normalize(D_true a + noise), a >= 0 with `nnz` atoms: the model dictionary learning assumes."""
    rng = np.random.default_rng(seed)
    D_true = rng.standard_normal((d, K))
    D_true /= np.linalg.norm(D_true, axis=0)
    A = np.zeros((n, K))
    for i in range(n):
        A[i, rng.choice(K, nnz, replace=False)] = rng.uniform(0.5, 1.5, nnz)
    X = A @ D_true.T + noise * rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), D_true.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    X, D_true = _sparse_data(4500, seed=0)
    return X[:4000], X[4000:], D_true


@pytest.fixture(scope="module")
def learned(data):
    train, held, _ = data
    return learn_dictionary(train, K=24, lam=LAM, heldout=held, progress=False, options=DictOptions(batch_size=128, epochs=2, seed=3))


def test_spherical_kmeans_init_shape_and_unit_columns(data):
    train, _, _ = data
    D = spherical_kmeans_init(train, 24, seed=0, niter=10)
    assert D.shape == (16, 24) and D.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(D, axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(D, spherical_kmeans_init(train, 24, seed=0, niter=10))


def test_spherical_kmeans_init_fills_when_too_few_points():
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((5, 8)).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    X = np.repeat(pts, 4, axis=0)  # 20 rows, 5 distinct
    D = spherical_kmeans_init(X, 12, seed=1)
    assert D.shape == (8, 12)
    np.testing.assert_allclose(np.linalg.norm(D, axis=0), 1.0, atol=1e-5)
    # every distinct point is an atom; the rest are distinct random directions
    cos = pts @ D
    assert (cos.max(axis=1) > 1 - 1e-5).all()
    assert np.unique(D.round(5), axis=1).shape[1] == 12
    np.testing.assert_array_equal(D, spherical_kmeans_init(X, 12, seed=1))
    assert not np.array_equal(D, spherical_kmeans_init(X, 12, seed=2))


def test_learned_dictionary_has_unit_atoms_and_stats(learned):
    assert isinstance(learned, DictResult)
    D = learned.D
    assert D.shape == (16, 24) and D.dtype == torch.float32
    torch.testing.assert_close(D.norm(dim=0), torch.ones(24), atol=1e-5, rtol=0)
    st = json.loads(json.dumps(learned.stats))  # JSON-serialisable
    for key in ("samples_seen", "iterations", "batch_size", "reseeded_atoms", "wall_s", "init",
                "train_objective_trace", "heldout_objective", "seed"):
        assert key in st, key
    assert st["init"] == "kmeans" and st["seed"] == 3 and st["batch_size"] == 128
    assert st["iterations"] == int(np.ceil(2 * 4000 / 128)) and st["samples_seen"] == st["iterations"] * 128
    assert len(st["train_objective_trace"]) >= 3
    assert len(st["train_objective_trace_iters"]) == len(st["train_objective_trace"])
    assert all(isinstance(v, float) for v in st["train_objective_trace"])


def test_learning_is_deterministic(data, learned):
    train, held, _ = data
    again = learn_dictionary(train, K=24, lam=LAM, progress=False, options=DictOptions(batch_size=128, epochs=2, seed=3))
    assert torch.equal(learned.D, again.D)
    other = learn_dictionary(train, K=24, lam=LAM, progress=False, options=DictOptions(batch_size=128, epochs=2, seed=4))
    assert not torch.equal(learned.D, other.D)


def test_heldout_objective_beats_kmeans_and_random_samples(data, learned):
    train, held, D_true = data
    ours = objective(held, learned.D, LAM)
    assert ours == pytest.approx(learned.stats["heldout_objective"], rel=1e-6)
    kmeans = objective(held, torch.from_numpy(spherical_kmeans_init(train, 24, seed=3, niter=10)), LAM)
    rng = np.random.default_rng(0)
    samples = torch.from_numpy(np.ascontiguousarray(train[rng.choice(len(train), 24, replace=False)].T))
    random_samples = objective(held, samples, LAM)
    assert ours < 0.9 * kmeans, (ours, kmeans)
    assert ours < 0.9 * random_samples, (ours, random_samples)
    # sanity: the generating dictionary is about as good as it gets
    truth = objective(held, torch.from_numpy(D_true), LAM)
    assert ours < 1.25 * truth, (ours, truth)


def test_objective_matches_explicit_codes(data):
    _, held, D_true = data
    from mlsm.pipeline.solvers import nn_lasso

    D = torch.from_numpy(D_true)
    X = torch.from_numpy(held)
    a = nn_lasso(X, D, LAM, tol=1e-5).codes
    explicit = float((0.5 * ((X - a @ D.T) ** 2).sum(1) + LAM * a.sum(1)).mean())
    assert objective(held, D, LAM, tol=1e-5) == pytest.approx(explicit, rel=1e-5)


def test_dead_atoms_are_reseeded_from_training_vectors():
    g = torch.Generator().manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(50, 6, generator=g), dim=1)
    D = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=0)
    A, B = torch.rand(5, 5, generator=g) + 0.1, torch.rand(6, 5, generator=g) + 0.1
    D0, A0, B0 = D.clone(), A.clone(), B.clone()
    usage = torch.tensor([3.0, 0.0, 1.0, 0.0, 7.0])
    assert _reseed_dead(D, A, B, usage, X, np.random.default_rng(0)) == 2
    live, dead = [0, 2, 4], [1, 3]
    assert torch.equal(D[:, live], D0[:, live])
    for j in dead:
        assert ((X @ D[:, j]).max() > 1 - 1e-5), "a reseeded atom is a training vector"
        assert (A[j] == 0).all() and (A[:, j] == 0).all() and (B[:, j] == 0).all()
    torch.testing.assert_close(A[np.ix_(live, live)], A0[np.ix_(live, live)])
    torch.testing.assert_close(B[:, live], B0[:, live])
    assert _reseed_dead(D, A, B, torch.ones(5), X, np.random.default_rng(0)) == 0
