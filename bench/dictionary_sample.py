"""The dictionary sampling rule of both paths (a few tokens per sequence) against the alternatives.

On one extract folder and for each seed: held-out tokens first (whole sequences, in no training
set), then training samples of --dict-samples vectors from the other sequences by each rule:
- token_level: uniform rows, token by token (the rule before issue 13: the fused path would need
  the forward of nearly every sequence);
- per_sequence_<m>: `sparse_code.dictionary_sample` with per_sequence=m (m=2: what `mlsm
  sparse-code` uses on both paths; the forward runs on about n/m sequences);
- whole_sequences: whole sequences in a seeded order (the rule of ebbe02f..e0a6445).
A dictionary is learnt on each with the stage's settings, and all are scored on the same held-out
tokens: the mean of 0.5 ||x - D a||^2 + lambda ||a||_1 with a solved to tol 1e-4. rel_diff_<rule>
is its objective over token_level's, minus 1. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mlsm.core.config import SparseCodeConfig
from mlsm.pipeline.dictionary import DictOptions, learn_dictionary
from mlsm.pipeline.solvers import nn_lasso
from mlsm.pipeline.sparse_code import StagedSource, dictionary_sample, l2_normalize_states


def objective(x: np.ndarray, D: torch.Tensor, lam: float) -> float:
    res = nn_lasso(torch.from_numpy(x), D, lam, tol=1e-4)
    return float(res.primal.double().mean())


def whole_sequences(lengths: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Ids of whole sequences in a seeded order until they hold n tokens."""
    order = rng.permutation(len(lengths))
    k = min(int(np.searchsorted(np.cumsum(lengths[order]), n, side="left")) + 1, len(order))
    return np.sort(order[:k])


def rows_of(seqs: np.ndarray, offs: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(offs[s], offs[s + 1]) for s in seqs]) if len(seqs) else np.zeros(0, np.int64)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extract-dir", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("-k", "--K", type=int, default=3000)
    ap.add_argument("--lam", type=float, default=0.05)
    ap.add_argument("--dict-samples", type=int, default=20_000)
    ap.add_argument("--heldout", type=int, default=20_000)
    ap.add_argument("--per-sequence", type=float, nargs="+", default=[2.0])
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args(argv)
    src = StagedSource(SparseCodeConfig(extract_dir=a.extract_dir, layer=a.layer, progress=False))
    lengths = src.seq_lengths()
    offs = np.concatenate([[0], np.cumsum(lengths)])
    rows = []
    for seed in range(a.seeds):
        held_seqs = whole_sequences(lengths, a.heldout, np.random.default_rng(1000 + seed))
        held = l2_normalize_states(src.sample_states(rows_of(held_seqs, offs)[: a.heldout]), "cpu").numpy()
        rest = np.setdiff1d(np.arange(len(lengths)), held_seqs)
        rest_offs = np.concatenate([[0], np.cumsum(lengths[rest])])
        rng = np.random.default_rng(seed)
        samples = {"token_level": np.sort(rng.choice(rows_of(rest, offs), size=min(a.dict_samples, int(rest_offs[-1])),
                                                     replace=False))}
        for m in a.per_sequence:
            _, train = dictionary_sample(lengths[rest], a.dict_samples, 0, seed, per_sequence=m)
            sub = np.searchsorted(rest_offs, train, side="right") - 1  # the sub-stream's rows -> global rows
            samples[f"per_sequence_{m:g}"] = offs[rest[sub]] + train - rest_offs[sub]
        samples["whole_sequences"] = rows_of(rest[whole_sequences(lengths[rest], a.dict_samples, rng)], offs)
        row = {"seed": seed, "heldout_tokens": len(held), "train_tokens": a.dict_samples}
        for name, r in samples.items():
            x = src.sample_states(r)
            x = x[np.random.default_rng(seed).permutation(len(x))[: a.dict_samples]]
            row[f"sequences_{name}"] = int(len(np.unique(np.searchsorted(offs, r, side="right"))))
            xn = l2_normalize_states(x, "cpu").numpy()
            D = learn_dictionary(xn, K=a.K, lam=a.lam, options=DictOptions(seed=seed), progress=False).D
            row[f"heldout_objective_{name}"] = objective(held, D.float().cpu(), a.lam)
        for name in samples:
            if name != "token_level":
                row[f"rel_diff_{name}"] = row[f"heldout_objective_{name}"] / row["heldout_objective_token_level"] - 1
        print(json.dumps(row), flush=True)
        rows.append(row)
    rule = f"rel_diff_per_sequence_{a.per_sequence[0]:g}"
    result = {"runs": rows, "K": a.K, "lambda": a.lam, "extract_dir": str(a.extract_dir)}
    for key in [k for k in rows[0] if k.startswith("rel_diff_")]:
        diffs = [r[key] for r in rows]
        result[f"{key}_mean"], result[f"{key}_min"], result[f"{key}_max"] = float(np.mean(diffs)), min(diffs), max(diffs)
    # the stage's rule (the first --per-sequence) under the plain names
    result.update(rel_diff_mean=result[f"{rule}_mean"], rel_diff_min=result[f"{rule}_min"],
                  rel_diff_max=result[f"{rule}_max"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
