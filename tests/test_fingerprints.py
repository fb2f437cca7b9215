"""Every stage refuses inputs that are not what its manifest says, naming the mismatch and the fix."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from tests.fault_kit import cli, make_tiny_aux, small_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return small_pipeline(tmp_path_factory.mktemp("fingerprints"))


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "error: " in err, err
    assert "Traceback" not in err
    return err


def _pretrain(data, out, *extra):
    return cli(["pretrain", "--data", data, "--out", out, "--steps", "1", "--batch-size", "4",
                "--no-progress", "--no-milestones", *extra])


def test_sparse_code_asked_for_another_layer_than_its_folder_holds(pipe, capsys):
    assert cli(pipe["code_cmd"] + ["--out", pipe["codes"], "--layer", "1"]) == 2
    err = _err(capsys)
    assert "params.layer: existing 2, requested 1" in err
    assert "mlsm sparse-code" in err and "--force" in err


def test_sparse_code_of_a_layer_that_was_not_extracted(pipe, capsys):
    assert cli(pipe["code_cmd"] + ["--out", pipe["root"] / "codes-l6", "--layer", "6"]) == 2
    err = _err(capsys)
    assert "layer 6 was not extracted" in err and "mlsm extract --layers 6" in err
    assert not (pipe["root"] / "codes-l6" / "manifest.json").exists()


def test_pretrain_refuses_codes_of_another_layer_than_the_manifest(pipe, capsys, tmp_path):
    other = pipe["root"] / "codes-l1"
    assert cli(pipe["code_cmd"] + ["--out", other, "--layer", "1"]) == 0
    mixed = tmp_path / "codes"
    shutil.copytree(pipe["codes"], mixed)  # manifest says layer 2 ...
    shutil.copyfile(other / "codes.h5", mixed / "codes.h5")  # ... the codes are of layer 1
    assert _pretrain(mixed / "codes.h5", tmp_path / "run") == 2
    err = _err(capsys)
    assert "built with layer 1" in err and "says layer 2" in err
    assert f"mlsm sparse-code --extract-dir {pipe['extract']} --out {mixed} --layer 2 -k 16 --force" in err
    assert not (tmp_path / "run" / "step-0000001").exists()


def test_pretrain_refuses_a_dictionary_of_another_d(pipe, capsys, tmp_path):
    mixed = tmp_path / "codes"
    shutil.copytree(pipe["codes"], mixed)
    with h5py.File(mixed / "dictionary.h5", "r+") as f:
        K = f["D"].shape[1]
        del f["D"]
        f.create_dataset("D", data=np.eye(64, K, dtype=np.float32))
    assert _pretrain(mixed / "codes.h5", tmp_path / "run") == 2
    err = _err(capsys)
    assert "dictionary of d=64" in err and "d=32" in err and "mlsm sparse-code" in err


def test_pretrain_accepts_matching_codes(pipe, tmp_path):
    """The control for the refusals above: the untouched folder trains."""
    assert _pretrain(pipe["codes"] / "codes.h5", tmp_path / "run", "--model", "tiny") == 0
    assert (tmp_path / "run" / "step-0000001").is_dir()


def test_pretrain_refuses_a_student_with_another_vocabulary(pipe, capsys, tmp_path):
    student = make_tiny_aux(tmp_path / "student", extra_words=("zebra", "quartz"))
    assert _pretrain(pipe["codes"] / "codes.h5", tmp_path / "run", "--init-from", student) == 2
    err = _err(capsys)
    assert "another tokenizer" in err and "mlsm extract" in err


def test_pretrain_refuses_a_tokenizer_folder_that_is_not_the_codes_one(pipe, capsys, tmp_path):
    mixed = tmp_path / "codes"
    shutil.copytree(pipe["codes"], mixed)
    with open(mixed / "tokenizer" / "vocab.txt", "a") as f:
        f.write("zebra\n")
    assert _pretrain(mixed / "codes.h5", tmp_path / "run") == 2
    assert "is not the one codes.h5 was built with" in _err(capsys)


def test_sparse_code_refuses_codes_of_an_older_extract(pipe, capsys, tmp_path):
    """The upstream manifest hash changed: the extract folder was rebuilt after the codes were made."""
    ext, codes = tmp_path / "extract", tmp_path / "codes"
    shutil.copytree(pipe["extract"], ext)
    shutil.copytree(pipe["codes"], codes)
    cmd = ["sparse-code", "--extract-dir", ext, "--out", codes, "--layer", "2"] + pipe["code_cmd"][3:]
    assert cli(cmd) == 0  # same extract: the finished stage is accepted as it is
    assert cli(pipe["extract_cmd"] + ["--out", ext, "--max-tokens", "600", "--force"]) == 0
    assert cli(cmd) == 2
    err = _err(capsys)
    assert "inputs.extract_manifest" in err and "extract stage's output changed" in err
    assert "mlsm sparse-code" in err and "--force" in err
    assert cli(cmd + ["--force"]) == 0


def test_extract_refuses_another_aux_model_or_changed_corpus(pipe, capsys, tmp_path):
    ext = tmp_path / "extract"
    shutil.copytree(pipe["extract"], ext)
    other_aux = make_tiny_aux(tmp_path / "aux2", seed=1)
    cmd = [a if a != pipe["aux"] else other_aux for a in pipe["extract_cmd"]] + ["--out", ext]
    assert cli(cmd) == 2
    err = _err(capsys)
    assert "inputs.aux_weights" in err and "auxiliary model's weights are different" in err
    assert "inputs.tokenizer" not in err  # same vocabulary: only the weights differ
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pipe["corpus"].read_text() + "one more line.\n")
    cmd = [a if a != pipe["corpus"] else corpus for a in pipe["extract_cmd"]] + ["--out", ext]
    assert cli(cmd) == 2
    assert "the corpus files changed" in _err(capsys)
