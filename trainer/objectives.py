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
    count_zero_codes: bool = False,
) -> tuple[torch.Tensor, int]:
    """Mean of KL(t || softmax(z)) over the rows it counts; returns (loss, number of rows counted).

    KL = sum_j t_j log t_j - sum_j t_j z_j + logsumexp(z), with t normalised per row by the caller.
    Empty rows (tokens whose code is all zero) have no loss. By default they are left out of its
    denominator too (the mean is over rows with a target); count_zero_codes=True counts them there
    (`pretrain --count-zero-codes`: the mean over every masked row, the reference's average).
    Pass `target_indptr` on the CPU to keep the row count free of a device sync.
    """
    z = _float32(logits)  # (M, K): one row per masked token
    M = z.shape[0]
    if target_indptr.numel() != M + 1:
        raise ValueError(f"target_indptr has {target_indptr.numel()} entries for {M} rows (expected {M + 1})")
    lens = (target_indptr[1:] - target_indptr[:-1]).cpu()  # (M,) nonzeros per row
    has = lens > 0
    n_has = int(has.sum())
    n = M if count_zero_codes else n_has
    if n_has == 0:
        return z.sum() * 0.0, n  # keeps the graph (and DDP's gradient hooks) alive
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


def context_free_baselines(data, special_ids, max_tokens: int = 200_000, seed: int = 0,
                           read_sequences: int = 64) -> dict:
    """Losses of a student that ignores the context, on a seeded sample of whole sequences (at
    most `max_tokens` tokens).

    Only non-special tokens count, as only they are masked. MLSM: predicting the mean target
    costs the mean KL(t || mean t) over the `coded_tokens` that have a target. MLM: predicting unigram
    frequencies costs their entropy. Both are plug-in estimates on the sample. A loss at its
    baseline means nothing contextual was learnt; `loss / baseline` says how far below it a run got.

    One pass, `read_sequences` sequences at a time: KL(t || m) = sum t log t - sum_k S_k log m_k,
    with S_k the target mass on atom k, so only per-atom sums are kept and memory stays at one
    small read whatever the sample.
    """
    import numpy as np

    order = np.random.default_rng(seed).permutation(data.num_sequences)
    lengths = data.lengths(order)
    ids = np.sort(order[: max(1, int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right")))])
    special = np.asarray(sorted(set(special_ids)), dtype=np.int32)
    counts = np.zeros(0, dtype=np.float64)
    atom_mass = np.zeros(int(data.K), dtype=np.float64) if data.has_codes else None
    t_log_t, n_plain, n_coded = 0.0, 0, 0
    for c0 in range(0, len(ids), read_sequences):
        # max_gap=0: read only the sampled sequences, not their neighbours.
        w = data.read_window(ids[c0:c0 + read_sequences], max_gap=0)
        plain = ~np.isin(w.tokens, special)
        c = np.bincount(w.tokens[plain])
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[:len(c)] += c
        n_plain += int(plain.sum())
        if atom_mass is None:
            continue
        rows = np.repeat(np.arange(len(w.tokens)), np.diff(w.indptr))
        val = w.values.astype(np.float64)
        mass = np.bincount(rows, weights=val, minlength=len(w.tokens))
        keep = plain[rows] & (mass[rows] > 0) & (val > 0)
        t = val[keep] / mass[rows][keep]
        atom_mass += np.bincount(w.indices[keep].astype(np.int64), weights=t, minlength=len(atom_mass))
        t_log_t += float((t * np.log(t)).sum())
        n_coded += int((plain & (mass > 0)).sum())
    pu = counts[counts > 0] / max(1, n_plain)
    out = {"tokens": n_plain, "coded_tokens": n_coded, "unigram_entropy": float(-(pu * np.log(pu)).sum()), "mlsm_marginal_kl": None}
    if n_coded:
        used = atom_mass > 0
        cross = float((atom_mass[used] * np.log(atom_mass[used] / n_coded)).sum())
        out["mlsm_marginal_kl"] = (t_log_t - cross) / n_coded
    return out
