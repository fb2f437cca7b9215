"""nn_lasso (both engines) against a slow float64 reference, the duality-gap certificate, and fista_fixed."""
import math

import numpy as np
import pytest
import torch

from mlsm.pipeline.solvers import LassoOptions, LassoResult, duality_gap, fista_fixed, lipschitz, nn_lasso

LAM = 0.05
ENGINES = ["active-set", "bpp"]  # the CPU engine and the batched-torch (GPU) one, both runnable on CPU


def _problem(d, K, B, nnz, seed, noise=0.05):
    """Rows x = normalize(D_true a + noise) with sparse non-negative a, as the pipeline sees them."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(d, K, generator=g, dtype=torch.float64), dim=0)
    A = torch.zeros(B, K, dtype=torch.float64)
    for i in range(B):
        idx = torch.randperm(K, generator=g)[:nnz]
        A[i, idx] = torch.rand(nnz, generator=g, dtype=torch.float64) + 0.1
    X = A @ D.T + noise * torch.randn(B, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(X, dim=1), D


def _objective(X, D, A, lam=LAM):
    r = X - A @ D.T
    return 0.5 * (r * r).sum(1) + lam * A.sum(1)


def _reference(X, D, lam=LAM, iters=4000):
    """FISTA with gradient restarts in float64 numpy, run far past convergence: slow but simple.

    test_reference_satisfies_kkt checks that it really is optimal.
    """
    Dn, Xn = D.numpy(), X.numpy()
    G, xD = Dn.T @ Dn, Xn @ Dn
    L = float(np.linalg.eigvalsh(G)[-1])
    a = np.zeros((Xn.shape[0], Dn.shape[1]))
    y, t = a.copy(), 1.0
    for _ in range(iters):
        a_next = np.maximum(y - (y @ G - xD + lam) / L, 0.0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        restart = ((y - a_next) * (a_next - a)).sum(1, keepdims=True) > 0  # per-row restart
        y = np.where(restart, a_next, a_next + (t - 1) / t_next * (a_next - a))
        a, t = a_next, t_next
    return torch.from_numpy(a)


@pytest.fixture(scope="module")
def small():
    X, D = _problem(d=8, K=20, B=24, nnz=3, seed=0)
    return X, D, _reference(X, D)


def test_reference_satisfies_kkt(small):
    # The reference itself must be optimal, or the comparisons below prove nothing.
    X, D, A = small
    grad = (A @ D.T - X) @ D + LAM
    assert (A >= 0).all()
    assert (grad >= -1e-9).all()
    assert (grad[A > 0].abs() <= 1e-9).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_nn_lasso_matches_reference(small, engine):
    X, D, A_ref = small
    tol = 1e-4
    res = nn_lasso(X.float(), D.float(), LAM, tol=tol, options=LassoOptions(engine=engine))
    assert isinstance(res, LassoResult)
    assert res.codes.shape == (X.shape[0], D.shape[1]) and res.codes.dtype == torch.float32
    assert (res.codes >= 0).all()
    p = _objective(X, D, res.codes.double())
    p_ref = _objective(X, D, A_ref)
    assert ((p - p_ref) / p_ref).max() <= tol
    assert (res.rel_gap <= tol).all()
    # KKT within the tolerance the gap allows: no atom may be strongly violated.
    grad = (res.codes.double() @ D.T - X) @ D + LAM
    assert (grad >= -1e-2).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_reported_gap_is_the_certificate(small, engine):
    X, D, A_ref = small
    res = nn_lasso(X.float(), D.float(), LAM, tol=1e-4, options=LassoOptions(engine=engine))
    p, gap = duality_gap(X, D, res.codes.double(), LAM)
    torch.testing.assert_close(res.primal.double(), p, rtol=1e-5, atol=1e-6)
    assert (res.rel_gap.double() >= gap / p - 1e-5).all()
    # a float64 certificate agrees with one recomputed in float64 on the same (float32) data
    res64 = nn_lasso(X.float(), D.float(), LAM, tol=1e-4, options=LassoOptions(cert_dtype=torch.float64, engine=engine))
    p64, gap64 = duality_gap(X.float().double(), D.float().double(), res64.codes.double(), LAM)
    torch.testing.assert_close(res64.rel_gap.double(), gap64 / p64, rtol=1e-4, atol=1e-9)
    # and the certificate really bounds the distance to the optimum
    assert (res.primal.double() - _objective(X, D, A_ref) <= res.rel_gap.double() * res.primal.double() + 1e-6).all()


def test_duality_gap_bounds_true_gap_and_vanishes_at_optimum(small):
    X, D, A_ref = small
    p_star = _objective(X, D, A_ref)
    g = torch.Generator().manual_seed(1)
    for A in (torch.zeros_like(A_ref), A_ref * 1.3, (A_ref + 0.05 * torch.rand(A_ref.shape, generator=g, dtype=torch.float64)),
              fista_fixed(X, D, LAM, n_iter=3)):
        p, gap = duality_gap(X, D, A, LAM)
        torch.testing.assert_close(p, _objective(X, D, A))
        assert (gap >= p - p_star - 1e-12).all()
    p, gap = duality_gap(X, D, A_ref, LAM)
    assert (gap / p).max() < 1e-8


@pytest.mark.parametrize("engine", ENGINES)
def test_working_set_rounds_and_fallback(engine):
    # Supports larger than the first working set force several rounds; max_iter=1 forces the fallback.
    X, D = _problem(d=24, K=120, B=16, nnz=10, seed=3)
    A_ref = _reference(X, D)
    p_ref = _objective(X, D, A_ref)
    for kw in (dict(ws_size=4, ws_grow=3), dict(ws_size=4, ws_grow=3, max_iter=1)):
        res = nn_lasso(X.float(), D.float(), LAM, tol=1e-4, options=LassoOptions(engine=engine, **kw))
        assert (res.rel_gap <= 1e-4).all(), kw
        assert (((_objective(X, D, res.codes.double()) - p_ref) / p_ref) <= 1e-4).all(), kw
    assert nn_lasso(X.float(), D.float(), LAM, tol=1e-4, options=LassoOptions(ws_size=4, ws_grow=3, engine=engine)).n_iter > 1


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_solutions_and_degenerate_rows(engine):
    # atoms in the positive orthant; x = 0, and x anti-correlated with every atom: a = 0 is optimal
    g = torch.Generator().manual_seed(5)
    D = torch.nn.functional.normalize(torch.rand(8, 20, generator=g), dim=0)
    anti = -torch.ones(8) / math.sqrt(8)
    Xz = torch.stack([torch.zeros(8), anti])
    assert (Xz @ D).max() <= LAM  # precondition of the test
    res = nn_lasso(Xz, D, LAM, options=LassoOptions(engine=engine))
    assert (res.codes == 0).all()
    assert (res.rel_gap == 0).all()
    torch.testing.assert_close(res.primal, torch.tensor([0.0, 0.5]))
    # empty batch
    res = nn_lasso(torch.zeros(0, 8), D, LAM, options=LassoOptions(engine=engine))
    assert res.codes.shape == (0, 20)


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_composition_does_not_change_a_row(small, engine):
    X, D, _ = small
    full = nn_lasso(X.float(), D.float(), LAM, tol=1e-6, options=LassoOptions(engine=engine)).codes
    one = nn_lasso(X[5:6].float(), D.float(), LAM, tol=1e-6, options=LassoOptions(engine=engine)).codes
    torch.testing.assert_close(full[5:6], one, atol=1e-4, rtol=1e-3)


def test_fista_fixed_nonneg_and_improves_with_iterations(small):
    X, D, A_ref = small
    objs = []
    for n in (2, 10, 100, 2000):
        A = fista_fixed(X, D, LAM, n_iter=n)
        assert (A >= 0).all()
        objs.append(float(_objective(X, D, A).sum()))
    assert objs[0] > objs[1] > objs[2] >= objs[3] - 1e-9
    assert objs[3] == pytest.approx(float(_objective(X, D, A_ref).sum()), rel=1e-6)


def test_lipschitz_is_largest_eigenvalue():
    _, D = _problem(d=8, K=20, B=1, nnz=1, seed=7)
    ev = np.linalg.eigvalsh((D.T @ D).numpy())[-1]
    assert math.isclose(lipschitz(D), ev, rel_tol=1e-9)
    assert math.isclose(lipschitz(D.float()), ev, rel_tol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_deterministic_for_the_same_input(engine):
    X, D = _problem(d=24, K=120, B=40, nnz=10, seed=11)
    runs = [nn_lasso(X.float(), D.float(), LAM, tol=1e-5, options=LassoOptions(ws_size=4, ws_grow=3, engine=engine)) for _ in range(2)]
    assert torch.equal(runs[0].codes, runs[1].codes)
    assert torch.equal(runs[0].rel_gap, runs[1].rel_gap)
    assert (runs[0].codes >= 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_codes_are_non_negative_where_the_unconstrained_lasso_is_not(engine):
    # x = d0 - d1 with correlated atoms: the plain lasso puts a negative weight on d1, ours must not.
    X, D = _problem(d=16, K=40, B=8, nnz=4, seed=12)
    X = torch.nn.functional.normalize(D[:, :8].T - 0.8 * D[:, 8:16].T, dim=1)
    res = nn_lasso(X.float(), D.float(), LAM, tol=1e-5, options=LassoOptions(engine=engine))
    assert (res.codes >= 0).all() and (res.rel_gap <= 1e-5).all()
    A_ref = _reference(X, D)
    assert ((_objective(X, D, res.codes.double()) - _objective(X, D, A_ref)) <= 1e-5 * _objective(X, D, A_ref) + 1e-9).all()
    # precondition: without the sign constraint the optimum uses negative weights (plain ISTA, soft threshold)
    G, xD = D.T @ D, X @ D
    L = lipschitz(D)
    a = torch.zeros(X.shape[0], D.shape[1], dtype=torch.float64)
    for _ in range(3000):
        z = a - (a @ G - xD) / L
        a = z.sign() * (z.abs() - LAM / L).clamp(min=0)
    assert (a < -1e-3).any()


def test_wrong_dimension_dictionary_is_refused():
    X, D = _problem(d=8, K=20, B=4, nnz=2, seed=13)
    with pytest.raises(ValueError, match=r"X \(4, 8\) and D \(9, 20\) do not match"):
        nn_lasso(X.float(), torch.randn(9, 20), LAM)
    with pytest.raises(ValueError, match="do not match"):
        nn_lasso(X.float()[0], D.float(), LAM)  # a vector, not a batch of rows


def test_sparse_code_stage_refuses_a_dictionary_of_another_d(tmp_path, capsys):
    import h5py

    from tests.fault_kit import cli, small_pipeline

    pipe = small_pipeline(tmp_path)
    out = tmp_path / "codes2"
    assert cli(pipe["code_cmd"] + ["--out", out, "--layer", "2", "--dictionary-only"]) == 0
    with h5py.File(out / "dictionary.h5", "r+") as f:  # same parameters key, wrong width
        K = f["D"].shape[1]
        del f["D"]
        f.create_dataset("D", data=np.eye(64, K, dtype=np.float32))
    capsys.readouterr()
    assert cli(pipe["code_cmd"] + ["--out", out, "--layer", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "64 x 16 dictionary" in err and "d=32" in err and "--force" in err
    assert not (out / "codes.h5").exists()


def test_worker_threads_give_the_single_thread_result_and_restore_threads():
    X, D = _problem(d=24, K=120, B=600, nnz=10, seed=14)
    before = torch.get_num_threads()
    one = nn_lasso(X.float(), D.float(), LAM, tol=1e-5, options=LassoOptions(ws_size=4, ws_grow=3, workers=1))
    two = nn_lasso(X.float(), D.float(), LAM, tol=1e-5, options=LassoOptions(ws_size=4, ws_grow=3, workers=2, chunk_size=100))
    assert torch.get_num_threads() == before
    assert (two.rel_gap <= 1e-5).all() and (two.codes >= 0).all()
    torch.testing.assert_close(two.codes, one.codes, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(two.primal, one.primal, atol=1e-6, rtol=1e-5)
    # the chunks, not the threads, decide the arithmetic: same chunks, same bits (resumed runs rely on it)
    one_same_chunks = nn_lasso(X.float(), D.float(), LAM, tol=1e-5, options=LassoOptions(ws_size=4, ws_grow=3, workers=1, chunk_size=100))
    assert torch.equal(two.codes, one_same_chunks.codes)


def test_bf16_pricing_error_is_within_the_bound_the_certificate_uses():
    # The active-set certificate trusts |c_j - C_j| <= 0.0045|C_j| + 0.0085*dmax*||r|| for C from a
    # bfloat16 GEMM with float32 accumulation. If this torch build ever accumulated in bf16, this fails.
    g = torch.Generator().manual_seed(21)
    D = torch.nn.functional.normalize(torch.randn(384, 3000, generator=g), dim=0)
    common = torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0)
    R = torch.randn(256, 384, generator=g) * 0.05 + 0.6 * common  # anisotropic, like real residuals
    C = (R.bfloat16() @ D.bfloat16()).double()
    exact = R.double() @ D.double()
    bound = 0.0045 * C.abs() + 0.0085 * R.double().norm(dim=1, keepdim=True)
    ratio = (exact - C).abs() / bound
    assert ratio.max() <= 1.0
    assert ratio.max() > 0.02  # the bound is not vacuous: bf16 error is real and of its order


def test_certificate_holds_for_atoms_that_are_not_unit_norm():
    # Rounding bounds scale with the largest atom norm; a dictionary with norms up to 3 must still be certified.
    X, D = _problem(d=24, K=120, B=32, nnz=6, seed=22)
    scale = torch.linspace(0.3, 3.0, D.shape[1], dtype=torch.float64)
    Ds = D * scale
    res = nn_lasso(X.float(), Ds.float(), LAM, tol=1e-5, options=LassoOptions(engine="active-set"))
    p, gap = duality_gap(X.float().double(), Ds.float().double(), res.codes.double(), LAM)
    assert (res.rel_gap.double() >= gap / p - 1e-6).all() and (res.rel_gap <= 1e-5).all()
    p_ref = _objective(X, Ds, _reference(X, Ds))
    assert ((p - p_ref) / p_ref <= 1e-5 + 1e-9).all()


def test_engines_agree_and_unknown_engine_is_refused():
    X, D = _problem(d=24, K=120, B=40, nnz=10, seed=23)
    a = nn_lasso(X.float(), D.float(), LAM, tol=1e-6, options=LassoOptions(engine="active-set"))
    b = nn_lasso(X.float(), D.float(), LAM, tol=1e-6, options=LassoOptions(engine="bpp"))
    torch.testing.assert_close(a.primal, b.primal, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="engine must be"):
        nn_lasso(X.float(), D.float(), LAM, options=LassoOptions(engine="lars"))


def _hard_problem(kind, seed):
    """Dictionaries on which a Lawson-Hanson path can reach a support that spans the data.

    fullrank: d=8, K=60 and a small lambda, so optimal supports have about d atoms and every
    violator of a d-atom support is a dependent column. illcond: atoms from a space with condition
    number 1e3. neardup: each atom has a 1e-4 perturbed copy of another norm. norms: norms 0.3 to 3.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "fullrank":
        X, D = _problem(d=8, K=60, B=64, nnz=8, seed=seed, noise=0.3)
        return X, D, 0.01
    if kind == "illcond":
        U, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
        spread = U @ torch.diag(torch.logspace(0, -3, 24, dtype=torch.float64))
        D = torch.nn.functional.normalize(spread @ torch.randn(24, 120, generator=g, dtype=torch.float64), dim=0)
        return _problem(d=24, K=120, B=64, nnz=6, seed=seed)[0], D, LAM
    X, D = _problem(d=24, K=60 if kind == "neardup" else 120, B=64, nnz=6, seed=seed)
    if kind == "neardup":
        copy = D + 1e-4 * torch.randn(D.shape, generator=g, dtype=torch.float64)
        return X, torch.cat([D, copy * torch.linspace(0.5, 2.0, 60, dtype=torch.float64)], 1), LAM
    return X, D * torch.linspace(0.3, 3.0, 120, dtype=torch.float64), LAM


@pytest.mark.parametrize("kind", ["fullrank", "illcond", "neardup", "norms"])
def test_active_set_engine_alone_reaches_tol_on_hard_dictionaries(kind):
    # No fallback: the rounds themselves must get there. Before dependent violators were exchanged
    # into the support (active_set._exchange), fullrank left most rows at gaps of 0.6.
    for seed in range(3):
        X, D, lam = _hard_problem(kind, seed)
        res = nn_lasso(X.float(), D.float(), lam, tol=1e-4, options=LassoOptions(engine="active-set", fallback_steps=0))
        p, gap = duality_gap(X.float().double(), D.float().double(), res.codes.double(), lam)
        assert (res.rel_gap <= 1e-4).all(), (kind, seed, float(res.rel_gap.max()))
        # and the gap it reports is the certificate of the float32 codes it returns, computed in float64
        assert (res.rel_gap.double() >= gap / p * (1 - 1e-7) - 1e-9).all()  # float32 rel_gap


@pytest.mark.parametrize("kind", ["fullrank", "illcond", "neardup", "norms"])
def test_tight_tol_is_reached_with_the_float64_fallback(kind, caplog):
    # At tol 1e-5 float32 rounds stall just above tol on fullrank; the float64 fallback must finish them.
    X, D, lam = _hard_problem(kind, 0)
    with caplog.at_level("WARNING", logger="mlsm.pipeline.solvers"):
        res = nn_lasso(X.float(), D.float(), lam, tol=1e-5, options=LassoOptions(engine="active-set"))
    p, gap = duality_gap(X.float().double(), D.float().double(), res.codes.double(), lam)
    assert (res.rel_gap <= 1e-5).all() and (gap / p <= 1e-5 + 1e-9).all()
    assert "stopped above tol" not in caplog.text


def test_rows_left_above_tol_are_named_and_their_gap_is_honest(caplog):
    X, D, lam = _hard_problem("fullrank", 1)
    with caplog.at_level("WARNING", logger="mlsm.pipeline.solvers"):
        res = nn_lasso(X.float(), D.float(), lam, tol=1e-12, options=LassoOptions(engine="active-set", max_iter=1, fallback_steps=20))
    above = torch.nonzero(res.rel_gap > 1e-12).flatten().tolist()
    assert above and f"{len(above)} of 64 rows stopped above tol" in caplog.text
    assert "rows " + ", ".join(map(str, above[:10])) in caplog.text
    p, gap = duality_gap(X.float().double(), D.float().double(), res.codes.double(), lam)
    assert (res.rel_gap.double() >= gap / p * (1 - 1e-7) - 1e-9).all()  # float32 rel_gap


@pytest.mark.parametrize("native", [True, False])
def test_pricing_gemm_follows_native_bf16_and_both_forms_certify(monkeypatch, native):
    # Without native bf16 the pricing GEMM runs in float32 (its output rounded to bf16): emulated
    # bf16 GEMMs are ~8x slower, and float32 inputs only shrink the error the bound allows for.
    import mlsm.core.device as device
    from mlsm.pipeline import active_set

    monkeypatch.setattr(device, "native_bf16", lambda dev, *a, **k: native)
    X, D = _problem(d=24, K=120, B=40, nnz=6, seed=24)
    Df = D.float()
    dic = active_set.prepare(Df, Df.T @ Df)
    assert dic.D_price.dtype == (torch.bfloat16 if native else torch.float32)
    res = nn_lasso(X.float(), Df, LAM, tol=1e-5, options=LassoOptions(engine="active-set"))
    p, gap = duality_gap(X.float().double(), Df.double(), res.codes.double(), LAM)
    assert (gap / p <= 1e-5 * 1.001).all() and (res.rel_gap.double() >= gap / p - 1e-6).all()
    C, exact = active_set._price(X.float(), dic.D_price), X.float().double() @ Df.double()
    C = torch.from_numpy(C).view(torch.bfloat16).double()
    bound = 0.0045 * C.abs() + 0.0085 * X.double().norm(dim=1, keepdim=True)
    assert ((exact - C).abs() <= bound).all()
