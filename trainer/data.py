"""codes.h5 / tokens.h5 → dynamically masked training batches with their sparse MLSM targets.

Neither the token stream (4 B/token) nor the CSR codes (hundreds of GB) is held whole: both are
read per *window*. An epoch visits blocks of contiguous sequences in a seeded random order, and a
window of a few thousand sequences (whole batches) is read with one contiguous slice of each
dataset per block, then shuffled in memory. That keeps HDF5 reads large and sequential while
batches still mix many parts of the corpus, and memory bounded by the window whatever the number
of tokens: what is kept whole is per sequence (the epoch's order and /seq_offsets, 8 B each; see
`TokenData`).

Everything random is a pure function of (seed, epoch, batch index), so the data position
(epoch, batch) is all a checkpoint needs to resume exactly. `Prefetcher` prepares the next steps
on a thread while the device computes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from mlsm.core.background import Prefetch
from mlsm.core.config import MASK_POLICIES
from mlsm.core.errors import MLSMError
from mlsm.core.ranks import ONE_PROCESS, Rank
from mlsm.pipeline.codes import TokenData, WindowSlices

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- CSR helpers


def csr_take(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, rows: np.ndarray):
    """Rows `rows` of a CSR matrix, as a new CSR (indptr, indices, values), without a Python loop."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    new_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_indptr[1:])
    src = np.repeat(starts - new_indptr[:-1], lens) + np.arange(new_indptr[-1], dtype=np.int64)
    return new_indptr, indices[src], values[src]


def codes_to_distributions(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray):
    """Rows → distributions t = a / sum(a); zero entries dropped, so all-zero rows end up empty."""
    M = len(indptr) - 1
    row = np.repeat(np.arange(M), np.diff(indptr))
    keep = values > 0
    row, indices, vals = row[keep], indices[keep], values[keep].astype(np.float64)
    sums = np.bincount(row, weights=vals, minlength=M)
    new_indptr = np.zeros(M + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=M), out=new_indptr[1:])
    return new_indptr, indices, (vals / sums[row]).astype(np.float32)


# --------------------------------------------------------------------------- the data file


@dataclass
class Batch:
    """Unmasked sequences, padded; `token_index` maps each position to the file's token stream (-1: pad).

    `codes` is the window the rows were read from when it holds their codes (None: no targets).
    """

    seq_ids: np.ndarray
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    token_index: np.ndarray  # (B, T) int64
    codes: WindowSlices | None

    def rows(self, r0: int, r1: int) -> Batch:
        """Rows r0..r1-1, trimmed to their own longest sequence."""
        return self.take(np.arange(r0, r1))

    def take(self, rows: np.ndarray) -> Batch:
        """These rows, in this order, trimmed to their own longest sequence."""
        rows = np.asarray(rows, dtype=np.int64)
        r = torch.from_numpy(rows)
        T = int(self.attention_mask[r].sum(1).max())
        return Batch(
            seq_ids=self.seq_ids[rows],
            input_ids=self.input_ids[r, :T].contiguous(),
            attention_mask=self.attention_mask[r, :T].contiguous(),
            token_index=self.token_index[rows, :T],
            codes=self.codes,
        )

    def targets(self, masked_index: torch.Tensor | np.ndarray):
        """Normalised CSR targets (indptr, indices, values) of the flat positions `masked_index`."""
        if self.codes is None:
            raise MLSMError("this data file has no /codes, so it has no MLSM targets; run `mlsm sparse-code` first.")
        g = self.token_index.reshape(-1)[np.asarray(masked_index, dtype=np.int64)]  # (M,) stream position per mask
        if (g < 0).any():
            raise ValueError("masked_index points at padding")
        ip, ix, val = csr_take(self.codes.indptr, self.codes.indices, self.codes.values, self.codes.rows_of(g))
        ip, ix, val = codes_to_distributions(ip, ix, val)
        return (
            torch.from_numpy(ip),
            torch.from_numpy(ix.astype(np.int64)),
            torch.from_numpy(val),
        )


def get_batch(data: TokenData, seq_ids, window: WindowSlices | None = None, with_codes: bool = True,
              rows=None) -> Batch:
    """Pad these sequences to the longest, with their codes (when `with_codes` and the file has them).

    Tokens and codes come from `window` (`TokenData.read_window` of, at least, the rows filled),
    else they are read now. Only `rows` (default: all) are filled; the others come back empty (all
    padding) but keep their place and the batch its length: a DDP rank fills its own rows of the
    global batch from a window of only its rows, and masks them as the whole batch would be.
    """
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    starts = np.asarray(data.seq_offsets[seq_ids], dtype=np.int64)
    lens = data.lengths(seq_ids)
    T = int(lens.max())
    fill = np.ones(len(seq_ids), dtype=bool)
    if rows is not None:
        fill[:] = False
        fill[np.asarray(rows, dtype=np.int64)] = True
    with_codes = with_codes and data.has_codes
    if window is None:
        window = data.read_window(seq_ids[fill], with_codes=with_codes)
    elif not window.holds(starts[fill]).all():
        raise ValueError("the window does not hold every row to fill")
    if with_codes and not window.has_codes:
        raise ValueError("the window was read without codes")
    pos = np.arange(T)
    valid = (pos[None, :] < lens[:, None]) & fill[:, None]  # (B, T)
    token_index = np.where(valid, starts[:, None] + pos[None, :], -1)  # (B, T), -1 on padding
    ids = np.full(valid.shape, data.pad_id, dtype=np.int64)  # (B, T)
    if valid.any():
        first = np.zeros(len(seq_ids), dtype=np.int64)
        first[fill] = window.rows_of(starts[fill])  # the window's row of each filled sequence's first token
        ids = np.where(valid, window.tokens[np.where(valid, first[:, None] + pos[None, :], 0)], ids)
    return Batch(
        seq_ids=seq_ids,
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(valid.astype(np.int64)),
        token_index=token_index,
        codes=window if with_codes else None,
    )


# --------------------------------------------------------------------------- masking


@dataclass(frozen=True)
class Masking:
    """How tokens are masked: the share selected, the policy, and the tokenizer's ids it needs.

    special_ids are never drawn as random replacements (policy "bert"); the caller says which
    positions are never selected (special_mask of mask_tokens).
    """

    mask_prob: float = 0.15
    policy: str = "mask"
    mask_id: int = -1
    vocab_size: int | None = None
    special_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, special: dict, vocab_size: int, mask_prob: float, policy: str) -> Masking:
        return cls(mask_prob, policy, special["mask"], vocab_size, tuple(special[k] for k in ("cls", "sep", "pad", "mask")))


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor, masking: Masking,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ~mask_prob of each sequence's non-special tokens; returns (masked ids, sorted flat index).

    The count per sequence is mask_prob * n rounded stochastically (unbiased even for short
    sequences), and at least 1 when the sequence has any candidate. Policy "mask" replaces every
    selected token by [MASK] (the reference); "bert" does 80% [MASK], 10% random, 10% unchanged,
    the random tokens never being special ones.
    """
    mask_prob, policy, mask_id = masking.mask_prob, masking.policy, masking.mask_id
    vocab_size, special_ids = masking.vocab_size, masking.special_ids
    if policy not in MASK_POLICIES:
        raise MLSMError(f"unknown mask policy {policy!r}; choose one of {', '.join(MASK_POLICIES)}.")
    if mask_id < 0:
        raise ValueError("mask_tokens needs the tokenizer's mask_id")
    B, T = input_ids.shape  # B sequences of T positions (padded)
    cand = attention_mask.bool() & ~special_mask.bool()
    n = cand.sum(1)
    u = torch.rand(B, generator=generator, dtype=torch.float64)
    k = torch.floor(n.double() * mask_prob + u).long()
    k = torch.where(n > 0, k.clamp(min=1), k).clamp(max=n)
    # The k candidates with the smallest random scores; ranks, not thresholds, so ties cannot matter.
    scores = torch.rand(B, T, generator=generator)
    scores = torch.where(cand, scores, torch.full_like(scores, 2.0))
    order = scores.argsort(dim=1)  # (B, T)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(T).expand(B, T).contiguous())  # (B, T)
    selected = ranks < k[:, None]  # (B, T): the k[b] lowest-scored candidates of row b
    out = input_ids.clone()
    if policy == "mask":
        out[selected] = mask_id
    else:
        if vocab_size is None:
            raise ValueError("policy 'bert' needs vocab_size")
        r = torch.rand(B, T, generator=generator)
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        if special_ids:
            allowed[torch.tensor(special_ids)] = False
        pool = allowed.nonzero().squeeze(1)
        rand_tok = pool[torch.randint(len(pool), (B, T), generator=generator)]
        out = torch.where(selected & (r < 0.8), torch.full_like(out, mask_id), out)
        out = torch.where(selected & (r >= 0.8) & (r < 0.9), rand_tok, out)
    return out, selected.reshape(-1).nonzero().squeeze(1)  # (B, T), (M,) flat positions b * T + t


# --------------------------------------------------------------------------- batches


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class BatchIterator:
    """Endless masked batches for one optimizer step each, resumable at (epoch, batch).

    An epoch is a seeded permutation of blocks of `block_size` contiguous sequences; consecutive
    `shuffle_window` sequences of it (rounded up to whole batches) are read together and shuffled.
    The last incomplete batch of an epoch is dropped. With DDP each rank takes its slice of every
    global batch; with `micro_batches` > 1 the rank's share is split (after sorting by length, to
    pad less) for gradient accumulation.
    """

    def __init__(self, data: TokenData, batch_size: int, *, seed: int, masking: Masking, micro_batches: int = 1,
                 rank: Rank = ONE_PROCESS, with_targets: bool = True, block_size: int = 64, shuffle_window: int = 4096,
                 held_out: int = 0):
        world_size = rank.count
        # The last `held_out` sequences are never trained on (trainer/heldout.py evaluates on them).
        self.num_sequences = data.num_sequences - held_out
        if batch_size % (micro_batches * world_size):
            raise MLSMError(
                f"batch size {batch_size} is not divisible by grad_accum x world size = {micro_batches * world_size}; "
                "choose a batch size that is."
            )
        if self.num_sequences < batch_size:
            raise MLSMError(
                f"{data.path} holds {data.num_sequences} sequences ({held_out} held out), fewer than one batch of "
                f"{batch_size} to train on; lower --batch-size or --eval-sequences, or use more data."
            )
        if masking.policy not in MASK_POLICIES:
            raise MLSMError(f"unknown mask policy {masking.policy!r}; choose one of {', '.join(MASK_POLICIES)}.")
        if with_targets and not data.has_codes:
            raise MLSMError(f"{data.path} has no /codes; run `mlsm sparse-code` to build MLSM targets.")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.masking = masking
        self.micro_batches, self.rank, self.world_size = micro_batches, rank.index, world_size
        self.with_targets = with_targets
        S = self.num_sequences
        self.block_starts = np.arange(0, S, block_size, dtype=np.int64)
        self.block_sizes = np.minimum(block_size, S - self.block_starts)
        self.window = -(-max(shuffle_window, batch_size) // batch_size) * batch_size
        self.batches_per_epoch = S // batch_size
        self.epoch = 0
        self.batch = 0
        self._order: tuple[int, np.ndarray] | None = None
        self._cache: tuple[tuple[int, int], WindowSlices] | None = None
        self._special = torch.tensor(sorted(set(masking.special_ids)), dtype=torch.long)

    # -- position

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_sequences": self.num_sequences,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "num_sequences"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise MLSMError(
                    f"the saved data position was made with {key}={state[key]}, this run has {mine}; "
                    "resume with the same data and settings, or start a new run directory."
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    # -- order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's sequence order: shuffled blocks, then shuffled within each window."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        rng = np.random.default_rng(_seed_of(self.seed, epoch, 1))
        perm = rng.permutation(len(self.block_starts))
        sizes, starts = self.block_sizes[perm], self.block_starts[perm]
        S = self.num_sequences
        order = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(S, dtype=np.int64)
        for w0 in range(0, S, self.window):
            rng.shuffle(order[w0 : w0 + self.window])
        self._order = (epoch, order)
        return order

    def _rank_seqs(self, order: np.ndarray, b0: int, b1: int) -> np.ndarray:
        """This rank's sequences of global batches b0..b1-1, shape (b1-b0, local batch)."""
        local = self.batch_size // self.world_size
        g = order[b0 * self.batch_size : b1 * self.batch_size].reshape(b1 - b0, self.batch_size)  # (batches, global)
        return g[:, self.rank * local : (self.rank + 1) * local]  # (batches, local)

    def _window_for(self, epoch: int, batch: int) -> WindowSlices:
        """This rank's tokens (and codes) of the window that holds this batch."""
        per_window = self.window // self.batch_size
        w = batch // per_window
        if self._cache is None or self._cache[0] != (epoch, w):
            self._cache = None  # free the old window before reading the next
            b0, b1 = w * per_window, min((w + 1) * per_window, self.batches_per_epoch)
            seqs = self._rank_seqs(self.epoch_order(epoch), b0, b1)
            self._cache = ((epoch, w), self.data.read_window(seqs.reshape(-1), with_codes=self.with_targets))
        return self._cache[1]

    # -- batches

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> list[dict]:
        epoch, batch = self.epoch, self.batch
        order = self.epoch_order(epoch)
        glob = order[batch * self.batch_size : (batch + 1) * self.batch_size]
        # The whole global batch is masked with one generator of (seed, epoch, batch), and each
        # rank then keeps its rows: masks depend neither on the world size nor on grad_accum, so
        # a DDP run sees exactly the batches of a one-process run. A rank reads only its own rows'
        # tokens and codes; the other rows stay empty, and masking draws the same numbers for a
        # row whatever the other rows hold (the batch keeps its global shape).
        local = self.batch_size // self.world_size
        mine = np.arange(self.rank * local, (self.rank + 1) * local)
        b = get_batch(self.data, glob, self._window_for(epoch, batch), with_codes=self.with_targets, rows=mine)
        gen = torch.Generator().manual_seed(_seed_of(self.seed, epoch, batch, 2))
        ids, selected = mask_batch(b, self._special, self.masking, gen)
        # Sorted by length, micro-batches pad less; a batch is a set, so nothing else changes.
        mine = mine[np.argsort(self.data.lengths(glob[mine]), kind="stable")]
        micro = []
        for rows in np.array_split(mine, self.micro_batches):
            sub = b.take(rows)
            T = sub.input_ids.shape[1]
            r = torch.from_numpy(rows)
            micro.append(pack_batch(sub, ids[r, :T], selected[r, :T], self.with_targets))
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return micro

def mask_batch(b: Batch, special: torch.Tensor, masking: Masking, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch's tokens (never the `special` ids): (masked ids, selected positions as a (B, T) bool)."""
    ids, masked_index = mask_tokens(b.input_ids, b.attention_mask, torch.isin(b.input_ids, special), masking, gen)
    selected = torch.zeros(b.input_ids.numel(), dtype=torch.bool)  # (B*T,) flat, as masked_index
    selected[masked_index] = True
    return ids, selected.view(b.input_ids.shape)


def pack_batch(b: Batch, masked_ids: torch.Tensor, selected: torch.Tensor, with_targets: bool) -> dict:
    """Everything one forward pass needs, as CPU tensors (training and held-out batches alike)."""
    masked_index = selected.reshape(-1).nonzero().squeeze(1)  # (M,) flat positions in this micro-batch's (b, T)
    out = {
        "seq_ids": b.seq_ids,
        "input_ids": masked_ids.contiguous(),
        "attention_mask": b.attention_mask,
        "masked_index": masked_index,
        "mlm_labels": b.input_ids.reshape(-1)[masked_index],  # (M,) the original ids
        "n_tokens": int(b.attention_mask.sum()),
        "n_masked": int(masked_index.numel()),
    }
    if with_targets:
        ip, ix, val = b.targets(masked_index.numpy())
        out.update(target_indptr=ip, target_indices=ix, target_values=val, n_targets=int((ip[1:] > ip[:-1]).sum()))
    return out


class Prefetcher:
    """Prepares the next steps' batches on a thread while the device works on the current one.

    Order and content are exactly those of the wrapped iterator; `state_dict()` is the position
    after the last batch handed out, not after the one being prepared.
    """

    def __init__(self, it: BatchIterator, depth: int = 2, pin_memory: bool = False):
        self._state = it.state_dict()

        def produce():
            while True:
                micro = next(it)
                if pin_memory:  # page-locked host memory lets the copies to the GPU run asynchronously
                    micro = [{k: v.pin_memory() if torch.is_tensor(v) and k != "target_indptr" else v
                              for k, v in m.items()} for m in micro]
                yield micro, it.state_dict()

        self._ahead = Prefetch(produce(), depth, name="mlsm-prefetch")

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> list[dict]:
        micro, self._state = next(self._ahead)
        return micro

    def state_dict(self) -> dict:
        return dict(self._state)

    def close(self) -> None:
        self._ahead.close()
