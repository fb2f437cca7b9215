"""Batched non-negative lasso with a certified duality gap.

Problem, per row x:  a* = argmin_{a >= 0} 0.5*||x - D a||^2 + lam*||a||_1,  D (d, K) with unit columns.

The reference (fixed 100 FISTA steps) never says how far from the optimum it stopped. `nn_lasso`
stops on a certified bound instead: the duality gap of a dual-feasible point built from the residual.

Duality (derived here so it can be checked): with Lagrange multiplier theta for r = x - D a,
    G(theta) = 0.5*||x||^2 - 0.5*||x - theta||^2,   feasible iff D^T theta <= lam (componentwise),
only the upper side because a >= 0. For any a >= 0 with r = x - D a, c = D^T r and a scale s in
[0, s_max], s_max = lam / max_j c_j (inf when max_j c_j <= 0), theta = s*r is feasible and
    P(a) - G(s r) = 0.5*(1 - s)^2*||r||^2 + sum_j a_j*(lam - s*c_j),
a sum of non-negative terms (no cancellation). It is minimised over s at s = 1 + a.c/||r||^2, which
we clip to [0, s_max]; at the optimum s = 1 and the gap is 0.

Method (`nn_lasso`): working sets. Screen the top-m atoms of each row by correlation, solve the
m-atom problem exactly, certify on the FULL dictionary (one B x d x K matmul per round: it is also
the pricing step), and for rows above tolerance re-solve with their support plus the atoms most
correlated with the residual. Rows still above tolerance after `max_iter` rounds get
full-dictionary FISTA in float64, warm-started, until the tolerance or a stall; rows left above
tol are named in a warning, and their rel_gap says how far from the optimum they are.

Two engines run the rounds. "active-set" (CPU, pipeline/active_set.py): per-row Lawson-Hanson on
carried Cholesky factors, compiled with numba; pricing in bf16 with an exact certificate.
"bpp" (here; the GPU engine): batched block principal pivoting (Kim & Park's NNLS active-set
method) on Gram sub-matrices. On CPU the cost is memory traffic and per-matrix LAPACK calls, not
flops, so its sub-problems stay small (support + 16 atoms) and rows are bucketed by size.
Correlation screening is poor on real hidden states (anisotropic: most atoms correlate with the
common direction), so several rounds are normal; each is cheap.

Precision: the data are float32, and so is the bpp certificate: exact up to float32 rounding,
about 1e-6 relative; ask for tol >= 1e-5 (LassoOptions(cert_dtype=torch.float64) recomputes the certificate in
float64). The active-set engine certifies in float64 on the float64 residual of its float32 codes.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

_TINY = 1e-12
_STATS: dict = {}  # counters for benchmarking (bpp iterations, fallback rows)


@dataclass
class LassoResult:
    codes: torch.Tensor  # (B, K) float32, >= 0 (dense)
    primal: torch.Tensor  # (B,) objective value at codes
    rel_gap: torch.Tensor  # (B,) certified (primal - dual) / max(primal, tiny), full dictionary
    n_iter: int  # outer iterations used (max over chunks)


@dataclass(frozen=True)
class LassoOptions:
    """How nn_lasso solves (never what: X, D, lam and tol say that); the defaults are measured best.

    max_iter: working-set rounds before the FISTA fallback. engine: "active-set" (CPU: per-row
    compiled active sets, bf16 pricing with an exact certificate; see pipeline/active_set.py), "bpp"
    (batched torch ops: the engine for GPUs, and any device), or "auto" (active-set on CPU for
    d <= ACTIVE_SET_MAX_D, bpp otherwise). ws_size: atoms screened by correlation for the first
    round; ws_grow: atoms added per round (None: per engine, 32/48 active-set, 16/16 bpp; each
    measured best on real states). bpp_iter: pivoting steps per bpp round. fallback_steps: FISTA
    step budget for rows still open after max_iter rounds (0: none; their rel_gap then says how far
    they are). cert_dtype: dtype of the certificate (default float32; torch.float64 removes float32
    rounding from it). workers: CPU only; chunks are solved by this many threads, each running torch
    single-threaded (default: torch.get_num_threads()): the per-round work is many small per-row
    steps that intra-op threading splits badly, so whole chunks per core scale better. chunk_size:
    rows per unit of work; 1024 halves the per-round Python/dispatch overhead of 512 and still gives
    a 2048-row batch (dictionary learning) one chunk per core.
    """

    max_iter: int = 20
    engine: str = "auto"
    ws_size: int | None = None
    ws_grow: int | None = None
    bpp_iter: int = 60
    fallback_steps: int = 5000
    chunk_size: int = 1024
    cert_dtype: torch.dtype | None = None
    workers: int | None = None
    progress: bool = False


# --------------------------------------------------------------------------------------------
# Certificates


def _gap_terms(rnorm2: torch.Tensor, c: torch.Tensor, a_c: torch.Tensor, a_l1: torch.Tensor,
               a_lam_minus: callable, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared gap arithmetic; `a_lam_minus(s)` returns sum_j a_j*(lam - s*c_j) for a (B,) scale s."""
    cmax = c.max(dim=1).values
    s_max = torch.where(cmax > 0, lam / cmax.clamp(min=_TINY), torch.full_like(cmax, math.inf))
    s_opt = torch.where(rnorm2 > _TINY, 1.0 + a_c / rnorm2.clamp(min=_TINY), torch.ones_like(rnorm2))
    s = torch.minimum(s_opt.clamp(min=0.0), s_max)
    gap = 0.5 * (1.0 - s) ** 2 * rnorm2 + a_lam_minus(s)
    primal = 0.5 * rnorm2 + lam * a_l1
    return primal, gap.clamp(min=0.0)


def duality_gap(X: torch.Tensor, D: torch.Tensor, A: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(primal (B,), gap (B,)) for dense codes A (B, K); gap >= primal - optimum (up to rounding).

    Negative entries of A are clipped first, since only a >= 0 is primal feasible.
    """
    A = A.clamp(min=0).to(D.dtype)
    X = X.to(D.dtype)
    r = X - A @ D.T
    c = r @ D
    rnorm2 = (r * r).sum(1)
    a_c = (A * c).sum(1)
    a_l1 = A.sum(1)
    return _gap_terms(rnorm2, c, a_c, a_l1, lambda s: (A * (lam - s[:, None] * c)).sum(1), lam)


def lipschitz(D: torch.Tensor) -> float:
    """lambda_max(D^T D), the gradient's Lipschitz constant; eigvalsh on the smaller Gram side."""
    D64 = D.detach().double()
    M = D64 @ D64.T if D.shape[0] <= D.shape[1] else D64.T @ D64
    return float(torch.linalg.eigvalsh(M)[-1])


# --------------------------------------------------------------------------------------------
# Reference solver


def fista_fixed(X: torch.Tensor, D: torch.Tensor, lam: float, n_iter: int = 100, L: float | None = None,
                A0: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: a fixed number of FISTA steps of size 1/L; no convergence claim.

    The gradient goes through D twice (2*K*d per row) unless the Gram matrix is cheaper (K < 2d).
    `A0` warm-starts from given codes.
    """
    X = X.to(D.dtype)
    if L is None:
        L = lipschitz(D)
    K = D.shape[1]
    gram = D.T @ D if K < 2 * D.shape[0] else None
    xD = X @ D
    a = torch.zeros(X.shape[0], K, dtype=D.dtype, device=D.device) if A0 is None else A0.to(D.dtype).clamp(min=0)
    y = a.clone()
    t = 1.0
    for _ in range(n_iter):
        # grad = D^T (D y - x) + lam = yG - xD + lam
        Dy_D = y @ gram if gram is not None else (y @ D.T) @ D
        a_next = (y - (Dy_D - xD + lam) / L).clamp_(min=0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = a_next + ((t - 1.0) / t_next) * (a_next - a)
        a, t = a_next, t_next
    return a


def _fista_to_tol(X, D, lam, A0, tol, max_steps, L, check_every=20):
    """Warm-started FISTA stopping on the certified gap; the last resort for rows the working sets miss.

    Momentum restarts at every check (cheap insurance against oscillation). It also stops when no
    row's gap improved by 1% over five checks: below ~1e-6 float32 rounding, not the solver, rules.
    """
    a = A0.clone()
    xD = X @ D
    steps, stale = 0, 0
    primal, gap = duality_gap(X, D, a, lam)
    rel = gap / primal.clamp(min=_TINY)
    best_a, best_p, best = a.clone(), primal.clone(), rel.clone()  # FISTA is not monotone: keep the best
    while steps < max_steps and bool((best > tol).any()) and stale < 5:
        y, t = a.clone(), 1.0
        for _ in range(check_every):
            a_next = (y - (((y @ D.T) @ D) - xD + lam) / L).clamp_(min=0)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = a_next + ((t - 1.0) / t_next) * (a_next - a)
            a, t = a_next, t_next
        steps += check_every
        primal, gap = duality_gap(X, D, a, lam)
        rel = gap / primal.clamp(min=_TINY)
        better = rel < best
        stale = 0 if bool((better & (rel < 0.99 * best) & (best > tol)).any()) else stale + 1
        best_a[better], best_p[better], best[better] = a[better], primal[better], rel[better]
    return best_a, best_p, best, steps


# --------------------------------------------------------------------------------------------
# Working-set solver


def _solve_free(Q: torch.Tensor, b: torch.Tensor, F: torch.Tensor, rows: torch.Tensor,
                n_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the given rows: x solves Q_FF x_F = b_F (x = 0 off F), and y = Q x - b.

    The systems are compacted to the free variables (free-first permutation, identity padding),
    and rows are bucketed by free-set size so that a few large rows do not pad everyone's
    factorisation: Cholesky cost grows with the cube of the padded size.
    """
    nr, m = len(rows), b.shape[1]
    dev, dt = b.device, b.dtype
    Fr = F[rows]
    nF = Fr.sum(1)
    x = torch.zeros(nr, m, dtype=dt, device=dev)
    y = -b[rows]
    if nr == 0 or int(nF.max()) == 0:
        return x, y
    order = torch.argsort(nF)
    P_all = torch.sort(Fr.to(torch.int8), dim=1, descending=True, stable=True).indices
    n_buckets = max(1, min(n_buckets, nr // 64))
    bounds = [round(i * nr / n_buckets) for i in range(n_buckets + 1)]

    def bucket(lo: int, hi: int):
        rb = order[lo:hi]
        nFb = nF[rb]
        f = int(nFb.max())
        if f == 0:
            return None
        P = P_all[rb, :f]
        g = rows[rb]
        Qb, bb = Q[g], b[g]
        n = len(rb)
        valid = torch.arange(f, device=dev)[None, :] < nFb[:, None]
        Qc = Qb.gather(2, P[:, None, :].expand(n, m, f))  # (n, m, f): columns of the free set
        Qf = Qc.gather(1, P[:, :, None].expand(n, f, f))
        eye = torch.eye(f, dtype=dt, device=dev)
        Qf = torch.where(valid[:, :, None] & valid[:, None, :], Qf, eye)
        Lc, info = torch.linalg.cholesky_ex(Qf)
        if bool((info != 0).any()):
            # Nearly dependent atoms: a small ridge keeps the factorisation alive; the gap stays honest.
            bad = info != 0
            Lc[bad] = torch.linalg.cholesky_ex(Qf[bad] + 1e-5 * eye)[0]
        xf = torch.cholesky_solve((bb.gather(1, P) * valid).unsqueeze(2), Lc) * valid.unsqueeze(2)
        return rb, torch.zeros_like(bb).scatter_(1, P, xf.squeeze(2)), torch.bmm(Qc, xf).squeeze(2) - bb

    for lo, hi in itertools.pairwise(bounds):
        res = bucket(lo, hi)
        if res is not None:
            rb, xb, yb = res
            x[rb], y[rb] = xb, yb
    return x, y


def _bpp(Q: torch.Tensor, b: torch.Tensor, F: torch.Tensor, max_iter: int, n_buckets: int = 4) -> tuple[torch.Tensor, int]:
    """Batched block principal pivoting for min_{a>=0} 0.5 a'Qa - b'a (Kim & Park 2011, NNLS).

    Each row keeps its own free set F; all infeasible variables swap at once, with the
    one-at-a-time backup rule (largest index) after 3 steps without progress, which makes it finite.
    Only rows still infeasible are re-solved. Returns the solution and the number of iterations.
    """
    nb, m = b.shape
    dev = b.device
    out = torch.zeros_like(b)
    rows = torch.arange(nb, device=dev)  # rows still infeasible
    n_inf_best = torch.full((nb,), m + 1, dtype=torch.long, device=dev)
    backup = torch.full((nb,), 3, dtype=torch.long, device=dev)
    F = F.clone()
    idx_m = torch.arange(m, device=dev)
    eps = 1e-6 * b.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        x, y = _solve_free(Q, b, F, rows, n_buckets)
        Fr, e = F[rows], eps[rows]
        V = (Fr & (x < -e)) | (~Fr & (y < -e))
        nV = V.sum(1)
        out[rows] = x.clamp(min=0)
        open_ = nV > 0
        if not bool(open_.any()):
            break
        rows, V, nV, Fr = rows[open_], V[open_], nV[open_], Fr[open_]
        improve = nV < n_inf_best[rows]
        use_backup = ~improve & (backup[rows] <= 0)
        n_inf_best[rows] = torch.where(improve, nV, n_inf_best[rows])
        backup[rows] = torch.where(improve, torch.full_like(nV, 3), backup[rows] - 1)
        last = torch.where(V, idx_m, -1).amax(dim=1)  # backup rule: flip only the largest index
        flip = torch.where(use_backup[:, None], idx_m[None, :] == last[:, None], V)
        F[rows] = Fr ^ flip
    return out, it


def _gram_block(gram_flat: torch.Tensor, K: int, rows_idx: torch.Tensor, cols_idx: torch.Tensor) -> torch.Tensor:
    """gram[rows_idx[i, p], cols_idx[i, q]] -> (n, p, q); int32 flat indices are much cheaper to build."""
    r = rows_idx.to(torch.int32) if K * K < 2**31 else rows_idx
    c = cols_idx.to(r.dtype)
    flat = (r[:, :, None] * K + c[:, None, :]).reshape(-1)
    return gram_flat.index_select(0, flat).view(rows_idx.shape[0], rows_idx.shape[1], cols_idx.shape[1])


def _csr(ws: torch.Tensor, vals: torch.Tensor, K: int) -> torch.Tensor:
    """Codes on a working set as a CSR matrix: D a then costs m*d per row instead of K*d."""
    nb, m = ws.shape
    crow = torch.arange(0, nb * m + 1, m, device=ws.device, dtype=torch.int64)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we only use the stable mm
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, ws.reshape(-1), vals.reshape(-1), size=(nb, K), check_invariants=False)


def _certify(X, D, Dt, ws, a, lam, dtype):
    """Full-dictionary certificate for working-set codes: returns primal, gap, c = D^T r."""
    K = D.shape[1]
    if dtype is not None and dtype != D.dtype:
        X, D, Dt, a = X.to(dtype), D.to(dtype), Dt.to(dtype), a.to(dtype)
    else:
        a = a.to(D.dtype)
    if X.device.type != "cpu":  # gathers are cheap on GPUs; CSR mm is the CPU's fast path
        Da = torch.bmm(a.unsqueeze(1), Dt[ws]).squeeze(1)
    else:
        Da = torch.sparse.mm(_csr(ws, a, K), Dt)
    r = X - Da
    c = r @ D
    c_ws = c.gather(1, ws)
    rnorm2 = (r * r).sum(1)
    a_c = (a * c_ws).sum(1)
    primal, gap = _gap_terms(rnorm2, c, a_c, a.sum(1), lambda s: (a * (lam - s[:, None] * c_ws)).sum(1), lam)
    return primal.float(), gap.float(), c.float()


def _bpp_rounds(X, D, Dt, gram, lam, tol, opt: LassoOptions):
    """Working-set rounds with batched torch ops (the engine for GPUs). Returns dense codes, primal,
    rel gap, rounds used and the rows still above tol."""
    B, K = X.shape[0], D.shape[1]
    dev = X.device
    C0 = X @ D  # (B, K) correlations
    max_iter, ws_grow, cert_dtype = opt.max_iter, opt.ws_grow, opt.cert_dtype
    m = min(opt.ws_size, K)
    ws = torch.topk(C0, m, dim=1, sorted=False).indices  # (B, m) each row's working set
    gram_flat = gram.reshape(-1)  # (K*K,)
    Q = _gram_block(gram_flat, K, ws, ws)  # (B, m, m)
    b = C0.gather(1, ws) - lam  # (B, m)
    F = b > 0  # (B, m) free (positive) variables

    primal = torch.zeros(B, dtype=torch.float32, device=dev)
    rel = torch.full((B,), math.inf, dtype=torch.float32, device=dev)
    parts = []  # (rows, ws, a) per round, scattered into the dense codes once at the end
    rows = torch.arange(B, device=dev)  # rows still open
    n_iter = 0
    for it in range(max_iter):
        n_iter = it + 1
        a, n_bpp = _bpp(Q, b, F, opt.bpp_iter)
        _STATS["bpp_iters"] = _STATS.get("bpp_iters", 0) + n_bpp
        p, g, c = _certify(X[rows], D, Dt, ws, a, lam, cert_dtype)
        rr = g / p.clamp(min=_TINY)
        primal[rows], rel[rows] = p, rr
        open_ = rr > tol
        n_open = int(open_.sum())
        last = n_open == 0 or it == max_iter - 1
        if last or n_open < len(rows):
            done = ~open_ if not last else torch.ones_like(open_)
            parts.append((rows[done], ws[done], a[done]))
        if last:
            rows = rows[open_]
            break
        if n_open < len(rows):
            rows, ws, a, c, Q, b = rows[open_], ws[open_], a[open_], c[open_], Q[open_], b[open_]
        # Next working set: the current support (its Gram block is reused) plus the atoms most
        # correlated with the residual among the rest (the violators come first). Only `keep` is
        # excluded, so the working set never holds an atom twice.
        support = a > 0  # (n_open, m)
        s = int(support.sum(1).max())
        order = torch.sort(support.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :s]  # (n_open, s)
        keep = ws.gather(1, order)  # (n_open, s) atom ids, support first
        Q_ss = Q.gather(1, order[:, :, None].expand(n_open, s, Q.shape[2])).gather(2, order[:, None, :].expand(n_open, s, s))
        n_new = min(ws_grow, K - s)
        top = torch.topk(c.scatter_(1, keep, -math.inf), n_new, dim=1, sorted=False)
        new = top.indices  # (n_open, n_new)
        Q_sn = _gram_block(gram_flat, K, keep, new)  # (n_open, s, n_new)
        Q_nn = _gram_block(gram_flat, K, new, new)  # (n_open, n_new, n_new)
        Q = torch.cat([torch.cat([Q_ss, Q_sn], 2), torch.cat([Q_sn.transpose(1, 2), Q_nn], 2)], 1)  # (n_open, m', m')
        ws = torch.cat([keep, new], 1)  # (n_open, m'), m' = s + n_new
        b = torch.cat([b.gather(1, order), C0[rows[:, None], new] - lam], 1)
        F = torch.cat([support.gather(1, order), top.values > lam], 1)
    codes = torch.zeros(B, K, dtype=torch.float32, device=dev)
    for r_, w_, a_ in parts:
        codes[r_[:, None], w_] = a_
    return codes, primal, rel, n_iter, rows


def _finish(X, D, lam, tol, rounds: tuple, L, opt: LassoOptions, rounds_certified: bool):
    """Float64 FISTA from the working-set codes for the rows still open (rare), then the optional float64
    certificate: for the fallback rows only if the rounds already certified in cert_dtype (bpp), else for every row.

    The fallback runs in float64 because the rows that reach it are the hard ones (supports that span
    the data, near-duplicate atoms), where float32 arithmetic stalls just above a tight tol; its float32
    result is certified in float64, so the gap reported is that of the codes returned.
    """
    B = X.shape[0]
    codes, primal, rel, rows = rounds
    fallback_steps, cert_dtype = opt.fallback_steps, opt.cert_dtype
    if len(rows) and fallback_steps > 0:
        log.debug("nn_lasso: %d rows above tol after the working-set rounds; FISTA fallback", len(rows))
        X64, D64 = X[rows].double(), D.double()
        a, _, _, _ = _fista_to_tol(X64, D64, lam, codes[rows].double(), tol, fallback_steps, L())
        a = a.float()
        p, g = duality_gap(X64, D64, a.double(), lam)
        _STATS["fallback_rows"] = _STATS.get("fallback_rows", 0) + len(rows)
        codes[rows], primal[rows], rel[rows] = a, p.float(), (g / p.clamp(min=_TINY)).float()
    if cert_dtype is not None and cert_dtype != torch.float32:
        redo = rows if rounds_certified else torch.arange(B, device=X.device)
        if len(redo):
            p, g = duality_gap(X[redo].to(cert_dtype), D.to(cert_dtype), codes[redo].to(cert_dtype), lam)
            primal[redo], rel[redo] = p.float(), (g / p.clamp(min=_TINY)).float()
    return codes, primal, rel


ACTIVE_SET_MAX_D = 8192  # the active-set certificate's bf16 rounding bound is proven up to this d


def auto_engine(device_type: str, d: int) -> str:
    """The engine nn_lasso picks by default for a device type ("cpu", "cuda", ...) and vector size d."""
    return "active-set" if device_type == "cpu" and d <= ACTIVE_SET_MAX_D else "bpp"


def nn_lasso(X: torch.Tensor, D: torch.Tensor, lam: float, tol: float = 1e-4, *, gram: torch.Tensor | None = None,
             options: LassoOptions = LassoOptions()) -> LassoResult:
    """Solve the non-negative lasso for every row of X to a certified relative duality gap `tol`.

    gram: D^T D, to reuse across calls; options: how (LassoOptions). Runs on the device of D.
    Chunks never depend on the number of workers or threads, so neither changes a bit of the result.
    """
    if lam < 0 or not tol > 0:
        raise ValueError(f"nn_lasso: need lam >= 0 and tol > 0, got lam={lam}, tol={tol}")
    if X.ndim != 2 or D.ndim != 2 or X.shape[1] != D.shape[0]:
        raise ValueError(f"nn_lasso: X {tuple(X.shape)} and D {tuple(D.shape)} do not match")
    engine = options.engine
    if engine == "auto":
        engine = auto_engine(D.device.type, D.shape[0])
    if engine not in ("active-set", "bpp"):
        raise ValueError(f"nn_lasso: engine must be 'auto', 'active-set' or 'bpp', got {engine!r}")
    if engine == "active-set" and D.device.type != "cpu":
        raise ValueError("nn_lasso: the active-set engine runs on CPU; use engine='bpp' (or 'auto') on a GPU")
    if engine == "active-set" and D.shape[0] > ACTIVE_SET_MAX_D:
        raise ValueError(f"nn_lasso: the active-set engine needs d <= {ACTIVE_SET_MAX_D}, got d={D.shape[0]}; "
                         f"use engine='bpp'")
    opt = dataclasses.replace(
        options, engine=engine,
        ws_size=options.ws_size if options.ws_size is not None else (32 if engine == "active-set" else 16),
        ws_grow=options.ws_grow if options.ws_grow is not None else (48 if engine == "active-set" else 16))
    D = D.float()
    X = X.to(device=D.device, dtype=torch.float32)
    if gram is None:
        gram = D.T @ D
    gram = gram.to(device=D.device, dtype=torch.float32).contiguous()
    Dt = D.T.contiguous()
    B, K = X.shape[0], D.shape[1]
    lip: list[float] = []  # computed only if some row needs the fallback

    def L() -> float:
        if not lip:
            lip.append(lipschitz(D))
        return lip[0]

    chunk_size, workers = opt.chunk_size, opt.workers
    if workers is None:
        workers = torch.get_num_threads() if D.device.type == "cpu" else 1
    workers = max(1, min(int(workers), math.ceil(B / chunk_size)))

    if engine == "active-set":
        from mlsm.pipeline import active_set  # numba compiles (or loads its cache) on first use

        dic = active_set.prepare(D, gram)

        def rounds(Xc):
            codes, primal, rel, n_iter, rows = active_set.solve_chunk(Xc, dic, lam, tol, opt.max_iter, opt.ws_size,
                                                                       opt.ws_grow, _STATS)
            return codes, primal, rel, n_iter, torch.from_numpy(rows)
    else:
        def rounds(Xc):
            return _bpp_rounds(Xc, D, Dt, gram, lam, tol, opt)

    def solve(s: int):
        Xc = X[s:s + chunk_size]
        codes, primal, rel, n_iter, rows = rounds(Xc)
        return (*_finish(Xc, D, lam, tol, (codes, primal, rel, rows), L, opt, engine == "bpp"), n_iter)

    starts = range(0, B, chunk_size)
    bar = tqdm(total=len(starts), desc="nn_lasso", disable=not opt.progress or len(starts) < 2, unit="chunk")
    if workers > 1 and len(starts) > 1:
        outer = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                results = []
                for res in pool.map(solve, starts):
                    results.append(res)
                    bar.update()
        finally:
            torch.set_num_threads(outer)
    else:
        results = []
        for s in starts:
            results.append(solve(s))
            bar.update()
    bar.close()
    out_codes = [r[0] for r in results]
    out_p = [r[1] for r in results]
    out_r = [r[2] for r in results]
    n_iter = max((r[3] for r in results), default=0)
    if B == 0:
        z = torch.zeros(0, device=D.device)
        return LassoResult(torch.zeros(0, K, device=D.device), z, z, 0)
    rel = torch.cat(out_r)
    above = torch.nonzero(rel > tol).flatten()
    if len(above) and opt.fallback_steps > 0:
        shown = ", ".join(str(int(i)) for i in above[:10]) + (", ..." if len(above) > 10 else "")
        log.warning("nn_lasso: %d of %d rows stopped above tol=%g (worst rel gap %.3g; rows %s): their rel_gap "
                    "says how far from the optimum they are", len(above), B, tol, float(rel.max()), shown)
    return LassoResult(torch.cat(out_codes), torch.cat(out_p), rel, n_iter)
