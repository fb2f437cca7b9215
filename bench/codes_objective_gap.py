"""The per-token lasso objective of two sparse-code runs over the same extract and dictionary.

objective(a) = 0.5 ||x - D a||^2 + lambda ||a||_1 per token, recomputed in float64 from each run's
codes.h5 and the extract's states (L2-normalised as the stage does). Meant for `--solver fista`
against `--solver exact` (docs/reference-differences.md), e.g.

    mlsm sparse-code --extract-dir E -k 1000 --out exact
    mlsm sparse-code --extract-dir E -k 1000 --dictionary exact/dictionary.h5 --solver fista --out fista
    python bench/codes_objective_gap.py E exact fista

The two runs must share the dictionary (the script refuses otherwise). Prints, as its only line,
one JSON object: tokens; mean objective of each run; the relative gap of the means; the mean, p99
and max of the per-token relative gap (b - a) / a; the tokens where b is below a; and each run's
coding rate (tokens/s) from its manifest and their ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from mlsm.pipeline.sparse_code import l2_normalize_states, read_sample


def codes_matrix(folder: Path, total: int, K: int) -> torch.Tensor:
    with h5py.File(folder / "codes.h5", "r") as f:
        ip, ix, v = f["codes/indptr"][:], f["codes/indices"][:].astype(np.int64), f["codes/values"][:]
    A = torch.zeros(total, K, dtype=torch.float64)
    A[np.repeat(np.arange(total), np.diff(ip)), ix] = torch.from_numpy(v.astype(np.float64))
    return A


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extract_dir", type=Path)
    ap.add_argument("a", type=Path, help="a sparse-code folder (the baseline, e.g. --solver exact)")
    ap.add_argument("b", type=Path, help="another one over the same extract, with the same dictionary")
    args = ap.parse_args()
    man = json.loads((args.extract_dir / "manifest.json").read_text())
    runs = [json.loads((d / "manifest.json").read_text()) for d in (args.a, args.b)]
    fps = set()
    for d in (args.a, args.b):
        with h5py.File(d / "codes.h5", "r") as f:
            fps.add(f.attrs["dictionary_fingerprint"])
    if len(fps) != 1:
        raise SystemExit("the two runs were coded with different dictionaries (pass --dictionary to the second)")
    layer, lam = runs[0]["params"]["layer"], runs[0]["params"]["lambda"]
    total = sum(s["tokens"] for s in man["shards"])
    X = l2_normalize_states(read_sample(args.extract_dir, man["shards"], np.arange(total), layer), "cpu").double()
    with h5py.File(args.a / "dictionary.h5", "r") as f:
        D = torch.from_numpy(f["D"][:]).double()

    def objective(folder: Path) -> torch.Tensor:
        A = codes_matrix(folder, total, D.shape[1])
        r = X - A @ D.T
        return 0.5 * (r * r).sum(1) + lam * A.sum(1)

    oa, ob = objective(args.a), objective(args.b)
    rel = (ob - oa) / oa
    rates = [r["report"].get("coding_tokens_per_s") for r in runs]
    print(json.dumps({
        "tokens": total, "solvers": [r.get("solver") for r in runs],
        "mean_objective": [float(oa.mean()), float(ob.mean())],
        "rel_gap_of_means": float((ob.mean() - oa.mean()) / oa.mean()),
        "rel_gap_mean": float(rel.mean()), "rel_gap_p99": float(rel.quantile(0.99)), "rel_gap_max": float(rel.max()),
        "b_below_a": int((rel < 0).sum()), "coding_tokens_per_s": rates,
        "speed_ratio_a_over_b": rates[0] / rates[1] if all(rates) else None,
    }))


if __name__ == "__main__":
    main()
