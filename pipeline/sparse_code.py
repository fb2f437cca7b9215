"""The sparse-code stage: learn the dictionary on a sample, then code every token once.

Two sources of hidden states, one coding loop: the staged path reads the extract shards one row
group at a time; the fused path (`--from-tokens`, pipeline.fused) runs the auxiliary forward on
each shard of a tokenized stream and codes its states in memory. Either writes one part file per
shard (resumable), then finalizes codes.h5 over the parts (pipeline.finalize: nothing is copied).

The dictionary sample is the same rule on both paths: a seeded sample uniform over the stream's
tokens, a few per sequence (`dictionary_sample`), so the fused path runs the forward on those
sequences alone; it leaves out each sequence's [CLS] and [SEP] unless `--dict-specials`. Every
token is then coded by one coder (`token_coder`, `--solver exact|fista`) on both paths.

Several workers (pipeline.workers) code disjoint shards into the same parts folder. All of them
must code with one dictionary: under torchrun rank 0 learns it while the others wait at a
barrier; with `--worker-index/--num-workers` it is learnt first by `--dictionary-only` and the
workers refuse to start without it (a dictionary learnt by every worker would differ on GPUs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mlsm.core.config import SparseCodeConfig, recorded
from mlsm.core.device import pick_device
from mlsm.core.errors import MLSMError
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
from mlsm.core.memory import release_freed_heap
from mlsm.core.ranks import Rank, join
from mlsm.pipeline.codes import dense_to_csr, part_rows, top_k_codes, write_part
from mlsm.pipeline.shards import iter_shard_batches, open_shard, read_rows
from mlsm.pipeline.solvers import LassoResult, duality_gap, fista_fixed, lipschitz, nn_lasso
from mlsm.pipeline.workers import BARRIER_TIMEOUT, prepare_shared_stage

log = logging.getLogger(__name__)

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


SAMPLE_CHUNK = 4096  # sequences drawn at a time by dictionary_sample
SAMPLE_RULE = "tokens-per-sequence"  # recorded in dictionary.h5: a dictionary of an older rule is learnt again


def dictionary_sample(seq_lengths: np.ndarray, n_train: int, n_held: int, seed: int,
                      per_sequence: float = 2.0, specials: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) global token rows of the dictionary sample, each sorted.

    specials=False leaves out the [CLS] and [SEP] of every sequence (the first and the last of its
    rows: pipeline.sequences wraps each packed sequence as exactly `[CLS] ... [SEP]`), so the sample
    is uniform over the other tokens; `sparse-code --no-dict-specials` (the default). With
    specials=True every position may be drawn.

    Sequences are visited in a seeded random order and each of their tokens is taken with one
    probability q, the same for every token, so the sample is uniform over the stream: held-out
    sequences first until they hold n_held tokens, then training ones until n_train more. q makes
    a full-length sequence give `per_sequence` tokens on average (more when the stream is too short
    for that: then q = 1.25 x the share of the stream the sample needs). Few tokens per sequence
    keep the sample's contexts as varied as a token-level one (whole sequences: a 6.5% worse
    held-out objective, bench/dictionary_sample.py), while the fused path runs the forward on
    about (n_train + n_held) / per_sequence sequences only, not on nearly all of them.
    """
    full = np.asarray(seq_lengths, dtype=np.int64)
    skip = 0 if specials else 1  # rows left out at each end of a sequence
    lengths = np.maximum(full - 2 * skip, 0)  # the rows that may be drawn, per sequence
    total = int(lengths.sum())
    if not total or n_train + n_held <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q = min(1.0, max(per_sequence / int(lengths.max()), 1.25 * (n_train + n_held) / total))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    offs = np.concatenate([[0], np.cumsum(full)])[:-1] + skip  # each sequence's first row that may be drawn
    held, train, n_h, n_t = [], [], 0, 0
    for c0 in range(0, len(order), SAMPLE_CHUNK):  # a chunk of sequences at a time: memory ~ the sample
        seqs = order[c0:c0 + SAMPLE_CHUNK]
        lens = lengths[seqs]
        starts = np.cumsum(lens) - lens
        rows = np.repeat(offs[seqs] - starts, lens) + np.arange(int(lens.sum()))
        taken = rng.random(len(rows)) < q
        cum = np.cumsum(np.add.reduceat(taken, starts))  # draws up to the end of each sequence
        rows, i = rows[taken], 0
        if n_h < n_held:  # held-out first; the training draws start at the next sequence
            k = int(np.searchsorted(cum, n_held - n_h, side="left"))
            if k == len(seqs):
                held.append(rows)
                n_h += len(rows)
                continue
            held.append(rows[:n_held - n_h])
            n_h, i = n_held, int(cum[k])
        train.append(rows[i:i + n_train - n_t])
        n_t += len(train[-1])
        if n_t >= n_train:
            break
    return tuple(np.sort(np.concatenate(x)) if x else np.zeros(0, np.int64) for x in (held, train))


def dictionary_vectors(source, cfg: SparseCodeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) L2-normalised vectors of the dictionary sample, from either source."""
    lengths = source.seq_lengths()
    n_held = min(cfg.heldout, int(lengths.sum()) // 10)
    held_rows, train_rows = dictionary_sample(lengths, cfg.dict_samples, n_held, cfg.seed, cfg.dict_per_sequence,
                                              specials=cfg.dict_specials)
    if not cfg.dict_specials:
        held_rows, train_rows = _drop_specials(source, held_rows, train_rows)
    held = source.sample_states(held_rows)
    train = source.sample_states(train_rows)
    train = train[np.random.default_rng(cfg.seed).permutation(len(train))]
    return l2_normalize_states(train, "cpu").numpy(), l2_normalize_states(held, "cpu").numpy()


def _drop_specials(source, *row_sets: np.ndarray) -> tuple[np.ndarray, ...]:
    """The rows whose token is not a [CLS] or [SEP]: the sample has left out each sequence's own two
    already, this drops one spelled out in the text (a tokenizer reads "[SEP]" as the token)."""
    rows = np.sort(np.concatenate(row_sets))
    if not len(rows):
        return row_sets
    ids = source.sample_tokens(rows)
    drop = rows[np.isin(ids, [source.special["cls"], source.special["sep"]])]
    if len(drop):
        log.info("sparse-code: %d [CLS]/[SEP] inside sequences left out of the dictionary sample", len(drop))
    return tuple(r[~np.isin(r, drop)] for r in row_sets)


def sample_vectors(extract_dir: Path, shards: list[dict], layer: int, n: int, seed: int,
                   progress: bool = True) -> np.ndarray:
    """A seeded uniform sample of n token vectors, read shard by shard (only the rows needed)."""
    rng = np.random.default_rng(seed)
    sample = read_sample(extract_dir, shards, sample_rows(shards, n, rng), layer, progress)
    return sample[rng.permutation(len(sample))]


class StagedSource:
    """The shards of a finished `mlsm extract` folder."""

    def __init__(self, cfg: SparseCodeConfig):
        self.extract_dir = Path(cfg.extract_dir)
        self.man = read_manifest(self.extract_dir, stage="extract", fix="mlsm extract (or make extract)")
        self.cfg = dataclasses.replace(cfg, layer=_layer_to_code(self.man, cfg.layer, self.extract_dir))
        self.inputs = {"extract_manifest": sha256_file(self.extract_dir / MANIFEST)}
        self.plan = [{"index": j, "tokens": s["tokens"], "file": s["file"]} for j, s in enumerate(self.man["shards"])]
        self.tokenizer_dir = self.extract_dir / TOKENIZER_DIR
        self.hidden_size = self.man.get("d")
        self.forward_s = 0.0

    @property
    def identity(self) -> dict:
        """The auxiliary model and tokenizer the states come from (a dictionary records them)."""
        return {k: self.man["inputs"].get(k) for k in ("aux_weights", "tokenizer")}

    def describe(self) -> dict:
        return {"extract_dir": str(self.extract_dir)}  # for the rebuild command in error messages

    def shard_path(self, shard: dict) -> Path:
        return self.extract_dir / shard["file"]

    @functools.cache  # noqa: B019 (one source per stage run; the dictionary sample asks three times)
    def seq_lengths(self) -> np.ndarray:
        """Tokens per sequence of the whole stream, from the shards' seq_id columns (read once)."""
        counts = []
        for s in self.man["shards"]:
            path = self.extract_dir / s["file"]
            if not path.exists():
                raise MLSMError(f"{path} is gone (deleted by --delete-hidden or make clean-hidden) and the dictionary "
                                f"sample needs it; re-extract with `mlsm extract --force`.")
            ids = open_shard(path).read(columns=["seq_id"]).column("seq_id").to_numpy()
            counts.append(np.bincount(ids - s["seq_start"], minlength=s["sequences"]))
        return np.concatenate(counts)

    def sample_states(self, rows: np.ndarray) -> np.ndarray:
        """States at these sorted global token rows."""
        if not len(rows):
            return np.zeros((0, self.hidden_size or 0), np.float16)
        return read_sample(self.extract_dir, self.man["shards"], rows, self.cfg.layer, self.cfg.progress)

    def sample_tokens(self, rows: np.ndarray) -> np.ndarray:
        """Token ids at these sorted global token rows."""
        return read_sample(self.extract_dir, self.man["shards"], rows, None)

    @functools.cached_property
    def special(self) -> dict:
        """The special tokens' ids, from the extract's tokenizer."""
        from mlsm.core import hf

        return hf.special_token_ids(hf.load_tokenizer(self.tokenizer_dir))

    def blocks(self, shard: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        path = self.shard_path(shard)
        if not path.exists():
            raise MLSMError(f"{path} is missing and its codes were never written; re-extract with "
                            f"`mlsm extract --force`.")
        for rg in iter_shard_batches(path, self.cfg.layer):
            yield rg["token_id"], rg["seq_id"], rg["hidden"]

    def after_part(self, shard: dict) -> None:
        if self.cfg.delete_hidden:  # write_part fsynced the part
            self.shard_path(shard).unlink(missing_ok=True)


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


# --------------------------------------------------------------------------- the dictionary


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


def _write_dictionary(path: Path, D: np.ndarray, attrs: dict) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("D", data=D)
            f.attrs.update(attrs)


def _dictionary_attrs(cfg: SparseCodeConfig, identity: dict, dict_key: str, stats: dict, d: int) -> dict:
    return {"K": cfg.K, "d": d, "layer": cfg.layer, "lambda": cfg.lam, "params_key": dict_key,
            "stats": json.dumps(stats), "aux_weights": identity["aux_weights"], "tokenizer": identity["tokenizer"],
            "sample": SAMPLE_RULE, "dict_per_sequence": cfg.dict_per_sequence, "dict_specials": cfg.dict_specials}


def _adopt_dictionary(cfg: SparseCodeConfig, identity: dict, dict_key: str):
    """--dictionary: code with a given dictionary.h5, once it is shown to fit these states."""
    src = Path(cfg.dictionary)
    fix = "learn one for these states (leave out --dictionary)"
    try:
        with h5py.File(src, "r") as f:
            D, attrs = f["D"][:], dict(f.attrs)
    except (OSError, KeyError) as e:
        raise MLSMError(f"{src} is not a readable dictionary ({e}); {fix}.") from e
    want = {"K": cfg.K, "layer": cfg.layer, "lambda": cfg.lam, **identity}
    meaning = {"aux_weights": "another auxiliary model", "tokenizer": "another tokenizer", "layer": "another layer"}
    for key, value in want.items():
        got = attrs.get(key)
        if got is None:
            raise MLSMError(f"{src} does not record its {key} (it predates dictionaries that do): it cannot be "
                            f"checked against these states; {fix}.")
        same = abs(float(got) - float(value)) <= 1e-12 if key == "lambda" else str(got) == str(value)
        if not same:
            raise MLSMError(f"{src} was learnt with {meaning.get(key, key)} ({key} {str(got)[:12]} vs "
                            f"{str(value)[:12]} here); {fix}, or pass the dictionary of these states.")
    if "dict_specials" in attrs and bool(attrs["dict_specials"]) != cfg.dict_specials:
        log.info("sparse-code: %s was learnt on a sample %s [CLS]/[SEP]; it is used as given", src,
                 "with" if attrs["dict_specials"] else "without")
    stats = json.loads(attrs.get("stats", "{}"))
    _write_dictionary(Path(cfg.out) / DICTIONARY, D, {**attrs, "params_key": dict_key})
    return torch.from_numpy(D), stats


def _learn_dictionary(cfg: SparseCodeConfig, source, device, dict_key: str):
    from mlsm.pipeline.dictionary import DictOptions, learn_dictionary

    path = Path(cfg.out) / DICTIONARY
    found = _load_dictionary(path, dict_key)
    if found is not None:
        log.info("sparse-code: reusing the dictionary in %s", path)
        return found
    path.unlink(missing_ok=True)
    if cfg.dictionary is not None:
        return _adopt_dictionary(cfg, source.identity, dict_key)
    train, held = dictionary_vectors(source, cfg)
    log.info("sparse-code: learning a %d x %d dictionary on %d vectors (%d held out)", train.shape[1], cfg.K,
             len(train), len(held))
    result = learn_dictionary(train, K=cfg.K, lam=cfg.lam, options=DictOptions(seed=cfg.seed), device=str(device),
                              heldout=held if len(held) else None, progress=cfg.progress)
    D = result.D.detach().float().cpu().contiguous()
    _write_dictionary(path, D.numpy(), _dictionary_attrs(cfg, source.identity, dict_key, result.stats, D.shape[0]))
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


# --------------------------------------------------------------------------- coding


def token_coder(cfg: SparseCodeConfig, D: torch.Tensor, gram: torch.Tensor):
    """The one function every token of either source is coded by (`--solver`): L2-normalised
    states (B, d) -> LassoResult.

    exact: nn_lasso to the certified relative gap --tol. fista: --fista-steps steps of fista_fixed
    from zero (the reference's coder); its codes are not certified, so their gap is computed here
    and stored as for exact codes (the part files' and codes.h5's gap figures say how far they are).
    """
    if cfg.solver == "exact":
        return lambda x: nn_lasso(x, D, cfg.lam, tol=cfg.tol, gram=gram)
    L = lipschitz(D)

    def fista(x: torch.Tensor) -> LassoResult:
        a = fista_fixed(x, D, cfg.lam, n_iter=cfg.fista_steps, L=L)
        primal, gap = duality_gap(x, D, a, cfg.lam)
        return LassoResult(a, primal, gap / primal.clamp(min=1e-12), cfg.fista_steps)

    return fista


def _code_part(cfg: SparseCodeConfig, blocks, part: Path, code, device, bar, attrs: dict) -> int:
    """Code (token ids, sequence ids, states) blocks into one part file; returns the number of tokens.

    Both sources hand over the same blocks (a Parquet shard's row groups), split into the same
    solver batches and coded by the same `code` (token_coder): the staged and fused paths compute
    the same codes.
    """
    lam = cfg.lam
    value_dtype = np.float16 if cfg.values == "float16" else np.float32
    toks, seqs, counts, idx, vals, gaps, recon = [], [], [], [], [], [], []
    for token_id, seq_id, hidden in blocks:
        toks.append(token_id)
        seqs.append(seq_id)
        for b in range(0, len(token_id), cfg.batch_size):
            x = l2_normalize_states(hidden[b:b + cfg.batch_size], device)
            res = code(x)
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
               attrs={"recon_err_sum": float(np.concatenate(recon).sum()), **attrs})
    return len(seq_ids)


def _part_done(part: Path, tokens: int, dict_fp: str) -> bool:
    """A part that reads back whole and was coded with this dictionary (else it is coded again)."""
    if part_rows(part) != tokens:
        return False
    with h5py.File(part, "r") as f:
        fp = f.attrs.get("dictionary_fingerprint")
    if fp is not None and fp != dict_fp:
        log.warning("%s was coded with another dictionary; it is coded again", part)
        return False
    return True


def run_sparse_code(cfg: SparseCodeConfig) -> dict:
    """Code this worker's shards; then codes.h5 is finalized (by rank 0 under torchrun, else by the
    worker that finds every part and every worker's record there).

    Returns the stage manifest, or (for a worker that is not last, or --dictionary-only) a
    record with complete=False and a "report".
    """
    cfg.validate()
    rank = join(index=cfg.worker_index, count=cfg.num_workers, timeout=BARRIER_TIMEOUT)
    try:
        return _run_sparse_code(cfg, rank)
    finally:
        rank.close()


# Parameters that only the fused path's forward uses: not recorded for the staged path.
_FUSED_ONLY = ("shard_tokens", "precision")


def _run_sparse_code(cfg: SparseCodeConfig, rank: Rank) -> dict:
    from mlsm.pipeline.finalize import finalize_codes

    out_dir = Path(cfg.out)
    if cfg.from_tokens is not None:
        from mlsm.pipeline.fused import FusedSource

        source = FusedSource(cfg)
    else:
        source = StagedSource(cfg)
    cfg = source.cfg
    params = recorded(cfg)
    if cfg.from_tokens is None:
        params = {k: v for k, v in params.items() if k not in _FUSED_ONLY}
    if cfg.solver == "exact":
        params.pop("fista_steps")  # the exact solver takes none
    inputs = dict(source.inputs)
    if cfg.dictionary is not None:
        inputs["dictionary"] = sha256_file(cfg.dictionary)
    state, old = prepare_shared_stage(rank, out_dir, "sparse-code", params, inputs, cfg.force,
                                      [DICTIONARY, CODES, PARTS_DIR, TOKENIZER_DIR, WORKERS_DIR])
    if state == "done":
        log.info("sparse-code: %s is already complete; nothing to do. Use --force to redo it.", out_dir)
        return old
    dev = pick_device(cfg.device)
    progress_doc = new_manifest("sparse-code", params, inputs)
    progress_doc.update(source.describe(), shards=[{"index": s["index"], "tokens": s["tokens"]} for s in source.plan],
                        tokenizer_fingerprint=source.identity["tokenizer"])
    write_json_atomic(out_dir / PROGRESS, progress_doc)
    if rank.is_main and not (out_dir / TOKENIZER_DIR).exists():
        with atomic_path(out_dir / TOKENIZER_DIR) as tmp:
            shutil.copytree(source.tokenizer_dir, tmp)

    t0 = time.time()
    dict_key = sha256_json({k: params[k] for k in ("layer", "K", "lambda", "dict_samples", "heldout", "seed",
                                                  "dict_per_sequence", "dict_specials")} | inputs
                        | {"sample": SAMPLE_RULE})
    D, dict_stats = _shared_dictionary(rank, cfg, dict_key, lambda: _learn_dictionary(cfg, source, dev, dict_key))
    t_dict = time.time() - t0
    if cfg.dictionary_only:
        log.info("sparse-code: dictionary ready in %s; now start the workers", out_dir / DICTIONARY)
        return {"complete": False, "report": {"dictionary": str(out_dir / DICTIONARY), "dictionary_s": round(t_dict, 1),
                                              **{k: dict_stats.get(k) for k in ("heldout_objective",) if k in dict_stats}}}
    d = source.hidden_size
    if d is not None and tuple(D.shape) != (d, cfg.K):
        raise MLSMError(f"{out_dir / DICTIONARY} is a {D.shape[0]} x {D.shape[1]} dictionary, but the hidden states "
                        f"have d={d} and K={cfg.K} was asked for; rebuild it with `mlsm sparse-code ... --force`.")
    dict_fp = dictionary_fingerprint(D)
    D = D.to(dev)
    code = token_coder(cfg, D, D.T @ D)

    parts_dir = out_dir / PARTS_DIR
    parts_dir.mkdir(exist_ok=True)
    mine = [s for s in source.plan if rank.owns(s["index"])]
    bar = tqdm(total=sum(s["tokens"] for s in mine), unit="tok", unit_scale=True,
               desc=f"sparse-code {rank.index}/{rank.count}", disable=not cfg.progress)
    t1 = time.time()
    coded = 0
    for shard in mine:
        part = parts_dir / part_name(shard["index"])
        if not _part_done(part, shard["tokens"], dict_fp):  # missing, damaged, or of another dictionary
            attrs = {"shard": shard.get("file", str(shard["index"])), "dictionary_fingerprint": dict_fp}
            coded += _code_part(cfg, source.blocks(shard), part, code, D.device, bar, attrs)
        else:
            bar.update(shard["tokens"])
        source.after_part(shard)
        release_freed_heap()  # the shard's arrays are freed: keep the heap from growing with the run
    bar.close()
    t_code = time.time() - t1
    record = {"worker": rank.index, "workers": rank.count, "device": str(dev), "solver": cfg.solver,
              "dictionary_s": round(t_dict, 1),
              "coding_s": round(t_code, 1), "forward_s": round(source.forward_s, 1), "coded_tokens": coded,
              "coding_tokens_per_s": round(coded / t_code, 1) if coded and t_code > 0 else None}
    write_json_atomic(out_dir / WORKERS_DIR / f"{rank.name}.json", record)
    if rank.launched:  # every rank's parts are on disk after the barrier; rank 0 finalizes
        rank.barrier()
        manifest = finalize_codes(out_dir) if rank.is_main else None
    else:
        manifest = finalize_codes(out_dir, worker=rank)
    return manifest if manifest is not None else {**record, "complete": False, "report": record}
