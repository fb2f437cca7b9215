"""Finalize a sparse-code folder: codes.h5 over the finished parts, and manifest.json.

codes.h5 keeps its layout (DESIGN §2.3) and is what users open with h5py; its /tokens,
/codes/indices and /codes/values are HDF5 virtual datasets over parts/, so finalizing writes only
the rebased /seq_offsets and /codes/indptr (`codes.merge_parts(copy=False)`): seconds where the
old serial merge recompressed every code. `--merge` writes a self-contained copy instead.

Idempotent and safe to run concurrently, with no lock: every file is written under a temp name
and renamed into place, and two runs over the same parts write the same bytes. Any job may run it
once every part exists (`mlsm finalize`, e.g. a SLURM job that depends on the coding array); a
worker runs it itself when it finds every part and every worker's record of its split there, and
under torchrun rank 0 runs it after a barrier.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from mlsm.core.errors import MLSMError
from mlsm.core.layout import (
    CODES,
    DICTIONARY,
    MANIFEST,
    PARTS_DIR,
    PROGRESS,
    WORKERS_DIR,
    dictionary_fingerprint,
    part_name,
)
from mlsm.core.manifest import write_json_atomic
from mlsm.core.ranks import Rank
from mlsm.pipeline.codes import merge_parts, part_rows, rebuild_command
from mlsm.pipeline.solvers import auto_engine
from mlsm.pipeline.workers import missing_workers, read_records

log = logging.getLogger(__name__)

SOLVER_NAME = "nn_lasso: working set + certified duality gap"  # the engine that ran is in report.engine


def solver_name(params: dict) -> str:
    """What coded the tokens, from the run's recorded parameters (`--solver`; older runs record none: exact)."""
    if params.get("solver", "exact") == "fista":
        return f"fista_fixed: {params['fista_steps']} FISTA steps from zero, no convergence claim"
    return SOLVER_NAME


def finalize_codes(out_dir: str | Path, worker: Rank | None = None, merge: bool = False) -> dict | None:
    """Write codes.h5 and manifest.json once every part is there; returns the manifest.

    With `worker` (a coding worker's own attempt) it returns None while parts or the records of
    the worker's split are missing; without (`mlsm finalize`) a missing part is an error naming it.
    """
    out_dir = Path(out_dir)
    man_path = out_dir / MANIFEST
    if man_path.exists() and not merge:
        done = json.loads(man_path.read_text())
        if done.get("complete") and (out_dir / CODES).exists():
            log.info("finalize: %s is already final", out_dir / CODES)
            return done
    doc_path = out_dir / PROGRESS if (out_dir / PROGRESS).exists() else man_path
    if not doc_path.exists():
        raise MLSMError(f"{out_dir} holds no sparse-code run (no {PROGRESS} or {MANIFEST}): run `mlsm sparse-code "
                        f"--out {out_dir} ...` first, then `mlsm finalize {out_dir}`.")
    doc = json.loads(doc_path.read_text())
    if doc.get("stage") != "sparse-code" or "shards" not in doc:
        raise MLSMError(f"{doc_path} is not the record of a sparse-code run that finalize can read; re-run "
                        f"`mlsm sparse-code --out {out_dir} ... --force`.")
    records = read_records(out_dir / WORKERS_DIR)
    if worker is not None:
        waiting = missing_workers(records, worker, lambda r: "coding_s" in r)
        if waiting:
            log.info("sparse-code: workers %s of %d have not finished; the last one to finish finalizes (or run "
                     "`mlsm finalize %s` once they have)", waiting, worker.count, out_dir)
            return None
    parts = [out_dir / PARTS_DIR / part_name(s["index"]) for s in doc["shards"]]
    missing = [(q, s) for q, s in zip(parts, doc["shards"], strict=True) if part_rows(q) != s["tokens"]]
    if missing:
        if worker is not None:
            log.info("sparse-code: %d of %d parts are done; the worker that codes the last one finalizes",
                     len(parts) - len(missing), len(parts))
            return None
        q, s = missing[0]
        raise MLSMError(f"{q} is missing or incomplete ({len(missing)} of {len(parts)} parts are): shard "
                        f"{s['index']} has not been coded. Run the coding worker that owns it again, "
                        f"`{rebuild_command(out_dir, doc, force=False)}` (its other options as before), then `mlsm finalize {out_dir}`. Finished parts are kept.")
    dict_path = out_dir / DICTIONARY
    try:
        with h5py.File(dict_path, "r") as f:
            D = f["D"][:]
            dict_stats = json.loads(f.attrs["stats"])
    except (OSError, KeyError) as e:
        raise MLSMError(f"{dict_path} is missing or unreadable ({e}); the parts cannot be checked against it. "
                        f"Re-run `{rebuild_command(out_dir, doc)}`.") from e
    dict_fp = dictionary_fingerprint(D)
    recon_sum = 0.0
    for q in parts:
        with h5py.File(q, "r") as f:
            fp = f.attrs.get("dictionary_fingerprint")
            recon_sum += float(f.attrs["recon_err_sum"])
        if fp is not None and fp != dict_fp:
            raise MLSMError(f"{q} was coded with another dictionary than {dict_path} (fingerprint {str(fp)[:12]} vs "
                            f"{dict_fp[:12]}). Delete it (`rm {q}`) and run `{rebuild_command(out_dir, doc, force=False)}` again (its other options as before): "
                            f"it codes only the missing parts. Then `mlsm finalize {out_dir}`.")
    p = doc["params"]
    fista = p.get("solver", "exact") == "fista"
    attrs = {
        "lambda": p["lambda"], "K": p["K"], "layer": p["layer"], "solver": solver_name(p),
        "top_k": p["top_k"] or 0, "values_dtype": p["values"], "dictionary_fingerprint": dict_fp,
        "tokenizer_fingerprint": doc["tokenizer_fingerprint"],
    }
    if fista:  # no tolerance: the gap of each code is what it is (gap_mean, gap_p99, gap_max)
        attrs["fista_steps"] = p["fista_steps"]
    else:
        attrs["tolerance"] = p["tol"]
    for key in ("extract_manifest", "tokens"):
        if key in doc["inputs"]:
            attrs["extract_fingerprint" if key == "extract_manifest" else "tokens_fingerprint"] = doc["inputs"][key]
    value_dtype = np.float16 if p["values"] == "float16" else np.float32
    total = sum(s["tokens"] for s in doc["shards"])
    t0 = time.time()
    stats = merge_parts(parts, out_dir / CODES, attrs, value_dtype, copy=merge)
    finalize_s = time.time() - t0
    if stats["tokens"] != total:
        raise MLSMError(f"the parts hold {stats['tokens']} tokens but the run lists {total}; re-run "
                        f"`{rebuild_command(out_dir, doc)}`.")
    coded = sum(r.get("coded_tokens", 0) for r in records)
    t_code = max((r["coding_s"] for r in records if "coding_s" in r), default=0.0)
    devices = sorted({r["device"] for r in records if "device" in r})
    report = {
        "tokens": total,
        "nnz_per_token": round(stats["nnz"] / total, 2),
        "bytes_per_token": round(stats["bytes"] / total, 1),
        "codes_bytes": stats["bytes"],
        "rel_recon_error": round(recon_sum / total, 4),
        "zero_code_tokens": stats["zero_rows"],
        "gap_mean": stats.get("gap_mean"), "gap_p99": stats.get("gap_p99"), "gap_max": stats.get("gap_max"),
        "dictionary_s": max((r["dictionary_s"] for r in records if "dictionary_s" in r), default=None),
        "coding_s": t_code,
        "coding_tokens_per_s": round(coded / t_code, 1) if coded and t_code > 0 else None,
        "forward_s": max((r.get("forward_s", 0.0) for r in records), default=0.0),
        "finalize_s": round(finalize_s, 2),
        "merged": merge,
        "device": ",".join(devices),
        "engine": "fista" if fista else ",".join(sorted({auto_engine(torch.device(d).type, D.shape[0])
                                                         for d in devices})),
        "workers": len(records),
    }
    manifest = {k: v for k, v in doc.items() if k != "complete"}
    manifest.update(complete=True, solver=solver_name(p), dictionary=dict_stats, report=report, tokens=total)
    write_json_atomic(man_path, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    log.info("sparse-code: %s", json.dumps(report))
    return manifest
