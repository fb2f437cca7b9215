"""The sparse-code stage: learn the dictionary on a sample, then code every token once.

Reads the extract shards one row group at a time (memory bounded by the dictionary sample and
one batch), writes one part file per shard (resumable), and merges them into codes.h5.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from mlsm.errors import MLSMError
from mlsm.manifest import (
    MANIFEST, PROGRESS, atomic_path, new_manifest, prepare_stage, read_manifest, sha256_file,
    sha256_json, write_json_atomic,
)
from pipeline.codes import dense_to_csr, merge_parts, write_part
from pipeline.extract import pick_device
from pipeline.shards import iter_shard_batches, read_rows

log = logging.getLogger(__name__)

SOLVER_NAME = "nn_lasso: working set + certified duality gap"


def normalize_rows(h: np.ndarray, device, eps: float = 1e-6) -> torch.Tensor:
    """x = h / max(||h||, eps), in float32; refuses NaN/Inf so they never poison the dictionary."""
    x = torch.from_numpy(np.array(h, dtype=np.float32)).to(device)
    if not torch.isfinite(x).all():
        raise MLSMError("hidden states contain NaN or Inf values; re-extract them with `mlsm extract --force`.")
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def sample_vectors(extract_dir: Path, shards: list[dict], layer: int, n: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of n token vectors, read shard by shard (only the rows needed)."""
    counts = np.array([s["tokens"] for s in shards])
    total = int(counts.sum())
    n = min(n, total)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for i, s in enumerate(tqdm(shards, desc="sample", unit="shard", leave=False)):
        rows = picked[(picked >= starts[i]) & (picked < starts[i + 1])] - starts[i]
        if len(rows):
            out.append(read_rows(extract_dir / s["file"], layer, rows))
    sample = np.concatenate(out)
    return sample[rng.permutation(len(sample))]


def _dictionary(extract_dir, out_dir, man, layer, K, lam, dict_samples, heldout, seed, device, dict_key, progress):
    from pipeline.dictionary import learn_dictionary

    path = out_dir / "dictionary.h5"
    if path.exists():
        with h5py.File(path, "r") as f:
            if f.attrs.get("params_key") == dict_key:
                log.info("sparse-code: reusing the dictionary in %s", path)
                return torch.from_numpy(f["D"][:]), json.loads(f.attrs["stats"])
        path.unlink()
    total = sum(s["tokens"] for s in man["shards"])
    n_held = min(heldout, total // 10)
    raw = sample_vectors(extract_dir, man["shards"], layer, dict_samples + n_held, seed)
    x = normalize_rows(raw, "cpu").numpy()
    train, held = x[n_held:], x[:n_held]
    log.info("sparse-code: learning a %d x %d dictionary on %d vectors (%d held out)", x.shape[1], K, len(train), len(held))
    result = learn_dictionary(train, K=K, lam=lam, seed=seed, device=str(device),
                              heldout=held if len(held) else None, progress=progress)
    D = result.D.detach().float().cpu().contiguous()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("D", data=D.numpy())
            f.attrs.update(K=K, d=D.shape[0], layer=layer, **{"lambda": lam}, params_key=dict_key,
                           stats=json.dumps(result.stats))
    return D, result.stats


def run_sparse_code(
    extract_dir: Path,
    out_dir: Path,
    layer: int | None = None,
    K: int = 3000,
    lam: float = 0.05,
    tol: float = 1e-4,
    dict_samples: int = 1_000_000,
    heldout: int = 20_000,
    batch_size: int = 1024,
    top_k: int | None = None,
    values: str = "float32",
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> dict:
    from pipeline.solvers import nn_lasso

    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    man = read_manifest(extract_dir, stage="extract", fix="mlsm extract (or make extract)")
    if layer is None:
        if len(man["params"]["layers"]) != 1:
            raise MLSMError(f"{extract_dir} holds layers {man['params']['layers']}; choose one with --layer.")
        layer = man["params"]["layers"][0]
    if layer not in man["params"]["layers"]:
        raise MLSMError(
            f"layer {layer} was not extracted: {extract_dir} holds layers {man['params']['layers']}. "
            f"Run `mlsm extract --layers {layer}` (or make extract LAYER={layer}), or pick one of those."
        )
    if values not in ("float32", "float16"):
        raise MLSMError("--values must be float32 or float16")
    if K > 65535:
        raise MLSMError("K must be below 65536: atom indices are stored as uint16.")
    params = {"layer": layer, "K": K, "lambda": lam, "tol": tol, "dict_samples": dict_samples,
              "heldout": heldout, "top_k": top_k, "values": values, "seed": seed}
    inputs = {"extract_manifest": sha256_file(extract_dir / MANIFEST)}
    state, old = prepare_stage(out_dir, "sparse-code", params, inputs, force,
                               ["dictionary.h5", "codes.h5", "parts", "tokenizer"])
    if state == "done":
        log.info("sparse-code: %s is already complete; nothing to do. Use --force to redo it.", out_dir)
        return old
    dev = pick_device(device)
    progress_doc = new_manifest("sparse-code", params, inputs)
    write_json_atomic(out_dir / PROGRESS, progress_doc)

    t0 = time.time()
    dict_key = sha256_json({k: params[k] for k in ("layer", "K", "lambda", "dict_samples", "heldout", "seed")} | inputs)
    D, dict_stats = _dictionary(extract_dir, out_dir, man, layer, K, lam, dict_samples, heldout, seed, dev, dict_key, progress)
    t_dict = time.time() - t0
    D = D.to(dev)
    gram = D.T @ D
    value_dtype = np.float16 if values == "float16" else np.float32

    parts_dir = out_dir / "parts"
    parts_dir.mkdir(exist_ok=True)
    total = man["tokens"]
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="sparse-code", disable=not progress)
    t1 = time.time()
    coded = 0
    parts = []
    for i, shard in enumerate(man["shards"]):
        part = parts_dir / f"part-{i:05d}.h5"
        parts.append(part)
        if part.exists():
            bar.update(shard["tokens"])
            continue
        toks, seqs, counts, idx, vals, gaps, recon = [], [], [], [], [], [], []
        for rg in iter_shard_batches(extract_dir / shard["file"], layer):
            toks.append(rg["token_id"])
            seqs.append(rg["seq_id"])
            for b in range(0, len(rg["token_id"]), batch_size):
                x = normalize_rows(rg["hidden"][b:b + batch_size], dev)
                res = nn_lasso(x, D, lam, tol=tol, gram=gram)
                a = res.codes
                recon.append((x - a @ D.T).norm(dim=1).cpu().numpy())
                if top_k:
                    keep = torch.topk(a, min(top_k, K), dim=1)
                    a = torch.zeros_like(a).scatter_(1, keep.indices, keep.values)
                c, j, v = dense_to_csr(a.cpu().numpy(), value_dtype)
                counts.append(c), idx.append(j), vals.append(v), gaps.append(res.rel_gap.cpu().numpy())
                bar.update(len(x))
                coded += len(x)
        seq_ids = np.concatenate(seqs)
        _, seq_lengths = np.unique(seq_ids, return_counts=True)
        recon_all = np.concatenate(recon)
        write_part(part, np.concatenate(toks), seq_lengths, np.concatenate(counts), np.concatenate(idx),
                   np.concatenate(vals), np.concatenate(gaps),
                   attrs={"recon_err_sum": float(recon_all.sum()), "shard": shard["file"]})
    bar.close()
    t_code = time.time() - t1

    recon_sum = 0.0
    for p in parts:
        with h5py.File(p, "r") as f:
            recon_sum += float(f.attrs["recon_err_sum"])
    from trainer.checkpoint import load_tokenizer, tokenizer_fingerprint

    tok_fp = tokenizer_fingerprint(load_tokenizer(extract_dir / "tokenizer"))
    attrs = {
        "lambda": lam, "K": K, "layer": layer, "solver": SOLVER_NAME, "tolerance": tol,
        "top_k": top_k or 0, "values_dtype": values,
        "extract_fingerprint": inputs["extract_manifest"],
        "dictionary_fingerprint": hashlib.sha256(D.cpu().numpy().tobytes()).hexdigest(),
        "tokenizer_fingerprint": tok_fp,
    }
    stats = merge_parts(parts, out_dir / "codes.h5", attrs, value_dtype)
    if stats["tokens"] != total:
        raise MLSMError(f"merged {stats['tokens']} tokens but the extract manifest lists {total}; re-run with --force.")
    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
    shutil.copytree(extract_dir / "tokenizer", out_dir / "tokenizer")
    shutil.rmtree(parts_dir)

    nnz = stats["nnz"]
    with h5py.File(out_dir / "codes.h5", "r") as f:
        indptr = f["codes/indptr"][:]
    zero_rows = int((np.diff(indptr) == 0).sum())
    report = {
        "tokens": total,
        "nnz_per_token": round(nnz / total, 2),
        "bytes_per_token": round(stats["bytes"] / total, 1),
        "codes_bytes": stats["bytes"],
        "rel_recon_error": round(recon_sum / total, 4),
        "zero_code_tokens": zero_rows,
        "gap_mean": stats.get("gap_mean"), "gap_p99": stats.get("gap_p99"), "gap_max": stats.get("gap_max"),
        "dictionary_s": round(t_dict, 1),
        "coding_s": round(t_code, 1),
        "coding_tokens_per_s": round(coded / t_code, 1) if coded and t_code > 0 else None,
        "device": str(dev),
    }
    manifest = dict(progress_doc)
    manifest.update(complete=True, solver=SOLVER_NAME, dictionary=dict_stats, report=report,
                    tokenizer_fingerprint=tok_fp, tokens=total)
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    log.info("sparse-code: %s", json.dumps(report))
    return manifest
