"""The tokenize stage: corpus → tokens.h5, the codes-less training set for `--objective mlm`.

It packs sequences exactly as extract does, so an MLM run and an MLSM run over the same corpus,
tokenizer and max_len see the same sequences. Training an auxiliary model from scratch
(`make aux`) needs nothing but this file.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlsm.core import hf
from mlsm.core.config import TokenizeConfig, recorded
from mlsm.core.errors import MLSMError
from mlsm.core.layout import MANIFEST, PARTS_DIR, PROGRESS, TOKENIZER_DIR, TOKENS, part_name
from mlsm.core.manifest import new_manifest, prepare_stage, write_json_atomic
from mlsm.pipeline import corpus as corpus_mod
from mlsm.pipeline.codes import merge_parts, write_part
from mlsm.pipeline.sequences import limit_tokens, pack_documents

log = logging.getLogger(__name__)


def run_tokenize(cfg: TokenizeConfig) -> dict:
    cfg.validate()
    out_dir, max_len, max_tokens, part_tokens = Path(cfg.out), cfg.max_len, cfg.max_tokens, cfg.part_tokens
    paths = corpus_mod.resolve_corpus(cfg.corpus, cfg.text_field)
    model_dir = hf.resolve_model_dir(cfg.tokenizer_from)
    tokenizer = hf.load_tokenizer(model_dir)
    special = hf.special_token_ids(tokenizer)
    tok_fp = hf.tokenizer_fingerprint(tokenizer)
    params = recorded(cfg)
    inputs = {"corpus": corpus_mod.corpus_fingerprint(paths, cfg.text_field), "tokenizer": tok_fp}
    state, old = prepare_stage(out_dir, "tokenize", params, inputs, cfg.force, [TOKENS, PARTS_DIR, TOKENIZER_DIR])
    if state == "done":
        log.info("tokenize: %s is already complete; nothing to do. Use --force to redo it.", out_dir)
        return old
    parts_dir = out_dir / PARTS_DIR
    parts_dir.mkdir(exist_ok=True)
    hf.copy_tokenizer_files(model_dir, out_dir / TOKENIZER_DIR)
    doc = new_manifest("tokenize", params, inputs)
    if corpus_mod.reads_text_field(paths):
        doc["text_field"] = cfg.text_field
    write_json_atomic(out_dir / PROGRESS, doc)

    stats = corpus_mod.CorpusStats()
    sequences = limit_tokens(
        pack_documents(corpus_mod.iter_documents(paths, stats, text_field=cfg.text_field), tokenizer, max_len, special["cls"], special["sep"]),
        max_tokens,
    )
    t0 = time.time()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenize", disable=not cfg.progress)
    buf: list[np.ndarray] = []
    n_buf = 0
    parts: list[Path] = []

    def flush():
        nonlocal buf, n_buf
        part = parts_dir / part_name(len(parts))
        if not part.exists():  # finished before an interruption: packing is deterministic
            write_part(part, np.concatenate(buf), np.array([len(s) for s in buf]))
        parts.append(part)
        buf, n_buf = [], 0

    for seq in sequences:
        buf.append(seq)
        n_buf += len(seq)
        bar.update(len(seq))
        if n_buf >= part_tokens:
            flush()
    if buf:
        flush()
    bar.close()
    if not parts:
        corpus_mod.require_nonempty(stats, cfg.text_field)
        raise MLSMError(f"the corpus {cfg.corpus} produced no token sequences; check that it contains text.")
    merged = merge_parts(parts, out_dir / TOKENS, {"tokenizer_fingerprint": tok_fp, "max_len": max_len})
    shutil.rmtree(parts_dir)
    manifest = dict(doc)
    manifest.update(complete=True, tokens=merged["tokens"], sequences=merged["sequences"],
                    corpus_stats=stats.as_dict(), wall_s=round(time.time() - t0, 2))
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    log.info("tokenize: %d tokens in %d sequences -> %s", merged["tokens"], merged["sequences"], out_dir / TOKENS)
    return manifest
