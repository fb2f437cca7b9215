"""Extract throughput against the auxiliary forward alone, and what the codes cost to store.

One run, same slice of the corpus, same batches:
  1. packing only (reading + tokenizer batch API + packing, on --tokenize-tokens): tokenize_tokens_per_s,
     which is also what a sharded worker spends per token of the whole stream (see docs/scaling.md);
  2. the forward alone on pre-packed batches (after one warm-up batch): forward_tokens_per_s (fp32),
     and in bf16 two ways: autocast (fp32 weights, what --precision bf16 runs) and bf16 weights;
     each timed before and after step 3 and averaged, so drifting machine load hits all alike;
  3. the whole extract stage, end to end as a user runs it: `mlsm extract` in a fresh process, its
     start-up, imports, model and tokenizer loading included (then tokenize + forward + Parquet
     write, threads overlapping them): extract_tokens_per_s. extract_stage_tokens_per_s is the
     stage's own wall time (manifest wall_s: the work after setup), for comparison. Run twice:
     --precision fp32 and --precision bf16 (extract_bf16_tokens_per_s).
  4. the targets' fidelity in bf16: the first --fidelity-tokens tokens' states in fp32 and in each
     bf16 mode, coded with the same dictionary (tol 1e-4); total variation between the targets
     (mean, p99), top-1 atom agreement, nnz per token (bf16_target_tv_mean, ... for autocast;
     bf16_fidelity for both modes).
Then storage: bytes per token of the hidden states and of codes.h5 (--codes, or codes made here
from the benchmark's own hidden states), and for top-k truncation N in {8, 16, 32, 64, all}: nnz and
bytes per token (float32 and float16 values) and KL(t_N || t), the divergence between the
truncated, renormalised target and the full one (= -log of the kept mass).

    python bench/extract_throughput.py --tokens 50000 --out runs/bench-extract     (make bench-extract)

The last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from mlsm.core.config import SparseCodeConfig
from mlsm.core.device import native_bf16, pick_device
from mlsm.core.layout import DICTIONARY, MANIFEST
from mlsm.pipeline import corpus as corpus_mod
from mlsm.pipeline.codes import merge_parts, top_k_codes, truncation_kl, write_part
from mlsm.pipeline.extract import _batches, cut_shards, forward_batch
from mlsm.pipeline.sequences import limit_tokens, pack_documents

TOP_K = (8, 16, 32, 64, None)


def pack(corpus: str, tokenizer, special: dict, max_len: int, tokens: int) -> tuple[list[np.ndarray], float]:
    t0 = time.time()
    paths = corpus_mod.resolve_corpus(corpus)
    seqs = list(limit_tokens(pack_documents(corpus_mod.iter_documents(paths), tokenizer, max_len, special["cls"],
                                            special["sep"]), tokens))
    return seqs, time.time() - t0


def forward_only(encoder, seqs, layers, pad, dev, dtype, shard_tokens, batch_tokens) -> float:
    batches = [b for _, _, shard in cut_shards(seqs, shard_tokens) for b in _batches(shard, batch_tokens)]
    forward_batch(encoder, batches[0], layers, pad, dev, dtype)  # warm-up (kernels, allocator)
    t0 = time.time()
    for b in batches:
        forward_batch(encoder, b, layers, pad, dev, dtype)  # returns CPU arrays: synchronised
    return time.time() - t0


def states(encoder, seqs, layer, pad, dev, dtype, batch_tokens) -> np.ndarray:
    """The layer's states of these sequences, float16 as the shards store them, then float32."""
    out = [forward_batch(encoder, b, [layer], pad, dev, dtype)[layer] for b in _batches(seqs, batch_tokens)]
    return np.concatenate(out).astype(np.float32)


def target_fidelity(ref: np.ndarray, other: np.ndarray, D: torch.Tensor, lam: float) -> dict:
    """How far the targets coded from `other` states are from those coded from `ref` (same tokens, same D).

    TV = 0.5 * sum_j |t_j - t'_j| between the L1-normalised codes; top-1: the same largest atom.
    Tokens whose code is empty in either are left out of TV and top-1 (and counted).
    """
    from mlsm.pipeline.solvers import nn_lasso
    from mlsm.pipeline.sparse_code import l2_normalize_states

    codes = [nn_lasso(l2_normalize_states(x, "cpu"), D, lam, tol=1e-4).codes.double() for x in (ref, other)]
    sums = [c.sum(1, keepdim=True) for c in codes]
    both = (sums[0] > 0).squeeze(1) & (sums[1] > 0).squeeze(1)
    t = [(c / s.clamp(min=1e-300))[both] for c, s in zip(codes, sums, strict=True)]
    tv = 0.5 * (t[0] - t[1]).abs().sum(1)
    return {"tv_mean": round(float(tv.mean()), 5), "tv_p99": round(float(tv.quantile(0.99)), 5),
            "top1_agree": round(float((t[0].argmax(1) == t[1].argmax(1)).double().mean()), 4),
            "nnz_ref": round(float((codes[0] > 0).sum(1).double().mean()), 2),
            "nnz_other": round(float((codes[1] > 0).sum(1).double().mean()), 2),
            "tokens": int(both.sum()), "empty_either": int((~both).sum())}


def extract_end_to_end(a, out_dir: Path, precision: str) -> tuple[float, dict]:
    """`mlsm extract` in a fresh process, as a user runs it: start-up, imports and model loading included."""
    cmd = [sys.executable, "-m", "mlsm.cli", "--threads", str(torch.get_num_threads()), "extract",
           "--corpus", a.corpus, "--out", str(out_dir), "--layers", a.layers, "--max-len", str(a.max_len),
           "--max-tokens", str(a.tokens), "--shard-tokens", str(a.shard_tokens), "--batch-tokens", str(a.batch_tokens),
           "--device", a.device, "--precision", precision, "--force", "--no-progress",
           *(["--aux", a.aux] if a.aux else [])]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0, json.loads((out_dir / MANIFEST).read_text())


def code_table(codes_path: Path, work: Path, chunk_tokens: int = 65536) -> tuple[float, list[dict]]:
    """bytes/token of codes_path and, per top-k, nnz, bytes/token (rewritten with the same layout) and KL."""
    with h5py.File(codes_path, "r") as f:
        n = f["tokens"].shape[0]
        offsets = f["seq_offsets"][:]
        cuts = [0]
        for o in offsets[1:]:  # chunk boundaries at sequence starts
            if o - cuts[-1] >= chunk_tokens or o == offsets[-1]:
                cuts.append(int(o))
        rows = []
        for k in TOP_K:
            kls, nnz, parts16, parts32 = [], 0, [], []
            for c, (a, b) in enumerate(itertools.pairwise(cuts)):
                ptr = f["codes/indptr"][a:b + 1]
                counts = np.diff(ptr)
                idx, val = f["codes/indices"][ptr[0]:ptr[-1]], f["codes/values"][ptr[0]:ptr[-1]]
                if k is not None:
                    kls.append(truncation_kl(counts, val, k))
                    counts, idx, val = top_k_codes(counts, idx, val, k)
                nnz += int(counts.sum())
                tok = f["tokens"][a:b]
                lengths = np.diff(offsets[(offsets >= a) & (offsets <= b)])
                for dtype, parts in ((np.float16, parts16), (np.float32, parts32)):
                    parts.append(work / f"k{k}-{dtype.__name__}-{c:04d}.h5")
                    write_part(parts[-1], tok, lengths, counts, idx, val.astype(dtype))
            row = {"k": k or "all", "nnz_per_token": round(nnz / n, 2)}
            for dtype, parts in ((np.float32, parts32), (np.float16, parts16)):
                t0 = time.time()
                stats = merge_parts(parts, work / "merged.h5", {}, dtype)
                row[f"bytes_per_token_{dtype.__name__}"] = round(stats["bytes"] / n, 1)
                row[f"merge_tokens_per_s_{dtype.__name__}"] = round(n / (time.time() - t0))  # the sequential step
                for p in parts:
                    p.unlink()
            kl = np.concatenate(kls) if kls else np.zeros(1)
            row.update(kl_mean=round(float(kl.mean()), 4), kl_p99=round(float(np.quantile(kl, 0.99)), 4))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return round(os.path.getsize(codes_path) / n, 1), rows


def main(argv=None) -> dict:
    from mlsm.core import hf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--aux", default=None)
    ap.add_argument("--layers", default="6")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--tokenize-tokens", type=int, default=500_000,
                    help="Tokens packed to time the tokenizer (its batches of 4096 lines make tiny slices unfair).")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--shard-tokens", type=int, default=200_000)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--codes", type=Path, default=None,
                    help="codes.h5 for the storage table (default: code this run's hidden states with -k).")
    ap.add_argument("-k", "--K", type=int, default=3000)
    ap.add_argument("--fidelity-tokens", type=int, default=20_000,
                    help="Tokens coded from fp32 and from bf16 states to compare their targets.")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-extract"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layers = [int(x) for x in a.layers.split(",")]
    dev = pick_device(a.device)
    model_dir = hf.resolve_model_dir(a.aux)
    tokenizer = hf.load_tokenizer(model_dir)
    special = hf.special_token_ids(tokenizer)
    encoder, config, _ = hf.load_encoder(a.aux, device=dev)

    packed, t_pack = pack(a.corpus, tokenizer, special, a.max_len, max(a.tokens, a.tokenize_tokens))
    n_packed = sum(len(s) for s in packed)
    seqs = list(limit_tokens(packed, a.tokens))
    del packed
    n = sum(len(s) for s in seqs)
    pad, f32, b16 = special["pad"], torch.float32, torch.bfloat16
    encoder_bf16 = copy.deepcopy(encoder).to(b16)  # the other bf16 mode: weights in bf16, no autocast

    def forward(enc, dtype) -> float:
        return forward_only(enc, seqs, layers, pad, dev, dtype, a.shard_tokens, a.batch_tokens)

    # Each mode runs before and after the extract runs and is averaged, so drifting load hits all alike.
    fwd = {"fp32": [forward(encoder, f32)], "bf16_autocast": [forward(encoder, b16)],
           "bf16_weights": [forward(encoder_bf16, f32)]}
    ext_dir, ext_bf16_dir = a.out / "extract", a.out / "extract-bf16"
    extract_end_to_end_s, man = extract_end_to_end(a, ext_dir, "fp32")
    extract_bf16_s, man_bf16 = extract_end_to_end(a, ext_bf16_dir, "bf16")
    fwd["fp32"].append(forward(encoder, f32))
    fwd["bf16_autocast"].append(forward(encoder, b16))
    fwd["bf16_weights"].append(forward(encoder_bf16, f32))
    assert man["tokens"] == n == man_bf16["tokens"], (man["tokens"], man_bf16["tokens"], n)
    assert man["params"]["precision"] == "fp32" and man_bf16["params"]["precision"] == "bf16"
    hidden_bytes = sum((ext_dir / s["file"]).stat().st_size for s in man["shards"])
    fwd_tps = {k: n / float(np.mean(v)) for k, v in fwd.items()}
    forward_tps = fwd_tps["fp32"]
    extract_tps = n / extract_end_to_end_s
    extract_bf16_tps = n / extract_bf16_s

    # Fidelity: the same tokens' states in fp32 and in each bf16 mode, coded with one dictionary.
    fid_seqs = list(limit_tokens(iter(seqs), a.fidelity_tokens))
    ref = states(encoder, fid_seqs, layers[0], pad, dev, f32, a.batch_tokens)
    codes = a.codes
    if codes is None:
        from mlsm.pipeline.sparse_code import run_sparse_code

        run_sparse_code(SparseCodeConfig(ext_dir, a.out / "codes", layer=layers[0], K=a.K, dict_samples=min(n, 100_000),
                                         heldout=min(n // 10, 10_000), device=a.device, force=True, progress=False))
        codes = a.out / "codes" / "codes.h5"
    work = a.out / "topk"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    codes_bpt, table = code_table(codes, work)
    shutil.rmtree(work)
    with h5py.File(codes, "r") as f:
        codes_info = {"path": str(codes), "K": int(f.attrs["K"]), "tokens": int(f["tokens"].shape[0])}
        lam = float(f.attrs["lambda"])
    with h5py.File(Path(codes).parent / DICTIONARY, "r") as f:
        D = torch.from_numpy(f["D"][:]).float()
    fidelity = {mode: target_fidelity(ref, states(enc, fid_seqs, layers[0], pad, dev, dtype, a.batch_tokens), D, lam)
                for mode, enc, dtype in (("bf16_autocast", encoder, b16), ("bf16_weights", encoder_bf16, f32))}
    result = {
        "tokens": n,
        "tokenize_tokens_per_s": round(n_packed / t_pack, 1),
        "tokenize_tokens": n_packed,
        "forward_tokens_per_s": round(forward_tps, 1),
        "forward_runs_s": [round(x, 2) for x in fwd["fp32"]],
        "forward_bf16_autocast_tokens_per_s": round(fwd_tps["bf16_autocast"], 1),
        "forward_bf16_weights_tokens_per_s": round(fwd_tps["bf16_weights"], 1),
        "extract_tokens_per_s": round(extract_tps, 1),
        "extract_bf16_tokens_per_s": round(extract_bf16_tps, 1),
        "extract_bf16_over_fp32": round(extract_bf16_tps / extract_tps, 3),
        "bf16_target_tv_mean": fidelity["bf16_autocast"]["tv_mean"],
        "bf16_target_tv_p99": fidelity["bf16_autocast"]["tv_p99"],
        "bf16_top1_agree": fidelity["bf16_autocast"]["top1_agree"],
        "bf16_fidelity": fidelity,
        "native_bf16": native_bf16(dev),
        "extract_over_forward": round(extract_tps / forward_tps, 3),
        "extract_end_to_end_s": round(extract_end_to_end_s, 2),
        "extract_stage_tokens_per_s": round(n / man["wall_s"], 1),
        "extract_stage_over_forward": round(n / man["wall_s"] / forward_tps, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bytes_per_token_hidden": round(hidden_bytes / n, 1),
        "bytes_per_token_codes": codes_bpt,
        "codes": codes_info,
        "top_k": table,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "aux": str(a.aux or hf.DEFAULT_AUX), "d": config.hidden_size, "layers": layers,
        "batch_tokens": a.batch_tokens,
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    (a.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
