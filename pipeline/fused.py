"""The fused coding path (`mlsm sparse-code --from-tokens`): the auxiliary forward and the coding of
each shard in one process, so hidden states live only in memory, one shard at a time.

It reads the packed stream of `mlsm tokenize` by sequence range, cuts it into the shards extract
would cut (`sequences.shard_bounds`), and runs each shard's forward in the batches extract would run
(`extract.forward_shard`), with the same float16 rounding. So, given the
same dictionary, its codes are those of `mlsm extract` + `mlsm sparse-code`, bit for bit on CPU;
peak hidden-state storage on disk is nil whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mlsm.core import hf
from mlsm.core.config import SparseCodeConfig
from mlsm.core.device import pick_device, resolve_precision
from mlsm.core.errors import MLSMError
from mlsm.pipeline.extract import forward_shard
from mlsm.pipeline.shards import ROW_GROUP_ROWS
from mlsm.pipeline.token_stream import TokenStream


class FusedSource:
    """The shards of a token stream, each run through the auxiliary encoder when it is coded."""

    def __init__(self, cfg: SparseCodeConfig):
        if cfg.layer is None:
            raise MLSMError("--from-tokens needs --layer N: the layer of the auxiliary model whose states are coded "
                            "(the recipe's choice: LAYER=$(mlsm extract --layers auto --layer-choice-only --tokens "
                            f"{cfg.from_tokens} --out data/extract))." )
        self.stream = TokenStream(cfg.from_tokens)
        self.model_dir = hf.resolve_model_dir(cfg.aux)
        self.aux = str(cfg.aux or hf.DEFAULT_AUX)
        tokenizer = hf.load_tokenizer(self.model_dir)
        self.stream.check_tokenizer(hf.tokenizer_fingerprint(tokenizer), self.aux)
        self.special = hf.special_token_ids(tokenizer)
        self.device = pick_device(cfg.device)
        self.cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, self.device))
        self.inputs = {"tokens": self.stream.fingerprint, "aux_weights": hf.weights_fingerprint(self.model_dir),
                       "tokenizer": self.stream.tokenizer_fingerprint}
        bounds = self.stream.shards(self.cfg.shard_tokens)
        offs = self.stream.seq_offsets
        self.plan = [{"index": j, "tokens": int(offs[e] - offs[f]), "seq_start": f, "seq_end": e}
                     for j, (f, e) in enumerate(bounds)]
        self.tokenizer_dir = self.stream.tokenizer_dir
        self._encoder = None
        self.forward_s = 0.0

    @property
    def identity(self) -> dict:
        """The auxiliary model and tokenizer the states come from (a dictionary records them)."""
        return {"aux_weights": self.inputs["aux_weights"], "tokenizer": self.inputs["tokenizer"]}

    def describe(self) -> dict:
        return {"tokens_dir": str(self.stream.folder), "aux": self.aux}

    def _load(self):
        if self._encoder is None:
            encoder, config, _ = hf.load_encoder(self.cfg.aux, device=self.device)
            if not 0 <= self.cfg.layer <= config.num_hidden_layers:
                raise MLSMError(f"layer {self.cfg.layer} does not exist: the auxiliary model has layers "
                                f"0..{config.num_hidden_layers}.")
            self._encoder, self.d = encoder, config.hidden_size
        return self._encoder

    @property
    def hidden_size(self) -> int:
        self._load()
        return self.d

    def states(self, seqs: list[np.ndarray]) -> np.ndarray:
        """float16 states of the layer for every token of these sequences, batched as extract batches."""
        encoder, layer = self._load(), self.cfg.layer
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        t0 = time.time()
        states = forward_shard(encoder, seqs, [layer], self.special["pad"], self.device, dtype,
                               self.cfg.batch_tokens)[layer]
        self.forward_s += time.time() - t0
        return states

    def seq_lengths(self) -> np.ndarray:
        return self.stream.seq_lengths

    def sample_states(self, rows: np.ndarray) -> np.ndarray:
        """States at these sorted global token rows: the forward runs on their sequences alone, a
        shard's worth of sequences at a time, and keeps only these rows."""
        return self._gather(rows, lambda seqs: self.states(self.stream.take(seqs)),
                            np.zeros((0, self.hidden_size), np.float16))

    def sample_tokens(self, rows: np.ndarray) -> np.ndarray:
        """Token ids at these sorted global token rows (read from the stream, no forward)."""
        return self._gather(rows, lambda seqs: np.concatenate(self.stream.take(seqs)), np.zeros(0, np.int32))

    def _gather(self, rows: np.ndarray, read, empty: np.ndarray) -> np.ndarray:
        """`read(sequence ids)` (one row per token of those sequences, in order) at these sorted rows,
        a shard's worth of sequences at a time."""
        offs = self.stream.seq_offsets
        seq = np.searchsorted(offs, rows, side="right") - 1
        ids = np.unique(seq)
        per_call = max(1, self.cfg.shard_tokens // max(1, int(np.diff(offs).max())))
        out = [empty]
        for c in range(0, len(ids), per_call):
            chunk = ids[c:c + per_call]
            values = read(chunk)
            lens = offs[chunk + 1] - offs[chunk]
            base = np.cumsum(lens) - lens  # where each sequence's rows start in `values`
            mine = (seq >= chunk[0]) & (seq <= chunk[-1])
            out.append(values[base[np.searchsorted(chunk, seq[mine])] + rows[mine] - offs[seq[mine]]])
        return np.concatenate(out)

    def blocks(self, shard: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(token ids, sequence ids, states) of one shard, in the row groups a Parquet shard would have."""
        first, end = shard["seq_start"], shard["seq_end"]
        seqs = self.stream.sequences(first, end)
        hidden = self.states(seqs)
        tokens = np.concatenate(seqs)
        seq_ids = np.repeat(np.arange(first, end, dtype=np.int64), [len(s) for s in seqs])
        for i in range(0, len(tokens), ROW_GROUP_ROWS):
            yield tokens[i:i + ROW_GROUP_ROWS], seq_ids[i:i + ROW_GROUP_ROWS], hidden[i:i + ROW_GROUP_ROWS]

    def after_part(self, shard: dict) -> None:
        """Nothing to delete: no hidden states were written."""

    def shard_path(self, shard: dict) -> Path | None:
        return None
