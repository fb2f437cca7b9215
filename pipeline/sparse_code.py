"""The sparse-code stage: learn the dictionary on a sample, then code every token once.

Reads the extract shards one row group at a time (memory bounded by the dictionary sample and
one batch), writes one part file per shard (resumable), and merges them into codes.h5.

Several workers (pipeline.workers) code disjoint shards into the same parts folder; the worker
that completes the set merges, so the result is the single-worker one. All of them must code with
one dictionary: under torchrun rank 0 learns it while the others wait at a barrier; with
`--worker-index/--num-workers` it is learnt first by `--dictionary-only` and the workers refuse to
start without it (a dictionary learnt by every worker would differ on GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mlsm.core.config import SparseCodeConfig, recorded
from mlsm.core.device import pick_device
from mlsm.core.errors import MLSMError
from mlsm.core.hf import load_tokenizer, tokenizer_fingerprint
from mlsm.core.layout import (
    CODES,
    DICTIONARY,
    MANIFEST,
    PARTS_DIR,
    PROGRESS,
    TOKENIZER_DIR,
    WORKERS_DIR,
    dictionary_fingerprint,
    part_name,
)
from mlsm.core.manifest import atomic_path, new_manifest, read_manifest, sha256_file, sha256_json, write_json_atomic
from mlsm.core.ranks import Rank, join
from mlsm.pipeline.codes import dense_to_csr, merge_parts, part_rows, top_k_codes, write_part
from mlsm.pipeline.shards import iter_shard_batches, read_rows
from mlsm.pipeline.solvers import auto_engine, nn_lasso
from mlsm.pipeline.workers import BARRIER_TIMEOUT, merge_once, missing_workers, prepare_shared_stage, read_records

log = logging.getLogger(__name__)

SOLVER_NAME = "nn_lasso: working set + certified duality gap"  # the engine that ran is in report.engine


def l2_normalize_states(h: np.ndarray, device, eps: float = 1e-6) -> torch.Tensor:
    """x = h / max(||h||, eps), in float32; refuses NaN/Inf so they never poison the dictionary."""
    x = torch.from_numpy(np.array(h, dtype=np.float32)).to(device)
    if not torch.isfinite(x).all():
        raise MLSMError("hidden states contain NaN or Inf values; re-extract them with `mlsm extract --force`.")
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def sample_rows(shards: list[dict], n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted global row numbers of a uniform sample of n tokens (all of them if fewer)."""
    total = int(sum(s["tokens"] for s in shards))
    return np.sort(rng.choice(total, size=min(n, total), replace=False))


def read_sample(extract_dir: Path, shards: list[dict], rows: np.ndarray, layer: int | None,
                progress: bool = False) -> np.ndarray:
    """Hidden states of `layer` (token ids if layer is None) at the sorted global `rows`, shard by shard."""
    starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in shards])])
    out = []
    for i, s in enumerate(tqdm(shards, desc="sample", unit="shard", leave=False, disable=not progress)):
        sel = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
        if len(sel):
            path = extract_dir / s["file"]
            if not path.exists():
                raise MLSMError(f"{path} is gone (deleted by --delete-hidden or make clean-hidden) and its hidden "
                                f"states are needed again; re-extract with `mlsm extract --force`.")
            if layer is None:
                out.append(pq.read_table(path, columns=["token_id"]).column("token_id").to_numpy()[sel])
            else:
                out.append(read_rows(path, layer, sel))
    return np.concatenate(out)


def sample_vectors(extract_dir: Path, shards: list[dict], layer: int, n: int, seed: int,
                   progress: bool = True) -> np.ndarray:
    """A seeded uniform sample of n token vectors, read shard by shard (only the rows needed)."""
    rng = np.random.default_rng(seed)
    sample = read_sample(extract_dir, shards, sample_rows(shards, n, rng), layer, progress)
    return sample[rng.permutation(len(sample))]


def _load_dictionary(path: Path, dict_key: str):
    """(D, stats) if path holds the dictionary these parameters ask for, else None."""
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("params_key") == dict_key:
                    return torch.from_numpy(f["D"][:]), json.loads(f.attrs["stats"])
        except (OSError, KeyError) as e:  # damaged on disk: learnt again
            log.warning("%s is damaged (%s); the dictionary will be learnt again", path, e)
    return None


def _learn_dictionary(cfg: SparseCodeConfig, man: dict, device, dict_key: str):
    from mlsm.pipeline.dictionary import DictOptions, learn_dictionary

    path = Path(cfg.out) / DICTIONARY
    found = _load_dictionary(path, dict_key)
    if found is not None:
        log.info("sparse-code: reusing the dictionary in %s", path)
        return found
    path.unlink(missing_ok=True)
    total = sum(s["tokens"] for s in man["shards"])
    n_held = min(cfg.heldout, total // 10)
    raw = sample_vectors(Path(cfg.extract_dir), man["shards"], cfg.layer, cfg.dict_samples + n_held, cfg.seed,
                         cfg.progress)
    x = l2_normalize_states(raw, "cpu").numpy()
    train, held = x[n_held:], x[:n_held]
    log.info("sparse-code: learning a %d x %d dictionary on %d vectors (%d held out)", x.shape[1], cfg.K, len(train),
             len(held))
    result = learn_dictionary(train, K=cfg.K, lam=cfg.lam, options=DictOptions(seed=cfg.seed), device=str(device),
                              heldout=held if len(held) else None, progress=cfg.progress)
    D = result.D.detach().float().cpu().contiguous()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("D", data=D.numpy())
            f.attrs.update(K=cfg.K, d=D.shape[0], layer=cfg.layer, **{"lambda": cfg.lam}, params_key=dict_key,
                           stats=json.dumps(result.stats))
    return D, result.stats


def _shared_dictionary(rank: Rank, cfg: SparseCodeConfig, dict_key: str, learn):
    """The one dictionary every worker codes with (see the module docstring)."""
    path = Path(cfg.out) / DICTIONARY
    if rank.launched:
        if rank.index == 0:
            try:
                learn()
            finally:
                rank.barrier()
        else:
            log.info("sparse-code: rank %d waits for rank 0's dictionary", rank.index)
            rank.barrier()
    elif rank.count == 1 or cfg.dictionary_only:
        return learn()
    found = _load_dictionary(path, dict_key)
    if found is None:
        raise MLSMError(f"{path} with these parameters is missing: workers of a sharded run share one dictionary. "
                        f"Learn it first with the same arguments plus --dictionary-only (without --worker-index), "
                        f"or launch the workers with torchrun.")
    return found


def _code_shard(cfg: SparseCodeConfig, shard_path: Path, part: Path, D, gram, bar) -> int:
    """Code one shard's tokens into a part file; returns the number of tokens."""
    lam = cfg.lam
    value_dtype = np.float16 if cfg.values == "float16" else np.float32
    toks, seqs, counts, idx, vals, gaps, recon = [], [], [], [], [], [], []
    for rg in iter_shard_batches(shard_path, cfg.layer):
        toks.append(rg["token_id"])
        seqs.append(rg["seq_id"])
        for b in range(0, len(rg["token_id"]), cfg.batch_size):
            x = l2_normalize_states(rg["hidden"][b:b + cfg.batch_size], D.device)
            res = nn_lasso(x, D, lam, tol=cfg.tol, gram=gram)
            a = res.codes
            # ||x - D a|| from the objective the solver already evaluated: a second full GEMM saved
            recon.append(torch.sqrt((2 * (res.primal.double() - lam * a.sum(1).double())).clamp(min=0)).cpu().numpy())
            c, j, v = dense_to_csr(a.cpu().numpy(), value_dtype)
            if cfg.top_k:
                c, j, v = top_k_codes(c, j, v, cfg.top_k)
            counts.append(c), idx.append(j), vals.append(v), gaps.append(res.rel_gap.cpu().numpy())
            bar.update(len(x))
    seq_ids = np.concatenate(seqs)
    _, seq_lengths = np.unique(seq_ids, return_counts=True)
    write_part(part, np.concatenate(toks), seq_lengths, np.concatenate(counts), np.concatenate(idx),
               np.concatenate(vals), np.concatenate(gaps),
               attrs={"recon_err_sum": float(np.concatenate(recon).sum()), "shard": shard_path.name})
    return len(seq_ids)


def run_sparse_code(cfg: SparseCodeConfig) -> dict:
    """Code this worker's shards; the worker that completes the set merges codes.h5 and writes the manifest.

    Returns the stage manifest, or (for a worker that is not last, or --dictionary-only) a
    record with complete=False and a "report".
    """
    cfg.validate()
    rank = join(index=cfg.worker_index, count=cfg.num_workers, timeout=BARRIER_TIMEOUT)
    try:
        return _run_sparse_code(cfg, rank)
    finally:
        rank.close()


def _layer_to_code(man: dict, layer: int | None, extract_dir: Path) -> int:
    have = man["params"]["layers"]
    if layer is None:
        if len(have) != 1:
            raise MLSMError(f"{extract_dir} holds layers {have}; choose one with --layer.")
        return have[0]
    if layer not in have:
        raise MLSMError(f"layer {layer} was not extracted: {extract_dir} holds layers {have}. Run `mlsm extract "
                        f"--layers {layer}` (or make extract LAYER={layer}), or pick one of those.")
    return layer


def _run_sparse_code(cfg: SparseCodeConfig, rank: Rank) -> dict:
    extract_dir, out_dir = Path(cfg.extract_dir), Path(cfg.out)
    man = read_manifest(extract_dir, stage="extract", fix="mlsm extract (or make extract)")
    cfg = dataclasses.replace(cfg, layer=_layer_to_code(man, cfg.layer, extract_dir))
    params = recorded(cfg)
    inputs = {"extract_manifest": sha256_file(extract_dir / MANIFEST)}
    state, old = prepare_shared_stage(rank, out_dir, "sparse-code", params, inputs, cfg.force,
                                      [DICTIONARY, CODES, PARTS_DIR, TOKENIZER_DIR, WORKERS_DIR])
    if state == "done":
        log.info("sparse-code: %s is already complete; nothing to do. Use --force to redo it.", out_dir)
        return old
    dev = pick_device(cfg.device)
    progress_doc = new_manifest("sparse-code", params, inputs)
    progress_doc["extract_dir"] = str(extract_dir)  # for the rebuild command in error messages
    write_json_atomic(out_dir / PROGRESS, progress_doc)

    t0 = time.time()
    dict_key = sha256_json({k: params[k] for k in ("layer", "K", "lambda", "dict_samples", "heldout", "seed")} | inputs)
    D, dict_stats = _shared_dictionary(rank, cfg, dict_key, lambda: _learn_dictionary(cfg, man, dev, dict_key))
    t_dict = time.time() - t0
    if cfg.dictionary_only:
        log.info("sparse-code: dictionary ready in %s; now start the workers", out_dir / DICTIONARY)
        return {"complete": False, "report": {"dictionary": str(out_dir / DICTIONARY), "dictionary_s": round(t_dict, 1),
                                              **{k: dict_stats.get(k) for k in ("heldout_objective",) if k in dict_stats}}}
    if man.get("d") is not None and tuple(D.shape) != (man["d"], cfg.K):
        raise MLSMError(f"{out_dir / DICTIONARY} is a {D.shape[0]} x {D.shape[1]} dictionary, but the hidden states "
                        f"have d={man['d']} and K={cfg.K} was asked for; rebuild it with `mlsm sparse-code ... --force`.")
    D = D.to(dev)
    gram = D.T @ D

    parts_dir = out_dir / PARTS_DIR
    parts_dir.mkdir(exist_ok=True)
    mine = [(i, s) for i, s in enumerate(man["shards"]) if rank.owns(i)]
    bar = tqdm(total=sum(s["tokens"] for _, s in mine), unit="tok", unit_scale=True,
               desc=f"sparse-code {rank.index}/{rank.count}", disable=not cfg.progress)
    t1 = time.time()
    coded = 0
    for i, shard in mine:
        part, shard_path = parts_dir / part_name(i), extract_dir / shard["file"]
        if part_rows(part) != shard["tokens"]:  # missing, or damaged on disk
            if not shard_path.exists():
                raise MLSMError(f"{shard_path} is missing and its codes were never written; "
                                f"re-extract with `mlsm extract --force`.")
            coded += _code_shard(cfg, shard_path, part, D, gram, bar)
        else:
            bar.update(shard["tokens"])
        if cfg.delete_hidden and shard_path.exists():  # write_part fsynced the part
            shard_path.unlink()
    bar.close()
    t_code = time.time() - t1
    record = {"worker": rank.index, "workers": rank.count, "device": str(dev), "dictionary_s": round(t_dict, 1),
              "coding_s": round(t_code, 1), "coded_tokens": coded,
              "coding_tokens_per_s": round(coded / t_code, 1) if coded and t_code > 0 else None}
    write_json_atomic(out_dir / WORKERS_DIR / f"{rank.name}.json", record)
    manifest = merge_codes(extract_dir, out_dir, rank)
    return manifest if manifest is not None else {**record, "complete": False, "report": record}


def merge_codes(extract_dir: Path, out_dir: Path, worker: Rank) -> dict | None:
    """Merge the parts into codes.h5 and write the manifest once every shard is coded and every worker
    of this split has recorded its end; else None."""
    return merge_once(out_dir, "sparse-code", lambda: _merge_codes(Path(extract_dir), Path(out_dir), worker))


def _merge_codes(extract_dir: Path, out_dir: Path, worker: Rank) -> dict | None:
    waiting = missing_workers(read_records(out_dir / WORKERS_DIR), worker, lambda r: "coding_s" in r)
    if waiting:
        log.info("sparse-code: workers %s of %d have not finished; the last one to finish merges", waiting,
                 worker.count)
        return None
    man = read_manifest(extract_dir, stage="extract", fix="mlsm extract (or make extract)")
    progress_doc = json.loads((out_dir / PROGRESS).read_text())
    p = progress_doc["params"]
    parts = [out_dir / PARTS_DIR / part_name(i) for i in range(len(man["shards"]))]
    n_missing = sum(part_rows(q) != s["tokens"] for q, s in zip(parts, man["shards"], strict=True))
    if n_missing:
        log.info("sparse-code: %d of %d parts are done; the worker that codes the last one merges them",
                 len(parts) - n_missing, len(parts))
        return None
    with h5py.File(out_dir / DICTIONARY, "r") as f:
        D = f["D"][:]
        dict_stats = json.loads(f.attrs["stats"])
    recon_sum = 0.0
    for q in parts:
        with h5py.File(q, "r") as f:
            recon_sum += float(f.attrs["recon_err_sum"])
    tok_fp = tokenizer_fingerprint(load_tokenizer(extract_dir / TOKENIZER_DIR))
    attrs = {
        "lambda": p["lambda"], "K": p["K"], "layer": p["layer"], "solver": SOLVER_NAME, "tolerance": p["tol"],
        "top_k": p["top_k"] or 0, "values_dtype": p["values"],
        "extract_fingerprint": progress_doc["inputs"]["extract_manifest"],
        "dictionary_fingerprint": dictionary_fingerprint(D),
        "tokenizer_fingerprint": tok_fp,
    }
    value_dtype = np.float16 if p["values"] == "float16" else np.float32
    total = man["tokens"]
    stats = merge_parts(parts, out_dir / CODES, attrs, value_dtype)
    if stats["tokens"] != total:
        raise MLSMError(f"merged {stats['tokens']} tokens but the extract manifest lists {total}; re-run with --force.")
    shutil.rmtree(out_dir / TOKENIZER_DIR, ignore_errors=True)
    shutil.copytree(extract_dir / TOKENIZER_DIR, out_dir / TOKENIZER_DIR)
    shutil.rmtree(out_dir / PARTS_DIR)

    records = read_records(out_dir / WORKERS_DIR)
    coded = sum(r["coded_tokens"] for r in records)
    t_code = max((r["coding_s"] for r in records), default=0.0)
    report = {
        "tokens": total,
        "nnz_per_token": round(stats["nnz"] / total, 2),
        "bytes_per_token": round(stats["bytes"] / total, 1),
        "codes_bytes": stats["bytes"],
        "rel_recon_error": round(recon_sum / total, 4),
        "zero_code_tokens": stats["zero_rows"],
        "gap_mean": stats.get("gap_mean"), "gap_p99": stats.get("gap_p99"), "gap_max": stats.get("gap_max"),
        "dictionary_s": max((r["dictionary_s"] for r in records), default=None),
        "coding_s": t_code,
        "coding_tokens_per_s": round(coded / t_code, 1) if coded and t_code > 0 else None,
        "device": ",".join(sorted({r["device"] for r in records})),
        "engine": ",".join(sorted({auto_engine(torch.device(r["device"]).type, D.shape[0]) for r in records})),
        "workers": len(records),
    }
    manifest = dict(progress_doc)
    manifest.update(complete=True, solver=SOLVER_NAME, dictionary=dict_stats, report=report,
                    tokenizer_fingerprint=tok_fp, tokens=total)
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    log.info("sparse-code: %s", json.dumps(report))
    return manifest
