"""The LSP explorer's figures (`mlsm atoms`): what each dictionary atom of a codes folder stands for.

Per atom: its usage (share of tokens whose code uses it, share of the code mass), the token types
that fire it most (by count, by mean weight), a few contexts of its strongest occurrences, its
nearest atoms (cosine of dictionary atoms) and its class in `mlsm layer-report`'s terms (lexical,
few-type, semantic, dead). Per token type: the atoms its occurrences use most (the page's search).

Everything comes from the codes folder: codes.h5 holds the token stream (/tokens, /seq_offsets) as
well as the codes, tokenizer/ decodes it and dictionary.h5 gives the atoms; the hidden states are
not needed. The stream is read with `TokenData`, a block of whole sequences at a time, and counted
with numpy (bincounts, and one sort per block for the (atom, token type) pairs), so memory grows
with the distinct pairs, not with the corpus. Special tokens ([CLS], [SEP], [PAD], [MASK]) are left
out: they are never masked, so their codes are never targets.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlsm import __version__
from mlsm.core import hf
from mlsm.core.config import AtomsConfig
from mlsm.core.errors import MLSMError
from mlsm.core.layout import CODES, DICTIONARY, MANIFEST, TOKENIZER_DIR
from mlsm.core.manifest import atomic_path, read_manifest, sha256_file
from mlsm.pipeline.codes import TokenData, check_codes_file, check_dictionary
from mlsm.pipeline.layer_report import atom_type_profile, few_type_atoms, lexical_atoms, summarize_atoms

log = logging.getLogger(__name__)

BLOCK_TOKENS = 1 << 16  # tokens read and counted at once (~2.3M nonzeros at 35 per token)
NEIGHBOUR_ROWS = 1024  # dictionary rows per block of the cosine matrix (K x K is too big at large K)
CLASSES = ("lexical", "few-type", "semantic", "dead")
FORMAT = "mlsm-atoms/1"


# --------------------------------------------------------------------------- inputs


def _fail_if_missing(folder: Path) -> Path:
    if not folder.is_dir():
        raise MLSMError(f"{folder} is not a folder: --codes names the output folder of `mlsm sparse-code` "
                        "(codes.h5, dictionary.h5, tokenizer/). Run `make sparse-code` first, or point --codes at it.")
    codes_path = folder / CODES
    if not codes_path.is_file():
        raise MLSMError(f"{codes_path} not found: {folder} is not a finished `mlsm sparse-code` folder. Run "
                        f"`mlsm sparse-code --out {folder}` (or `mlsm finalize {folder}` after separate coding jobs).")
    return codes_path


def _check_extract(codes_path: Path, attrs: dict, extract_dir: Path) -> dict:
    """The extract manifest, when it is the one the codes were made from."""
    man = read_manifest(extract_dir, stage="extract", fix="mlsm extract")
    want = attrs.get("extract_fingerprint")
    if want is None:
        raise MLSMError(f"{codes_path} records no extract fingerprint (it was made with `sparse-code --from-tokens`), "
                        f"so it cannot be tied to {extract_dir}. Leave --extract-dir out: the codes folder suffices.")
    got = sha256_file(extract_dir / MANIFEST)
    if got != str(want):
        raise MLSMError(f"{codes_path} was not made from {extract_dir} (extract manifest fingerprint {got[:12]}, the "
                        f"codes name {str(want)[:12]}). Pass the extract folder the codes were made from, or leave "
                        "--extract-dir out: the codes folder suffices.")
    return man


def _tokenizer(folder: Path, extract_dir: Path | None, codes_path: Path, attrs: dict):
    candidates = [folder / TOKENIZER_DIR] + ([extract_dir / TOKENIZER_DIR] if extract_dir is not None else [])
    tok_dir = next((d for d in candidates if d.is_dir()), None)
    if tok_dir is None:
        raise MLSMError(f"no tokenizer folder in {' or '.join(map(str, candidates))}: `mlsm sparse-code` writes one "
                        f"next to {codes_path.name}. Restore it (copy the auxiliary model's tokenizer files there), "
                        "or pass --extract-dir.")
    tok = hf.load_tokenizer(tok_dir)
    want = attrs.get("tokenizer_fingerprint")
    got = hf.tokenizer_fingerprint(tok)
    if want is not None and str(want) != got:
        raise MLSMError(f"the tokenizer in {tok_dir} is not the one {codes_path} was built with (fingerprints "
                        f"{got[:12]} vs {str(want)[:12]}): its tokens would decode to other words. Restore the "
                        "tokenizer folder the stage wrote.")
    return tok


def _aux_of(folder: Path, extract_man: dict | None) -> str | None:
    """The auxiliary model's name, from the extract manifest (given, or named by the codes' manifest)."""
    if extract_man is None:
        try:
            codes_man = json.loads((folder / MANIFEST).read_text())
            extract_man = json.loads((Path(codes_man["extract_dir"]) / MANIFEST).read_text())
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            return None
    aux = extract_man.get("aux")
    return aux if isinstance(aux, str) else (json.dumps(aux) if aux is not None else None)


# --------------------------------------------------------------------------- counting


def top_per_group(group: np.ndarray, score: np.ndarray, n: int, tiebreak: np.ndarray) -> np.ndarray:
    """Indices of the n highest scores of each group, ordered by group, then score (ties: lower tiebreak)."""
    order = np.lexsort((tiebreak, -score, group))
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, np.int64)
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    return order[rank < n]


def _reduce_pairs(keys: np.ndarray, counts: np.ndarray, wsums: np.ndarray):
    """Sum counts and weights of equal keys; keys come back sorted."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, np.int64)
    return k[starts], np.add.reduceat(counts[order], starts), np.add.reduceat(wsums[order], starts)


class _Occurrences:
    """A few occurrences per atom (atom, weight, stream position, token), kept across blocks."""

    def __init__(self, atom=None, weight=None, pos=None, token=None):
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float32)
        self.atom = empty_i if atom is None else atom
        self.weight = empty_f if weight is None else weight
        self.pos = empty_i if pos is None else pos
        self.token = empty_i if token is None else token

    def take(self, idx: np.ndarray) -> _Occurrences:
        return _Occurrences(self.atom[idx], self.weight[idx], self.pos[idx], self.token[idx])

    def plus(self, other: _Occurrences) -> _Occurrences:
        return _Occurrences(*(np.concatenate([a, b]) for a, b in
                              zip(self.columns(), other.columns(), strict=True)))

    def columns(self):
        return self.atom, self.weight, self.pos, self.token

    def strongest(self, n: int, key: np.ndarray | None = None) -> _Occurrences:
        """The n strongest of each atom (or of each `key`, e.g. an (atom, token type) pair)."""
        return self.take(top_per_group(self.atom if key is None else key, self.weight, n, self.pos))


class Tally:
    """Counts over the code stream, block by block: per atom, per (atom, token type) pair, per type."""

    def __init__(self, K: int, V: int, contexts: int, special: np.ndarray):
        self.K, self.V, self.C, self.special = K, V, contexts, special
        self.uses = np.zeros(K, np.int64)
        self.mass = np.zeros(K, np.float64)
        self.type_counts = np.zeros(V, np.int64)
        self.tokens = self.empty = 0
        self._pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pairs_len, self._compacted = 0, 0
        self.top = _Occurrences()  # each atom's C strongest occurrences
        self.best_of_type = _Occurrences()  # the strongest occurrence of each of an atom's C strongest types

    def add(self, tokens: np.ndarray, positions: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
            values: np.ndarray) -> None:
        """One block: the tokens of whole sequences, their stream positions and their CSR codes."""
        counted = ~self.special[tokens]
        nnz_per_row = np.diff(indptr)
        self.tokens += int(counted.sum())
        self.empty += int((counted & (nnz_per_row == 0)).sum())
        self.type_counts += np.bincount(tokens[counted], minlength=self.V)
        row = np.repeat(np.arange(len(tokens)), nnz_per_row)
        keep = counted[row] & (values > 0)
        occ = _Occurrences(indices[keep].astype(np.int64), values[keep].astype(np.float32), positions[row[keep]],
                           tokens[row[keep]].astype(np.int64))
        self.uses += np.bincount(occ.atom, minlength=self.K)
        self.mass += np.bincount(occ.atom, weights=occ.weight, minlength=self.K)
        if not len(occ.atom):
            return
        key = occ.atom * self.V + occ.token
        order = np.lexsort((occ.pos, -occ.weight, key))  # by pair, strongest first
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        self._pairs.append((k[starts], np.diff(np.r_[starts, len(k)]),
                            np.add.reduceat(occ.weight[order].astype(np.float64), starts)))
        self._pairs_len += len(starts)
        if self._pairs_len > 2 * self._compacted + (1 << 22):
            self._compact()
        # Each atom's strongest occurrences are among the C strongest of one of its pairs.
        rank_in_pair = np.arange(len(k)) - np.repeat(starts, np.diff(np.r_[starts, len(k)]))
        candidates = occ.take(order[rank_in_pair < self.C])
        self.top = self.top.plus(candidates).strongest(self.C)
        firsts = occ.take(order[starts])
        merged = self.best_of_type.plus(firsts)
        merged = merged.strongest(1, key=merged.atom * self.V + merged.token)
        self.best_of_type = merged.strongest(self.C)

    def _compact(self) -> None:
        keys, counts, wsums = (np.concatenate(c) for c in zip(*self._pairs, strict=True))
        self._pairs = [_reduce_pairs(keys, counts, wsums)]
        self._pairs_len = self._compacted = len(self._pairs[0][0])

    def pairs(self):
        """(atom, token type, count, weight sum) of every pair seen, sorted by atom then type."""
        if not self._pairs:
            z = np.zeros(0, np.int64)
            return z, z, z, np.zeros(0)
        self._compact()
        keys, counts, wsums = self._pairs[0]
        return keys // self.V, keys % self.V, counts.astype(np.int64), wsums

    def contexts(self) -> _Occurrences:
        """Per atom, up to C occurrences: the strongest of each of its strongest token types first (so
        the contexts show its range), then its strongest occurrences; by atom, in that order."""
        both = self.best_of_type.plus(self.top)
        first = np.r_[np.zeros(len(self.best_of_type.atom), np.int64), np.ones(len(self.top.atom), np.int64)]
        # an occurrence in both lists keeps its place in the first
        order = np.lexsort((first, both.pos, both.atom))
        a, p = both.atom[order], both.pos[order]
        unique = order[np.r_[True, (a[1:] != a[:-1]) | (p[1:] != p[:-1])]] if len(a) else order
        both, first = both.take(unique), first[unique]
        order = np.lexsort((both.pos, -both.weight, first, both.atom))
        a = both.atom[order]
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]]) if len(a) else np.zeros(0, np.int64)
        rank = np.arange(len(a)) - np.repeat(starts, np.diff(np.r_[starts, len(a)]))
        return both.take(order[rank < self.C])


def _sequence_blocks(data: TokenData, max_tokens: int | None, seed: int) -> list[np.ndarray]:
    """The sequences to scan (all, or a seeded sample of about max_tokens tokens), in stream order,
    cut into blocks of about BLOCK_TOKENS tokens."""
    ids = np.arange(data.num_sequences, dtype=np.int64)
    if max_tokens is not None and max_tokens < data.num_tokens:
        perm = np.random.default_rng(seed).permutation(data.num_sequences)
        n = int(np.searchsorted(np.cumsum(data.lengths(perm)), max_tokens)) + 1
        ids = np.sort(perm[:n])
    cum = np.cumsum(data.lengths(ids))
    cuts = np.flatnonzero(np.diff(cum // BLOCK_TOKENS)) + 1
    return np.split(ids, cuts)


def _scan(data: TokenData, blocks: list[np.ndarray], tally: Tally, progress: bool) -> None:
    bar = tqdm(total=int(sum(data.lengths(b).sum() for b in blocks)), unit="tok", unit_scale=True, desc="atoms",
               disable=not progress)
    for seq_ids in blocks:
        w = data.read_window(seq_ids, max_gap=0)  # only these sequences, one slice per run of them
        run_len = w.run_tok_ends - w.run_tok_starts
        positions = np.repeat(w.run_tok_starts - w.run_row_starts, run_len) + np.arange(len(w.tokens))
        tally.add(w.tokens, positions, w.indptr, w.indices, w.values)
        bar.update(len(w.tokens))
    bar.close()


# --------------------------------------------------------------------------- what the page shows


def nearest_atoms(D: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per atom, the n others of highest cosine similarity (best first), and those similarities."""
    Dn = D / np.maximum(np.linalg.norm(D, axis=0, keepdims=True), 1e-12)
    K = Dn.shape[1]
    n = min(n, K - 1)
    idx, sim = np.zeros((K, n), np.int64), np.zeros((K, n), np.float32)
    for r0 in range(0, K, NEIGHBOUR_ROWS):
        G = Dn[:, r0:r0 + NEIGHBOUR_ROWS].T @ Dn  # (rows, K)
        G[np.arange(len(G)), np.arange(r0, r0 + len(G))] = -np.inf
        part = np.argpartition(-G, n - 1, axis=1)[:, :n] if n else np.zeros((len(G), 0), np.int64)
        vals = np.take_along_axis(G, part, 1)
        order = np.lexsort((part, -vals), axis=1) if n else part
        idx[r0:r0 + len(G)] = np.take_along_axis(part, order, 1)
        sim[r0:r0 + len(G)] = np.take_along_axis(vals, order, 1)
    return idx, sim


def _context_texts(data: TokenData, tok, occ: _Occurrences, window: int) -> list[tuple[str, str, str]]:
    """(left, firing token, right) of each occurrence, detokenized within its sequence."""
    if not len(occ.pos):
        return []
    seq = np.searchsorted(data.seq_offsets, occ.pos, side="right") - 1
    w = data.read_window(np.unique(seq), max_gap=0, with_codes=False)
    lo = np.maximum(np.asarray(data.seq_offsets[seq]), occ.pos - window)
    hi = np.minimum(np.asarray(data.seq_offsets[seq + 1]), occ.pos + window + 1)
    row_lo, row_hit, row_hi = w.rows_of(lo), w.rows_of(occ.pos), w.rows_of(hi - 1) + 1
    lefts = [w.tokens[a:b].tolist() for a, b in zip(row_lo, row_hit, strict=True)]
    hits = [[int(t)] for t in w.tokens[row_hit]]
    rights = [w.tokens[a + 1:b].tolist() for a, b in zip(row_hit, row_hi, strict=True)]
    pre = tok.decode_batch(lefts, skip_special_tokens=True)
    with_hit = tok.decode_batch([a + b for a, b in zip(lefts, hits, strict=True)], skip_special_tokens=True)
    full = tok.decode_batch([a + b + c for a, b, c in zip(lefts, hits, rights, strict=True)],
                            skip_special_tokens=True)
    right_alone = None
    out = []
    for i, (p, ph, f) in enumerate(zip(pre, with_hit, full, strict=True)):
        if ph.startswith(p) and f.startswith(ph) and len(ph) > len(p):
            h, r = ph[len(p):], f[len(ph):]
            lead = len(h) - len(h.lstrip())
            out.append((p + h[:lead], h[lead:], r))
        else:  # the decoder joined the token with its neighbours differently: show the pieces
            if right_alone is None:
                right_alone = tok.decode_batch(rights, skip_special_tokens=True)
            piece = tok.id_to_token(hits[i][0]) or ""
            out.append((p + " ", piece, " " + right_alone[i]))
    return out


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def atom_report(cfg: AtomsConfig) -> dict:
    """Count, write the page and its JSON twin; returns the JSON's content."""
    cfg.validate()
    t0 = time.time()
    folder = cfg.codes
    codes_path = _fail_if_missing(folder)
    check_codes_file(codes_path)  # its manifest, and the dictionary next to it, are of the same run
    with TokenData(codes_path) as data:
        if not data.has_codes:
            raise MLSMError(f"{codes_path} holds no codes (/codes): it is a token stream. Point --codes at a "
                            "`mlsm sparse-code` folder.")
        K, attrs = data.K, data.attrs
        extract_man = _check_extract(codes_path, attrs, cfg.extract_dir) if cfg.extract_dir is not None else None
        dict_path = folder / DICTIONARY
        if not dict_path.is_file():
            raise MLSMError(f"{dict_path} not found: the nearest atoms need the dictionary the codes were made with. "
                            f"Restore it, or rebuild the folder with `mlsm sparse-code --out {folder} --force`.")
        D = check_dictionary(dict_path, K=K, fingerprint=attrs.get("dictionary_fingerprint"))
        tok = _tokenizer(folder, cfg.extract_dir, codes_path, attrs)
        V = tok.get_vocab_size(with_added_tokens=True)
        if data.max_token_id >= V:
            raise MLSMError(f"{codes_path} has token id {data.max_token_id}, beyond the {V} of its tokenizer: the "
                            "file and its tokenizer folder do not belong together. Rebuild the folder.")
        special = np.zeros(V, bool)
        ids = hf.special_token_ids(tok)
        special[[ids[k] for k in ("cls", "sep", "pad", "mask")]] = True

        tally = Tally(K, V, cfg.contexts, special)
        _scan(data, _sequence_blocks(data, cfg.max_tokens, cfg.seed), tally, cfg.progress)
        t_scan = time.time() - t0
        occ = tally.contexts()
        texts = _context_texts(data, tok, occ, cfg.window)
        total_tokens, total_sequences = data.num_tokens, data.num_sequences

    pair_atom, pair_type, pair_count, pair_wsum = tally.pairs()
    uses, types, top_type = atom_type_profile(pair_atom, pair_count, K)
    lexical = lexical_atoms(uses, top_type)
    few = few_type_atoms(uses, types, cfg.few) & ~lexical
    dead = uses == 0
    cls = np.where(lexical, 0, np.where(few, 1, np.where(dead, 3, 2)))
    mass_total = float(tally.mass.sum()) or 1.0
    n_tok = max(tally.tokens, 1)

    by_count = top_per_group(pair_atom, pair_count.astype(np.float64), cfg.top_tokens, pair_type)
    mean = pair_wsum / np.maximum(pair_count, 1)
    eligible = np.flatnonzero(pair_count >= cfg.min_count)
    by_mean = eligible[top_per_group(pair_atom[eligible], mean[eligible], cfg.top_tokens, pair_type[eligible])]
    per_type = top_per_group(pair_type, pair_count.astype(np.float64), cfg.token_atoms, pair_atom)
    near_idx, near_sim = nearest_atoms(D, cfg.neighbours)

    atoms = [{"id": a, "class": CLASSES[int(cls[a])], "usage": _sig(uses[a] / n_tok),
              "mass": _sig(tally.mass[a] / mass_total), "n": int(uses[a]), "types": int(types[a]),
              "by_count": [], "by_mean": [], "contexts": [],
              "near": [[int(j), _sig(float(s), 3)] for j, s in zip(near_idx[a], near_sim[a], strict=True)]}
             for a in range(K)]
    for i in by_count.tolist():
        atoms[pair_atom[i]]["by_count"].append([int(pair_type[i]), int(pair_count[i])])
    for i in by_mean.tolist():
        atoms[pair_atom[i]]["by_mean"].append([int(pair_type[i]), _sig(mean[i]), int(pair_count[i])])
    for a, w, (left, hit, right) in zip(occ.atom.tolist(), occ.weight.tolist(), texts, strict=True):
        atoms[a]["contexts"].append([left, hit, right, _sig(w)])
    tokens: dict[str, list] = {}
    for i in per_type.tolist():
        t = int(pair_type[i])
        tokens.setdefault(str(t), [int(tally.type_counts[t]), []])[1].append([int(pair_atom[i]), int(pair_count[i])])
    shown = {t for a in atoms for t, *_ in a["by_count"] + a["by_mean"]} | {int(t) for t in tokens}
    vocab = {str(t): tok.id_to_token(t) for t in sorted(shown)}

    summary = {k: None if isinstance(v, float) and np.isnan(v) else v  # JSON has no NaN (no atom used)
               for k, v in summarize_atoms(uses, types, top_type, cfg.few).items()}
    classes = []
    for c, name in enumerate(CLASSES):
        m = cls == c
        classes.append({"class": name, "atoms": int(m.sum()),
                        "used_share": float(m.sum() / max(summary["atoms_used"], 1)) if name != "dead" else None,
                        "usage_share": float(uses[m].sum() / max(uses.sum(), 1)),
                        "mass_share": float(tally.mass[m].sum() / mass_total)})
    report = {
        "format": FORMAT,
        "meta": {"codes": str(folder), "extract_dir": None if cfg.extract_dir is None else str(cfg.extract_dir),
                 "aux": _aux_of(folder, extract_man), "K": K, "layer": attrs.get("layer"),
                 "lambda": attrs.get("lambda"), "solver": attrs.get("solver"), "tolerance": attrs.get("tolerance"),
                 "tokens_in_file": total_tokens, "sequences_in_file": total_sequences,
                 "tokens_counted": tally.tokens, "empty_code_share": tally.empty / n_tok,
                 "nnz_per_token": float(uses.sum() / n_tok), "token_types": int((tally.type_counts > 0).sum()),
                 "params": {k: getattr(cfg, k) for k in ("top_tokens", "min_count", "contexts", "window", "neighbours",
                                                        "token_atoms", "few", "max_tokens", "seed")},
                 "mlsm_version": __version__},
        "summary": {"layer_report": summary, "classes": classes},
        "vocab": vocab,
        "atoms": atoms,
        "tokens": tokens,
    }
    _write(cfg.out, report)
    log.info("atoms: %d atoms over %d tokens (scan %.1f s, all %.1f s) -> %s and %s", K, tally.tokens, t_scan,
             time.time() - t0, cfg.out, cfg.out.with_suffix(".json"))
    return report


def _write(out: Path, report: dict) -> None:
    from mlsm.pipeline.atoms_page import render_page

    text = json.dumps(report, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    page = render_page(text, title=f"LSP explorer: {report['meta']['codes']}")
    for path, content in ((out.with_suffix(".json"), text + "\n"), (out, page)):
        with atomic_path(path) as tmp:
            tmp.write_text(content, encoding="utf-8")
