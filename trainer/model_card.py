"""The export's README.md: a Hugging Face model card whose every figure comes from the run's own records.

Its sources are the checkpoint's config.json (`mlsm` block), the run folder's run.json (settings,
data provenance, context-free baseline) and metrics.jsonl. A field the run does not have is said
to be missing ("not recorded", or why it does not apply), never filled in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlsm import __version__
from mlsm.trainer.metrics_log import read_metrics

CARD = "README.md"
NOT_RECORDED = "not recorded"


def run_records(model_dir: Path) -> tuple[dict | None, list[dict]]:
    """run.json and metrics.jsonl of the run a step-XXXXXXX/ checkpoint belongs to (None, [] for any other source)."""
    run_json = Path(model_dir).parent / "run.json"
    if not run_json.is_file():
        return None, []
    return json.loads(run_json.read_text()), read_metrics(run_json.parent / "metrics.jsonl")


def _fmt(v) -> str:
    if v is None:
        return NOT_RECORDED
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _table(rows: list[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in rows)


def _loss_at(rows: list[dict], step: int | None) -> dict | None:
    """The last logged row with a finite loss at or before the checkpoint's step."""
    good = [r for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])
            and (step is None or r["step"] <= step)]
    return good[-1] if good else None


def _metadata(objective: str | None, license: str, languages: list[str]) -> str:
    tags = ["mlsm"]
    if objective == "mlsm":
        tags.append("masked-latent-semantic-modeling")
    if objective == "mlm":
        tags.append("masked-language-modeling")
    tags += ["bert", "feature-extraction"]
    lines = ["---", f"license: {json.dumps(license)}", "library_name: transformers",
             "pipeline_tag: feature-extraction", "tags:"] + [f"- {t}" for t in tags]
    if languages:
        lines += ["language:"] + [f"- {json.dumps(x)}" for x in languages]
    return "\n".join(lines + ["---"]) + "\n"


def _objective(meta: dict, cfg: dict) -> str:
    objective, w = meta.get("objective"), meta.get("mlm_weight") or 0.0
    if objective == "mlsm":
        text = ("Masked Latent Semantic Modeling: at each masked position the student predicts a distribution "
                "over K latent semantic properties, the L1-normalised non-negative sparse code of an auxiliary "
                "model's hidden state against a learned dictionary; the loss is the KL divergence to it.")
        return text + (f" Plus {w:g} x the masked-language-modeling cross-entropy." if w else "")
    if objective == "mlm":
        return ("Masked language modeling (cross-entropy of the masked words) only: no auxiliary model, no latent "
                "semantic properties, no dictionary.")
    return NOT_RECORDED


def _targets(objective: str | None, data: dict | None) -> list[tuple[str, object]]:
    if objective == "mlm":
        why = "none: an MLM-only run has no auxiliary model"
        return [("auxiliary model", why), ("auxiliary layer", why), ("K (dictionary atoms)", why),
                ("lambda (L1 penalty)", why), ("solver tolerance (certified relative duality gap)", why),
                ("corpus fingerprint", (data or {}).get("corpus_fingerprint")),
                ("training tokens", (data or {}).get("tokens"))]
    d = data or {}
    aux = d.get("aux")
    if aux is not None and d.get("aux_weights"):
        aux = f"{aux} (weights sha256 {d['aux_weights'][:16]})"
    return [("auxiliary model", aux), ("auxiliary layer", d.get("layer")), ("K (dictionary atoms)", d.get("K")),
            ("lambda (L1 penalty)", d.get("lambda")),
            ("solver tolerance (certified relative duality gap)", d.get("tolerance")), ("solver", d.get("solver")),
            ("top-k atoms kept per token", d.get("top_k") or ("all" if data else None)),
            ("corpus fingerprint", d.get("corpus_fingerprint")), ("training tokens", d.get("tokens"))]


def _files(objective: str | None, heads: dict, dictionary: str | None) -> str:
    rows = [("`config.json`, `model.safetensors`", "the encoder, loadable with `transformers.AutoModel`"),
            ("`vocab.txt`, `tokenizer.json`, `tokenizer_config.json`", "its tokenizer (the one its training data was tokenized with)")]
    if "mlsm_head" in heads:
        rows.append((f"`{heads['mlsm_head']}`", "the MLSM head (dense, GELU, LayerNorm, K-way decoder)"))
    if "mlm_head" in heads:
        rows.append((f"`{heads['mlm_head']}`", "the MLM head (its decoder is tied to the word embeddings)"))
    if dictionary:
        rows.append((f"`{dictionary}`", "the dictionary D (d x K) the MLSM targets were coded against"))
    elif objective == "mlsm":
        rows.append(("(no dictionary)", "the run's dictionary.h5 was not found, or did not match its codes, at "
                                        "export time"))
    rows.append(("`mlsm_export.json`", "source checkpoint, step, heads, dictionary, parameter count"))
    return "| file | what |\n|---|---|\n" + "".join(f"| {f} | {w} |\n" for f, w in rows)


def _snippet(heads: dict, dictionary: str | None) -> str:
    lines = ["import torch", "from transformers import AutoModel, AutoTokenizer"]
    if "mlsm_head" in heads:
        lines.append("from mlsm.trainer.export import load_mlsm_head")
    if dictionary:
        lines.insert(0, "import h5py")
    lines += ["", 'folder = "."  # this folder', "model = AutoModel.from_pretrained(folder).eval()",
              "tok = AutoTokenizer.from_pretrained(folder)",
              'inputs = tok("The committee met on Friday.", return_tensors="pt")', "with torch.no_grad():",
              "    hidden = model(**inputs).last_hidden_state  # (1, tokens, hidden size)"]
    if "mlsm_head" in heads:
        lines += ["head = load_mlsm_head(folder)  # the MLSM head: a last hidden state -> K atom logits",
                  "with torch.no_grad():",
                  "    lsp = head(hidden).softmax(-1)  # per token, the predicted distribution over the K atoms"]
    if dictionary:
        lines += [f'with h5py.File(f"{{folder}}/{dictionary}") as f:',
                  '    D = f["D"][:]  # d x K: column k is atom k, in the auxiliary model\'s hidden space']
    return "```python\n" + "\n".join(lines) + "\n```\n"


def model_card(name: str, meta: dict, info: dict, hidden: dict, run: dict | None, rows: list[dict],
               dictionary: str | None, license: str, languages: list[str]) -> str:
    """The card's text. meta: the checkpoint's `mlsm` block; info: mlsm_export.json; hidden: the BERT config."""
    cfg = (run or {}).get("config") or {}
    data = (run or {}).get("data")
    objective = meta.get("objective") or cfg.get("objective")
    step = meta.get("step")
    logged = _loss_at(rows, step)
    base = ((run or {}).get("context_free_baseline") or {}).get("loss")
    loss = logged["loss"] if logged else None
    source = "" if run else (" The export source is not a checkpoint of an mlsm run folder (no run.json beside it), "
                             "so its training is not recorded here.")
    out = [_metadata(objective, license, languages), f"# {name}\n",
           f"A BERT encoder (`BertModel`: {hidden.get('num_hidden_layers')} layers, hidden size "
           f"{hidden.get('hidden_size')}, {info['parameters'] / 1e6:.2f}M parameters) pre-trained with mlsm "
           f"{meta.get('mlsm_version') or (run or {}).get('mlsm_version') or NOT_RECORDED} and exported with mlsm "
           f"{__version__}.{source}\n",
           "## Objective\n", _objective(meta, cfg) + "\n",
           "## Targets\n", _table(_targets(objective, data)),
           "## Training\n", _table([
               ("checkpoint step", step), ("steps planned", cfg.get("steps")),
               ("batch size (sequences per step)", cfg.get("batch_size")), ("gradient accumulation", cfg.get("grad_accum")),
               ("peak learning rate", cfg.get("lr")), ("warm-up (fraction of steps)", cfg.get("warmup")),
               ("weight decay", cfg.get("weight_decay")), ("mask probability", cfg.get("mask_prob")),
               ("mask policy", cfg.get("mask_policy")), ("max sequence length", cfg.get("max_len")),
               ("precision", cfg.get("precision")), ("seed", cfg.get("seed"))]),
           "## Result\n",
           "The loss against its context-free baseline: the loss of a student that ignores the context "
           "(KL to the mean target for MLSM, the unigram entropy for MLM, weighted as the run weighs its losses). "
           "Below 1 means the student uses the context.\n\n",
           _table([("loss at the logged step", None if logged is None else f"{_fmt(loss)} (step {logged['step']})"),
                   ("context-free baseline", base),
                   ("loss / baseline", loss / base if loss is not None and base else None)]),
           "## Files\n", _files(objective, info["heads"], dictionary)]
    out += ["## Use\n", "Run from this folder (needs `pip install mlsm transformers`):\n\n",
            _snippet(info["heads"], dictionary)]
    return "\n".join(p.rstrip("\n") + "\n" for p in out if p)
