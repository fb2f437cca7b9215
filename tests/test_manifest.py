import json

import pytest

from mlsm.core.errors import MLSMError
from mlsm.core.layout import MANIFEST, PROGRESS
from mlsm.core.manifest import atomic_path, prepare_stage, read_manifest, write_json_atomic


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"


def test_prepare_stage_fresh_resume_done_and_mismatch(tmp_path):
    params, inputs = {"layers": [6]}, {"corpus": "abc"}
    assert prepare_stage(tmp_path, "extract", params, inputs, False, [])[0] == "fresh"
    write_json_atomic(tmp_path / PROGRESS, {"params": params, "inputs": inputs, "shards": [1]})
    state, old = prepare_stage(tmp_path, "extract", params, inputs, False, [])
    assert state == "resume" and old["shards"] == [1]
    with pytest.raises(MLSMError, match=r"layers: existing \[6\], requested \[4\]"):
        prepare_stage(tmp_path, "extract", {"layers": [4]}, inputs, False, [])
    write_json_atomic(tmp_path / MANIFEST, {"params": params, "inputs": inputs, "complete": True})
    assert prepare_stage(tmp_path, "extract", params, inputs, False, [])[0] == "done"
    (tmp_path / "shard-00000.parquet").write_bytes(b"x")
    assert prepare_stage(tmp_path, "extract", {"layers": [4]}, inputs, True, ["shard-*.parquet"])[0] == "fresh"
    assert list(tmp_path.iterdir()) == []


def test_read_manifest_names_the_missing_stage(tmp_path):
    with pytest.raises(MLSMError, match="Run `make extract` first"):
        read_manifest(tmp_path, stage="extract", fix="make extract")
    (tmp_path / MANIFEST).write_text(json.dumps({"stage": "extract", "complete": True}))
    assert read_manifest(tmp_path, stage="extract", fix="make extract")["complete"]


def test_done_with_a_leftover_progress_file_cleans_it(tmp_path):
    """A kill between writing manifest.json and removing progress.json: the stage is done."""
    params, inputs = {"K": 8}, {"extract_manifest": "abc"}
    for name in (MANIFEST, PROGRESS):
        write_json_atomic(tmp_path / name, {"params": params, "inputs": inputs, "complete": name == MANIFEST})
    for name in ("codes.h5", "dictionary.h5"):
        (tmp_path / name).write_bytes(b"x")
    assert prepare_stage(tmp_path, "sparse-code", params, inputs, False, [])[0] == "done"
    assert not (tmp_path / PROGRESS).exists()


def test_done_is_not_believed_when_a_final_file_is_gone(tmp_path):
    params, inputs = {"K": 8}, {}
    write_json_atomic(tmp_path / MANIFEST, {"params": params, "inputs": inputs, "complete": True})
    (tmp_path / "dictionary.h5").write_bytes(b"x")
    with pytest.raises(MLSMError, match=r"complete, but codes.h5 is gone.*`mlsm sparse-code` with --force"):
        prepare_stage(tmp_path, "sparse-code", params, inputs, False, [])


def test_stale_temps_of_dead_writers_are_removed_live_and_foreign_ones_kept(tmp_path):
    import os
    import subprocess

    from mlsm.core.manifest import _HOST, remove_stale_temps

    p = subprocess.Popen(["true"])  # its pid is a writer that has exited
    p.wait()
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f".part-00001.h5.{p.pid}.{_HOST}.tmp"
    live = tmp_path / f".shard-00000.parquet.{os.getppid()}.{_HOST}.tmp"
    foreign = tmp_path / f".shard-00001.parquet.{p.pid}.othernode.tmp"
    for f in (stale, live, foreign):
        f.write_bytes(b"half")
    assert remove_stale_temps(tmp_path) == [stale]
    assert live.exists() and foreign.exists() and not stale.exists()


def test_mismatch_message_explains_a_changed_upstream(tmp_path):
    params = {"layer": 6}
    write_json_atomic(tmp_path / MANIFEST, {"params": params, "inputs": {"extract_manifest": "a" * 64}, "complete": True})
    with pytest.raises(MLSMError) as e:
        prepare_stage(tmp_path, "sparse-code", params, {"extract_manifest": "b" * 64}, False, [])
    msg = str(e.value)
    assert "inputs.extract_manifest: existing 'aaaaaaaaaaaa...', requested 'bbbbbbbbbbbb...'" in msg
    assert "extract stage's output changed" in msg and "`mlsm sparse-code` with these options and --force" in msg
