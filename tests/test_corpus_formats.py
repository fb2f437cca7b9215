"""Corpus input as Parquet and as Hugging Face `datasets` (pipeline.corpus_arrow through pipeline.corpus):
the same documents as .txt / .jsonl give the same documents and the same tokens.h5, Parquet is read a
batch at a time, the fingerprint follows the content and --text-field, and bad input is an `error:`
before anything is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsm.core.errors import MLSMError
from mlsm.core.manifest import files_fingerprint
from mlsm.pipeline import corpus_arrow
from mlsm.pipeline.corpus import CorpusStats, corpus_fingerprint, iter_documents, require_nonempty, resolve_corpus
from tests.fault_kit import SENTENCES, assert_h5_equal, assert_parquet_equal, cli, make_tiny_aux


def make_docs(n: int = 30, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[SENTENCES[i] for i in rng.permutation(len(SENTENCES))[: 1 + k % 5]] for k in range(n)]


def write_txt(path: Path, docs) -> Path:
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n")
    return path


def write_jsonl(path: Path, rows: list[str | None], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: r}) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows, row_group_size: int | None = None, **extra_columns) -> Path:
    table = pa.table({"text": pa.array(rows, pa.string()), **extra_columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_dataset(folder: Path, rows, **extra_columns) -> Path:
    datasets.Dataset.from_dict({"text": rows, **extra_columns},
                               features=None if extra_columns else datasets.Features(text=datasets.Value("string"))
                               ).save_to_disk(str(folder))
    return folder


def rows_of(docs) -> list[str]:
    """One row per document, its lines joined by newlines (as a jsonl record's text)."""
    return ["\n".join(d) for d in docs]


def tokenize(corpus, out, *extra) -> int:
    return cli(["tokenize", "--corpus", corpus, "--out", out, "--no-progress", *extra])


# ---------------------------------------------------------------------------------------------
# the same documents in every format


def test_every_format_gives_the_same_documents_and_tokens(tmp_path):
    docs = make_docs()
    rows = rows_of(docs)
    # Rows may hold newlines: \r\n and a blank line inside a row split it into two documents, as in jsonl,
    # and a null row is skipped.
    parquet_rows = [*rows[:3], rows[3] + "\r\n\r\n" + rows[4], None, *rows[5:]]
    corpora = {
        "txt": write_txt(tmp_path / "c.txt", docs),
        "jsonl": write_jsonl(tmp_path / "c.jsonl", rows),
        "parquet": write_parquet(tmp_path / "c.parquet", parquet_rows, row_group_size=4),
        "datasets": write_dataset(tmp_path / "ds", parquet_rows),
    }
    corpora["arrow"] = next(corpora["datasets"].glob("*.arrow"))  # a bare .arrow file of the same rows
    for name, path in corpora.items():
        stats = CorpusStats()
        assert list(iter_documents(resolve_corpus(path), stats)) == docs, name
        assert stats.documents == len(docs) and stats.lines == sum(map(len, docs)), name
        assert stats.null_records == (1 if name in ("parquet", "datasets", "arrow") else 0), name
    for name, path in corpora.items():
        assert tokenize(path, tmp_path / f"tok-{name}") == 0, name
    for name in ("jsonl", "parquet", "datasets", "arrow"):
        assert_h5_equal(tmp_path / f"tok-{name}" / "tokens.h5", tmp_path / "tok-txt" / "tokens.h5")
    man = json.loads((tmp_path / "tok-parquet" / "manifest.json").read_text())
    assert man["text_field"] == "text" and man["corpus_stats"]["null_records"] == 1
    assert "text_field" not in json.loads((tmp_path / "tok-txt" / "manifest.json").read_text())


def test_text_field_picks_the_column_or_jsonl_field(tmp_path):
    docs = make_docs(8)
    other = make_docs(8, seed=1)
    pq_path = write_parquet(tmp_path / "c.parquet", rows_of(docs), body=pa.array(rows_of(other)))
    ds_path = write_dataset(tmp_path / "ds", rows_of(docs), body=rows_of(other))
    js_path = write_jsonl(tmp_path / "c.jsonl", rows_of(other), field="body")
    for path in (pq_path, ds_path, js_path):
        assert list(iter_documents(resolve_corpus(path, "body"), text_field="body")) == other, path
    assert list(iter_documents(resolve_corpus(pq_path))) == docs


def test_a_folder_holds_datasets_folders_as_single_entries(tmp_path):
    docs = make_docs(6)
    write_txt(tmp_path / "a.txt", docs[:2])
    write_dataset(tmp_path / "b-ds", rows_of(docs[2:4]))
    write_parquet(tmp_path / "c.parquet", rows_of(docs[4:]))
    got = resolve_corpus(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["a.txt", "b-ds", "c.parquet"]
    assert list(iter_documents(got)) == docs


def test_a_dataset_dict_with_one_split_is_that_split_and_with_several_an_error(tmp_path, capsys):
    rows = rows_of(make_docs(4))
    one = tmp_path / "one"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": rows})).save_to_disk(str(one))
    assert resolve_corpus(one) == [one / "train"]
    two = tmp_path / "two"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": rows}),
                         test=datasets.Dataset.from_dict({"text": rows[:1]})).save_to_disk(str(two))
    assert tokenize(two, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "error: " in err and str(two) in err and "train" in err and "test" in err and "--corpus" in err
    assert not (tmp_path / "out").exists()
    assert tokenize(two / "test", tmp_path / "out") == 0  # one split's folder is a corpus


# ---------------------------------------------------------------------------------------------
# batches


def test_parquet_is_read_in_batches_in_row_order(tmp_path, monkeypatch):
    rows = [f"document number {i}." for i in range(70)]
    path = write_parquet(tmp_path / "c.parquet", rows, row_group_size=7)
    assert pq.ParquetFile(path).num_row_groups == 10
    batches = list(corpus_arrow.parquet_texts(path, "text", batch_rows=3))
    assert max(len(b) for b in batches) == 3 and len(batches) >= 70 // 3
    assert [x for b in batches for x in b.to_pylist()] == rows
    monkeypatch.setattr(corpus_arrow, "BATCH_ROWS", 3)
    assert [d[0] for d in iter_documents([path])] == rows


def test_parquet_memory_follows_the_batch_not_the_file(tmp_path):
    """A ~34 MB text column in one row group: Arrow's allocations while it is read stay a few MB (a
    pre-buffered or unbuffered read holds the whole compressed column chunk, ~11 MB, and fails)."""
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    rows = [" ".join(rng.choice(words, 300)) for _ in range(20000)]  # ~1.7 KB each
    path = write_parquet(tmp_path / "big.parquet", rows)  # one row group, the writer's default
    column_bytes = sum(len(r) for r in rows)
    before = pa.total_allocated_bytes()
    peak = 0
    n = 0
    for batch in corpus_arrow.parquet_texts(path, "text", batch_rows=256):
        n += len(batch)
        peak = max(peak, pa.total_allocated_bytes() - before)
    assert n == len(rows)
    assert peak < column_bytes / 4, (peak, column_bytes)


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_follows_parquet_content_and_text_field(tmp_path):
    rows = rows_of(make_docs(5))
    path = write_parquet(tmp_path / "c.parquet", rows, body=pa.array(rows))
    fp = corpus_fingerprint([path])
    assert corpus_fingerprint([path], "text") == fp
    assert corpus_fingerprint([path], "body") != fp
    write_parquet(path, rows[:-1] + ["another text"], body=pa.array(rows))
    assert corpus_fingerprint([path]) != fp
    # a datasets folder: every file in it counts
    ds = write_dataset(tmp_path / "ds", rows)
    fp_ds = corpus_fingerprint([ds])
    write_dataset(ds, rows + ["one more row, one more document."])
    assert corpus_fingerprint([ds]) != fp_ds
    # plain text has no field: its fingerprint is the one it had before text fields existed
    txt = write_txt(tmp_path / "c.txt", make_docs(3))
    assert corpus_fingerprint([txt], "body") == corpus_fingerprint([txt]) == files_fingerprint([txt])
    # jsonl read by its default "text" field keeps its old fingerprint too; another field changes it
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "one document."}\n{"text": "another one."}\n')
    assert corpus_fingerprint([jl]) == files_fingerprint([jl]) != corpus_fingerprint([jl], "body")


def test_a_resume_with_another_text_field_is_refused(tmp_path, capsys):
    rows = rows_of(make_docs(6))
    path = write_parquet(tmp_path / "c.parquet", rows, body=pa.array(rows[::-1]))
    out = tmp_path / "tok"
    assert tokenize(path, out) == 0
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert tokenize(path, out, "--text-field", "body") == 2
    err = capsys.readouterr().err
    assert "error: " in err and "inputs.corpus" in err and "--text-field" in err
    assert (out / "manifest.json").read_text() == before
    assert tokenize(path, out, "--text-field", "body", "--force") == 0
    assert json.loads((out / "manifest.json").read_text())["text_field"] == "body"


def test_extract_reads_parquet_and_records_the_text_field(tmp_path):
    aux = make_tiny_aux(tmp_path / "aux")
    docs = make_docs(10)
    txt = write_txt(tmp_path / "c.txt", docs)
    path = write_parquet(tmp_path / "c.parquet", ["x"] * len(docs), body=pa.array(rows_of(docs)))
    common = ["--aux", aux, "--layers", "1", "--max-len", "64", "--no-progress"]
    assert cli(["extract", "--corpus", path, "--text-field", "body", "--out", tmp_path / "ex-pq", *common]) == 0
    assert cli(["extract", "--corpus", txt, "--out", tmp_path / "ex-txt", *common]) == 0
    man = json.loads((tmp_path / "ex-pq" / "manifest.json").read_text())
    assert man["text_field"] == "body" and man["corpus_files"] == [str(path)]
    assert man["tokens"] == json.loads((tmp_path / "ex-txt" / "manifest.json").read_text())["tokens"]
    assert_parquet_equal(tmp_path / "ex-pq", tmp_path / "ex-txt")


# ---------------------------------------------------------------------------------------------
# nulls and bad input


def test_null_rows_are_skipped_and_counted_and_all_null_is_an_error(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", [None, "one line.", None])
    stats = CorpusStats()
    assert list(iter_documents([path], stats)) == [["one line."]]
    assert stats.null_records == 2 and stats.documents == 1 and stats.bytes == len("one line.")
    empty = write_parquet(tmp_path / "nulls.parquet", [None, None])
    stats = CorpusStats()
    assert list(iter_documents([empty], stats)) == []
    with pytest.raises(MLSMError, match="2 rows with a null 'text'"):
        require_nonempty(stats)


def _truncated_parquet(d: Path) -> Path:
    path = write_parquet(d / "cut.parquet", rows_of(make_docs(20)))
    path.write_bytes(path.read_bytes()[:-40])  # the footer is gone
    return path


def _truncated_arrow(d: Path) -> Path:
    folder = write_dataset(d / "cut-ds", rows_of(make_docs(20)))
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])
    return folder


@pytest.mark.parametrize(
    "make, extra, expect",
    [
        (lambda d: write_parquet(d / "c.parquet", ["a"], body=pa.array(["b"])), ["--text-field", "content"],
         ["c.parquet", "no column 'content'", "'text', 'body'"]),
        (lambda d: write_parquet(d / "c.parquet", ["a"], n=pa.array([1])), ["--text-field", "n"],
         ["c.parquet", "'n' holds int64, not strings"]),
        (_truncated_parquet, [], ["cut.parquet", "not a readable Parquet file", "truncated or corrupt"]),
        (lambda d: write_dataset(d / "ds", ["a"]), ["--text-field", "content"],
         ["ds", "no column 'content'", "'text'"]),
        (lambda d: write_dataset(d / "ds", ["a"], n=[1]), ["--text-field", "n"], ["ds", "'n' holds int64"]),
        (_truncated_arrow, [], ["cut-ds", "not a readable datasets folder"]),
    ],
    ids=["parquet-missing-field", "parquet-int-column", "parquet-truncated", "datasets-missing-field",
         "datasets-int-column", "datasets-truncated"],
)
def test_bad_input_is_an_error_naming_the_file_and_writes_nothing(tmp_path, capsys, make, extra, expect):
    corpus = make(tmp_path)
    for spec in (corpus, tmp_path):  # the file itself, or the folder holding it
        out = tmp_path / "out"
        assert tokenize(spec, out, *extra) == 2
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err, err
        for piece in expect:
            assert piece in err, (piece, err)
        assert not out.exists()


def test_datasets_not_installed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    folder = write_dataset(tmp_path / "ds", ["a line."])
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails as if uninstalled
    assert tokenize(folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "error: " in err and "pip install mlsm[datasets]" in err
    assert not (tmp_path / "out").exists()
    write_parquet(tmp_path / "c.parquet", ["a line."])  # Parquet needs only pyarrow
    assert tokenize(tmp_path / "c.parquet", tmp_path / "out") == 0
