"""Atomic writes, fingerprints and manifest.json: how every stage proves what it finished."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlsm import __version__
from mlsm.core.errors import MLSMError
from mlsm.core.layout import CODES, DICTIONARY, MANIFEST, PROGRESS, TOKENS

log = logging.getLogger(__name__)

@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `final`; rename it into place only if the block succeeds.

    A killed process leaves at most a `*.tmp` file, never a file that looks finished.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{_HOST}.tmp")
    try:
        yield tmp
        if tmp.is_dir():
            if final.exists():
                shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        if _disk_full(e):
            raise MLSMError(
                f"no space left on the device while writing {final} (the partial file was removed; finished "
                f"files are kept). Free some space, or write to another folder, and run the same command again: "
                f"it continues where it stopped."
            ) from e
        raise


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (h5py, pyarrow) wraps it in its own error."""
    for _ in range(8):  # the chain of causes is short; bounded in case it loops
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# The writer's host and pid are in each temp name, so a later run can tell a dead writer's
# leftovers (safe to delete) from a live writer's file, also on a folder shared between nodes.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files/folders under `folder` left by killed writers of this host; returns them."""
    removed = []
    for p in sorted(Path(folder).rglob(".*.tmp")):
        parts = p.name[1:-len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] != _HOST:
            continue  # not ours, or written on another node: its writer may be alive
        pid = int(parts[1])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def files_fingerprint(paths: list[Path]) -> str:
    """Cheap fingerprint of input files: name, size and mtime (hashing GBs of text on every run is not)."""
    entries = []
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        entries.append([str(p.resolve()), st.st_size, int(st.st_mtime)])
    return sha256_json(entries)


def read_manifest(folder: str | os.PathLike, *, stage: str, fix: str) -> dict:
    """Load a finished stage's manifest, or tell the user which command produces it."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise MLSMError(f"{path} not found: the {stage} stage has not finished in {folder}. Run `{fix}` first.")
    try:
        with open(path) as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MLSMError(f"{path} is unreadable ({e}). Re-run `{fix} --force`.") from e
    if man.get("stage") != stage or not man.get("complete"):
        raise MLSMError(f"{path} does not describe a complete {stage} stage. Re-run `{fix}`.")
    return man


def new_manifest(stage: str, params: dict, inputs: dict) -> dict:
    return {
        "stage": stage,
        "mlsm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": params,
        "inputs": inputs,
        "complete": False,
    }


# Files a finished stage must still have: "done" is not believed when one of them was deleted.
_FINAL_FILES = {"sparse-code": (CODES, DICTIONARY), "tokenize": (TOKENS,)}


# What a changed input fingerprint means, in the user's terms.
_INPUT_MEANING = {
    "corpus": "the corpus files changed (names, sizes or modification times), or --text-field",
    "aux_weights": "the auxiliary model's weights are different",
    "tokenizer": "the tokenizer (vocabulary or normalisation) is different",
    "extract_manifest": "the extract stage's output changed since (it was re-run or edited)",
    "tokens": "the token stream (the `mlsm tokenize` folder) is another one, or was re-made",
    "dictionary": "--dictionary names another dictionary file",
}


def _short(v: Any) -> str:
    return repr(v[:12] + "...") if isinstance(v, str) and len(v) == 64 else repr(v)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            line = f"{prefix}{key}: existing {_short(a)}, requested {_short(b)}"
            if prefix == "inputs." and key in _INPUT_MEANING:
                line += f" ({_INPUT_MEANING[key]})"
            out.append(line)
    return out


def prepare_stage(
    out_dir: str | os.PathLike,
    stage: str,
    params: dict,
    inputs: dict,
    force: bool,
    outputs: list[str],
) -> tuple[str, dict | None]:
    """Decide whether a stage is done, resumes, or starts fresh in out_dir.

    Returns ("done", manifest), ("resume", progress) or ("fresh", None). A folder holding work
    made with other parameters or inputs is never silently mixed with new work: the user gets
    the list of differences and the two ways out (--force, or another --out).
    `outputs` are glob patterns of the stage's files, removed on --force.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if force:
        for pattern in outputs + [MANIFEST, PROGRESS, ".*.tmp"]:
            for p in out_dir.glob(pattern):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return "fresh", None
    for p in remove_stale_temps(out_dir):
        log.info("%s: removed %s, left by a killed run", stage, p)
    for name, state in ((MANIFEST, "done"), (PROGRESS, "resume")):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise MLSMError(f"{path} is unreadable. Re-run `mlsm {stage}` with --force to redo the stage.") from None
        diffs = _differences({"params": old.get("params", {}), "inputs": old.get("inputs", {})},
                             {"params": params, "inputs": inputs})
        if diffs:
            raise MLSMError(
                f"{out_dir} already holds {stage} output made differently:\n  - "
                + "\n  - ".join(diffs)
                + f"\nRe-run `mlsm {stage}` with these options and --force to replace it, "
                f"or write to another folder with --out."
            )
        if state == "done" and not old.get("complete"):
            continue
        if state == "done":
            gone = [f for f in _FINAL_FILES.get(stage, ()) if not (out_dir / f).exists()]
            if gone:
                raise MLSMError(f"{path} says the {stage} stage is complete, but {', '.join(gone)} is gone "
                                f"from {out_dir}. Re-run `mlsm {stage}` with --force to rebuild it.")
            (out_dir / PROGRESS).unlink(missing_ok=True)  # a kill between manifest and cleanup left it
        return state, old
    return "fresh", None


CHECKSUMS = "checksums.json"


def write_checksums(folder: Path) -> None:
    """Flush every file of a finished folder (a checkpoint) to disk and record its size and sha256.

    Written last, inside the temporary folder: a checkpoint whose files were later cut short
    (a full disk, a crash before the page cache reached the disk, a bad copy) no longer matches.
    """
    folder = Path(folder)
    sums = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != CHECKSUMS:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            sums[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    with open(folder / CHECKSUMS, "w") as f:
        json.dump(sums, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def checksum_problem(folder: Path, full: bool = True) -> str | None:
    """What is wrong with a folder's files (None: they match, or it predates checksums).

    `full=False` compares sizes only, which catches truncation without reading the files.
    """
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    for name, want in sorted(sums.items()):
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if full and sha256_file(p) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None
