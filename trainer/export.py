"""Export a checkpoint as a plain Hugging Face BERT directory, with the pre-training heads beside it.

Our checkpoints already use HF parameter names; export drops what `transformers` would not expect
(trainer state, head weights inside model.safetensors), guarantees the tokenizer files that
`AutoTokenizer` needs, writes each head to its own safetensors file, copies the dictionary the
MLSM targets were coded against, and writes a model card (README.md; see docs/export.md).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from mlsm import __version__
from mlsm.core import hf
from mlsm.core.bert import BertConfig, MLSMHead
from mlsm.core.errors import MLSMError
from mlsm.core.layout import DICTIONARY, dictionary_fingerprint
from mlsm.core.manifest import atomic_path
from mlsm.trainer.model_card import CARD, model_card, run_records

log = logging.getLogger(__name__)

MLSM_HEAD_FILE = "mlsm_head.safetensors"
MLM_HEAD_FILE = "mlm_head.safetensors"
HEAD_FILES = {"mlsm_head": MLSM_HEAD_FILE, "mlm_head": MLM_HEAD_FILE}
EXPORT_INFO = "mlsm_export.json"


def _tokenizer_config(model_dir: Path, tok) -> dict:
    """The source's tokenizer_config.json, or one describing the BERT WordPiece tokenizer we load."""
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": bool(norm.get("lowercase", True)),
        "strip_accents": norm.get("strip_accents"),
        "tokenize_chinese_chars": bool(norm.get("handle_chinese_chars", True)),
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
        "model_max_length": 512,
    }


def _write_tokenizer(model_dir: Path, out: Path) -> None:
    """Copy the tokenizer files and fill in whichever of tokenizer.json / vocab.txt / config is missing."""
    tok = hf.load_tokenizer(model_dir)
    hf.copy_tokenizer_files(model_dir, out)
    if not (out / "tokenizer.json").is_file():
        tok.save(str(out / "tokenizer.json"))
    if not (out / "vocab.txt").is_file():
        vocab = tok.get_vocab(with_added_tokens=True)
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):
            raise MLSMError(f"the tokenizer of {model_dir} has gaps in its ids; it cannot be written as vocab.txt.")
        by_id = sorted(vocab, key=vocab.__getitem__)
        (out / "vocab.txt").write_text("".join(t + "\n" for t in by_id), encoding="utf-8")
    if not (out / "tokenizer_config.json").is_file():
        cfg = _tokenizer_config(model_dir, tok)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _run_dictionary(run: dict | None) -> Path | None:
    """The run's dictionary.h5, if it is still where run.json says and is the one its codes were made with."""
    import h5py

    data = (run or {}).get("data") or {}
    path, want = data.get("dictionary_file"), data.get("dictionary_fingerprint")
    if not path or not want or not Path(path).is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            D = f["D"][:]
    except (OSError, KeyError):
        return None
    return Path(path) if dictionary_fingerprint(D) == want else None


def export_model(src: str | Path, out: Path, force: bool = False, license: str = "unknown",
                 languages: tuple[str, ...] = ()) -> dict:
    """Write a transformers-compatible BertModel directory from a run, step or HF model directory.

    Returns a summary (source, heads written, dictionary, parameter count). The folder appears only
    complete. `license` and `languages` go into the model card's metadata.
    """
    from safetensors.torch import save_file

    model_dir = hf.resolve_model_dir(str(src))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MLSMError(f"{out} already exists and is not empty; pass --force to replace it or choose another --out.")
    encoder, config, _ = hf.load_encoder(str(model_dir))
    tensors = hf._strip_prefix(hf._read_tensors(model_dir))
    src_cfg = json.loads((model_dir / hf.CONFIG).read_text(encoding="utf-8"))
    meta = src_cfg.get("mlsm") or {}

    heads: dict[str, dict[str, torch.Tensor]] = {}
    for name in HEAD_FILES:
        part = {k[len(name) + 1:]: v.contiguous() for k, v in tensors.items() if k.startswith(name + ".")}
        if part:
            heads[name] = part

    run, rows = run_records(model_dir)
    dictionary = _run_dictionary(run) if "mlsm_head" in heads else None
    if "mlsm_head" in heads and dictionary is None:
        log.warning("the run's dictionary.h5 was not found where run.json says (or it is not the one its codes were "
                    "made with): the export has the MLSM head without it")
    info = {
        "source": str(model_dir),
        "step": meta.get("step"),
        "objective": meta.get("objective"),
        "mlm_weight": meta.get("mlm_weight"),
        "num_atoms": meta.get("num_atoms"),
        "codes_layer": meta.get("codes_layer"),
        "codes_lambda": meta.get("codes_lambda"),
        "heads": {n: HEAD_FILES[n] for n in heads},
        "dictionary": DICTIONARY if dictionary is not None else None,
        "model_card": CARD,
        "parameters": int(sum(v.numel() for v in encoder.state_dict().values())),
        "mlsm_version": __version__,
    }
    cfg = config.to_hf()
    if meta:
        cfg["mlsm"] = meta  # provenance only; transformers keeps unknown keys as plain attributes
    with atomic_path(out) as tmp:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / hf.CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        enc = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
        save_file(enc, str(tmp / hf.SAFETENSORS), metadata={"format": "pt"})
        for name, part in heads.items():
            head_meta = {"format": "pt", "head": name, "hidden_size": str(config.hidden_size)}
            if name == "mlsm_head":
                head_meta["num_atoms"] = str(part["decoder.weight"].shape[0])
                head_meta["codes_layer"] = str(meta.get("codes_layer"))
                head_meta["codes_lambda"] = str(meta.get("codes_lambda"))
            save_file(part, str(tmp / HEAD_FILES[name]), metadata=head_meta)
        _write_tokenizer(model_dir, tmp)
        if dictionary is not None:
            shutil.copyfile(dictionary, tmp / DICTIONARY)
        card = model_card(out.name, meta, info, cfg, run, rows, info["dictionary"], license, list(languages))
        (tmp / CARD).write_text(card, encoding="utf-8")
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("exported %s -> %s (heads: %s)", model_dir, out, ", ".join(heads) or "none")
    return info


def load_mlsm_head(export_dir: Path) -> MLSMHead:
    """The exported MLSM head as a module: feed it last hidden states, get K atom logits."""
    from safetensors import safe_open

    export_dir = Path(export_dir)
    path = export_dir / MLSM_HEAD_FILE
    if not path.is_file():
        raise MLSMError(f"{export_dir} has no {MLSM_HEAD_FILE}: the exported model was not trained with MLSM.")
    config = BertConfig.from_hf(json.loads((export_dir / hf.CONFIG).read_text(encoding="utf-8")))
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    head = MLSMHead(config, int(state["decoder.weight"].shape[0]))
    head.load_state_dict(state, strict=True)
    return head.eval()
