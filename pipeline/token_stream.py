"""The packed token stream of `mlsm tokenize`, read by sequence range: the corpus tokenized once.

Extract (`--tokens`) and the fused coding path (`sparse-code --from-tokens`) read their own
shards' sequences from it, so no worker tokenizes the corpus again and every worker agrees on the
shard cuts (`sequences.shard_bounds`) from the sequence lengths alone. Only the offsets (8 B per
sequence) are held in memory; tokens are read per shard.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mlsm.core.errors import MLSMError
from mlsm.core.layout import MANIFEST, TOKENIZER_DIR, TOKENS
from mlsm.core.manifest import read_manifest, sha256_file
from mlsm.pipeline.sequences import shard_bounds


class TokenStream:
    """A finished tokenize folder, opened for reading by sequence range."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, stage="tokenize", fix=f"mlsm tokenize --out {self.folder}")
        self.path = self.folder / TOKENS
        try:
            with h5py.File(self.path, "r") as f:
                self.seq_offsets = f["seq_offsets"][:].astype(np.int64)
                n_tokens = int(f["tokens"].shape[0])
        except (OSError, KeyError) as e:
            raise MLSMError(f"{self.path} is not a readable token stream ({e}); rebuild it with "
                            f"`mlsm tokenize --out {self.folder} --force`.") from e
        if n_tokens != self.manifest.get("tokens") or self.seq_offsets[-1] != n_tokens:
            raise MLSMError(f"{self.path} holds {n_tokens} tokens but {self.folder / MANIFEST} lists "
                            f"{self.manifest.get('tokens')}: the file was replaced or cut short. Rebuild it with "
                            f"`mlsm tokenize --out {self.folder} --force`, then re-run this command with --force.")
        # The identity later stages record (and check on resume): the manifest names the corpus and
        # tokenizer fingerprints and the token count.
        self.fingerprint = sha256_file(self.folder / MANIFEST)

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / TOKENIZER_DIR

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["inputs"]["tokenizer"]

    @property
    def max_len(self) -> int:
        return int(self.manifest["params"]["max_len"])

    @property
    def num_tokens(self) -> int:
        return int(self.seq_offsets[-1])

    @property
    def seq_lengths(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    def shards(self, shard_tokens: int) -> list[tuple[int, int]]:
        return shard_bounds(self.seq_lengths, shard_tokens)

    def sequences(self, first: int, end: int) -> list[np.ndarray]:
        """Sequences first..end-1, read with one slice."""
        lo, hi = int(self.seq_offsets[first]), int(self.seq_offsets[end])
        with h5py.File(self.path, "r") as f:
            flat = f["tokens"][lo:hi].astype(np.int32, copy=False)
        return np.split(flat, self.seq_offsets[first + 1:end] - lo)

    def take(self, seq_ids: np.ndarray) -> list[np.ndarray]:
        """These sorted sequences, read run by run."""
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        out: list[np.ndarray] = []
        breaks = np.flatnonzero(np.diff(seq_ids) != 1) + 1
        for run in np.split(seq_ids, breaks):
            if len(run):
                out += self.sequences(int(run[0]), int(run[-1]) + 1)
        return out

    def check_tokenizer(self, tokenizer_fp: str, model: str) -> None:
        if tokenizer_fp != self.tokenizer_fingerprint:
            raise MLSMError(f"{self.folder} was tokenized with another tokenizer than the auxiliary model {model}'s. "
                            f"Tokenize again with it: `mlsm tokenize --tokenizer-from {model} --out <folder>`.")
