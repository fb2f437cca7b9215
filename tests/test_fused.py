"""The scaled path: one tokenization, the fused forward + coding, and finalize over the parts.

Staged (tokenize -> extract --tokens -> sparse-code) and fused (tokenize -> sparse-code
--from-tokens) runs on a tiny random auxiliary model; every comparison reads the arrays back from
the files the CLI wrote.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.fault_kit import (
    REPO,
    assert_h5_equal,
    assert_parquet_equal,
    cli,
    leftovers,
    make_tiny_aux,
    write_corpus,
)
from tests.test_faults_pipeline import _in_process, _kill_chain

SEED = 11
FORWARD = ["--shard-tokens", "300", "--batch-tokens", "128"]
CODE = ["-k", "16", "--dict-samples", "600", "--heldout", "60", "--batch-size", "256", "--layer", "2", "--no-progress"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    aux = make_tiny_aux(root / "aux")
    corpus = write_corpus(root / "corpus.txt", docs=30)
    assert cli(["tokenize", "--corpus", corpus, "--tokenizer-from", aux, "--max-tokens", "1500",
                "--out", root / "tokens", "--no-progress"]) == 0
    extract = ["extract", "--aux", str(aux), "--layers", "1,2", *FORWARD, "--no-progress"]
    assert cli(extract + ["--corpus", corpus, "--max-tokens", "1500", "--out", root / "extract-corpus"]) == 0
    assert cli(extract + ["--tokens", root / "tokens", "--out", root / "extract"]) == 0
    assert cli(["sparse-code", *CODE, "--extract-dir", root / "extract", "--out", root / "staged"]) == 0
    fused = ["sparse-code", *CODE, "--from-tokens", str(root / "tokens"), "--aux", str(aux), *FORWARD]
    events = _in_process(fused + ["--out", str(root / "fused")])
    return dict(root=root, aux=aux, fused=fused, events=events)


def codes_arrays(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in ("tokens", "seq_offsets", "codes/indptr", "codes/indices", "codes/values")}


def assert_same_codes(a: Path, b: Path) -> None:
    ca, cb = codes_arrays(a), codes_arrays(b)
    for k in ca:
        assert ca[k].dtype == cb[k].dtype, k
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


def test_extract_from_the_token_stream_writes_the_shards_of_extract_from_the_corpus(kit):
    assert_parquet_equal(kit["root"] / "extract-corpus", kit["root"] / "extract")
    man = json.loads((kit["root"] / "extract" / "manifest.json").read_text())
    assert "tokens" in man["inputs"] and man["params"]["max_tokens"] == 1500


def test_fused_codes_are_the_staged_codes_bit_for_bit_given_the_same_dictionary(kit):
    out = kit["root"] / "fused-same-dict"
    assert cli(kit["fused"] + ["--dictionary", kit["root"] / "staged" / "dictionary.h5", "--out", out]) == 0
    assert_same_codes(out / "codes.h5", kit["root"] / "staged" / "codes.h5")
    assert not list(out.rglob("*.parquet"))  # no hidden states were written
    with h5py.File(out / "codes.h5") as f, h5py.File(kit["root"] / "staged" / "codes.h5") as g:
        assert f.attrs["dictionary_fingerprint"] == g.attrs["dictionary_fingerprint"]


def test_both_paths_sample_the_same_sequences_for_the_dictionary(kit):
    # Same rule, same sequences: the fused forward and the staged shards differ only in batch
    # composition, so the two dictionaries' held-out objectives agree closely.
    read = lambda p: json.loads((p / "manifest.json").read_text())["dictionary"]  # noqa: E731
    staged, fused = read(kit["root"] / "staged"), read(kit["root"] / "fused")
    assert staged["heldout_objective"] == pytest.approx(fused["heldout_objective"], rel=0.02)


def test_dictionary_sample_is_uniform_over_tokens_a_few_per_sequence():
    from mlsm.pipeline.sparse_code import dictionary_sample

    lengths = np.random.default_rng(0).integers(3, 129, size=50_000)
    offs = np.r_[0, np.cumsum(lengths)]
    seq_of = lambda rows: np.searchsorted(offs, rows, side="right") - 1  # noqa: E731
    held, train = dictionary_sample(lengths, n_train=20_000, n_held=3_000, seed=1)
    assert len(held) == 3_000 and len(train) == 20_000
    assert np.all(np.diff(held) > 0) and np.all(np.diff(train) > 0) and train[-1] < offs[-1]
    assert not set(seq_of(held)) & set(seq_of(train))  # held-out sequences are not trained on
    # about two tokens per full-length sequence: the fused path's forward covers ~n/2 sequences, not all
    touched = np.unique(seq_of(train))
    per_full = np.bincount(seq_of(train), minlength=len(lengths))[touched][lengths[touched] > 120].mean()
    assert 1.0 <= per_full < 3.5 and len(touched) < 0.4 * len(lengths)
    again = dictionary_sample(lengths, 20_000, 3_000, 1)
    np.testing.assert_array_equal(again[1], train)
    # a token's chance is the same wherever it is: in long or short sequences, first or last
    small = lengths[:400]
    hits = np.zeros(int(small.sum()))
    for seed in range(400):
        hits[dictionary_sample(small, 2_000, 0, seed)[1]] += 1
    soffs = np.r_[0, np.cumsum(small)]
    seq = np.searchsorted(soffs, np.arange(len(hits)), side="right") - 1
    in_long, in_short = hits[small[seq] > 100].mean(), hits[small[seq] < 30].mean()
    first = hits[soffs[:-1]].mean()
    assert in_long == pytest.approx(in_short, rel=0.1) and first == pytest.approx(hits.mean(), rel=0.1)
    # a stream too short for two per sequence: the rule takes more from each, still uniformly
    held, train = dictionary_sample(lengths[:200], 5_000, 500, 3)
    assert len(held) == 500 and len(train) == 5_000


def test_codes_h5_reads_its_codes_from_the_parts_and_merge_makes_a_standalone_copy(kit, tmp_path):
    out = kit["root"] / "fused"
    with h5py.File(out / "codes.h5") as f:
        assert f["codes/indices"].is_virtual and f["codes/values"].is_virtual and f["tokens"].is_virtual
        assert not f["codes/indptr"].is_virtual
    parts = sum(p.stat().st_size for p in (out / "parts").glob("*.h5"))
    assert (out / "codes.h5").stat().st_size < parts / 4  # nothing of the codes was copied
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert cli(["finalize", copy, "--merge"]) == 0
    with h5py.File(copy / "codes.h5") as f:
        assert not f["codes/values"].is_virtual
    assert_same_codes(copy / "codes.h5", out / "codes.h5")


def test_fused_survives_seeded_kills(kit):
    out = kit["root"] / "fused-killed"
    args = kit["fused"] + ["--out", str(out)]
    hit, final, before = _kill_chain(args, kit["events"], 3, random.Random(SEED))
    assert len(hit) >= 2, hit
    assert_h5_equal(out / "codes.h5", kit["root"] / "fused" / "codes.h5")
    assert_h5_equal(out / "dictionary.h5", kit["root"] / "fused" / "dictionary.h5", skip_attrs=("stats",))
    assert leftovers(out) == []
    print("fused kill points:", hit)


def _edit_attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs.update(attrs)


@pytest.mark.parametrize("attr,value,says", [("layer", 1, "another layer"), ("aux_weights", "0" * 64,
                                                                                "another auxiliary model"),
                                             ("tokenizer", "1" * 64, "another tokenizer")])
def test_fused_refuses_a_dictionary_of_other_states(kit, tmp_path, capsys, attr, value, says):
    other = tmp_path / "dictionary.h5"
    shutil.copy(kit["root"] / "staged" / "dictionary.h5", other)
    _edit_attrs(other, **{attr: value})
    assert cli(kit["fused"] + ["--dictionary", other, "--out", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(other) in err and says in err
    assert not (tmp_path / "out" / "codes.h5").exists()


def test_a_token_stream_of_another_tokenizer_or_cut_short_is_refused(kit, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    shutil.copytree(kit["root"] / "tokens", tokens)
    man = json.loads((tokens / "manifest.json").read_text())
    man["inputs"]["tokenizer"] = "2" * 64
    (tokens / "manifest.json").write_text(json.dumps(man))
    args = [a if a != str(kit["root"] / "tokens") else str(tokens) for a in kit["fused"]]
    assert cli(args + ["--out", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert "another tokenizer" in err and "mlsm tokenize" in err
    man["inputs"]["tokenizer"] = json.loads((kit["root"] / "tokens" / "manifest.json").read_text())["inputs"]["tokenizer"]
    man["tokens"] += 7
    (tokens / "manifest.json").write_text(json.dumps(man))
    assert cli(args + ["--out", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert str(tokens / "tokens.h5") in err and "mlsm tokenize" in err


def test_a_resume_on_another_token_stream_is_refused(kit, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(kit["root"] / "fused", out)
    (out / "manifest.json").rename(out / "progress.json")  # as if interrupted
    other = tmp_path / "tokens"
    assert cli(["tokenize", "--corpus", kit["root"] / "corpus.txt", "--tokenizer-from", kit["aux"],
                "--max-tokens", "1200", "--out", other, "--no-progress"]) == 0
    args = [a if a != str(kit["root"] / "tokens") else str(other) for a in kit["fused"]]
    assert cli(args + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert "inputs.tokens" in err and "--force" in err
    assert len(list((out / "parts").glob("*.h5"))) == len(list((kit["root"] / "fused" / "parts").glob("*.h5")))


def test_finalize_names_a_missing_part_and_a_part_of_another_dictionary(kit, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(kit["root"] / "fused", out)
    (out / "manifest.json").rename(out / "progress.json")
    (out / "codes.h5").unlink()
    part = out / "parts" / "part-00001.h5"
    kept = part.read_bytes()
    part.unlink()
    assert cli(["finalize", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(part) in err and "mlsm sparse-code --from-tokens" in err
    assert len(list((out / "parts").glob("*.h5"))) == len(list((kit["root"] / "fused" / "parts").glob("*.h5"))) - 1
    part.write_bytes(kept)
    _edit_attrs(part, dictionary_fingerprint="3" * 64)
    assert cli(["finalize", out]) == 2
    err = capsys.readouterr().err
    assert str(part) in err and "another dictionary" in err and f"rm {part}" in err
    assert not (out / "codes.h5").exists()
    # the fix the message gives: delete it and run the coding again, which codes only that part
    part.unlink()
    assert cli(kit["fused"] + ["--out", out]) == 0
    assert_same_codes(out / "codes.h5", kit["root"] / "fused" / "codes.h5")


def test_two_finalize_runs_at_once_both_succeed_with_the_same_file(kit, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(kit["root"] / "fused", out)
    (out / "manifest.json").rename(out / "progress.json")
    (out / "codes.h5").unlink()
    cmd = [sys.executable, "-m", "mlsm.cli", "finalize", str(out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    assert_h5_equal(out / "codes.h5", kit["root"] / "fused" / "codes.h5")
    assert json.loads((out / "manifest.json").read_text())["complete"] and leftovers(out) == []
    assert cli(["finalize", out]) == 0  # idempotent


def test_a_full_disk_during_fused_coding_is_a_clear_error_and_keeps_finished_parts(kit, tmp_path, capsys,
                                                                                   monkeypatch):
    import mlsm.pipeline.sparse_code as sc
    from mlsm.core.manifest import atomic_path

    real, calls = sc.write_part, [0]

    def filling(path, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half a part")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(sc, "write_part", filling)
    out = tmp_path / "out"
    assert cli(kit["fused"] + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no space left" in err and "part-00001.h5" in err
    assert [p.name for p in (out / "parts").iterdir()] == ["part-00000.h5"]  # the finished part is kept
    monkeypatch.setattr(sc, "write_part", real)
    assert cli(kit["fused"] + ["--out", out]) == 0
    assert_same_codes(out / "codes.h5", kit["root"] / "fused" / "codes.h5")


def test_separate_fused_jobs_after_dictionary_only_write_the_single_job_codes(kit, tmp_path):
    out = tmp_path / "out"
    args = kit["fused"] + ["--out", out]
    assert cli(args + ["--dictionary-only"]) == 0 and not (out / "codes.h5").exists()
    assert cli(args + ["--worker-index", 0, "--num-workers", 2]) == 0
    assert not (out / "codes.h5").exists()  # worker 1's record is missing: nobody finalizes yet
    assert cli(args + ["--worker-index", 1, "--num-workers", 2]) == 0  # the last one finalizes
    assert_h5_equal(out / "codes.h5", kit["root"] / "fused" / "codes.h5")
    assert cli(["finalize", out]) == 0  # a dependent finalize job finds nothing left to do
