"""GPU check for the sparse-coding engine: tokens/s of nn_lasso vs 100-step FISTA at d=768, K=3000.

Short and self-contained (no data needed): a synthetic dictionary with the structure that makes
real hidden states hard (atoms sharing a common direction, so correlation screening is poor) and
tokens x = normalize(D a + noise) with ~`--nnz` non-negative atoms. `--vectors file.npy` codes real
(n, d) vectors instead, against a dictionary of K of them. Prints one JSON line (the last line).

    python bench/sparse_coding_gpu.py --device cuda            # the issue's target: >= 1M tokens/s
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mlsm.pipeline.solvers import LassoOptions, duality_gap, fista_fixed, lipschitz, nn_lasso


def synthetic(d: int, K: int, n: int, nnz: int, seed: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(d, 1, generator=g), dim=0)
    D = torch.nn.functional.normalize(torch.randn(d, K, generator=g) + 1.5 * common, dim=0)
    idx = torch.stack([torch.randperm(K, generator=g)[:nnz] for _ in range(min(n, 4096))])
    A = torch.zeros(len(idx), K).scatter_(1, idx, torch.rand(len(idx), nnz, generator=g) + 0.2)
    X = A @ D.T + 0.3 * torch.randn(len(idx), d, generator=g) / d ** 0.5
    X = X.repeat((n + len(X) - 1) // len(X), 1)[:n]  # the same 4096 rows cycled: cheap to build
    return torch.nn.functional.normalize(X, dim=1).to(dev), D.to(dev)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("-k", "--K", type=int, default=3000)
    ap.add_argument("--n", type=int, default=262_144, help="tokens to code")
    ap.add_argument("--nnz", type=int, default=40)
    ap.add_argument("--lam", type=float, default=0.05)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--chunk", type=int, default=16384, help="nn_lasso chunk_size")
    ap.add_argument("--fista-n", type=int, default=65536)
    ap.add_argument("--vectors", type=Path, default=None, help="real vectors (n, d) .npy instead of synthetic")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    if args.vectors is not None:
        V = torch.nn.functional.normalize(torch.from_numpy(np.load(args.vectors)).float(), dim=1)
        rng = np.random.default_rng(args.seed)
        D = V[torch.as_tensor(rng.choice(len(V), args.K, replace=False))].T.contiguous().to(dev)
        X = V.repeat((args.n + len(V) - 1) // len(V), 1)[:args.n].to(dev)
    else:
        X, D = synthetic(args.d, args.K, args.n, args.nnz, args.seed, dev)
    gram = D.T @ D
    nn_lasso(X[:4096], D, args.lam, tol=args.tol, gram=gram, options=LassoOptions(chunk_size=args.chunk))  # warm-up
    sync()
    t = time.perf_counter()
    res = nn_lasso(X, D, args.lam, tol=args.tol, gram=gram, options=LassoOptions(chunk_size=args.chunk))
    sync()
    ours_s = time.perf_counter() - t

    nf = min(args.fista_n, len(X))
    L = lipschitz(D)
    fista_fixed(X[:1024], D, args.lam, n_iter=5, L=L)
    sync()
    t = time.perf_counter()
    A = fista_fixed(X[:nf], D, args.lam, n_iter=100, L=L)
    sync()
    fista_s = time.perf_counter() - t
    p_f, g_f = duality_gap(X[:nf].double(), D.double(), A.double(), args.lam)
    # our objective vs FISTA's on the same rows (positive: FISTA is worse)
    p_ours = res.primal[:nf].double()
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "d": int(D.shape[0]), "K": int(D.shape[1]), "n": int(len(X)), "tol": args.tol,
        "data": str(args.vectors) if args.vectors else f"synthetic nnz={args.nnz}",
        "ours_tokens_per_s": round(len(X) / ours_s, 1),
        "fista100_tokens_per_s": round(nf / fista_s, 1),
        "speedup": round((len(X) / ours_s) / (nf / fista_s), 2),
        "ours_cert_mean_rel_gap": float(res.rel_gap.double().mean()),
        "ours_cert_p99_rel_gap": float(torch.quantile(res.rel_gap[:100_000].double(), 0.99)),
        "ours_cert_max_rel_gap": float(res.rel_gap.max()),
        "fista100_cert_mean_rel_gap": float((g_f / p_f).mean()),
        "fista100_minus_ours_mean_rel": float(((p_f - p_ours) / p_ours).mean()),
        "ours_nnz": float((res.codes > 0).sum(1).float().mean()),
        "working_set_rounds": res.n_iter,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
