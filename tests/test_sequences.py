import numpy as np
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from mlsm.pipeline.sequences import limit_tokens, pack_documents

WORDS = [f"w{i}" for i in range(50)]


def _tok():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({w: i + 5 for i, w in enumerate(WORDS)})
    t = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = Whitespace()
    return t


def _line(n, start=0):
    return " ".join(WORDS[(start + i) % 50] for i in range(n))


def test_packs_consecutive_lines_without_crossing_documents():
    docs = [[_line(3), _line(3, 3), _line(3, 6)], [_line(2)]]
    seqs = list(pack_documents(docs, _tok(), max_len=10, cls_id=2, sep_id=3))
    # 8 content tokens fit: the first two lines share a sequence, the third starts a new one.
    assert [len(s) for s in seqs] == [8, 5, 4]
    assert all(s[0] == 2 and s[-1] == 3 for s in seqs)
    assert seqs[2].tolist() == [2, 5, 6, 3]  # the second document starts fresh


def test_long_lines_are_split_into_full_sequences():
    seqs = list(pack_documents([[_line(25)]], _tok(), max_len=10, cls_id=2, sep_id=3))
    assert [len(s) for s in seqs] == [10, 10, 10, 3]
    content = np.concatenate([s[1:-1] for s in seqs])
    assert content.tolist() == [5 + (i % 50) for i in range(25)]


def test_packing_is_independent_of_batching():
    docs = [[_line(i % 7 + 1, i) for i in range(j, j + 5)] for j in range(40)]
    a = list(pack_documents(docs, _tok(), 16, 2, 3, lines_per_batch=3))
    b = list(pack_documents(docs, _tok(), 16, 2, 3, lines_per_batch=10_000))
    assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b, strict=True))


def test_limit_tokens_stops_before_the_budget():
    seqs = [np.zeros(n, np.int32) for n in (5, 5, 5)]
    assert [len(s) for s in limit_tokens(seqs, 12)] == [5, 5]
    assert len(list(limit_tokens(seqs, None))) == 3


def test_shard_cuts_depend_only_on_the_stream():
    from mlsm.pipeline.extract import cut_shards

    rng = np.random.default_rng(0)
    seqs = [np.zeros(n, np.int32) for n in rng.integers(3, 40, 200)]
    shards = list(cut_shards(iter(seqs), 250))
    assert [i for i, _, _ in shards] == list(range(len(shards)))
    assert sum(len(s) for _, _, b in shards for s in b) == sum(len(s) for s in seqs)
    firsts = np.cumsum([0] + [len(b) for _, _, b in shards])[:-1]
    assert [f for _, f, _ in shards] == list(firsts)
    for _, _, b in shards[:-1]:
        n = sum(len(s) for s in b)
        assert n >= 250 and n - len(b[-1]) < 250  # closes at the first sequence reaching the budget
