"""The MLSM KL loss on sparse targets and the MLM cross-entropy.

Targets stay sparse all the way: densifying (M, K) with K = 3000 would cost more memory than the
logits themselves and gain nothing, because KL(t || softmax(z)) needs z only at t's support plus a
logsumexp over the row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) go up to float32; float64 (tests) stays as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mlsm_kl_loss(
    logits: torch.Tensor,
    target_indptr: torch.Tensor,
    target_indices: torch.Tensor,
    target_values: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Mean over rows with a target of KL(t || softmax(z)); returns (loss, number of such rows).

    KL = sum_j t_j log t_j - sum_j t_j z_j + logsumexp(z), with t normalised per row by the caller.
    Empty rows (tokens whose code is all zero) are left out of the loss and of its denominator.
    Pass `target_indptr` on the CPU to keep the row count free of a device sync.
    """
    z = _float32(logits)  # (M, K): one row per masked token
    M = z.shape[0]
    if target_indptr.numel() != M + 1:
        raise ValueError(f"target_indptr has {target_indptr.numel()} entries for {M} rows (expected {M + 1})")
    lens = (target_indptr[1:] - target_indptr[:-1]).cpu()  # (M,) nonzeros per row
    has = lens > 0
    n = int(has.sum())
    if n == 0:
        return z.sum() * 0.0, 0  # keeps the graph (and DDP's gradient hooks) alive
    dev = z.device
    rows = torch.repeat_interleave(torch.arange(M), lens).to(dev, non_blocking=True)  # (nnz,) row of each entry
    cols = target_indices.to(dev, dtype=torch.long, non_blocking=True)  # (nnz,) its atom
    t = target_values.to(dev, dtype=z.dtype, non_blocking=True)  # (nnz,) its probability
    neg_entropy = torch.zeros(M, dtype=z.dtype, device=dev).index_add_(0, rows, torch.xlogy(t, t))  # (M,)
    cross = torch.zeros(M, dtype=z.dtype, device=dev).index_add_(0, rows, t * z[rows, cols])  # (M,)
    kl = neg_entropy - cross + torch.logsumexp(z, dim=-1)  # (M,)
    kl = torch.where(has.to(dev, non_blocking=True), kl, torch.zeros_like(kl))
    return kl.sum() / n, n


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions (labels = original ids; -100 is ignored).

    logits (M, V), labels (M,): one row per masked token.
    """
    return F.cross_entropy(_float32(logits), labels.to(logits.device, dtype=torch.long), ignore_index=-100)


def dense_kl_reference(logits: torch.Tensor, dense_targets: torch.Tensor) -> torch.Tensor:
    """The textbook dense KL, for tests: rows whose targets sum to 0 are skipped."""
    z = _float32(logits)
    t = dense_targets.to(z.dtype)
    has = t.sum(-1) > 0
    kl = (torch.xlogy(t, t) - t * F.log_softmax(z, dim=-1)).sum(-1)
    return kl[has].sum() / has.sum().clamp(min=1)


def context_free_baselines(data, special_ids, max_tokens: int = 200_000, seed: int = 0) -> dict:
    """Losses of a student that ignores the context, on a seeded sample of whole sequences (at
    most `max_tokens` tokens, read as one window: memory does not grow with the corpus).

    Only non-special tokens count, as only they are masked. MLSM: predicting the mean target
    costs the mean KL(t || mean t) over the tokens that have a target. MLM: predicting unigram
    frequencies costs their entropy. Both are plug-in estimates on the sample. A loss at its
    baseline means nothing contextual was learnt; `loss / baseline` says how far below it a run got.
    """
    import numpy as np

    order = np.random.default_rng(seed).permutation(data.num_sequences)
    lengths = data.lengths(order)
    ids = order[: max(1, int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right")))]
    w = data.read_window(ids)
    plain = ~np.isin(w.tokens, np.asarray(sorted(set(special_ids)), dtype=w.tokens.dtype))
    counts = np.bincount(w.tokens[plain]).astype(np.float64)
    pu = counts[counts > 0] / max(1, int(plain.sum()))
    out = {"tokens": int(plain.sum()), "unigram_entropy": float(-(pu * np.log(pu)).sum()), "mlsm_marginal_kl": None}
    if w.has_codes:
        rows = np.repeat(np.arange(len(w.tokens)), np.diff(w.indptr))
        val = w.values.astype(np.float64)
        mass = np.bincount(rows, weights=val, minlength=len(w.tokens))
        keep = plain[rows] & (mass[rows] > 0) & (val > 0)
        t, idx = val[keep] / mass[rows][keep], w.indices[keep].astype(np.int64)
        n_coded = int((plain & (mass > 0)).sum())
        if n_coded:
            mean_t = np.bincount(idx, weights=t, minlength=int(data.K)) / n_coded
            out["mlsm_marginal_kl"] = float((t * np.log(t / mean_t[idx])).sum() / n_coded)
    return out
