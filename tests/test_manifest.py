import json

import pytest

from mlsm.errors import MLSMError
from mlsm.manifest import MANIFEST, PROGRESS, atomic_path, prepare_stage, read_manifest, write_json_atomic


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
