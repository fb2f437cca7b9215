"""The extract stage: run the auxiliary encoder on unmasked text, store chosen layers per token.

The packed sequence stream is cut into shards at sequence boundaries that depend only on the stream
(a shard closes at the first sequence that brings it to `shard_tokens`), and each shard is batched
on its own. So shard j holds the same rows, computed in the same batches, whichever worker makes it:
n workers (pipeline.workers) together write exactly the shards of a single-worker run.

The encoder runs only up to the deepest requested layer. Three threads overlap the work: packing
(the fast tokenizer's batch API) runs ahead of the forward, and Parquet writing runs behind it, each
through a queue of at most two shards, so memory is bounded by a few shards whatever the corpus size.
Shards are written atomically and listed in the worker's record as they finish; a killed worker
resumes at its first missing shard. Every worker packs the whole stream (to agree on the cuts) but
runs the encoder only on its own shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mlsm.core import hf
from mlsm.core.background import Drain, Prefetch
from mlsm.core.config import ExtractConfig, recorded
from mlsm.core.device import pick_device, resolve_precision
from mlsm.core.errors import MLSMError
from mlsm.core.layout import MANIFEST, PROGRESS, SHARD_GLOB, TOKENIZER_DIR, WORKERS_DIR, shard_name
from mlsm.core.manifest import new_manifest, write_json_atomic
from mlsm.core.ranks import Rank, join
from mlsm.pipeline import corpus as corpus_mod
from mlsm.pipeline.sequences import limit_tokens, pack_documents
from mlsm.pipeline.shards import shard_rows, write_shard
from mlsm.pipeline.token_stream import TokenStream
from mlsm.pipeline.workers import BARRIER_TIMEOUT, merge_once, missing_workers, prepare_shared_stage, read_records

log = logging.getLogger(__name__)



def cut_shards(sequences: Iterable[np.ndarray], shard_tokens: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(shard index, first sequence id, sequences): a shard closes once it holds >= shard_tokens."""
    index, first, buf, n = 0, 0, [], 0
    for seq in sequences:
        buf.append(seq)
        n += len(seq)
        if n >= shard_tokens:
            yield index, first, buf
            index, first, buf, n = index + 1, first + len(buf), [], 0
    if buf:
        yield index, first, buf


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
def forward_batch(encoder, batch: list[np.ndarray], layers: list[int], pad_id: int, device, dtype):
    """Hidden states of the real (unpadded) tokens of a batch, per layer, float16 on the CPU."""
    lengths = [len(s) for s in batch]
    T = max(lengths)
    ids = np.full((len(batch), T), pad_id, dtype=np.int64)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = s
    input_ids = torch.from_numpy(ids).to(device, non_blocking=True)
    mask = torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        states = encoder(input_ids, attention_mask=mask, num_layers=max(layers), output_hidden_states=True)
    flat_mask = mask.reshape(-1)
    return {l: states[l].reshape(-1, states[l].shape[-1])[flat_mask].to(torch.float16).cpu().numpy() for l in layers}


class ShardSource:
    """Where a worker's shards come from: the corpus, tokenized and packed by every worker (to agree
    on the cuts), or a `mlsm tokenize` folder (`--tokens`), read by sequence range: the corpus
    tokenized once."""

    def __init__(self, cfg: ExtractConfig, tokenizer, special: dict):
        self.tokenizer, self.special = tokenizer, special
        self.stream = self.paths = None
        self.stats = corpus_mod.CorpusStats()
        if cfg.tokens is not None:
            self.stream = TokenStream(cfg.tokens)
            self.stream.check_tokenizer(hf.tokenizer_fingerprint(tokenizer), cfg.aux or hf.DEFAULT_AUX)
            tok_params = self.stream.manifest["params"]
            # the packing the tokens were made with, recorded as what it is
            cfg = dataclasses.replace(cfg, max_len=tok_params["max_len"], max_tokens=tok_params["max_tokens"])
            self.inputs = {"tokens": self.stream.fingerprint, "tokenizer": self.stream.tokenizer_fingerprint}
        else:
            self.paths = corpus_mod.resolve_corpus(cfg.corpus, cfg.text_field)
            self.inputs = {"corpus": corpus_mod.corpus_fingerprint(self.paths, cfg.text_field),
                           "tokenizer": hf.tokenizer_fingerprint(tokenizer)}
        self.cfg = cfg

    def describe(self) -> dict:
        if self.stream is not None:
            return {"tokens_dir": str(self.stream.folder)}
        described = {"corpus_files": [str(p) for p in self.paths]}
        if corpus_mod.reads_text_field(self.paths):
            described["text_field"] = self.cfg.text_field
        return described

    def shards(self, compute) -> Iterator[tuple[int, int, list[np.ndarray] | None, int]]:
        """(index, first sequence id, its sequences or None where `compute(index)` is false, tokens)."""
        cfg = self.cfg
        if self.stream is not None:
            offs = self.stream.seq_offsets
            for index, (first, end) in enumerate(self.stream.shards(cfg.shard_tokens)):
                seqs = self.stream.sequences(first, end) if compute(index) else None
                yield index, first, seqs, int(offs[end] - offs[first])
            return
        sequences = limit_tokens(
            pack_documents(corpus_mod.iter_documents(self.paths, self.stats, text_field=cfg.text_field),
                           self.tokenizer, cfg.max_len, self.special["cls"], self.special["sep"]),
            cfg.max_tokens,
        )
        for index, first, seqs in cut_shards(sequences, cfg.shard_tokens):
            yield index, first, seqs if compute(index) else None, sum(len(s) for s in seqs)

    def corpus_stats(self) -> dict:
        if self.stream is not None:
            return self.stream.manifest.get("corpus_stats", {})
        if self.stats.invalid_utf8_lines:
            log.warning("extract: %d lines had invalid UTF-8, replaced by U+FFFD", self.stats.invalid_utf8_lines)
        return self.stats.as_dict()

    def require_nonempty(self) -> None:
        if self.stream is None:
            corpus_mod.require_nonempty(self.stats, self.cfg.text_field)
        raise MLSMError(f"the corpus {self.cfg.corpus} produced no token sequences; check that it contains text.")


def forward_shard(encoder, seqs: list[np.ndarray], layers: list[int], pad_id: int, device, dtype,
                  batch_tokens: int) -> dict[int, np.ndarray]:
    """float16 states of every token of a shard's sequences, per layer, in the shard's own batches:
    whoever computes a shard (an extract worker, the fused path) gets the same values."""
    outs = [forward_batch(encoder, b, layers, pad_id, device, dtype) for b in _batches(seqs, batch_tokens)]
    return {l: np.concatenate([o[l] for o in outs]) for l in layers}


def _done_shards(out_dir: Path) -> dict[int, dict]:
    """Shards any worker (of any earlier split) finished and whose file is still there, whole."""
    done = {}
    for rec in read_records(out_dir / WORKERS_DIR):
        for entry in rec["shards"]:
            if shard_rows(out_dir / entry["file"]) == entry["tokens"]:  # present and whole
                done[entry["index"]] = entry
    return done


def run_extract(cfg: ExtractConfig) -> dict:
    """Extract this worker's shards; the worker that completes the set writes manifest.json.

    Returns the stage manifest, or (for a worker that is not last) its own record with
    complete=False.
    """
    cfg.validate()
    choice = None
    if cfg.layers == "auto":
        cfg, choice = _resolve_auto_layer(cfg)
        if cfg.layer_choice_only:
            return {"stage": "layer-choice", "complete": True, "layer_choice": choice}
    rank = join(index=cfg.worker_index, count=cfg.num_workers, timeout=BARRIER_TIMEOUT)
    try:
        return _run_extract(cfg, rank, choice)
    finally:
        rank.close()


def _resolve_auto_layer(cfg: ExtractConfig) -> tuple[ExtractConfig, dict]:
    """`--layers auto`: the recipe's layer. Several workers each read a choice made before they start
    (`mlsm extract --layers auto` alone, or one worker's run), so no two of them write it at once."""
    from mlsm.pipeline import layer_choice

    several = ((cfg.num_workers or 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1) and not cfg.layer_choice_only
    folder = Path(cfg.layer_choice_dir or Path(cfg.out) / layer_choice.CHOICE_DIR)
    if several and not (folder / layer_choice.CHOICE_FILE).is_file():
        raise MLSMError(f"--layers auto with several workers needs the choice made first: {folder / 'choice.json'} "
                        f"is missing. Run `mlsm extract --layers auto --out {cfg.out} ...` once (one process; it "
                        f"stops after the choice with --layer-choice-only), then start the workers.")
    choice = layer_choice.choose_layer(dataclasses.replace(cfg, force=cfg.force and not several))
    return dataclasses.replace(cfg, layers=(choice["chosen"],)), choice


def _run_extract(cfg: ExtractConfig, rank: Rank, choice: dict | None = None) -> dict:
    out_dir = Path(cfg.out)
    model_dir = hf.resolve_model_dir(cfg.aux)
    tokenizer = hf.load_tokenizer(model_dir)
    special = hf.special_token_ids(tokenizer)
    dev = pick_device(cfg.device)
    # The precision used, not the one asked for: "auto" differs between machines, and states made
    # in bf16 and fp32 must never meet in one folder (the manifest refuses the mix, listing it).
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, dev))
    source = ShardSource(cfg, tokenizer, special)
    cfg = source.cfg
    params = recorded(cfg)
    inputs = {**source.inputs, "aux_weights": hf.weights_fingerprint(model_dir)}
    state, old = prepare_shared_stage(rank, out_dir, "extract", params, inputs, cfg.force,
                                      [SHARD_GLOB, TOKENIZER_DIR, WORKERS_DIR])
    if state == "done":
        missing = [s["file"] for s in old["shards"] if not (out_dir / s["file"]).exists()]
        if missing:
            log.warning("extract: %s is complete but %d of its %d shards were deleted (sparse-code --delete-hidden "
                        "or make clean-hidden); use --force to extract them again.", out_dir, len(missing), len(old["shards"]))
        log.info("extract: %s is already complete (%d tokens); nothing to do. Use --force to redo it.",
                 out_dir, old["tokens"])
        return old

    encoder, config, _ = hf.load_encoder(cfg.aux, device=dev)
    log.info("extract: auxiliary forward on %s in %s%s", dev, cfg.precision,
             " (autocast)" if cfg.precision == "bf16" else "")
    layers = list(cfg.layers)
    bad = [l for l in layers if not 0 <= l <= config.num_hidden_layers]
    if bad:
        raise MLSMError(f"layers {bad} do not exist: the auxiliary model has layers 0..{config.num_hidden_layers}.")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    if rank.is_main:
        hf.copy_tokenizer_files(model_dir, out_dir / TOKENIZER_DIR)

    stage_doc = new_manifest("extract", params, inputs)
    stage_doc.update(aux=str(cfg.aux or hf.DEFAULT_AUX), aux_config=config.to_hf(), d=config.hidden_size,
                     special_ids=special, **source.describe())
    if choice is not None:
        stage_doc["layer_choice"] = choice
    write_json_atomic(out_dir / PROGRESS, stage_doc)
    done = _done_shards(out_dir)
    record_path = out_dir / WORKERS_DIR / f"{rank.name}.json"
    record = {"worker": rank.index, "workers": rank.count, "device": str(dev), "total_shards": None,
              "shards": [e for j, e in sorted(done.items()) if rank.owns(j)]}
    if done:
        log.info("extract: %d shards already finished; %s resumes", len(done), rank.name)

    total = {"shards": 0, "packing_s": 0.0}

    def work():
        """(index, first sequence, its sequences or None when not ours to compute, tokens) per shard."""
        shards = source.shards(lambda j: rank.owns(j) and j not in done)
        while True:
            tp = time.time()
            item = next(shards, None)
            total["packing_s"] += time.time() - tp  # tokenizing + packing, or reading the token stream
            if item is None:
                return
            total["shards"] = item[0] + 1
            yield item

    def write(item):
        index, first, seqs, hidden = item
        seq_ids = np.repeat(np.arange(first, first + len(seqs), dtype=np.int64), [len(s) for s in seqs])
        positions = np.concatenate([np.arange(len(s), dtype=np.int16) for s in seqs])
        write_shard(out_dir / shard_name(index), seq_ids, positions, np.concatenate(seqs), hidden)
        record["shards"].append({"index": index, "file": shard_name(index), "tokens": int(len(seq_ids)),
                                 "seq_start": first, "seq_end": first + len(seqs), "sequences": len(seqs)})
        write_json_atomic(record_path, record)

    # Packing runs ahead of the forward and Parquet writing behind it, each at most two shards away.
    producer, writer = Prefetch(work(), depth=2, name="mlsm-pack"), Drain(write, depth=2, name="mlsm-write")
    bar = tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc=f"extract {rank.index}/{rank.count}",
               disable=not cfg.progress)
    t0 = time.time()
    new_tokens = 0
    t_forward = 0.0
    try:
        for index, first, seqs, n_tokens in producer:
            if seqs is not None:
                tf = time.time()
                hidden = forward_shard(encoder, seqs, layers, special["pad"], dev, dtype, cfg.batch_tokens)
                t_forward += time.time() - tf
                writer.put((index, first, seqs, hidden))
                new_tokens += n_tokens
            bar.update(n_tokens)
    finally:
        producer.close()
        bar.close()
        writer.close()  # every shard handed over is written, also when the forward failed
    wall = time.time() - t0
    if total["shards"] == 0:
        source.require_nonempty()
    record.update(total_shards=total["shards"], corpus_stats=source.corpus_stats(), wall_s=round(wall, 2),
                  forward_s=round(t_forward, 2), packing_s=round(total["packing_s"], 2), new_tokens=new_tokens,
                  tokens_per_s=round(new_tokens / wall, 1) if wall > 0 and new_tokens else None)
    write_json_atomic(record_path, record)
    log.info("extract: %s finished its shards (%d new tokens, %.0f tokens/s)", rank.name, new_tokens,
             record["tokens_per_s"] or 0)
    manifest = merge_extract(out_dir, rank)
    return manifest if manifest is not None else {**record, "complete": False}


def merge_extract(out_dir: Path, worker: Rank) -> dict | None:
    """Write manifest.json once every shard of the stream is on disk and every worker of this split
    has recorded its end; None until then."""
    return merge_once(out_dir, "extract", lambda: _merge_extract(Path(out_dir), worker))


def _merge_extract(out_dir: Path, worker: Rank) -> dict | None:
    records = read_records(out_dir / WORKERS_DIR)
    finished = [r for r in records if r.get("total_shards") is not None]
    waiting = missing_workers(records, worker, lambda r: r.get("total_shards") is not None)
    if waiting:
        log.info("extract: workers %s of %d have not finished; the last one to finish writes the manifest",
                 waiting, worker.count)
        return None
    n_shards = finished[0]["total_shards"]
    done = _done_shards(out_dir)
    missing = [j for j in range(n_shards) if j not in done]
    if missing:
        log.info("extract: %d of %d shards are done; the worker that finishes the last one writes the manifest",
                 n_shards - len(missing), n_shards)
        return None
    stage_doc = json.loads((out_dir / PROGRESS).read_text())
    shards = [{k: v for k, v in done[j].items() if k != "index"} for j in range(n_shards)]
    wall = max(r["wall_s"] for r in finished)
    manifest = dict(stage_doc)
    manifest.update(
        complete=True,
        shards=shards,
        tokens=sum(s["tokens"] for s in shards),
        sequences=sum(s["sequences"] for s in shards),
        corpus_stats=finished[0]["corpus_stats"],
        wall_s=wall,
        device=",".join(sorted({r["device"] for r in finished})),
        workers=[{k: r.get(k) for k in ("worker", "workers", "device", "wall_s", "forward_s", "packing_s", "new_tokens",
                                        "tokens_per_s")} for r in finished],
    )
    new_tokens = sum(r.get("new_tokens", 0) for r in finished)
    manifest["tokens_per_s"] = round(new_tokens / wall, 1) if wall > 0 and new_tokens else None
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    log.info("extract: %d tokens in %d sequences, %d shards -> %s", manifest["tokens"], manifest["sequences"],
             len(shards), out_dir)
    return manifest
