"""What a run's training data was made from, recorded in run.json so a model card needs no data folder.

It follows the fingerprint chain the stages leave: codes.h5 (or tokens.h5) -> its folder's
manifest.json -> the extract or tokenize manifest it was made from. A link whose file is gone or
whose fingerprint does not match stays None: the card then says "not recorded", it never guesses.
"""

from __future__ import annotations

from pathlib import Path

from mlsm.core.errors import MLSMError
from mlsm.core.layout import DICTIONARY, MANIFEST
from mlsm.core.manifest import read_manifest, sha256_file
from mlsm.pipeline.codes import TokenData


def _manifest(folder: str | Path | None, stage: str, fingerprint: str | None = None) -> dict | None:
    """folder/manifest.json of a finished `stage`, only if its sha256 is `fingerprint` (when given);
    None where `read_manifest` would refuse it: provenance is recorded, never demanded."""
    if folder is None:
        return None
    try:
        doc = read_manifest(folder, stage=stage, fix=f"mlsm {stage}")
    except MLSMError:
        return None
    if fingerprint is not None and sha256_file(Path(folder) / MANIFEST) != fingerprint:
        return None
    return doc


def _corpus_of_tokens(tokens_dir: str | None, fingerprint: str | None) -> str | None:
    doc = _manifest(tokens_dir, "tokenize", fingerprint) if fingerprint else None
    return doc["inputs"].get("corpus") if doc else None


def data_provenance(data: TokenData) -> dict:
    """The run's data: its own attributes, plus the auxiliary model and corpus its manifests vouch for."""
    a = data.attrs
    out = {
        "path": str(data.path), "tokens": data.num_tokens, "sequences": data.num_sequences,
        "K": a.get("K"), "lambda": a.get("lambda"), "layer": a.get("layer"), "solver": a.get("solver"),
        "tolerance": a.get("tolerance"), "top_k": a.get("top_k") or None,
        "dictionary_fingerprint": a.get("dictionary_fingerprint"), "dictionary_file": None,
        "aux": None, "aux_weights": None, "corpus_fingerprint": None,
    }
    folder = Path(data.path).parent
    codes_man = _manifest(folder, "sparse-code")
    if codes_man is not None and data.has_codes:
        if (folder / DICTIONARY).is_file():
            out["dictionary_file"] = str(folder / DICTIONARY)  # export checks its fingerprint
        extract = _manifest(codes_man.get("extract_dir"), "extract", a.get("extract_fingerprint"))
        if extract is not None:  # the staged path
            out["aux"], out["aux_weights"] = extract.get("aux"), extract["inputs"].get("aux_weights")
            out["corpus_fingerprint"] = extract["inputs"].get("corpus") or _corpus_of_tokens(
                extract.get("tokens_dir"), extract["inputs"].get("tokens"))
        elif codes_man.get("tokens_dir") is not None:  # the fused path: the forward ran inside sparse-code
            out["aux"], out["aux_weights"] = codes_man.get("aux"), codes_man["inputs"].get("aux_weights")
            out["corpus_fingerprint"] = _corpus_of_tokens(codes_man["tokens_dir"], a.get("tokens_fingerprint"))
    tokens_man = _manifest(folder, "tokenize")
    if tokens_man is not None:  # tokens.h5 of `mlsm tokenize` (an MLM run)
        out["corpus_fingerprint"] = tokens_man["inputs"].get("corpus")
    return out
