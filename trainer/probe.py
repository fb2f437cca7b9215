"""Linear probes on frozen features: a multinomial logistic regression per task and layer.

The standard probing setup beside fine-tuning: the encoder is frozen, so there is no fine-tuning
variance, and a probe separates representations that fine-tuning washes out. Tasks are read and
encoded exactly as `mlsm finetune` reads them (token tasks: each word's first sub-token; sequence
tasks: here the mean over the example's tokens). The probe is fitted full-batch with L-BFGS from
zero weights on standardised features, so a fit is deterministic; its L2 strength is the one of a
small grid that scores best on dev, and test is scored only with that choice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mlsm import __version__
from mlsm.core import hf
from mlsm.core.bert import PRESETS, BertConfig, BertEncoder
from mlsm.core.config import ProbeConfig
from mlsm.core.device import pick_device
from mlsm.core.errors import MLSMError
from mlsm.core.manifest import write_json_atomic
from mlsm.trainer.finetune import Task, collate, encode_split, load_task, model_label, subsample_splits
from mlsm.trainer.scores import scores

log = logging.getLogger(__name__)

PROBE_JSON = "probe.json"
PROBE_MD = "probe.md"


# --------------------------------------------------------------------------- the frozen encoder


def never_trained_encoder(preset: str, tokenizer: str | None, seed: int) -> tuple[BertEncoder, Path]:
    """A random student of `preset` with the tokenizer's vocabulary, seeded: the probes' floor."""
    if preset not in PRESETS:
        raise MLSMError(f"--never-trained needs a preset as --model: one of {sorted(PRESETS)} (got {preset!r}).")
    tok_dir = hf.resolve_model_dir(tokenizer)
    tok = hf.load_tokenizer(tok_dir)
    config = dataclasses.replace(BertConfig.preset(preset, tok.get_vocab_size(with_added_tokens=True)),
                                 pad_token_id=hf.special_token_ids(tok)["pad"])
    torch.manual_seed(seed)
    return BertEncoder(config).eval(), tok_dir


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """'last' | 'all' | '0,2' -> layer numbers in HF numbering (0 = embeddings)."""
    if spec == "last":
        return [num_layers]
    if spec == "all":
        return list(range(num_layers + 1))
    layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    bad = [x for x in layers if not 0 <= x <= num_layers]
    if bad or not layers:
        raise MLSMError(f"layers {bad or spec} do not exist: this model has layers 0..{num_layers} (0 = embeddings).")
    return layers


@torch.no_grad()
def extract_features(encoder: BertEncoder, examples: list, token_level: bool, layers: list[int], pad_id: int,
                     device, batch: int, desc: str, progress: bool = True) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per layer, one feature row per scored unit (a labelled word's first sub-token, or an example's
    mean over its tokens), and the units' labels. Examples run sorted by length (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    feats: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    labels = []
    for start in tqdm(range(0, len(order), batch), desc=desc, unit="batch", disable=not progress, leave=False):
        b = collate([examples[i] for i in order[start:start + batch]], pad_id, token_level, device)
        states = encoder(b["ids"], b["mask"], b["types"], num_layers=max(layers), output_hidden_states=True)
        if token_level:
            keep = b["labels"] != -100
            labels.append(b["labels"][keep].cpu())
            for layer in layers:
                feats[layer].append(states[layer][keep].float().cpu())
        else:
            labels.append(b["labels"].cpu())
            m = b["mask"].unsqueeze(-1).float()
            for layer in layers:
                feats[layer].append(((states[layer].float() * m).sum(1) / m.sum(1)).cpu())
    hidden = encoder.config.hidden_size
    return ({layer: torch.cat(v) if v else torch.zeros(0, hidden) for layer, v in feats.items()},
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))


# --------------------------------------------------------------------------- the probe


def fit_logistic(X: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: mean cross-entropy + l2 * ||W||^2 (bias not penalised),
    full-batch L-BFGS from zero weights (a convex problem: no seed, the same answer every time)."""
    W = torch.zeros(X.shape[1], n_classes, dtype=X.dtype, device=X.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=X.dtype, device=X.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W + b, y) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def predict_logistic(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> np.ndarray:
    return (X @ W + b).argmax(-1).cpu().numpy()


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every split by the training features' mean and std, so one L2 grid suits every layer."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def probe_layer(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], n_classes: int,
                grid: tuple[float, ...], max_iter: int) -> dict:
    """Fit one probe per L2 strength on train, keep the best on dev (ties: the stronger L2), score dev and test."""
    splits = [s for s in ("dev", "test") if s in feats]
    xs = dict(zip(["train", *splits], standardise(feats["train"], *(feats[s] for s in splits)), strict=True))
    t0 = time.time()
    fits, dev_acc = {}, {}
    for l2 in sorted(grid, reverse=True):
        fits[l2] = fit_logistic(xs["train"], labels["train"], n_classes, l2, max_iter)
        dev_acc[l2] = float((predict_logistic(*fits[l2], xs["dev"]) == labels["dev"].numpy()).mean())
    best = max(dev_acc, key=lambda l2: (dev_acc[l2], l2))
    out = {"l2": best, "dev_accuracy_by_l2": {repr(k): v for k, v in dev_acc.items()}}
    train_pred = predict_logistic(*fits[best], xs["train"])
    out["train"] = {**scores(labels["train"].numpy(), train_pred, n_classes), "n": int(len(train_pred))}
    for split in splits:
        pred = predict_logistic(*fits[best], xs[split])
        out[split] = {**scores(labels[split].numpy(), pred, n_classes), "n": int(len(pred))}
    out["fit_s"] = round(time.time() - t0, 2)
    return out


def majority(labels: dict[str, torch.Tensor], n_classes: int) -> dict:
    """The chance line: the most frequent training label predicted everywhere."""
    top = int(torch.bincount(labels["train"], minlength=n_classes).argmax())
    return {split: scores(y.numpy(), np.full(len(y), top), n_classes) for split, y in labels.items() if split != "train"}


# --------------------------------------------------------------------------- the stage


def _read_task(folder: Path, cfg: ProbeConfig) -> Task:
    if not Path(folder).exists():
        raise MLSMError(f"task folder {folder} does not exist; `make eval-data` writes data/eval/{{bbc,supersense,pos}}/.")
    task = load_task(Path(folder))
    if "dev" not in task.splits:
        raise MLSMError(f"{folder} has no dev split: the probe chooses its L2 strength on dev.")
    subsample_splits(task, cfg.max_train, cfg.max_eval, cfg.seed)
    return task


def run_probe(cfg: ProbeConfig) -> dict:
    """Probe every task at every chosen layer; writes probe.json and probe.md into out_dir (if given)."""
    cfg.validate()
    tasks = [_read_task(Path(t), cfg) for t in cfg.tasks]  # missing data fails before the model loads
    device = pick_device(cfg.device)
    if cfg.never_trained:
        preset = cfg.model or "tiny"
        encoder, tok_dir = never_trained_encoder(preset, cfg.tokenizer, cfg.seed)
        encoder = encoder.to(device)
        model = {"model": f"never-trained {preset}", "model_name": f"never-trained-{preset}", "model_step": 0,
                 "model_objective": "none"}
    else:
        encoder, _, tok_dir = hf.load_encoder(cfg.model, device=device)
        meta = json.loads((tok_dir / hf.CONFIG).read_text()).get("mlsm") or {}
        model = {"model": str(tok_dir), "model_name": model_label(cfg.model, tok_dir),
                 "model_step": meta.get("step"), "model_objective": meta.get("objective")}
    for p in encoder.parameters():
        p.requires_grad_(False)
    layers = resolve_layers(cfg.layers, encoder.config.num_hidden_layers)
    tok = hf.load_tokenizer(tok_dir)
    tok.enable_truncation(max_length=cfg.max_len)
    pad_id = hf.special_token_ids(tok)["pad"]
    result = {**model, "never_trained": cfg.never_trained, "layers": layers,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
              "tasks": {}, "mlsm_version": __version__}
    result["config"]["tasks"] = [str(t) for t in cfg.tasks]
    for task in tasks:
        label_ids = {lab: i for i, lab in enumerate(task.labels)}
        token_level = task.kind == "token"
        t0 = time.time()
        feats: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
        labels: dict[str, torch.Tensor] = {}
        for split in task.splits:
            encoded = encode_split(task, split, tok, label_ids, cfg.max_len)
            per_layer, labels[split] = extract_features(encoder, encoded, token_level, layers, pad_id, device,
                                                        cfg.batch, f"{task.name} {split}", cfg.progress)
            for layer in layers:
                feats[layer][split] = per_layer[layer].to(device)
        if len(labels["train"]) == 0 or len(labels["dev"]) == 0:
            raise MLSMError(f"task {task.name} has no labelled units in train or dev to probe on.")
        extract_s = round(time.time() - t0, 2)
        on_device = {s: y.to(device) for s, y in labels.items()}
        row = {"kind": task.kind, "n_labels": len(task.labels), "units": {s: int(len(y)) for s, y in labels.items()},
               "features": "first sub-token of each labelled word" if token_level else "mean over the tokens",
               "extract_s": extract_s, "majority": majority(labels, len(task.labels)), "layers": {}}
        for layer in layers:
            row["layers"][str(layer)] = probe_layer(feats[layer], on_device, len(task.labels), cfg.l2_grid,
                                                    cfg.max_iter)
            log.info("probe %s layer %d: %s", task.name, layer,
                     json.dumps({k: row["layers"][str(layer)][k] for k in ("l2", "dev", "test")
                                 if k in row["layers"][str(layer)]}))
        result["tasks"][task.name] = row
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        write_json_atomic(out / PROBE_JSON, result)
        (out / PROBE_MD).write_text(markdown_table([result]), encoding="utf-8")
    return result


def probe_checkpoint(checkpoint: str | Path | None, tasks, layers: str | list[int] = "last", **settings) -> dict:
    """The probe as a function (for bench/compare.py): checkpoint is a run, a step-N folder, or with
    never_trained=True a preset name; settings are ProbeConfig's other fields (out_dir, max_train, ...)."""
    spec = layers if isinstance(layers, str) else ",".join(str(x) for x in layers)
    cfg = ProbeConfig(model=None if checkpoint is None else str(checkpoint), tasks=tuple(Path(t) for t in tasks),
                      layers=spec, **settings)
    return run_probe(cfg)


def markdown_table(results: list[dict]) -> str:
    """One row per (model, task, layer): accuracy and macro-F1 in percent, the chosen L2, the majority line."""
    lines = ["| model | task | layer | L2 | dev acc | dev macro-F1 | test acc | test macro-F1 | majority (test) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, t in r["tasks"].items():
            chance = t["majority"].get("test", t["majority"]["dev"])["accuracy"]
            for layer, p in t["layers"].items():
                def cell(split, metric, p=p):
                    return f"{100 * p[split][metric]:.1f}" if split in p else "–"

                lines.append(f"| {r['model_name']} | {name} | {layer} | {p['l2']:g} | {cell('dev', 'accuracy')} | "
                             f"{cell('dev', 'macro_f1')} | {cell('test', 'accuracy')} | {cell('test', 'macro_f1')} | "
                             f"{100 * chance:.1f} |")
    return "\n".join(lines) + "\n"
