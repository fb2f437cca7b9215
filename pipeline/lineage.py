"""Does a file belong to the manifest next to it? Checks a consumer runs before trusting a stage's output.

A stage's manifest.json records what it made (parameters, input fingerprints); the HDF5 files
carry the same facts in their attributes. Files get copied between folders and runs, so the
consumer compares the two and refuses a mix, naming the mismatch and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from mlsm.core.errors import MLSMError
from mlsm.core.manifest import MANIFEST


def _rebuild(folder: Path, man: dict) -> str:
    p = man.get("params", {})
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (("layer", p.get("layer")), ("K", p.get("K")))
                    if v is not None).replace("--K", "-k")
    return f"mlsm sparse-code --extract-dir {man.get('extract_dir', '<extract folder>')} --out {folder} {opts} --force"


def check_dictionary(path: Path, d: int | None = None, K: int | None = None, fingerprint: str | None = None,
                     fix: str = "mlsm sparse-code --force") -> np.ndarray:
    """Load dictionary.h5 and check it is a d x K dictionary (and the very one a codes file names)."""
    try:
        with h5py.File(path, "r") as f:
            D = f["D"][:]
    except (OSError, KeyError) as e:
        raise MLSMError(f"{path} is not a readable dictionary ({e}). Rebuild it with `{fix}`.") from e
    if d is not None and D.shape[0] != d:
        raise MLSMError(f"{path} is a dictionary of d={D.shape[0]}, but the hidden states it must code have "
                        f"d={d} (another auxiliary model or layer width). Rebuild it with `{fix}`.")
    if K is not None and D.shape[1] != K:
        raise MLSMError(f"{path} has K={D.shape[1]} atoms, but K={K} is expected. Rebuild it with `{fix}`.")
    if fingerprint is not None:
        got = hashlib.sha256(np.ascontiguousarray(D, dtype=np.float32).tobytes()).hexdigest()
        if got != fingerprint:
            raise MLSMError(f"{path} is not the dictionary the codes were made with (fingerprint {got[:12]} vs "
                            f"{fingerprint[:12]}). Rebuild both with `{fix}`.")
    return D


def check_codes_file(codes_path: Path) -> None:
    """codes.h5 against its folder's sparse-code manifest.json and dictionary.h5, when they are there.

    A lone codes.h5 (no manifest) is accepted: its own attributes are all there is to go by.
    """
    codes_path = Path(codes_path)
    folder = codes_path.parent
    man_path = folder / MANIFEST
    if not man_path.is_file():
        return
    try:
        man = json.loads(man_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # the trainer reports unreadable data itself
    if man.get("stage") != "sparse-code":
        return
    fix = _rebuild(folder, man)
    try:
        with h5py.File(codes_path, "r") as f:
            attrs = dict(f.attrs)
            if "codes" not in f:
                return
    except OSError as e:
        raise MLSMError(f"{codes_path} is not a readable HDF5 file ({e}); it may be truncated. "
                        f"Rebuild it with `{fix}`.") from e
    params = man.get("params", {})
    checks = [("layer", params.get("layer"), attrs.get("layer")), ("K", params.get("K"), attrs.get("K")),
              ("lambda", params.get("lambda"), attrs.get("lambda")),
              ("extract fingerprint", man.get("inputs", {}).get("extract_manifest"), attrs.get("extract_fingerprint"))]
    for name, want, got in checks:
        if want is None or got is None:
            continue
        same = (abs(float(want) - float(got)) <= 1e-12 * max(1.0, abs(float(want)))
                if isinstance(want, (int, float)) else str(want) == str(got))
        if not same:
            show = (lambda v: str(v)[:12]) if name.endswith("fingerprint") else str
            raise MLSMError(f"{codes_path} was built with {name} {show(got)}, but {man_path} says {name} "
                            f"{show(want)}: the file comes from another run. Rebuild it with `{fix}`, "
                            f"or point --data at the codes.h5 of the run you mean.")
    dict_path = folder / "dictionary.h5"
    if dict_path.is_file():
        check_dictionary(dict_path, d=(man.get("dictionary") or {}).get("d"), K=params.get("K"),
                         fingerprint=attrs.get("dictionary_fingerprint"), fix=fix)
