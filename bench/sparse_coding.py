"""Sparse-coding benchmark: our engine against SPAMS, scikit-learn and the 100-step FISTA reference.

One run, real hidden states from the extract stage (`make extract` defaults when they are missing):
  1. dictionary learning on the same training vectors and the same number of samples seen:
     SPAMS trainDL (posAlpha) and ours (pipeline.dictionary.learn_dictionary, whose wall time
     includes its k-means init; its minibatch codes are loose: tol 1e-2, 2 rounds, as the stage
     runs it); wall time and the held-out objective mean(0.5||x - Da||^2 + lam||a||_1), coded to
     --tol for every dictionary;
  2. encoding of the held-out vectors with our learned dictionary: SPAMS lasso (pos, exact LARS,
     float64: the reference solution), scikit-learn sparse_encode(lasso_cd, positive), fista_fixed
     (100 steps), and ours (nn_lasso) at the stage's tol 1e-4 and at --tol2 (1e-3) beside it;
     vectors/s, relative objective gap to the SPAMS solution (not clipped: a negative gap means
     the method beat SPAMS's LARS; "min gap" shows how far), our certified gap, nnz, relative
     reconstruction error. The slow methods run on a subset (the table says which).

Every rival runs in its best mode: SPAMS (trainDL and lasso) in float32 and float64 and with its
OpenBLAS at 1 thread and at --threads (its own OpenMP loop over vectors uses --threads either way);
a short probe of each setting picks the fastest, which then does the timed run. scikit-learn gets
n_jobs=--threads; torch gets --threads.

Prints a table, then, as the LAST line, one JSON object (keys documented in `main`).
Needs `pip install spams-bin scikit-learn` (the `bench` extra; `make bench-sparse` installs it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from mlsm.pipeline.dictionary import DictOptions, learn_dictionary, objective
from mlsm.pipeline.solvers import fista_fixed, lipschitz, nn_lasso
from mlsm.pipeline.sparse_code import l2_normalize_states, sample_vectors


def load_vectors(extract_dir: Path, layer: int | None, n: int, seed: int) -> np.ndarray:
    man_path = extract_dir / "manifest.json"
    if not man_path.exists():
        print(f"{extract_dir} has no hidden states: running `make extract EXTRACT_DIR={extract_dir}`", file=sys.stderr)
        subprocess.run(["make", "extract", f"EXTRACT_DIR={extract_dir}"], cwd=ROOT, check=True)
    man = json.loads(man_path.read_text())
    if not man.get("complete"):
        sys.exit(f"error: {extract_dir} is an incomplete extract; finish it with `make extract`")
    layers = man["params"]["layers"]
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        sys.exit(f"error: layer {layer} not in {extract_dir} (has {layers})")
    total = sum(s["tokens"] for s in man["shards"])
    if total < n:
        sys.exit(f"error: {extract_dir} holds {total} tokens; this benchmark needs {n} "
                 f"(make extract TOKENS={n}) or smaller --train/--heldout")
    raw = sample_vectors(extract_dir, man["shards"], layer, n, seed)
    return l2_normalize_states(raw, "cpu").numpy()


def primal64(X: np.ndarray, D: np.ndarray, A: np.ndarray, lam: float) -> np.ndarray:
    """Per-row objective in float64, codes clipped to the feasible set first."""
    A = np.maximum(np.asarray(A, dtype=np.float64), 0.0)
    R = X.astype(np.float64) - A @ D.T.astype(np.float64)
    return 0.5 * (R * R).sum(1) + lam * A.sum(1)


def code_stats(name, X, D, A, lam, secs, p_ref, n_total):
    p = primal64(X, D, A, lam)
    rel = (p - p_ref) / np.maximum(p_ref, 1e-12)  # negative: better than SPAMS's LARS
    R = X.astype(np.float64) - np.maximum(A, 0).astype(np.float64) @ D.T.astype(np.float64)
    return {
        "method": name, "n": int(len(X)), "subset": len(X) < n_total,
        "vec_per_s": len(X) / secs, "mean_rel_gap": float(rel.mean()), "p99_rel_gap": float(np.quantile(rel, 0.99)),
        "max_rel_gap": float(rel.max()), "min_rel_gap": float(rel.min()), "nnz": float((A > 0).sum(1).mean()), "min_code": float(A.min()),
        "rel_recon_err": float((np.linalg.norm(R, axis=1) / np.linalg.norm(X, axis=1).clip(1e-12)).mean()),
    }


def spams_lasso(spams, X, D, lam, threads, dtype=np.float64):
    A = spams.lasso(np.asfortranarray(X.T, dtype=dtype), D=np.asfortranarray(D, dtype=dtype),
                    lambda1=lam, mode=2, pos=True, numThreads=threads)
    return np.asarray(A.toarray().T)


def spams_train(spams, X, K, lam, batch, iters, threads, dtype):
    D = spams.trainDL(np.asfortranarray(X.T, dtype=dtype), K=K, lambda1=lam, mode=2, posAlpha=True,
                      batchsize=batch, iter=iters, numThreads=threads, verbose=False)
    return np.asarray(D, dtype=np.float32)


def fastest_setting(run, threads: int) -> tuple[dict, dict]:
    """Probe `run(dtype)` under every (dtype, OpenBLAS threads) setting; return the fastest and all timings."""
    from threadpoolctl import threadpool_limits

    times = {}
    for dtype in (np.float32, np.float64):
        for blas in sorted({1, threads}):
            with threadpool_limits(limits=blas, user_api="blas"):
                t = time.perf_counter()
                run(dtype)
                times[(np.dtype(dtype).name, blas)] = time.perf_counter() - t
    (dt, blas), _ = min(times.items(), key=lambda kv: kv[1])
    return {"dtype": dt, "blas_threads": blas}, {f"{k[0]}/blas{k[1]}": round(v, 3) for k, v in times.items()}


def run_in(setting: dict, fn):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=setting["blas_threads"], user_api="blas"):
        return timed(fn)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extract-dir", type=Path, default=ROOT / "data" / "extract")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--train", type=int, default=102_400, help="training vectors (a multiple of both batch sizes)")
    ap.add_argument("--heldout", type=int, default=20_000)
    ap.add_argument("-k", "--K", type=int, default=3000)
    ap.add_argument("--lam", type=float, default=0.05)
    ap.add_argument("--tol", type=float, default=1e-4, help="our certified per-row relative gap (the stage default)")
    ap.add_argument("--tol2", type=float, default=1e-3, help="a second tolerance, shown beside (0: skip)")
    ap.add_argument("--passes", type=float, default=1.0, help="epochs of dictionary learning (same for both)")
    ap.add_argument("--spams-batch", type=int, default=400)
    ap.add_argument("--ours-batch", type=int, default=2048)
    ap.add_argument("--fista-n", type=int, default=4096, help="held-out subset for fista_fixed")
    ap.add_argument("--sklearn-n", type=int, default=2048, help="held-out subset for scikit-learn")
    ap.add_argument("--spams32-n", type=int, default=5000, help="held-out subset for SPAMS in its other precision")
    ap.add_argument("--probe-n", type=int, default=2000, help="vectors of the SPAMS lasso setting probe")
    ap.add_argument("--probe-frac", type=float, default=0.05, help="share of trainDL iterations of its setting probe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device of our solver and fista_fixed (cpu, cuda, auto)")
    ap.add_argument("--skip-dict", action="store_true", help="skip SPAMS trainDL (ours still learns the dictionary)")
    args = ap.parse_args(argv)

    try:
        import sklearn
        import spams
        from sklearn.decomposition import sparse_encode
    except ImportError as e:
        sys.exit(f"error: {e}. Install the benchmark extra: .venv/bin/python -m pip install -e '.[bench]'")
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    device_desc = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                   f"cpu {platform.processor() or platform.machine()} x{args.threads} threads (torch {torch.__version__})")
    load0 = os.getloadavg()

    t = time.perf_counter()
    x = load_vectors(args.extract_dir, args.layer, args.train + args.heldout, args.seed)
    held, train = x[:args.heldout], x[args.heldout:]
    print(f"vectors: {len(train)} train, {len(held)} held-out, d={x.shape[1]} ({time.perf_counter() - t:.1f}s)", file=sys.stderr)
    lam, K = args.lam, args.K
    samples = int(round(args.passes * len(train)))

    # ---- dictionary learning
    n_batches = max(1, samples // args.ours_batch)
    options = DictOptions(batch_size=args.ours_batch, n_iter=n_batches, seed=args.seed)
    ours_dict, dict_ours_s = timed(lambda: learn_dictionary(train, K=K, lam=lam, options=options, device=str(dev)))
    D = ours_dict.D.cpu().numpy()
    dict_res = {"ours": {"wall_s": dict_ours_s, "samples_seen": ours_dict.stats["samples_seen"],
                         "heldout_obj": objective(held, torch.from_numpy(D).to(dev), lam, tol=args.tol)}}
    dict_res["ours"].update(code_tol=ours_dict.stats["code_tol"], code_rounds=ours_dict.stats["code_rounds"],
                            init_s=ours_dict.stats["init_s"])
    if not args.skip_dict:
        iters = max(1, samples // args.spams_batch)
        probe_iters = max(1, round(args.probe_frac * iters))
        setting, probe = fastest_setting(
            lambda dt: spams_train(spams, train, K, lam, args.spams_batch, probe_iters, args.threads, dt), args.threads)
        print(f"SPAMS trainDL probe ({probe_iters} iterations): {probe}; timed run: {setting}", file=sys.stderr)
        Ds, dict_spams_s = run_in(setting, lambda: spams_train(spams, train, K, lam, args.spams_batch, iters,
                                                               args.threads, np.dtype(setting["dtype"])))
        Ds /= np.linalg.norm(Ds, axis=0, keepdims=True).clip(1e-12)  # trainDL keeps ||d|| <= 1; unit norm can only help
        dict_res["spams"] = {"wall_s": dict_spams_s, "samples_seen": iters * args.spams_batch,
                             "heldout_obj": objective(held, torch.from_numpy(Ds).to(dev), lam, tol=args.tol),
                             "setting": setting, "probe_s": probe}
    rng = np.random.default_rng(args.seed)
    Dr = np.ascontiguousarray(train[rng.choice(len(train), K, replace=False)].T)
    dict_res["random_samples"] = {"wall_s": 0.0, "samples_seen": 0,
                                  "heldout_obj": objective(held, torch.from_numpy(Dr).to(dev), lam, tol=args.tol)}

    # ---- encoding the held-out vectors with our dictionary
    # The reference solution is float64 LARS on every held-out vector, timed at its best BLAS setting;
    # the other precision is timed on a subset at its best setting. The faster is SPAMS's speed.
    npb = min(args.probe_n, len(held))
    lasso_setting, lasso_probe = fastest_setting(
        lambda dt: spams_lasso(spams, held[:npb], D, lam, args.threads, dt), args.threads)
    print(f"SPAMS lasso probe ({npb} vectors): {lasso_probe}", file=sys.stderr)

    def best_blas(dt):
        return min((v, int(k.split("blas")[1])) for k, v in lasso_probe.items() if k.startswith(dt))[1]
    s64 = {"dtype": "float64", "blas_threads": best_blas("float64")}
    s32 = {"dtype": "float32", "blas_threads": best_blas("float32")}
    A_ref, spams_s = run_in(s64, lambda: spams_lasso(spams, held, D, lam, args.threads))
    p_ref = primal64(held, D, A_ref, lam)
    rows = [code_stats(f"spams lasso (LARS, f64, blas {s64['blas_threads']})", held, D, A_ref, lam, spams_s, p_ref,
                       len(held))]
    n32 = min(args.spams32_n, len(held))
    A32, spams32_s = run_in(s32, lambda: spams_lasso(spams, held[:n32], D, lam, args.threads, np.float32))
    spams32 = code_stats(f"spams lasso (LARS, f32, blas {s32['blas_threads']})", held[:n32], D, A32, lam, spams32_s,
                         p_ref[:n32], len(held))

    Dt = torch.from_numpy(D).to(dev)
    Xt = torch.from_numpy(held).to(dev)
    nn_lasso(Xt[:256], Dt, lam, tol=args.tol)  # warm-up (allocator, thread pool)
    sync()

    def ours():
        res = nn_lasso(Xt, Dt, lam, tol=args.tol)
        sync()
        return res
    res, ours_s = timed(ours)
    rows.append(code_stats(f"ours nn_lasso tol={args.tol:g}", held, D, res.codes.cpu().numpy(), lam, ours_s, p_ref, len(held)))
    cert = res.rel_gap.double().cpu().numpy()
    rows[-1].update(cert_mean=float(cert.mean()), cert_p99=float(np.quantile(cert, 0.99)), cert_max=float(cert.max()))

    if args.tol2 > 0:
        res2, ours2_s = timed(lambda: (nn_lasso(Xt, Dt, lam, tol=args.tol2), sync())[0])
        extra_ours = code_stats(f"ours nn_lasso tol={args.tol2:g}", held, D, res2.codes.cpu().numpy(), lam, ours2_s,
                                p_ref, len(held))
        cert2 = res2.rel_gap.double().cpu().numpy()
        extra_ours.update(cert_mean=float(cert2.mean()), cert_p99=float(np.quantile(cert2, 0.99)),
                          cert_max=float(cert2.max()))

    nf = min(args.fista_n, len(held))
    fista_fixed(Xt[:64], Dt, lam, n_iter=5)

    def fista():
        A = fista_fixed(Xt[:nf], Dt, lam, n_iter=100, L=lipschitz(Dt))
        sync()
        return A
    A_f, fista_s = timed(fista)
    rows.append(code_stats("fista_fixed 100 steps", held[:nf], D, A_f.cpu().numpy(), lam, fista_s, p_ref[:nf], len(held)))

    ns = min(args.sklearn_n, len(held))
    A_s, sk_s = timed(lambda: sparse_encode(held[:ns].astype(np.float64), D.T.astype(np.float64), algorithm="lasso_cd",
                                            alpha=lam, positive=True, n_jobs=args.threads))
    rows.append(code_stats(f"sklearn lasso_cd (v{sklearn.__version__})", held[:ns], D, A_s, lam, sk_s, p_ref[:ns], len(held)))
    rows.append(spams32)
    if args.tol2 > 0:
        rows.append(extra_ours)
    # SPAMS's speed is its faster precision: the ratio we report is the conservative one
    spams_best = max(rows[0]["vec_per_s"], spams32["vec_per_s"])

    # ---- report
    load1 = os.getloadavg()
    print()
    print(f"Encoding {len(held)} held-out vectors, d={held.shape[1]}, K={K}, lambda={lam}; gap vs the SPAMS solution")
    hdr = (f"{'method':38s} {'n':>6s} {'vec/s':>9s} {'mean gap':>9s} {'p99 gap':>9s} {'max gap':>9s} {'min gap':>9s} "
           f"{'cert max':>9s} {'nnz':>6s} {'rel err':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        n = f"{r['n']}{'*' if r['subset'] else ''}"
        cert = f"{r['cert_max']:9.2e}" if "cert_max" in r else f"{'-':>9s}"
        print(f"{r['method']:38s} {n:>6s} {r['vec_per_s']:9.0f} {r['mean_rel_gap']:9.2e} {r['p99_rel_gap']:9.2e} "
              f"{r['max_rel_gap']:9.2e} {r['min_rel_gap']:9.2e} {cert} {r['nnz']:6.1f} {r['rel_recon_err']:8.4f}")
    print("* timed on a subset of the held-out vectors; gaps are to SPAMS's f64 solution, unclipped; "
          "cert max: our certified duality gap")
    r = rows[1]
    print(f"ours: certified rel gap mean {r['cert_mean']:.2e}, p99 {r['cert_p99']:.2e}, max {r['cert_max']:.2e}; "
          f"speed-up vs SPAMS (faster of f32/f64) {r['vec_per_s'] / spams_best:.2f}x, vs FISTA-100 {r['vec_per_s'] / rows[2]['vec_per_s']:.2f}x")
    print()
    print(f"Dictionary learning on {len(train)} vectors, {samples} samples seen, K={K}")
    print(f"{'method':44s} {'wall s':>8s} {'samples':>8s} {'held-out objective':>19s}")
    labels = {"ours": f"ours (codes tol {dict_res['ours']['code_tol']:g}, {dict_res['ours']['code_rounds']} rounds; "
                      f"incl. k-means {dict_res['ours']['init_s']:.0f}s)",
              "spams": "spams trainDL ({dtype}, blas {blas_threads})".format(**dict_res["spams"]["setting"])
              if "spams" in dict_res else "", "random_samples": "random training vectors"}
    for name, v in dict_res.items():
        print(f"{labels[name]:44s} {v['wall_s']:8.1f} {v['samples_seen']:8d} {v['heldout_obj']:19.5f}")
    print(f"load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    out = {
        "ours_vec_per_s": round(rows[1]["vec_per_s"], 1),
        "spams_vec_per_s": round(spams_best, 1),
        "spams_f64_vec_per_s": round(rows[0]["vec_per_s"], 1),
        "spams_f32_vec_per_s": round(spams32["vec_per_s"], 1),
        "spams_f32_mean_rel_gap": spams32["mean_rel_gap"],
        "ours_speedup_vs_spams": round(rows[1]["vec_per_s"] / spams_best, 2),
        "fista100_vec_per_s": round(rows[2]["vec_per_s"], 1),
        "sklearn_vec_per_s": round(rows[3]["vec_per_s"], 1),
        "ours_mean_rel_gap": rows[1]["mean_rel_gap"],
        "ours_p99_rel_gap": rows[1]["p99_rel_gap"],
        "ours_cert_mean_rel_gap": rows[1]["cert_mean"],
        "ours_cert_p99_rel_gap": rows[1]["cert_p99"],
        "ours_cert_max_rel_gap": rows[1]["cert_max"],
        "ours_min_rel_gap": rows[1]["min_rel_gap"], "spams_f32_min_rel_gap": spams32["min_rel_gap"],
        "spams_f64_blas_threads": s64["blas_threads"], "spams_f32_blas_threads": s32["blas_threads"],
        "spams_lasso_probe_s": lasso_probe,
        "fista100_mean_rel_gap": rows[2]["mean_rel_gap"],
        "sklearn_mean_rel_gap": rows[3]["mean_rel_gap"],
        "ours_nnz": rows[1]["nnz"], "spams_nnz": rows[0]["nnz"],
        "tol": args.tol,
        **({"ours_tol2": args.tol2, "ours_tol2_vec_per_s": round(extra_ours["vec_per_s"], 1),
            "ours_tol2_mean_rel_gap": extra_ours["mean_rel_gap"], "ours_tol2_p99_rel_gap": extra_ours["p99_rel_gap"],
            "ours_tol2_cert_max_rel_gap": extra_ours["cert_max"],
            "ours_tol2_speedup_vs_spams": round(extra_ours["vec_per_s"] / spams_best, 2)}
           if args.tol2 > 0 else {}),
        "dict_ours_s": round(dict_res["ours"]["wall_s"], 1),
        "dict_ours_init_s": dict_res["ours"]["init_s"], "dict_ours_code_tol": dict_res["ours"]["code_tol"],
        "dict_ours_code_rounds": dict_res["ours"]["code_rounds"],
        "dict_spams_setting": dict_res["spams"]["setting"] if "spams" in dict_res else None,
        "dict_spams_probe_s": dict_res["spams"]["probe_s"] if "spams" in dict_res else None,
        "dict_spams_s": round(dict_res["spams"]["wall_s"], 1) if "spams" in dict_res else None,
        "dict_ours_heldout_obj": dict_res["ours"]["heldout_obj"],
        "dict_spams_heldout_obj": dict_res["spams"]["heldout_obj"] if "spams" in dict_res else None,
        "dict_random_heldout_obj": dict_res["random_samples"]["heldout_obj"],
        "samples_seen": samples, "train_n": len(train), "heldout_n": len(held), "K": K, "lambda": lam,
        "d": int(held.shape[1]), "threads": args.threads, "device": device_desc,
        "load_avg_start": round(load0[0], 2), "load_avg_end": round(load1[0], 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
