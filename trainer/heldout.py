"""Held-out pre-training loss: the objective's loss on sequences the student never trains on.

`--eval-sequences N` holds out the **last N sequences** of the data file (BatchIterator never
draws them) and scores the student on them with masks drawn once from a fixed seed, so every
evaluation of every run on the same file sees the same masked tokens: the loss is comparable
across steps, seeds and learning rates of one objective (`bench/compare.py` picks each
objective's learning rate by it). The MLSM KL and the MLM cross-entropy are different
quantities: compare them within an objective only. Evaluation runs in eval mode (no dropout)
and draws nothing from the global RNG, so a resumed run stays bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch

from mlsm.pipeline.codes import TokenData
from mlsm.trainer.data import Masking, get_batch, mask_batch, pack_batch
from mlsm.trainer.objectives import mlm_loss, mlsm_kl_loss

MASK_SEED = 1234  # the held-out masks: the same for every run, seed and learning rate


def heldout_batches(data: TokenData, n: int, batch_size: int, masking: Masking, with_targets: bool,
                    mask_seed: int = MASK_SEED) -> list[dict]:
    """The last `n` sequences of `data`, masked once with `mask_seed`, as packed batches."""
    S = data.num_sequences
    seqs = np.arange(S - n, S, dtype=np.int64)
    special = torch.tensor(sorted(set(masking.special_ids)), dtype=torch.long)
    gen = torch.Generator().manual_seed(mask_seed)
    out = []
    for b0 in range(0, n, batch_size):
        b = get_batch(data, seqs[b0:b0 + batch_size], with_codes=with_targets)
        ids, selected = mask_batch(b, special, masking, gen)
        out.append(pack_batch(b, ids, selected, with_targets))
    return out


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches: list[dict], spec) -> dict:
    """The step's losses (trainer.train.StepSpec says which and how weighted) over all held-out
    masked tokens: each part is the mean over its tokens, not over batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kl_sum = ce_sum = 0.0
    n_targets = n_masked = 0
    try:
        for m in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                out = model(m["input_ids"].to(device), m["attention_mask"].to(device), m["masked_index"].to(device))
            if spec.use_mlsm:
                kl, n = mlsm_kl_loss(out["mlsm_logits"], m["target_indptr"], m["target_indices"].to(device),
                                     m["target_values"].to(device), count_zero_codes=spec.count_zero_codes)
                kl_sum, n_targets = kl_sum + float(kl) * n, n_targets + n
            if spec.use_mlm:
                ce_sum += float(mlm_loss(out["mlm_logits"], m["mlm_labels"])) * m["n_masked"]
                n_masked += m["n_masked"]
    finally:
        model.train(was_training)
    mlsm_v = kl_sum / max(n_targets, 1) if spec.use_mlsm else None
    mlm_v = ce_sum / max(n_masked, 1) if spec.use_mlm else None
    return {"heldout_loss": spec.total(mlsm_v, mlm_v), "heldout_mlsm_loss": mlsm_v, "heldout_mlm_loss": mlm_v}
