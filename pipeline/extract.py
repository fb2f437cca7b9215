"""The extract stage: run the auxiliary encoder on unmasked text, store chosen layers per token.

The encoder runs only up to the deepest requested layer. Shards are written atomically and
recorded in progress.json as they finish, so a killed run resumes at the first missing shard.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mlsm.errors import MLSMError
from mlsm.manifest import PROGRESS, new_manifest, prepare_stage, write_json_atomic, MANIFEST
from pipeline import corpus as corpus_mod
from pipeline.sequences import limit_tokens, pack_documents
from pipeline.shards import shard_name, write_shard

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MLSMError(f"--device {device} asked for, but torch sees no CUDA device. Use --device cpu.")
    return torch.device(device)


def _batches(sequences, batch_tokens: int):
    """Group consecutive sequences into forward batches of about batch_tokens padded tokens."""
    batch: list[np.ndarray] = []
    longest = 0
    for seq in sequences:
        longest_new = max(longest, len(seq))
        if batch and longest_new * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest_new = [], len(seq)
        batch.append(seq)
        longest = longest_new
    if batch:
        yield batch


@torch.inference_mode()
def _forward(encoder, batch: list[np.ndarray], layers: list[int], pad_id: int, device, dtype):
    lengths = [len(s) for s in batch]
    T = max(lengths)
    ids = np.full((len(batch), T), pad_id, dtype=np.int64)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = s
    input_ids = torch.from_numpy(ids).to(device)
    mask = torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        states = encoder(input_ids, attention_mask=mask, num_layers=max(layers), output_hidden_states=True)
    flat_mask = mask.reshape(-1)
    return {l: states[l].reshape(-1, states[l].shape[-1])[flat_mask].to(torch.float16).cpu().numpy() for l in layers}


def run_extract(
    corpus: str,
    out_dir: Path,
    layers: list[int],
    aux: str | None = None,
    max_len: int = 128,
    max_tokens: int | None = None,
    shard_tokens: int = 200_000,
    batch_tokens: int = 8192,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> dict:
    from trainer import checkpoint

    out_dir = Path(out_dir)
    paths = corpus_mod.resolve_corpus(corpus)
    model_dir = checkpoint.resolve_model_dir(aux)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    special = checkpoint.special_token_ids(tokenizer)
    layers = sorted(set(int(l) for l in layers))
    params = {"layers": layers, "max_len": max_len, "max_tokens": max_tokens, "shard_tokens": shard_tokens}
    inputs = {
        "corpus": corpus_mod.corpus_fingerprint(paths),
        "aux_weights": checkpoint.weights_fingerprint(model_dir),
        "tokenizer": checkpoint.tokenizer_fingerprint(tokenizer),
    }
    state, old = prepare_stage(out_dir, "extract", params, inputs, force, ["shard-*.parquet", "tokenizer"])
    if state == "done":
        log.info("extract: %s is already complete (%d tokens); nothing to do. Use --force to redo it.",
                 out_dir, old["tokens"])
        return old
    done_shards = old["shards"] if state == "resume" else []
    skip_seqs = done_shards[-1]["seq_end"] if done_shards else 0

    dev = pick_device(device)
    encoder, config, _ = checkpoint.load_encoder(aux, device=dev)
    bad = [l for l in layers if not 0 <= l <= config.num_hidden_layers]
    if bad:
        raise MLSMError(f"layers {bad} do not exist: the auxiliary model has layers 0..{config.num_hidden_layers}.")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    checkpoint.copy_tokenizer_files(model_dir, out_dir / "tokenizer")

    progress_doc = new_manifest("extract", params, inputs)
    progress_doc.update(aux=str(aux or checkpoint.DEFAULT_AUX), aux_config=config.to_hf(), d=config.hidden_size,
                        special_ids=special, shards=list(done_shards))
    write_json_atomic(out_dir / PROGRESS, progress_doc)
    if done_shards:
        log.info("extract: resuming after %d finished shards (%d sequences)", len(done_shards), skip_seqs)

    stats = corpus_mod.CorpusStats()
    sequences = limit_tokens(
        pack_documents(corpus_mod.iter_documents(paths, stats), tokenizer, max_len, special["cls"], special["sep"]),
        max_tokens,
    )
    t0 = time.time()
    seq_id = 0
    buf = {"seq": [], "pos": [], "tok": [], "h": {l: [] for l in layers}}
    buf_tokens = 0
    new_tokens = 0
    total_hint = max_tokens
    bar = tqdm(total=total_hint, unit="tok", unit_scale=True, desc="extract", disable=not progress)

    def flush():
        nonlocal buf, buf_tokens
        index = len(progress_doc["shards"])
        seq_arr = np.concatenate(buf["seq"])
        write_shard(
            out_dir / shard_name(index),
            seq_arr,
            np.concatenate(buf["pos"]),
            np.concatenate(buf["tok"]),
            {l: np.concatenate(buf["h"][l]) for l in layers},
        )
        progress_doc["shards"].append({
            "file": shard_name(index), "tokens": int(len(seq_arr)),
            "seq_start": int(seq_arr[0]), "seq_end": int(seq_arr[-1]) + 1,
            "sequences": int(seq_arr[-1] - seq_arr[0] + 1),
        })
        write_json_atomic(out_dir / PROGRESS, progress_doc)
        buf = {"seq": [], "pos": [], "tok": [], "h": {l: [] for l in layers}}
        buf_tokens = 0

    for batch in _batches(sequences, batch_tokens):
        first = seq_id
        seq_id += len(batch)
        if seq_id <= skip_seqs:
            bar.update(sum(len(s) for s in batch))
            continue
        if first < skip_seqs:  # a batch straddling the resume point: keep only unfinished sequences
            batch = batch[skip_seqs - first:]
            first = skip_seqs
        hidden = _forward(encoder, batch, layers, special["pad"], dev, dtype)
        n = sum(len(s) for s in batch)
        buf["seq"].append(np.repeat(np.arange(first, first + len(batch), dtype=np.int64), [len(s) for s in batch]))
        buf["pos"].append(np.concatenate([np.arange(len(s), dtype=np.int16) for s in batch]))
        buf["tok"].append(np.concatenate(batch))
        for l in layers:
            buf["h"][l].append(hidden[l])
        buf_tokens += n
        new_tokens += n
        bar.update(n)
        if buf_tokens >= shard_tokens:
            flush()
    if buf_tokens:
        flush()
    bar.close()
    wall = time.time() - t0
    if not progress_doc["shards"]:
        corpus_mod.require_nonempty(stats)
        raise MLSMError(f"the corpus {corpus} produced no token sequences; check that it contains text.")
    if stats.invalid_utf8_lines:
        log.warning("extract: %d lines had invalid UTF-8, replaced by U+FFFD", stats.invalid_utf8_lines)

    manifest = dict(progress_doc)
    manifest.update(
        complete=True,
        tokens=sum(s["tokens"] for s in manifest["shards"]),
        sequences=sum(s["sequences"] for s in manifest["shards"]),
        corpus_stats=stats.as_dict(),
        corpus_files=[str(p) for p in paths],
        wall_s=round(wall, 2),
        tokens_per_s=round(new_tokens / wall, 1) if wall > 0 else None,
        device=str(dev),
    )
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    log.info("extract: %d tokens in %d sequences, %d shards, %.1f tokens/s -> %s",
             manifest["tokens"], manifest["sequences"], len(manifest["shards"]),
             manifest["tokens_per_s"] or 0, out_dir)
    return manifest
