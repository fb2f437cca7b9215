"""The dictionary sampling rule of both paths (whole sequences) against the token-level rule it replaced.

On one extract folder and for each seed: held-out tokens first (whole sequences, in neither
training set), then two training samples of --dict-samples vectors from the other sequences:
(a) token by token, uniformly (the rule before issue 13), (b) whole sequences
(`sparse_code.dictionary_sample`, what `mlsm sparse-code` uses on both paths now). A dictionary is
learnt on each with the stage's settings, and both are scored on the same held-out tokens: the mean
of 0.5 ||x - D a||^2 + lambda ||a||_1 with a solved to tol 1e-4. Last line: JSON.
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
from mlsm.pipeline.sparse_code import StagedSource, dictionary_sample, l2_normalize_states, read_sample


def objective(x: np.ndarray, D: torch.Tensor, lam: float) -> float:
    res = nn_lasso(torch.from_numpy(x), D, lam, tol=1e-4)
    return float(res.primal.double().mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extract-dir", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("-k", "--K", type=int, default=3000)
    ap.add_argument("--lam", type=float, default=0.05)
    ap.add_argument("--dict-samples", type=int, default=20_000)
    ap.add_argument("--heldout", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args(argv)
    src = StagedSource(SparseCodeConfig(extract_dir=a.extract_dir, layer=a.layer, progress=False))
    lengths = src.seq_lengths()
    offs = np.concatenate([[0], np.cumsum(lengths)])
    rows = []
    for seed in range(a.seeds):
        held_ids, _ = dictionary_sample(lengths, 0, a.heldout, 1000 + seed)
        held = l2_normalize_states(src.sample_states(held_ids)[: a.heldout], "cpu").numpy()
        rest = np.setdiff1d(np.arange(len(lengths)), held_ids)
        rng = np.random.default_rng(seed)
        # (a) token level: uniform rows of the remaining sequences
        rest_rows = np.concatenate([np.arange(offs[s], offs[s + 1]) for s in rest])
        token_rows = np.sort(rng.choice(rest_rows, size=min(a.dict_samples, len(rest_rows)), replace=False))
        x_tok = read_sample(a.extract_dir, src.man["shards"], token_rows, src.cfg.layer)
        # (b) whole sequences, the rule of both paths
        _, train = dictionary_sample(lengths[rest], a.dict_samples, 0, seed)
        x_seq = src.sample_states(rest[train])
        x_seq = x_seq[np.random.default_rng(seed).permutation(len(x_seq))[: a.dict_samples]]
        row = {"seed": seed, "heldout_tokens": len(held), "train_tokens": a.dict_samples,
               "sequences_in_sample": int(len(train))}
        for name, x in (("token_level", x_tok), ("sequences", x_seq)):
            xn = l2_normalize_states(x, "cpu").numpy()
            D = learn_dictionary(xn, K=a.K, lam=a.lam, options=DictOptions(seed=seed), progress=False).D
            row[f"heldout_objective_{name}"] = objective(held, D.float().cpu(), a.lam)
        row["rel_diff"] = row["heldout_objective_sequences"] / row["heldout_objective_token_level"] - 1
        print(json.dumps(row), flush=True)
        rows.append(row)
    diffs = [r["rel_diff"] for r in rows]
    result = {"runs": rows, "rel_diff_mean": float(np.mean(diffs)), "rel_diff_min": min(diffs),
              "rel_diff_max": max(diffs), "K": a.K, "lambda": a.lam, "extract_dir": str(a.extract_dir)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
