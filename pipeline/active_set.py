"""CPU engine of `nn_lasso`: per-row active sets compiled with numba, certificates batched in bf16.

The working-set rounds of `pipeline.solvers` stay: solve on ~100 atoms (support + candidates), certify on the full
dictionary, add the atoms most correlated with the residual, repeat. What changes on CPU is how
each piece is done, because there the cost was never the flops:

- The sub-problem is solved per row by Lawson-Hanson active sets (a few atoms enter at a time,
  step back when one would go negative) on a Cholesky factor that is updated, not refactorised,
  and carried from round to round. The factor is float32: exactness is the certificate's job, and
  a float64 factor was 8% slower with the same rounds, passes and certified gaps on real states. Gradients of the candidates come from `D^T r` with r kept in
  d dimensions, so no Gram block is ever gathered; the Gram matrix is read only for the factor's
  new columns.
- The full-dictionary product `D^T r` that prices and certifies each round runs in bfloat16
  (2.4x the float32 GEMM on AVX512-BF16; on CPUs without native bf16 the GEMM runs in float32
  and only its output is rounded, as torch's emulated bf16 GEMM is ~8x slower). It is made exact where the certificate needs it: every
  atom whose bf16 value could be the maximum, under a rigorous rounding bound, and every support
  atom is recomputed in float64, against the residual x - D a of the float32 codes returned, itself
  formed in float64. So the certified gap is that of the codes we output, to float64 rounding.
- A violator whose factor column is (nearly) dependent on the support's cannot enter by an append.
  That is the normal state once the support spans the data (|P| = d, or near-duplicate atoms): it
  is then exchanged for the support atom a simplex-style ratio test pushes out (`_exchange`).
  Blocking such atoms for the round instead left rows stuck far above tol (numba 0.62's LLVM 20
  rounds the fastmath factor updates differently on some CPUs, and that was enough to lead one
  row of a test into a d-atom support).

Everything that touches one row runs in one compiled loop (`nogil`), so threads over chunks scale.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np
import torch


@nb.njit(cache=True, nogil=True, fastmath=True)
def _chol_append(L, n, col, qdd):
    """Row n of the Cholesky factor when a column enters (col = Q[P, j]); returns the pivot squared."""
    for i in range(n):
        s = col[i]
        for k in range(i):
            s -= L[i, k] * L[n, k]
        L[n, i] = s / L[i, i]
    d = qdd
    for k in range(n):
        d -= L[n, k] * L[n, k]
    return d


@nb.njit(cache=True, nogil=True, fastmath=True)
def _chol_delete(L, n, k):
    """Factor of Q without row/column k, in place: drop row k, Givens rotations restore the triangle."""
    for i in range(k, n - 1):
        for j in range(i + 2):
            L[i, j] = L[i + 1, j]
    for j in range(k, n - 1):
        a = L[j, j]
        b = L[j, j + 1]
        r = math.sqrt(a * a + b * b)
        c = a / r if r > 0 else 1.0  # r > 0 while pivots are; guarded like the step below, by principle
        s = b / r if r > 0 else 0.0
        for i in range(j, n - 1):
            x = L[i, j]
            y = L[i, j + 1]
            L[i, j] = c * x + s * y
            L[i, j + 1] = -s * x + c * y
    for i in range(n):
        L[i, n - 1] = 0.0
        L[n - 1, i] = 0.0


@nb.njit(cache=True, nogil=True, fastmath=True)
def _chol_solve(L, n, rhs, out):
    """out = (L L^T)^{-1} rhs; the back substitution runs by rows of L so both passes stream."""
    for i in range(n):
        s = rhs[i]
        for k in range(i):
            s -= L[i, k] * out[k]
        out[i] = s / L[i, i]
    for i in range(n - 1, -1, -1):
        xi = out[i] / L[i, i]
        out[i] = xi
        for k in range(i):
            out[k] -= xi * L[i, k]


@nb.njit(cache=True, nogil=True, fastmath=True)
def _residual(x, Dt, Widx, P, nP, a, resid):
    """r = x - D_P a_P with the float32 values of a, i.e. the residual of the codes we output."""
    for t in range(x.shape[0]):
        resid[t] = x[t]
    for k in range(nP):
        p = P[k]
        ap = np.float32(a[p])
        row = Dt[Widx[p]]
        for t in range(x.shape[0]):
            resid[t] -= ap * row[t]


@nb.njit(cache=True, nogil=True, fastmath=True)
def _dot32(u, v):
    s = np.float32(0.0)
    for t in range(u.shape[0]):
        s += u[t] * v[t]
    return s


@nb.njit(cache=True, nogil=True, fastmath=True)
def _max32(u):
    m = u[0]
    for t in range(1, u.shape[0]):
        m = max(m, u[t])
    return m


@nb.njit(cache=True, nogil=True, fastmath=True)
def _dot64(u, v):
    s = 0.0
    for t in range(u.shape[0]):
        s += np.float64(u[t]) * np.float64(v[t])
    return s


@nb.njit(cache=True, nogil=True)
def _exchange(L, P, nP, a, Widx, gram, j, gj, dd, col, w, P_old):
    """Enter atom j, which is (nearly) in the span of the support P, by pushing one support atom out.

    Lawson-Hanson grows P one factor column at a time, so it cannot take an atom whose column is
    dependent on P's; once P spans the data (|P| = d), every violator is such an atom. With
    d_j = D_P w + e (Q_PP w = Q_Pj, ||e||^2 = dd), the move a_j += t, a_P -= t*w keeps the fit up to
    t*e and changes the objective by -t*gj + t^2*dd/2, where gj = d_j.r - lam > 0 (at the optimum on
    P, D_P^T r = lam). It descends until the first a_p with w_p > 0 reaches 0 (the ratio test of a
    simplex pivot): p leaves, j enters. Returns p, or -1 when nothing changed: no support atom
    bounds the step, the line minimum comes first, or j is dependent on P without p as well.
    `col` holds Q_Pj on entry; `w` and `P_old` are scratch.
    """
    _chol_solve(L, nP, col, w)
    t = np.inf
    out = -1
    for k in range(nP):
        if w[k] > 0:
            tk = a[P[k]] / w[k]
            if tk < t:
                t = tk
                out = k
    if out < 0 or (dd > 0 and t > gj / dd):
        return -1
    p = P[out]
    for k in range(nP):
        P_old[k] = P[k]
    _chol_delete(L, nP, out)
    for k in range(out, nP - 1):
        P[k] = P[k + 1]
    n = nP - 1
    row = gram[Widx[j]]
    for k in range(n):
        col[k] = row[Widx[P[k]]]
    d2 = _chol_append(L, n, col, row[Widx[j]])
    if d2 <= 1e-6 * row[Widx[j]]:  # still dependent without p (rounding): put p back, change nothing
        row = gram[Widx[p]]
        for k in range(n):
            col[k] = row[Widx[P[k]]]
        L[n, n] = math.sqrt(max(_chol_append(L, n, col, row[Widx[p]]), 1e-30))
        P[n] = p
        return -1
    L[n, n] = math.sqrt(d2)
    P[n] = j
    for k in range(nP):
        a[P_old[k]] = max(a[P_old[k]] - t * w[k], 0.0)
    a[p] = 0.0
    a[j] = t
    return p


@nb.njit(cache=True, nogil=True)
def _round(X, Dt, gram, dmax, lam, rows, slot, prev_idx, prev_a, prev_b, prev_n, prev_L, prev_off, cand, n_cand,
           out_idx, out_a, out_b, out_n, out_L, out_off, R, qblock):
    """One working-set round for each row: NNLS on (previous support + candidates), warm-started.

    Row i of this round is chunk row rows[i]; its previous support, values, b = D^T x - lam and
    packed factor are at slot[i] of the prev_* arrays. Writes the new support in factor order,
    its packed factor (rows after one another from out_off[i], so the buffer is used densely and
    can be reused round after round) and the residual R[i]. Returns the number of active-set passes.

    Arguments (flat, as numba compiles them best; the one bundle is this list):
      X (B, d) float32 rows of the chunk; Dt (K, d) and gram (K, K) the dictionary and D^T D;
      dmax the largest atom norm; lam the L1 weight;
      rows (n,) chunk rows solved this round; slot (n,) their index in the prev_* arrays;
      prev_idx/prev_a/prev_b (S, w) previous support ids, values and b; prev_n (S,) support sizes;
      prev_L/prev_off packed Cholesky factors and each slot's offset into them;
      cand (n, c) candidate atoms per row and n_cand (n,) how many are valid;
      out_idx/out_a/out_b/out_n/out_L/out_off the same six outputs for this round;
      R (n, d) residual out; qblock how many atoms may enter per pass (halved per row on step-backs).
    """
    n = rows.shape[0]
    K = gram.shape[0]
    wmax = prev_idx.shape[1] + cand.shape[1]
    mark = np.zeros(K, np.bool_)
    Widx = np.empty(wmax, np.int64)
    b = np.empty(wmax)
    a = np.empty(wmax)
    inP = np.empty(wmax, np.bool_)
    blocked = np.empty(wmax, np.bool_)
    P = np.empty(wmax, np.int64)
    L = np.zeros((wmax + 1, wmax + 1), np.float32)
    bP = np.empty(wmax, np.float32)
    z = np.empty(wmax, np.float32)
    col = np.empty(wmax, np.float32)
    g = np.empty(wmax, np.float32)
    added = np.empty(wmax, np.int64)
    g_at = np.empty(wmax, np.float32)
    path_at = np.empty(wmax)
    w_ex = np.empty(wmax, np.float32)
    P_old = np.empty(wmax, np.int64)
    d = X.shape[1]
    r_prev = np.empty(d, np.float32)
    passes = 0
    pos = 0
    for i in range(n):
        x = X[rows[i]]
        sl = slot[i]
        ns = prev_n[sl]
        for k in range(ns):
            Widx[k] = prev_idx[sl, k]
            a[k] = prev_a[sl, k]
            b[k] = prev_b[sl, k]
            mark[Widx[k]] = True
            off = prev_off[sl] + k * (k + 1) // 2
            for kk in range(k + 1):
                L[k, kk] = prev_L[off + kk]
            P[k] = k
            inP[k] = True
            blocked[k] = False
        w = ns
        for t in range(n_cand[i]):
            j = cand[i, t]
            if not mark[j]:
                mark[j] = True
                Widx[w] = j
                a[w] = 0.0
                b[w] = _dot64(Dt[j], x) - lam
                inP[w] = False
                blocked[w] = False
                w += 1
        bmax = 1e-30
        for k in range(w):
            mark[Widx[k]] = False
            bmax = max(bmax, abs(b[k]))
        eps = 1e-6 * bmax
        nP = ns
        resid = R[i]
        _residual(x, Dt, Widx, P, nP, a, resid)
        q = qblock
        path = 0.0
        for k in range(w):
            g_at[k] = np.inf
            path_at[k] = 0.0
        for _ in range(8 * w + 50):
            passes += 1
            for k in range(w):
                if inP[k] or blocked[k]:
                    g[k] = -1.0
                elif g_at[k] + (path - path_at[k]) > eps:
                    # |d.r' - d.r| <= ||d|| ||r' - r||: only a candidate whose last gradient plus the
                    # residual's path length (times dmax) since then reaches eps can be a violator now.
                    g_at[k] = _dot32(Dt[Widx[k]], resid) - lam
                    path_at[k] = path
                    g[k] = g_at[k]
                else:
                    g[k] = -1.0
            # Enter up to q violators, largest gradient first.
            nadd = 0
            q_now = q
            j = -1
            for _ in range(q_now):
                best = eps
                j = -1
                for k in range(w):
                    if g[k] > best:
                        best = g[k]
                        j = k
                if j < 0:
                    break
                g[j] = -1.0
                row = gram[Widx[j]]
                for k in range(nP):
                    col[k] = row[Widx[P[k]]]
                qjj = row[Widx[j]]
                dd = _chol_append(L, nP, col, qjj)
                if dd <= 1e-6 * qjj:  # (nearly) in the span of the support (for float32)
                    if nadd > 0:
                        continue  # the support moved in this pass: it is tried again in the next
                    p = _exchange(L, P, nP, a, Widx, gram, j, best, dd, col, w_ex, P_old)
                    if p < 0:
                        blocked[j] = True
                        continue
                    inP[p] = False
                    g_at[p] = np.inf
                    inP[j] = True
                    added[nadd] = j
                    nadd += 1
                    continue
                L[nP, nP] = math.sqrt(dd)
                P[nP] = j
                inP[j] = True
                nP += 1
                a[j] = 0.0
                added[nadd] = j
                nadd += 1
            if nadd == 0:
                if j < 0:
                    break
                continue
            # Lawson-Hanson: solve on P; if some value is not positive, step back to the boundary and drop it.
            for _ in range(w + 5):
                for k in range(nP):
                    bP[k] = b[P[k]]
                _chol_solve(L, nP, bP, z)
                zmin = 1.0
                for k in range(nP):
                    zmin = min(zmin, z[k])
                if zmin > 0:
                    for k in range(nP):
                        a[P[k]] = z[k]
                    break
                alpha = 1.0
                for k in range(nP):
                    if z[k] <= 0:
                        ak = a[P[k]]
                        den = ak - z[k]  # >= 0; 0 when both are 0 (an atom that just entered at 0)
                        alpha = min(alpha, ak / den) if den > 0 else 0.0
                for k in range(nP):
                    a[P[k]] += alpha * (z[k] - a[P[k]])
                k = nP - 1
                while k >= 0:
                    p = P[k]
                    if a[p] <= 1e-12 * bmax:
                        a[p] = 0.0
                        _chol_delete(L, nP, k)
                        for kk in range(k, nP - 1):
                            P[kk] = P[kk + 1]
                        nP -= 1
                        inP[p] = False
                        g_at[p] = np.inf
                        for t in range(nadd):
                            if added[t] == p:
                                # An atom entered and left at once: enter fewer at a time; one at a
                                # time (plain Lawson-Hanson) it may not come back in this round.
                                if q_now == 1:
                                    blocked[p] = True
                                q = max(1, q_now // 2)
                    k -= 1
            for t in range(d):
                r_prev[t] = resid[t]
            _residual(x, Dt, Widx, P, nP, a, resid)
            step = 0.0
            for t in range(d):
                step += (resid[t] - r_prev[t]) ** 2
            path += dmax * math.sqrt(step) + 1e-7
        out_n[i] = nP
        out_off[i] = pos
        for k in range(nP):
            p = P[k]
            out_idx[i, k] = Widx[p]
            out_a[i, k] = a[p]
            out_b[i, k] = b[p]
            off = pos + k * (k + 1) // 2
            for kk in range(k + 1):
                out_L[off + kk] = L[k, kk]
        pos += nP * (nP + 1) // 2
    return passes


@nb.njit(cache=True, nogil=True)
def _top_outside(c, idx, n_sup, g, cand, n_cand, mark, hv, hi):
    """The g largest entries of c outside idx[:n_sup] (a min-heap; unsorted)."""
    for k in range(n_sup):
        mark[idx[k]] = True
    n = 0
    for j in range(c.shape[0]):
        v = c[j]
        if (n == g and v <= hv[0]) or mark[j]:
            continue
        if n < g:
            k = n
            n += 1
            while k > 0:
                par = (k - 1) // 2
                if hv[par] <= v:
                    break
                hv[k] = hv[par]
                hi[k] = hi[par]
                k = par
        else:
            k = 0
            while True:
                m = 2 * k + 1
                if m >= g:
                    break
                if m + 1 < g and hv[m + 1] < hv[m]:
                    m += 1
                if hv[m] >= v:
                    break
                hv[k] = hv[m]
                hi[k] = hi[m]
                k = m
        hv[k] = v
        hi[k] = j
    for k in range(n):
        cand[k] = hi[k]
    n_cand[0] = n
    for k in range(n_sup):
        mark[idx[k]] = False


@nb.njit(cache=True, nogil=True, fastmath=True)
def _bf16_row(bits, bits32):
    """A row of bfloat16 (as int16 bits) widened to float32 in a scratch buffer: saves torch's
    full-size float32 copy of C, which is written and read back once per round."""
    for j in range(bits.shape[0]):
        bits32[j] = np.uint32(np.uint16(bits[j])) << 16
    return bits32.view(np.float32)


@nb.njit(cache=True, nogil=True)
def _select(C16, g, cand, n_cand):
    """Initial candidates: the top g of each row of C."""
    mark = np.zeros(C16.shape[1], np.bool_)
    hv = np.empty(max(g, 1), np.float32)
    hi = np.empty(max(g, 1), np.int64)
    bits32 = np.empty(C16.shape[1], np.uint32)
    empty = np.empty(0, np.int32)
    for i in range(C16.shape[0]):
        _top_outside(_bf16_row(C16[i], bits32), empty, 0, g, cand[i], n_cand[i:i + 1], mark, hv, hi)


@nb.njit(cache=True, nogil=True)
def _a_dot(a, c, ns):
    """sum_k a_k c_k over the support, with the float32 values of a (those of the codes we output)."""
    s = 0.0
    for k in range(ns):
        s += np.float64(np.float32(a[k])) * c[k]
    return s


@nb.njit(cache=True, nogil=True, fastmath=False)
def _gap(rn2, ac, a, c_sup, ns, cmax, lam):
    """solvers._gap_terms for one row: the best scale s of the residual, clipped to dual feasibility."""
    s_max = lam / cmax if cmax > 0 else np.inf
    s = 1.0 + ac / rn2 if rn2 > 1e-12 else 1.0
    s = min(max(s, 0.0), s_max)
    lam_minus = 0.0
    for k in range(ns):
        lam_minus += np.float64(np.float32(a[k])) * (lam - s * c_sup[k])
    return max(0.5 * (1.0 - s) ** 2 * rn2 + lam_minus, 0.0)


@nb.njit(cache=True, nogil=True)
def _certify_select(X, rows, R, C16, Dt, dmax, lam, idx, a, n_sup, g, cand, n_cand, primal, gap, tol, exact):
    """Duality gap of each row's codes against the FULL dictionary, and the next candidates.

    C holds D^T r from a bfloat16 GEMM with float32 accumulation, r being the float32 residual R
    (or from a float32 GEMM rounded to bf16 on CPUs without native bf16: no input rounding, so a
    smaller error than the bound below allows).
    With u = 2^-8 (bf16's unit roundoff), sum_t |d_jt r_t| <= ||d_j|| ||r|| and ||d_j|| <= dmax,
    its error is bounded by
        |c_j - C_j| <= u/(1-u)*|C_j| + ((2u + u^2) + d*2^-24)*dmax*||r||
    (output rounding; bf16 rounding of d_j and r; float32 accumulation over d terms). For
    d <= 8192 that is at most 0.0045*|C_j| + 0.0085*dmax*||r||, the bound used here.
    The certificate itself is computed on the exact residual r* = x - D a of the float32 codes a
    we return (formed in float64 from the row x), so float32 rounding of r never enters the gap;
    |d_j.r* - d_j.r| <= dmax*||r* - r|| joins the bound. Every atom whose upper bound reaches the
    largest lower bound is recomputed exactly, so max_j c_j is exact; so is c_j on the support. The
    gap formula is `solvers._gap_terms` (see there for the derivation).
    Before that, rows whose gap estimated from the bf16 values alone is far above tol are left
    open without the exact work (`exact` forces it, for the last round).
    """
    n, K = C16.shape
    d = R.shape[1]
    mark = np.zeros(K, np.bool_)
    bits32 = np.empty(K, np.uint32)
    hv = np.empty(max(g, 1), np.float32)
    hi = np.empty(max(g, 1), np.int64)
    c_sup = np.empty(idx.shape[1])
    r64 = np.empty(d)
    for i in range(n):
        r = R[i]
        rn2 = _dot64(r, r)
        e0 = 0.0085 * dmax * math.sqrt(rn2) + 1e-30
        ns = n_sup[i]
        al1 = 0.0
        for k in range(ns):
            al1 += np.float64(np.float32(a[i, k]))
        primal[i] = 0.5 * rn2 + lam * al1
        ci = _bf16_row(C16[i], bits32)
        # Both bounds are increasing in C_j, so the largest lower bound is that of max_j C_j, and
        # "upper bound >= thr" is a plain threshold on C_j.
        cm = _max32(ci)
        lo = cm - 0.0045 * abs(cm) - e0
        if not exact:
            # Likely open? The bf16 values stand in for the exact ones; a row is only ever called
            # done after the exact computation below, so a wrong guess costs a round, never a gap.
            for k in range(ns):
                c_sup[k] = ci[idx[i, k]]
            if _gap(rn2, _a_dot(a[i], c_sup, ns), a[i], c_sup, ns, lo, lam) > (4 * tol + 0.02) * primal[i]:
                gap[i] = np.inf
                if g > 0:
                    _top_outside(ci, idx[i], ns, g, cand[i], n_cand[i:i + 1], mark, hv, hi)
                continue
        x = X[rows[i]]
        for t in range(d):
            r64[t] = x[t]
        for k in range(ns):
            ak = np.float64(np.float32(a[i, k]))
            atom = Dt[idx[i, k]]
            for t in range(d):
                r64[t] -= ak * atom[t]
        rn2 = 0.0
        dr2 = 0.0
        for t in range(d):
            rn2 += r64[t] * r64[t]
            dr2 += (r64[t] - r[t]) ** 2
        primal[i] = 0.5 * rn2 + lam * al1
        e0 += dmax * math.sqrt(dr2)
        lo = cm - 0.0045 * abs(cm) - e0
        cmax = -np.inf
        for k in range(ns):
            c_sup[k] = _dot64(Dt[idx[i, k]], r64)
            cmax = max(cmax, c_sup[k])
        ac = _a_dot(a[i], c_sup, ns)
        # The gap only grows with max_j c_j, so a lower bound of the max gives a lower bound of the
        # gap: rows that fail even then are open, and their exact max is not needed (yet).
        gap[i] = _gap(rn2, ac, a[i], c_sup, ns, max(cmax, lo), lam)
        is_open = gap[i] > tol * primal[i]
        if is_open and not exact:
            gap[i] = np.inf
        else:
            t = max(lo, cmax) - e0  # the support's exact max is a lower bound of the max, often a better one
            t = (t / 1.0045 if t >= 0 else t / 0.9955) - 1e-6 * abs(t) - 1e-12
            for j in range(K):
                if ci[j] >= t:
                    cmax = max(cmax, _dot64(Dt[j], r64))
            gap[i] = _gap(rn2, ac, a[i], c_sup, ns, cmax, lam)
            is_open = gap[i] > tol * primal[i]
        if g > 0 and is_open:
            _top_outside(ci, idx[i], ns, g, cand[i], n_cand[i:i + 1], mark, hv, hi)


class Dictionary(NamedTuple):
    """The forms of D the engine reads, made once per nn_lasso call."""
    Dt: np.ndarray  # (K, d) float32: rows are atoms, for the per-row dot products
    D_price: torch.Tensor  # (d, K) bfloat16 where bf16 matmuls are native, else float32: the pricing GEMM
    gram: np.ndarray  # (K, K) float32: columns of the factor
    dmax: float  # largest atom norm (1 for a unit-norm dictionary), in every rounding bound


def prepare(D: torch.Tensor, gram: torch.Tensor, bf16_gemm: bool | None = None) -> Dictionary:
    """bf16_gemm (default: whether this CPU multiplies bf16 natively) picks the pricing GEMM's inputs.

    Without native bf16 the GEMM runs in float32 and only its output is rounded to bf16: torch's
    emulated bf16 GEMM is an order of magnitude slower, and float32 inputs only shrink the error the
    certificate's bound allows for (see `_certify_select`), so the bound stays rigorous.
    """
    from mlsm.core.device import native_bf16

    D, gram = D.detach(), gram.detach()  # a dictionary that is a trainable parameter codes the same
    Dt = np.ascontiguousarray(D.T.numpy(), dtype=np.float32)
    dmax = float(np.sqrt((Dt.astype(np.float64) ** 2).sum(1).max(initial=0.0))) * (1 + 1e-6)
    if bf16_gemm is None:
        bf16_gemm = native_bf16(torch.device("cpu"))
    D_price = D.to(torch.bfloat16) if bf16_gemm else D.float().contiguous()
    return Dictionary(Dt, D_price, np.ascontiguousarray(gram.numpy(), dtype=np.float32), dmax)


def _price(M: torch.Tensor, D_price: torch.Tensor) -> np.ndarray:
    """D^T m for every row of M, as bf16 bits (int16): the input of _select and _certify_select."""
    return (M.to(D_price.dtype) @ D_price).to(torch.bfloat16).view(torch.int16).numpy()


def solve_chunk(X: torch.Tensor, dic: Dictionary, lam: float, tol: float, max_iter: int, ws_size: int, ws_grow: int,
                stats: dict, qblock: int = 8):
    """Working-set rounds for one chunk of rows (float32, CPU). Returns dense codes, primal, rel gap,
    rounds used and the rows still above tol (for the caller's fallback).

    qblock: atoms entered per active-set pass (halved for the row whenever one enters and leaves at
    once); 8 measured best of 4/8/16/64 on real states.
    """
    Dt32, D_price, gram, dmax = dic
    B, K = X.shape[0], gram.shape[0]
    Xn = np.ascontiguousarray(X.numpy(), dtype=np.float32)
    C = _price(X, D_price)
    g0 = min(ws_size, K)
    cand = np.empty((B, max(g0, ws_grow)), np.int32)
    n_cand = np.zeros(B, np.int64)
    _select(C, g0, cand, n_cand)
    rows = np.arange(B, dtype=np.int64)
    slot = np.zeros(B, dtype=np.int64)
    prev_idx, prev_a, prev_b = np.zeros((1, 0), np.int32), np.zeros((1, 0)), np.zeros((1, 0))
    prev_n, prev_off = np.zeros(1, np.int64), np.zeros(1, np.int64)
    L_bufs = [np.empty(0, np.float32), np.empty(0, np.float32)]  # packed factors: this round's and the last one's
    codes = torch.zeros(B, K, dtype=torch.float32)
    primal = np.zeros(B)
    rel = np.full(B, np.inf)
    n_iter = 0
    for it in range(max_iter):
        n_iter = it + 1
        n = len(rows)
        width = min(K, int(prev_n[slot].max(initial=0)) + int(n_cand.max(initial=0)))
        out_idx = np.empty((n, width), np.int32)
        out_a = np.empty((n, width))
        out_b = np.empty((n, width))
        out_n = np.empty(n, np.int64)
        w_row = np.minimum(prev_n[slot] + n_cand, K)
        need = int((w_row * (w_row + 1) // 2).sum())
        if len(L_bufs[it % 2]) < need:
            L_bufs[it % 2] = np.empty(need + need // 4, np.float32)
        out_L, out_off = L_bufs[it % 2], np.empty(n, np.int64)
        R = np.empty((n, Xn.shape[1]), np.float32)
        stats["passes"] = stats.get("passes", 0) + _round(
            Xn, Dt32, gram, dmax, lam, rows, slot, prev_idx, prev_a, prev_b, prev_n, L_bufs[(it + 1) % 2],
            prev_off, cand, n_cand, out_idx, out_a, out_b, out_n, out_L, out_off, R, qblock)
        stats["row_rounds"] = stats.get("row_rounds", 0) + n
        C = _price(torch.from_numpy(R), D_price)
        cand = np.empty((n, ws_grow), np.int32)
        n_cand = np.zeros(n, np.int64)
        p, gp = np.empty(n), np.empty(n)
        last = it == max_iter - 1
        _certify_select(Xn, rows, R, C, Dt32, dmax, lam, out_idx, out_a, out_n, 0 if last else ws_grow, cand, n_cand, p, gp, tol,
                        last)
        rr = gp / np.maximum(p, 1e-12)
        primal[rows], rel[rows] = p, rr
        open_ = rr > tol
        done = np.arange(n) if last else np.flatnonzero(~open_)  # the last round hands back open rows too
        if len(done):
            nd = out_n[done]
            ri = np.repeat(rows[done], nd)
            mask = np.arange(width)[None, :] < nd[:, None]
            codes[torch.from_numpy(ri), torch.from_numpy(out_idx[done][mask].astype(np.int64))] = \
                torch.from_numpy(out_a[done][mask].astype(np.float32))
        if last or not open_.any():
            rows = rows[open_]
            break
        keep = np.flatnonzero(open_)
        rows, slot = rows[keep], keep
        cand, n_cand = cand[keep], n_cand[keep]
        prev_idx, prev_a, prev_b, prev_n, prev_off = out_idx, out_a, out_b, out_n, out_off
    return codes, torch.from_numpy(primal).float(), torch.from_numpy(rel).float(), n_iter, rows
