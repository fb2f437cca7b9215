"""Fault injection and resume: SIGKILL extract and sparse-code at seeded write events, rerun, compare.

Each killed stage runs as a child interpreter (tests/fault_kit.py). A chain of kills hits one
output folder (each rerun resumes what the previous killed run left), then a last run completes;
its Parquet tables / HDF5 datasets must equal those of an uninterrupted run, bit for bit, and
shards finished before a kill must not have been computed again.
`pytest -m soak` (make test-soak) kills at every event of both stages: before, after and in the
middle of each write.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import pytest

from mlsm.cli import main
from tests.fault_kit import (
    assert_h5_equal,
    assert_parquet_equal,
    leftovers,
    make_tiny_aux,
    run_cli,
    write_corpus,
)

SEED = 6
WHEN = ("before", "after", "torn")


def _in_process(args: list[str]) -> int:
    """The CLI in this interpreter; returns the number of os.replace calls (= atomic writes)."""
    real, count = os.replace, [0]

    def counting(*a, **k):
        count[0] += 1
        return real(*a, **k)

    os.replace = counting
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), e
    finally:
        os.replace = real
    return count[0]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    aux = make_tiny_aux(root / "aux")
    corpus = write_corpus(root / "corpus.txt", docs=30)
    extract_args = ["extract", "--corpus", str(corpus), "--aux", str(aux), "--layers", "1,2", "--max-tokens", "1500",
                    "--shard-tokens", "300", "--batch-tokens", "256", "--no-progress"]
    code_args = ["sparse-code", "--layer", "2", "-k", "16", "--dict-samples", "600", "--heldout", "60",
                 "--batch-size", "256", "--no-progress"]
    ref = {"extract": root / "ref-extract", "codes": root / "ref-codes"}
    events = {"extract": _in_process(extract_args + ["--out", str(ref["extract"])]),
              "codes": _in_process(code_args + ["--extract-dir", str(ref["extract"]), "--out", str(ref["codes"])])}
    return dict(root=root, extract_args=extract_args, code_args=code_args, ref=ref, events=events)


def _extract_cmd(kit, out):
    return kit["extract_args"] + ["--out", str(out)]


def _codes_cmd(kit, out):
    return kit["code_args"] + ["--extract-dir", str(kit["ref"]["extract"]), "--out", str(out)]


def _finished_files(out):
    """Outputs under their final names (complete by construction) with their identity."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for pat in ("shard-*.parquet", "dictionary.h5") for p in out.glob(pat)}


def _kill_chain(args: list[str], n_events: int, kills: int, rng: random.Random):
    """Kill successive runs on one folder at seeded events, then complete it.

    Returns the kill points hit, the final run, and the files that existed before the final run.
    """
    hit = []
    for _ in range(kills):
        point = f"{rng.randint(2, max(2, n_events // 2))}:{rng.choice(WHEN)}"
        r = run_cli(args, kill=point)
        if r.returncode == 0:  # the resumed run had fewer events left than the point: it finished
            break
        assert r.returncode == -9, r.stderr
        hit.append(point)
    out = args[args.index("--out") + 1]
    before = _finished_files(Path(out))
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    return hit, r, before


def _check_extract(out, ref):
    assert_parquet_equal(out, ref)
    shards = lambda d: json.loads((d / "manifest.json").read_text())["shards"]  # noqa: E731
    assert shards(out) == shards(ref)
    assert leftovers(out) == []


def _check_codes(out, ref):
    assert_h5_equal(out / "codes.h5", ref / "codes.h5")
    assert_h5_equal(out / "dictionary.h5", ref / "dictionary.h5", skip_attrs=("stats",))  # stats hold timings
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert leftovers(out) == []


def test_extract_survives_seeded_kills_and_resumes_at_the_first_missing_shard(kit):
    out = kit["root"] / "extract-killed"
    hit, final, before = _kill_chain(_extract_cmd(kit, out), kit["events"]["extract"], 3, random.Random(SEED))
    assert len(hit) >= 2, hit
    _check_extract(out, kit["ref"]["extract"])
    assert before, "the kills should have left finished shards to resume from"
    assert _finished_files(out) | before == _finished_files(out)  # finished shards were not written again
    print("extract kill points:", hit)


def test_sparse_code_survives_seeded_kills(kit):
    out = kit["root"] / "codes-killed"
    hit, final, before = _kill_chain(_codes_cmd(kit, out), kit["events"]["codes"], 3, random.Random(SEED + 1))
    assert len(hit) >= 2, hit
    _check_codes(out, kit["ref"]["codes"])
    if before:  # the dictionary (the expensive part) was learnt before a kill: it is reused, not relearnt
        assert _finished_files(out) == before and "reusing the dictionary" in final.stderr
    print("sparse-code kill points:", hit)


@pytest.mark.parametrize("stage", ["extract", "codes"])
def test_rerun_of_a_finished_stage_does_nothing_and_says_so(kit, stage, caplog):
    ref = kit["ref"][stage]
    before = {p: p.stat().st_mtime_ns for p in ref.rglob("*")}
    cmd = _extract_cmd(kit, ref) if stage == "extract" else _codes_cmd(kit, ref)
    with caplog.at_level(logging.INFO):
        assert _in_process(cmd) == 0  # not a single file written
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in ref.rglob("*")} == before


@pytest.mark.parametrize("stage", ["extract", "codes"])
def test_force_redoes_the_stage(kit, stage):
    ref = kit["ref"][stage]
    out = kit["root"] / f"force-{stage}"
    shutil.copytree(ref, out)
    (out / "notes.txt").write_text("x")  # not an output: --force leaves unknown files alone
    old = {p.name: p.stat().st_mtime_ns for p in out.glob("*.*") if p.suffix in (".parquet", ".h5")}
    cmd = _extract_cmd(kit, out) if stage == "extract" else _codes_cmd(kit, out)
    assert _in_process(cmd + ["--force"]) > 0
    new = {p.name: p.stat().st_mtime_ns for p in out.glob("*.*") if p.suffix in (".parquet", ".h5")}
    assert set(new) == set(old) and all(new[k] != old[k] for k in old)
    (_check_extract if stage == "extract" else _check_codes)(out, ref)
    assert (out / "notes.txt").exists()


@pytest.mark.soak
@pytest.mark.parametrize("stage", ["extract", "codes"])
@pytest.mark.parametrize("when", WHEN)
def test_soak_every_kill_point(kit, stage, when):
    for event in range(1, kit["events"][stage] + 1):
        out = kit["root"] / f"soak-{stage}-{when}-{event}"
        args = _extract_cmd(kit, out) if stage == "extract" else _codes_cmd(kit, out)
        assert run_cli(args, kill=f"{event}:{when}").returncode == -9
        r = run_cli(args)
        assert r.returncode == 0, r.stderr
        (_check_extract if stage == "extract" else _check_codes)(out, kit["ref"][stage])
        shutil.rmtree(out)


@pytest.mark.parametrize("stage", ["extract", "codes"])
def test_a_worker_that_finds_every_shard_done_waits_for_the_other_workers_record(kit, stage):
    # The race, made deterministic: worker 1 has written all its shards (or parts) and is killed
    # just before its final record. Worker 0 then finds every shard on disk; it must not merge
    # (its manifest would list itself alone). Worker 1's rerun records its end and merges.
    root = kit["root"] / f"race-{stage}"
    cmd = (_extract_cmd if stage == "extract" else _codes_cmd)(kit, root / "out")
    if stage == "codes":
        assert run_cli(cmd + ["--dictionary-only"]).returncode == 0
    worker = lambda i: cmd + ["--worker-index", str(i), "--num-workers", "2"]  # noqa: E731
    probe = root / "probe"  # worker 1 alone, elsewhere: how many atomic writes it makes (its record is last)
    probe_cmd = [str(probe) if a == str(root / "out") else a for a in worker(1)]
    if stage == "codes":
        shutil.copytree(root / "out", probe)
    assert run_cli(probe_cmd, count=root / "n").returncode == 0
    n = int((root / "n").read_text())
    assert run_cli(worker(1), kill=f"{n}:before").returncode == -9
    final = "manifest.json"
    assert run_cli(worker(0)).returncode == 0
    assert not (root / "out" / final).exists(), "merged before worker 1 recorded its end"
    r = run_cli(worker(1))
    assert r.returncode == 0, r.stderr
    man = json.loads((root / "out" / final).read_text())
    if stage == "extract":
        assert sorted(w["worker"] for w in man["workers"]) == [0, 1]
        _check_extract(root / "out", kit["ref"]["extract"])
    else:
        assert man["report"]["workers"] == 2
        assert_h5_equal(root / "out" / "codes.h5", kit["ref"]["codes"] / "codes.h5")
