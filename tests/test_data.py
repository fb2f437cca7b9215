"""codes.h5 → masked batches: masking statistics, CSR targets, resumable order."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mlsm.core.errors import MLSMError
from mlsm.core.ranks import Rank
from mlsm.pipeline.codes import TokenData
from mlsm.trainer.data import BatchIterator, Masking, codes_to_distributions, csr_take, get_batch, mask_tokens

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
PAD, UNK, CLS, SEP, MASK = range(5)
VOCAB = 50
K = 20


def make_tokenizer_dir(folder: Path, words: list[str] | None = None) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = words if words is not None else [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def token_code(v: int) -> dict[int, float]:
    """Words come in 5 topics of 9; a word's code lives in its topic's block of 4 atoms.

    So the context (any neighbour shows the topic) predicts most of a masked word's target. Some
    words have an empty code, some only explicit zeros; both mean "no target".
    """
    w = v - len(SPECIALS)
    if w < 0:
        return {v % K: 1.0}  # special tokens are never masked; their codes must never be read
    if w % 9 == 0:
        return {}
    if w % 9 == 4:
        return {(3 * w) % K: 0.0}
    c = w // 9
    return {4 * c + w % 4: 1.0, 4 * c + (w + 1) % 4: 0.5}


def make_dataset(folder: Path, *, n_seq: int = 200, max_len: int = 16, codes: bool = True, seed: int = 0) -> Path:
    """Sequences [CLS] w ... w [SEP] whose words all come from one topic (see token_code)."""
    from mlsm.core.hf import load_tokenizer, tokenizer_fingerprint

    rng = np.random.default_rng(seed)
    tok_dir = make_tokenizer_dir(folder / "tokenizer")
    seqs = []
    for _ in range(n_seq):
        n, topic = int(rng.integers(2, max_len - 1)), int(rng.integers(5))
        words = rng.integers(9, size=n) + 9 * topic + len(SPECIALS)
        seqs.append([CLS, *words.tolist(), SEP])
    tokens = np.concatenate(seqs).astype(np.int32)
    offsets = np.r_[0, np.cumsum([len(s) for s in seqs])].astype(np.int64)
    path = folder / ("codes.h5" if codes else "tokens.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=tokens, chunks=(64,))
        f.create_dataset("seq_offsets", data=offsets)
        f.attrs["tokenizer_fingerprint"] = tokenizer_fingerprint(load_tokenizer(tok_dir))
        f.attrs["max_len"] = max_len
        if codes:
            rows = [token_code(int(v)) for v in tokens]
            indptr = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
            g = f.create_group("codes")
            g.create_dataset("indptr", data=indptr, chunks=(64,))
            g.create_dataset("indices", data=np.array([k for r in rows for k in r], np.uint16), chunks=(64,))
            g.create_dataset("values", data=np.array([x for r in rows for x in r.values()], np.float16), chunks=(64,))
            f.attrs.update(K=K, layer=3, **{"lambda": 0.05})
    return path


@pytest.fixture(scope="module")
def codes_h5(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("codes"))


def _iterator(data: TokenData, batch_size: int = 16, **kw) -> BatchIterator:
    masking = Masking(kw.pop("mask_prob", 0.15), kw.pop("mask_policy", "mask"), MASK, VOCAB, (CLS, SEP, PAD, MASK))
    if "world_size" in kw:
        kw["rank"] = Rank(kw.pop("rank", 0), kw.pop("world_size"))
    args = dict(seed=0, masking=masking, block_size=8, shuffle_window=32)
    args.update(kw)
    return BatchIterator(data, batch_size, **args)


def _file_target(f: h5py.File, g: int) -> dict[int, float]:
    ip = f["codes/indptr"]
    lo, hi = int(ip[g]), int(ip[g + 1])
    vals = f["codes/values"][lo:hi].astype(np.float64)
    idx = f["codes/indices"][lo:hi].astype(int)
    s = vals.sum()
    return {} if s == 0 else {int(i): v / s for i, v in zip(idx, vals, strict=True) if v > 0}


def _batch_targets(ip, ix, val) -> list[dict[int, float]]:
    return [dict(zip(ix[ip[r] : ip[r + 1]].tolist(), val[ip[r] : ip[r + 1]].tolist(), strict=True)) for r in range(len(ip) - 1)]


# --------------------------------------------------------------------------- CSR


def test_csr_take_and_normalise():
    indptr = np.array([0, 2, 2, 3, 5])
    indices = np.array([1, 3, 0, 2, 4])
    values = np.array([1.0, 3.0, 0.0, 2.0, 2.0])
    ip, ix, v = csr_take(indptr, indices, values, np.array([3, 1, 0, 2]))
    assert ip.tolist() == [0, 2, 2, 4, 5] and ix.tolist() == [2, 4, 1, 3, 0]
    ip, ix, v = codes_to_distributions(ip, ix, v)
    # row 3 (only a zero entry) becomes empty; the others sum to 1
    assert ip.tolist() == [0, 2, 2, 4, 4] and ix.tolist() == [2, 4, 1, 3]
    np.testing.assert_allclose(v, [0.5, 0.5, 0.25, 0.75])


def test_batch_targets_match_file_rows(codes_h5):
    gen = torch.Generator().manual_seed(3)
    with TokenData(codes_h5) as data, h5py.File(codes_h5) as f:
        assert data.has_codes and data.K == K and data.num_sequences == 200
        seq_ids = np.array([17, 3, 4, 5, 150, 99, 100])
        b = get_batch(data, seq_ids)
        special = torch.isin(b.input_ids, torch.tensor([CLS, SEP, PAD]))
        ids, mi = mask_tokens(b.input_ids, b.attention_mask, special, Masking(0.3, "mask", MASK, VOCAB), gen)
        ip, ix, val = b.targets(mi)
        got = _batch_targets(ip.numpy(), ix.numpy(), val.numpy())
        T = b.input_ids.shape[1]
        expected = []
        for flat in mi.tolist():
            s, t = divmod(flat, T)
            g = int(data.seq_offsets[seq_ids[s]]) + t
            assert int(f["tokens"][g]) == int(b.input_ids[s, t])
            expected.append(_file_target(f, g))
        assert len(got) == len(expected) > 5
        assert any(not e for e in expected), "the fixture should mask some tokens without a target"
        for a, e in zip(got, expected, strict=True):
            assert a.keys() == e.keys()
            for k in a:
                assert a[k] == pytest.approx(e[k], rel=1e-6)


@pytest.mark.parametrize("kw", [dict(micro_batches=2), dict(rank=1, world_size=2)])
def test_iterator_targets_match_file_rows(codes_h5, kw):
    """The window cache path (what training uses) gives the same rows as the file."""
    with TokenData(codes_h5) as data, h5py.File(codes_h5) as f:
        it = _iterator(data, **kw)
        for _ in range(7):  # crosses several windows and an epoch boundary
            for m in next(it):
                T = m["input_ids"].shape[1]
                got = _batch_targets(m["target_indptr"].numpy(), m["target_indices"].numpy(), m["target_values"].numpy())
                assert len(got) == m["n_masked"] == len(m["mlm_labels"])
                for flat, tgt, label in zip(m["masked_index"].tolist(), got, m["mlm_labels"].tolist(), strict=True):
                    s, t = divmod(flat, T)
                    g = int(data.seq_offsets[m["seq_ids"][s]]) + t
                    assert int(f["tokens"][g]) == label
                    e = _file_target(f, g)
                    assert tgt.keys() == e.keys() and all(tgt[k] == pytest.approx(e[k], rel=1e-6) for k in e)


def test_tokens_only_file(tmp_path):
    path = make_dataset(tmp_path, n_seq=20, codes=False)
    with TokenData(path) as data:
        assert not data.has_codes and data.K is None
        with pytest.raises(MLSMError, match="sparse-code"):
            _iterator(data, batch_size=4)
        micro = next(_iterator(data, batch_size=4, with_targets=False))
        assert "target_indptr" not in micro[0]


def test_bad_file_raises(tmp_path):
    with pytest.raises(MLSMError, match="does not exist"):
        TokenData(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(MLSMError, match="HDF5"):
        TokenData(tmp_path / "junk.h5")


# --------------------------------------------------------------------------- masking


def _random_batch(B=2000, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, T + 1, (B,), generator=g)
    attn = (torch.arange(T)[None, :] < lens[:, None]).long()
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(B), lens - 1] = SEP
    ids[attn == 0] = PAD
    special = torch.isin(ids, torch.tensor([CLS, SEP, PAD]))
    return ids, attn, special


def test_mask_rate_and_specials():
    ids, attn, special = _random_batch()
    out, mi = mask_tokens(ids, attn, special, Masking(0.15, "mask", MASK, VOCAB), torch.Generator().manual_seed(1))
    sel = torch.zeros(ids.numel(), dtype=torch.bool)
    sel[mi] = True
    sel = sel.view(ids.shape)
    cand = attn.bool() & ~special
    assert torch.all(mi[1:] > mi[:-1]), "masked_index must be sorted and unique"
    assert not (sel & ~cand).any(), "special or padding positions were masked"
    assert torch.all(sel.sum(1)[cand.sum(1) > 0] >= 1), "every sequence with candidates gets a mask"
    rate = sel.sum().item() / cand.sum().item()
    assert 0.14 < rate < 0.165, rate
    assert torch.all(out[sel] == MASK) and torch.equal(out[~sel], ids[~sel])


def test_mask_policy_bert_proportions():
    ids, attn, special = _random_batch(seed=2)
    specials = [CLS, SEP, PAD, MASK]
    out, mi = mask_tokens(ids, attn, special, Masking(0.15, "bert", MASK, VOCAB, tuple(specials)), torch.Generator().manual_seed(5))
    orig, new = ids.reshape(-1)[mi], out.reshape(-1)[mi]
    n = len(mi)
    frac_mask = (new == MASK).sum().item() / n
    frac_same = (new == orig).sum().item() / n
    frac_rand = 1 - frac_mask - frac_same
    # a random replacement (46 non-special ids) equals the original 1/46 of the time
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1 - 0.1 / 46) < 0.015 and abs(frac_rand - 0.1) < 0.015
    replaced = new[(new != MASK) & (new != orig)]
    assert not torch.isin(replaced, torch.tensor(specials)).any()
    unsel = torch.ones(ids.numel(), dtype=torch.bool)
    unsel[mi] = False
    assert torch.equal(out.reshape(-1)[unsel], ids.reshape(-1)[unsel])


def test_mask_deterministic_for_seed():
    ids, attn, special = _random_batch(B=50)
    a = mask_tokens(ids, attn, special, Masking(0.15, "bert", MASK, VOCAB), torch.Generator().manual_seed(7))
    b = mask_tokens(ids, attn, special, Masking(0.15, "bert", MASK, VOCAB), torch.Generator().manual_seed(7))
    c = mask_tokens(ids, attn, special, Masking(0.15, "bert", MASK, VOCAB), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def _masks_by_seq(it: BatchIterator, steps: int) -> dict[int, list[int]]:
    out = {}
    for _ in range(steps):
        for m in next(it):
            T = m["input_ids"].shape[1]
            for r, s in enumerate(m["seq_ids"].tolist()):
                lo, hi = r * T, (r + 1) * T
                out[s] = [i - lo for i in m["masked_index"].tolist() if lo <= i < hi]
    return out


def test_masks_fresh_each_epoch_and_order_covers_epoch(codes_h5):
    with TokenData(codes_h5) as data:
        it = _iterator(data)
        per_epoch = it.batches_per_epoch
        assert per_epoch == 200 // 16
        seen = [s for _ in range(per_epoch) for m in next(it) for s in m["seq_ids"].tolist()]
        assert len(seen) == len(set(seen)) == per_epoch * 16 and it.epoch == 1 and it.batch == 0
        assert seen != sorted(seen), "the epoch order should be shuffled"
        it0 = _iterator(data)
        e0 = _masks_by_seq(it0, per_epoch)
        e1 = _masks_by_seq(it0, per_epoch)
        common = sorted(set(e0) & set(e1))
        assert len(common) > 100
        assert sum(e0[s] != e1[s] for s in common) > 0.8 * len(common), "masks must change between epochs"
        assert list(e0) != list(e1), "the sequence order must change between epochs"


def test_iterator_resume_and_micro_batch_invariance(codes_h5):
    with TokenData(codes_h5) as data:
        a = _iterator(data)
        for _ in range(9):
            next(a)
        state = a.state_dict()
        expected = [next(a) for _ in range(6)]  # crosses into epoch 1
        b = _iterator(data)
        b.load_state_dict(state)
        for want, got in zip(expected, (next(b) for _ in range(6)), strict=True):
            for x, y in zip(want, got, strict=True):
                assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["masked_index"], y["masked_index"])
                assert torch.equal(x["target_values"], y["target_values"])
        with pytest.raises(MLSMError, match="seed"):
            _iterator(data, seed=1).load_state_dict(state)

        # grad_accum must not change what is masked: the same sequences, the same masked tokens
        one, two = next(_iterator(data)), next(_iterator(data, micro_batches=2))
        assert len(two) == 2
        flat = lambda ms: sorted(
            (s, tuple(ids[ids != PAD].tolist()))
            for m in ms for s, ids in zip(m["seq_ids"].tolist(), m["input_ids"], strict=True)
        )
        assert flat(one) == flat(two)
        assert sum(m["n_targets"] for m in two) == one[0]["n_targets"]


def test_rank_slices_partition_the_global_batch(codes_h5):
    with TokenData(codes_h5) as data:
        full = next(_iterator(data))[0]["seq_ids"].tolist()
        parts = [next(_iterator(data, rank=r, world_size=2))[0]["seq_ids"].tolist() for r in range(2)]
        assert sorted(parts[0] + parts[1]) == sorted(full) and not set(parts[0]) & set(parts[1])

        # Masks and targets do not depend on the split: two ranks x two micro-batches see exactly
        # what one process sees, sequence by sequence, over several windows and an epoch boundary.
        def by_seq(batches):
            out = {}
            for m in batches:
                ip, vals = m["target_indptr"], m["target_values"]
                T = m["input_ids"].shape[1]
                for row, s in enumerate(m["seq_ids"].tolist()):
                    ids = m["input_ids"][row]
                    pos = [int(i) - row * T for i in m["masked_index"] if row * T <= i < (row + 1) * T]
                    first = sum(1 for i in m["masked_index"] if i < row * T)
                    tv = vals[ip[first] : ip[first + len(pos)]].tolist()
                    out[s] = (tuple(ids[ids != PAD].tolist()), tuple(pos), tuple(tv))
            return out

        one, split = _iterator(data), [_iterator(data, rank=r, world_size=2, micro_batches=2) for r in range(2)]
        for _ in range(15):
            want = by_seq(next(one))
            got = {**by_seq(next(split[0])), **by_seq(next(split[1]))}
            assert got == want
        with pytest.raises(MLSMError, match="divisible"):
            _iterator(data, batch_size=15, micro_batches=2)


def test_prefetcher_is_transparent(codes_h5):
    from mlsm.trainer.data import Prefetcher

    with TokenData(codes_h5) as data:
        plain = _iterator(data)
        want = [(next(plain)[0]["input_ids"], plain.state_dict()) for _ in range(5)]
        pre = Prefetcher(_iterator(data), depth=3)
        try:
            for ids, state in want:
                assert torch.equal(next(pre)[0]["input_ids"], ids)
                assert pre.state_dict() == state, "the position must be that of the consumed batch"
        finally:
            pre.close()

        class Broken(BatchIterator):
            def __next__(self):
                raise RuntimeError("disk on fire")

        pre = Prefetcher(Broken(data, 16, seed=0, masking=Masking(0.15, "mask", MASK, VOCAB, (CLS, SEP, PAD, MASK))))
        with pytest.raises(RuntimeError, match="disk on fire"):
            next(pre)
        pre.close()
