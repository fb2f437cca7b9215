"""The sparse-code stage: learn the dictionary on a sample, then code every token once.

Reads the extract shards one row group at a time (memory bounded by the dictionary sample and
one batch), writes one part file per shard (resumable), and merges them into codes.h5.

Several workers (pipeline.workers) code disjoint shards into the same parts folder; the worker
that completes the set merges, so the result is the single-worker one. All of them must code with
one dictionary: under torchrun rank 0 learns it while the others wait at a barrier; with
`--shard-index/--num-shards` it is learnt first by `--dictionary-only` and the workers refuse to
start without it (a dictionary learnt by every worker would differ on GPUs).
"""

from __future__ import annotations

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

from mlsm.core.device import pick_device
from mlsm.core.hf import load_tokenizer, tokenizer_fingerprint
from mlsm.core.errors import MLSMError
from mlsm.core.layout import dictionary_fingerprint
from mlsm.core.manifest import (
    MANIFEST, PROGRESS, atomic_path, new_manifest, read_manifest, sha256_file, sha256_json, write_json_atomic,
)
from mlsm.pipeline.codes import dense_to_csr, merge_parts, part_rows, top_k_codes, write_part
from mlsm.pipeline.shards import iter_shard_batches, read_rows
from mlsm.pipeline.solvers import auto_engine, nn_lasso
from mlsm.pipeline.workers import (
    Worker, finish, merge_once, missing_workers, prepare_shared_stage, read_records, resolve_worker,
)

log = logging.getLogger(__name__)

SOLVER_NAME = "nn_lasso: working set + certified duality gap"  # the engine that ran is in report.engine
WORKERS_DIR = "workers"


def normalize_rows(h: np.ndarray, device, eps: float = 1e-6) -> torch.Tensor:
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


def _dictionary(extract_dir, out_dir, man, layer, K, lam, dict_samples, heldout, seed, device, dict_key, progress):
    from mlsm.pipeline.dictionary import learn_dictionary

    path = out_dir / "dictionary.h5"
    found = _load_dictionary(path, dict_key)
    if found is not None:
        log.info("sparse-code: reusing the dictionary in %s", path)
        return found
    path.unlink(missing_ok=True)
    total = sum(s["tokens"] for s in man["shards"])
    n_held = min(heldout, total // 10)
    raw = sample_vectors(extract_dir, man["shards"], layer, dict_samples + n_held, seed, progress)
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


def _shared_dictionary(worker: Worker, dictionary_only: bool, out_dir, dict_key, learn):
    """The one dictionary every worker codes with (see the module docstring)."""
    path = out_dir / "dictionary.h5"
    if worker.distributed:
        if worker.index == 0:
            try:
                learn()
            finally:
                worker.barrier()
        else:
            log.info("sparse-code: rank %d waits for rank 0's dictionary", worker.index)
            worker.barrier()
    elif worker.count == 1 or dictionary_only:
        return learn()
    found = _load_dictionary(path, dict_key)
    if found is None:
        raise MLSMError(f"{path} with these parameters is missing: workers of a sharded run share one dictionary. "
                        f"Learn it first with the same arguments plus --dictionary-only (without --shard-index), "
                        f"or launch the workers with torchrun.")
    return found


def _code_shard(extract_dir, shard, part, layer, D, gram, lam, tol, batch_size, top_k, value_dtype, dev, bar):
    toks, seqs, counts, idx, vals, gaps, recon = [], [], [], [], [], [], []
    for rg in iter_shard_batches(extract_dir / shard["file"], layer):
        toks.append(rg["token_id"])
        seqs.append(rg["seq_id"])
        for b in range(0, len(rg["token_id"]), batch_size):
            x = normalize_rows(rg["hidden"][b:b + batch_size], dev)
            res = nn_lasso(x, D, lam, tol=tol, gram=gram)
            a = res.codes
            # ||x - D a|| from the objective the solver already evaluated: a second full GEMM saved
            recon.append(torch.sqrt((2 * (res.primal.double() - lam * a.sum(1).double())).clamp(min=0)).cpu().numpy())
            c, j, v = dense_to_csr(a.cpu().numpy(), value_dtype)
            if top_k:
                c, j, v = top_k_codes(c, j, v, top_k)
            counts.append(c), idx.append(j), vals.append(v), gaps.append(res.rel_gap.cpu().numpy())
            bar.update(len(x))
    seq_ids = np.concatenate(seqs)
    _, seq_lengths = np.unique(seq_ids, return_counts=True)
    write_part(part, np.concatenate(toks), seq_lengths, np.concatenate(counts), np.concatenate(idx),
               np.concatenate(vals), np.concatenate(gaps),
               attrs={"recon_err_sum": float(np.concatenate(recon).sum()), "shard": shard["file"]})
    return len(seq_ids)


def run_sparse_code(
    extract_dir: Path,
    out_dir: Path,
    layer: int | None = None,
    K: int = 3000,
    lam: float = 0.05,
    tol: float = 1e-4,
    dict_samples: int = 1_000_000,
    heldout: int = 20_000,
    batch_size: int = 8192,
    top_k: int | None = None,
    values: str = "float32",
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    shard_index: int | None = None,
    num_shards: int | None = None,
    dictionary_only: bool = False,
    delete_hidden: bool = False,
) -> dict:
    """Code this worker's shards; the worker that completes the set merges codes.h5 and writes the manifest.

    Returns the stage manifest, or (for a worker that is not last, or --dictionary-only) a
    record with complete=False and a "report".
    """
    worker = resolve_worker(shard_index, num_shards)
    try:
        return _run_sparse_code(worker, Path(extract_dir), Path(out_dir), layer, K, lam, tol, dict_samples, heldout,
                                batch_size, top_k, values, seed, device, force, progress, dictionary_only,
                                delete_hidden)
    finally:
        finish(worker)


def _run_sparse_code(worker, extract_dir, out_dir, layer, K, lam, tol, dict_samples, heldout, batch_size, top_k,
                     values, seed, device, force, progress, dictionary_only, delete_hidden) -> dict:
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
        raise MLSMError("--values-dtype must be float32 or float16")
    if K > 65535:
        raise MLSMError("K must be below 65536: atom indices are stored as uint16.")
    if top_k is not None and top_k < 1:
        raise MLSMError("--top-k must be at least 1 (leave it out to keep every atom).")
    params = {"layer": layer, "K": K, "lambda": lam, "tol": tol, "dict_samples": dict_samples,
              "heldout": heldout, "top_k": top_k, "values": values, "seed": seed}
    inputs = {"extract_manifest": sha256_file(extract_dir / MANIFEST)}
    state, old = prepare_shared_stage(worker, out_dir, "sparse-code", params, inputs, force,
                                      ["dictionary.h5", "codes.h5", "parts", "tokenizer", WORKERS_DIR])
    if state == "done":
        log.info("sparse-code: %s is already complete; nothing to do. Use --force to redo it.", out_dir)
        return old
    dev = pick_device(device)
    progress_doc = new_manifest("sparse-code", params, inputs)
    progress_doc["extract_dir"] = str(extract_dir)  # for the rebuild command in error messages
    write_json_atomic(out_dir / PROGRESS, progress_doc)

    t0 = time.time()
    dict_key = sha256_json({k: params[k] for k in ("layer", "K", "lambda", "dict_samples", "heldout", "seed")} | inputs)
    D, dict_stats = _shared_dictionary(
        worker, dictionary_only, out_dir, dict_key,
        lambda: _dictionary(extract_dir, out_dir, man, layer, K, lam, dict_samples, heldout, seed, dev, dict_key,
                            progress))
    t_dict = time.time() - t0
    if dictionary_only:
        log.info("sparse-code: dictionary ready in %s; now start the workers", out_dir / "dictionary.h5")
        return {"complete": False, "report": {"dictionary": str(out_dir / "dictionary.h5"), "dictionary_s": round(t_dict, 1),
                                              **{k: dict_stats.get(k) for k in ("heldout_objective",) if k in dict_stats}}}
    if man.get("d") is not None and tuple(D.shape) != (man["d"], K):
        raise MLSMError(f"{out_dir / 'dictionary.h5'} is a {D.shape[0]} x {D.shape[1]} dictionary, but the hidden states "
                        f"have d={man['d']} and K={K} was asked for; rebuild it with `mlsm sparse-code ... --force`.")
    D = D.to(dev)
    gram = D.T @ D
    value_dtype = np.float16 if values == "float16" else np.float32

    parts_dir = out_dir / "parts"
    parts_dir.mkdir(exist_ok=True)
    mine = [(i, s) for i, s in enumerate(man["shards"]) if worker.owns(i)]
    bar = tqdm(total=sum(s["tokens"] for _, s in mine), unit="tok", unit_scale=True,
               desc=f"sparse-code {worker.index}/{worker.count}", disable=not progress)
    t1 = time.time()
    coded = 0
    for i, shard in mine:
        part = parts_dir / f"part-{i:05d}.h5"
        if part_rows(part) != shard["tokens"]:  # missing, or damaged on disk
            if not (extract_dir / shard["file"]).exists():
                raise MLSMError(f"{extract_dir / shard['file']} is missing and its codes were never written; "
                                f"re-extract with `mlsm extract --force`.")
            coded += _code_shard(extract_dir, shard, part, layer, D, gram, lam, tol, batch_size, top_k, value_dtype,
                                 dev, bar)
        else:
            bar.update(shard["tokens"])
        if delete_hidden and (extract_dir / shard["file"]).exists():  # write_part fsynced the part
            (extract_dir / shard["file"]).unlink()
    bar.close()
    t_code = time.time() - t1
    record = {"worker": worker.index, "workers": worker.count, "device": str(dev), "dictionary_s": round(t_dict, 1),
              "coding_s": round(t_code, 1), "coded_tokens": coded,
              "coding_tokens_per_s": round(coded / t_code, 1) if coded and t_code > 0 else None}
    write_json_atomic(out_dir / WORKERS_DIR / f"{worker.name}.json", record)
    manifest = merge_codes(extract_dir, out_dir, worker)
    return manifest if manifest is not None else {**record, "complete": False, "report": record}


def merge_codes(extract_dir: Path, out_dir: Path, worker: Worker) -> dict | None:
    """Merge the parts into codes.h5 and write the manifest once every shard is coded and every worker
    of this split has recorded its end; else None."""
    return merge_once(out_dir, "sparse-code", lambda: _merge_codes(Path(extract_dir), Path(out_dir), worker))


def _merge_codes(extract_dir: Path, out_dir: Path, worker: Worker) -> dict | None:
    waiting = missing_workers(read_records(out_dir / WORKERS_DIR), worker, lambda r: "coding_s" in r)
    if waiting:
        log.info("sparse-code: workers %s of %d have not finished; the last one to finish merges", waiting,
                 worker.count)
        return None
    man = read_manifest(extract_dir, stage="extract", fix="mlsm extract (or make extract)")
    progress_doc = json.loads((out_dir / PROGRESS).read_text())
    p = progress_doc["params"]
    parts = [out_dir / "parts" / f"part-{i:05d}.h5" for i in range(len(man["shards"]))]
    n_missing = sum(part_rows(q) != s["tokens"] for q, s in zip(parts, man["shards"]))
    if n_missing:
        log.info("sparse-code: %d of %d parts are done; the worker that codes the last one merges them",
                 len(parts) - n_missing, len(parts))
        return None
    with h5py.File(out_dir / "dictionary.h5", "r") as f:
        D = f["D"][:]
        dict_stats = json.loads(f.attrs["stats"])
    recon_sum = 0.0
    for q in parts:
        with h5py.File(q, "r") as f:
            recon_sum += float(f.attrs["recon_err_sum"])
    tok_fp = tokenizer_fingerprint(load_tokenizer(extract_dir / "tokenizer"))
    attrs = {
        "lambda": p["lambda"], "K": p["K"], "layer": p["layer"], "solver": SOLVER_NAME, "tolerance": p["tol"],
        "top_k": p["top_k"] or 0, "values_dtype": p["values"],
        "extract_fingerprint": progress_doc["inputs"]["extract_manifest"],
        "dictionary_fingerprint": dictionary_fingerprint(D),
        "tokenizer_fingerprint": tok_fp,
    }
    value_dtype = np.float16 if p["values"] == "float16" else np.float32
    total = man["tokens"]
    stats = merge_parts(parts, out_dir / "codes.h5", attrs, value_dtype)
    if stats["tokens"] != total:
        raise MLSMError(f"merged {stats['tokens']} tokens but the extract manifest lists {total}; re-run with --force.")
    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
    shutil.copytree(extract_dir / "tokenizer", out_dir / "tokenizer")
    shutil.rmtree(out_dir / "parts")

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
