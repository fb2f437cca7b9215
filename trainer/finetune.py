"""Fine-tuning protocol of DESIGN.md section 1: a linear head on our BERT, several seeds, mean +- std.

Tasks are folders holding train/dev/test files:
- sentence or sentence-pair classification: .tsv (GLUE style, header row), .csv or .jsonl;
- token classification: .conll / .txt / .tsv in CoNLL style (token first, tag last, blank line
  between sentences); a tag of `_` means "no label" (not trained on, not scored).
The classifier reads the [CLS] hidden state (our checkpoints have no trained pooler); the tagger
reads each word's first sub-token. No model selection on dev: scores are those after the last
epoch, so the test set is never used for a choice.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mlsm import __version__
from mlsm.core import hf
from mlsm.core.config import FinetuneConfig
from mlsm.core.device import pick_device, resolve_precision
from mlsm.core.errors import MLSMError
from mlsm.core.manifest import write_json_atomic
from mlsm.trainer.metrics_log import MetricsLog
from mlsm.trainer.report_to import Report, require_sink
from mlsm.trainer.scores import mean_std, scores
from mlsm.trainer.train import lr_at, param_groups

log = logging.getLogger(__name__)

NO_LABEL = "_"
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "validation", "valid", "dev_matched"), "test": ("test",)}
CLASSIFICATION_EXT = (".tsv", ".csv", ".jsonl")
TOKEN_EXT = (".conll", ".conllu", ".bio", ".iob")
# Column names of common formats, tried in order: (first text, optional second text).
TEXT_COLUMNS = [("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
                ("question", "sentence"), ("text_a", "text_b"), ("sentence", None), ("text", None),
                ("content", None), ("review", None)]
LABEL_COLUMNS = ("label", "gold_label", "labels", "class", "category")


@dataclass
class Task:
    name: str
    kind: str  # "sequence" | "token"
    labels: list[str]
    splits: dict[str, list] = field(default_factory=dict)  # sequence: (text_a, text_b, label); token: (words, tags)


# --------------------------------------------------------------------------- reading tasks


def _find_split(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_NAMES[split]:
        for ext in CLASSIFICATION_EXT + TOKEN_EXT + (".txt",):
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _is_token_file(path: Path) -> bool:
    if path.suffix in TOKEN_EXT:
        return True
    if path.suffix in (".csv", ".jsonl"):
        return False
    # .tsv / .txt: CoNLL if sentences are separated by blank lines and rows have 2+ short columns.
    with open(path, encoding="utf-8", errors="replace") as f:
        head = list(itertools.islice(f, 200))
    nonblank = [i for i, line in enumerate(head) if line.strip()]
    blank = any(not head[i].strip() for i in range(nonblank[0], nonblank[-1])) if nonblank else False
    rows = [line.rstrip("\n").split("\t") if "\t" in line else line.split() for line in head if line.strip()]
    return blank and all(len(r) >= 2 and len(r[0]) < 60 for r in rows[:50])


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    sents, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if words:
                    sents.append((words, tags))
                words, tags = [], []
                continue
            if line.startswith(("-DOCSTART-", "# ")):
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                raise MLSMError(f"{path}:{lineno}: expected 'token<TAB>tag', got {line[:80]!r}.")
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        sents.append((words, tags))
    return sents


def _col(header: list[str] | None, spec: str, path: Path) -> int:
    if spec.isdigit():
        return int(spec)
    if header is None or spec not in header:
        raise MLSMError(f"{path} has no column {spec!r} (columns: {header}); pass --text-cols/--label-col.")
    return header.index(spec)


def read_classification(path: Path, text_cols=None, label_col=None) -> list[tuple[str, str | None, str | None]]:
    """Rows (text_a, text_b or None, label or None); headers name the columns (see TEXT_COLUMNS)."""
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MLSMError(f"{path}:{lineno}: not JSON ({e}).") from e
                rows.append(d)
        if not rows:
            return []
        header = list(rows[0])
        table = [[str(r.get(k, "")) if r.get(k) is not None else "" for k in header] for r in rows]
    else:
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix == ".csv":
                reader = csv.reader(f)
            else:  # GLUE TSVs hold unescaped quotes
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            table = [r for r in reader if r]
        if not table:
            return []
        header, table = table[0], table[1:]
    if text_cols:
        ia = _col(header, text_cols[0], path)
        ib = _col(header, text_cols[1], path) if len(text_cols) > 1 else None
    else:
        for a, b in TEXT_COLUMNS:
            if a in header and (b is None or b in header):
                ia, ib = header.index(a), (header.index(b) if b else None)
                break
        else:
            raise MLSMError(
                f"{path}: cannot tell the text column(s) from the header {header}; pass --text-cols NAME[,NAME2]."
            )
    if label_col:
        il = _col(header, label_col, path)
    else:
        il = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    out = []
    for i, r in enumerate(table):
        need = max(x for x in (ia, ib, il) if x is not None)
        if len(r) <= need:
            raise MLSMError(f"{path}: row {i + 2} has {len(r)} columns, fewer than the {need + 1} needed.")
        label = r[il].strip() if il is not None else None
        out.append((r[ia], r[ib] if ib is not None else None, label if label else None))
    return out


def load_task(folder: Path, text_cols=None, label_col=None) -> Task:
    folder = Path(folder)
    if not folder.is_dir():
        raise MLSMError(f"task {folder} is not a folder; it must hold train.* and dev.* and/or test.* files.")
    files = {s: _find_split(folder, s) for s in SPLIT_NAMES}
    if files["train"] is None:
        raise MLSMError(f"{folder} has no train file (train.tsv, train.csv, train.jsonl or train.conll).")
    kind = "token" if _is_token_file(files["train"]) else "sequence"
    task = Task(name=folder.name, kind=kind, labels=[])
    for split, path in files.items():
        if path is None:
            continue
        if kind == "token":
            data = read_conll(path)
        else:
            data = read_classification(path, text_cols, label_col)
            if split == "train" and any(lab is None for *_, lab in data):
                raise MLSMError(f"{path} has rows without a label; name the label column with --label-col.")
            if split != "train" and data and all(lab is None for *_, lab in data):
                log.info("%s has no labels (e.g. a GLUE test file); it is not scored", path)
                continue
        task.splits[split] = data
    if "dev" not in task.splits and "test" not in task.splits:
        raise MLSMError(f"{folder} has no labelled dev or test file to score on.")
    spec = folder / "task.json"
    if spec.is_file():
        task.labels = list(json.loads(spec.read_text()).get("labels") or [])
    seen = set()
    for data in task.splits.values():
        if kind == "token":
            seen.update(t for _, tags in data for t in tags if t != NO_LABEL)
        else:
            seen.update(lab for *_, lab in data if lab is not None)
    task.labels += sorted(seen - set(task.labels))
    if len(task.labels) < 2:
        raise MLSMError(f"{folder} has {len(task.labels)} label(s); classification needs at least two.")
    return task


def subsample_splits(task: Task, max_train: int | None, max_eval: int | None, seed: int) -> None:
    """Cut train to max_train and dev, test to max_eval examples, in place.

    Seeded subsamples, never the first rows: files are often sorted by label or source.
    """
    for i, (split, cap) in enumerate((("train", max_train), ("dev", max_eval), ("test", max_eval))):
        rows = task.splits.get(split)
        if cap is not None and rows is not None and len(rows) > cap:
            keep = np.sort(np.random.default_rng([seed, i]).choice(len(rows), cap, replace=False))
            task.splits[split] = [rows[j] for j in keep]


def model_label(spec: str, model_dir: Path) -> str:
    """How reports name a model: run/step-N for a checkpoint, an alias (`minilm`) itself, else the folder name."""
    if model_dir.name.startswith("step-"):
        return f"{model_dir.parent.name}/{model_dir.name}"
    return spec if not Path(spec).exists() else model_dir.name


# --------------------------------------------------------------------------- encoding

Example = tuple  # (token ids, segment ids, label or per-token labels with -100 = ignore)


def encode_split(task: Task, split: str, tok, label_ids: dict[str, int], max_len: int) -> list[Example]:
    """Token ids, segment ids (from the tokenizer's pair template) and labels of one split."""
    out: list[Example] = []
    dropped = 0
    if task.kind == "sequence":
        for a, b, lab in task.splits[split]:
            enc = tok.encode(a, b) if b is not None else tok.encode(a)
            out.append((enc.ids, enc.type_ids, label_ids[lab]))
        return out
    for words, tags in task.splits[split]:
        enc = tok.encode(words, is_pretokenized=True)
        labels, prev = [], None
        for w in enc.word_ids:
            if w is None or w == prev:
                labels.append(-100)
            else:
                labels.append(label_ids[tags[w]] if tags[w] != NO_LABEL else -100)
            prev = w
        dropped += sum(1 for t in tags if t != NO_LABEL) - sum(1 for x in labels if x != -100)
        out.append((enc.ids, enc.type_ids, labels))
    if dropped:
        log.warning("%s/%s: %d labelled words were cut by --max-len %d and are not scored",
                    task.name, split, dropped, max_len)
    return out


def collate(items: list[Example], pad_id: int, token_task: bool, device) -> dict[str, torch.Tensor]:
    T = max(len(ids) for ids, _, _ in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    types = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long) if token_task else torch.zeros(len(items), dtype=torch.long)
    for i, (x, t, y) in enumerate(items):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
        types[i, :len(t)] = torch.tensor(t)
        if token_task:
            labels[i, :len(y)] = torch.tensor(y)
        else:
            labels[i] = y
    return {k: v.to(device) for k, v in dict(ids=ids, mask=mask, types=types, labels=labels).items()}


class Classifier(nn.Module):
    """Encoder + dropout + linear: on [CLS] for sequences, on every position for tokens."""

    def __init__(self, encoder, n_labels: int, token_level: bool):
        super().__init__()
        self.encoder = encoder
        self.token_level = token_level
        self.dropout = nn.Dropout(encoder.config.hidden_dropout_prob)
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)
        nn.init.normal_(self.head.weight, 0.0, encoder.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, mask, types):
        h = self.encoder(ids, mask, types)
        return self.head(self.dropout(h if self.token_level else h[:, 0]))


# --------------------------------------------------------------------------- one seed


def predict(model: Classifier, data: list[Example], pad_id: int, device, batch: int,
            bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(gold, predicted) label ids over the scored units (examples, or labelled words)."""
    model.eval()
    golds, preds = [], []
    with torch.no_grad():
        for i in range(0, len(data), batch):
            b = collate(data[i:i + batch], pad_id, model.token_level, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                p = model(b["ids"], b["mask"], b["types"]).argmax(-1)
            keep = b["labels"] != -100
            golds.append(b["labels"][keep].cpu().numpy())
            preds.append(p[keep].cpu().numpy())
    return np.concatenate(golds), np.concatenate(preds)


def config_json(cfg: FinetuneConfig) -> dict:
    """The settings as results.json and the dashboards record them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def seed_dir(cfg: FinetuneConfig, seed: int) -> Path | None:
    """<out>/<task>/seed-<seed>/: one seed's metrics.jsonl (and its --report-to mirror), as a run folder."""
    return None if cfg.out_dir is None else Path(cfg.out_dir) / f"seed-{seed}"


def run_seed(cfg: FinetuneConfig, task: Task, encoded: dict[str, list[Example]], seed: int, device, pad_id: int) -> dict:
    """Fine-tune a fresh copy of the encoder with one seed; scores after the last epoch.

    With --out, the training loss goes to the seed's metrics.jsonl every log_every steps, and the
    scores as a last row at the last step.
    """
    torch.manual_seed(seed)
    bf16 = cfg.precision == "bf16"
    encoder, _, _ = hf.load_encoder(cfg.model, device=device)
    token_task = task.kind == "token"
    model = Classifier(encoder, len(task.labels), token_task).to(device)
    train = encoded["train"]
    total = max(1, int(round(cfg.epochs * math.ceil(len(train) / cfg.batch))))
    sched = SimpleNamespace(lr=cfg.lr, warmup=cfg.warmup, steps=total)  # the pre-training schedule's shape
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    rng = np.random.default_rng(seed)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    step, t0, losses = 0, time.time(), []
    folder = seed_dir(cfg, seed)
    report = Report(cfg.report_to, name=f"{task.name}-seed-{seed}", group=task.name,
                    config=config_json(cfg) | {"seed": seed})
    with MetricsLog(folder or Path(), 0, enabled=folder is not None, report=report) as metrics:
        bar = tqdm(total=total, desc=f"{task.name} seed {seed}", unit="step", disable=not cfg.progress, leave=False)
        while step < total:
            order = rng.permutation(len(train))
            for i in range(0, len(order), cfg.batch):
                if step >= total:
                    break
                model.train()
                b = collate([train[j] for j in order[i:i + cfg.batch]], pad_id, token_task, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(b["ids"], b["mask"], b["types"])
                loss = loss_fn(logits.float().reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, sched)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step in (1, total):
                    metrics.write({"step": step, "loss": losses[-1], "lr": opt.param_groups[0]["lr"],
                                   "grad_norm": float(grad_norm), "elapsed_s": time.time() - t0})
        bar.close()
        result = {"seed": seed, "steps": total, "train_loss_first": losses[0],
                  "train_loss_last": float(np.mean(losses[-10:])), "train_s": round(time.time() - t0, 2)}
        for split in ("dev", "test"):
            if split in encoded:
                gold, pred = predict(model, encoded[split], pad_id, device, max(cfg.batch, 64), bf16)
                result[split] = {**scores(gold, pred, len(task.labels)), "n": int(len(gold))}
                metrics.write({"step": total, **{f"{split}_{k}": v for k, v in result[split].items() if k != "n"}})
    return result


# --------------------------------------------------------------------------- the protocol


def summarize(per_seed: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {metric: {mean, std}}} over seeds (std with ddof=1)."""
    out: dict = {}
    for split in ("dev", "test"):
        rows = [r[split] for r in per_seed if split in r]
        if not rows:
            continue
        out[split] = {}
        for metric in rows[0]:
            if metric == "n":
                continue
            m, s = mean_std([r[metric] for r in rows])
            out[split][metric] = {"mean": m, "std": s}
    return out


def markdown_table(results: list[dict]) -> str:
    """One row per (model, task): scores as mean +- std over seeds, in percent."""
    lines = ["| model | task | split | seeds | accuracy | macro-F1 | MCC |", "|---|---|---|---|---|---|---|"]
    for r in results:
        split = "test" if "test" in r["summary"] else "dev"
        s = r["summary"][split]

        def cell(k, s=s):
            return f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}" if k in s else "–"

        lines.append(f"| {r['model_name']} | {r['task']} | {split} | {len(r['seeds'])} | {cell('accuracy')} | "
                     f"{cell('macro_f1')} | {cell('mcc')} |")
    return "\n".join(lines) + "\n"


def run_finetune(cfg: FinetuneConfig) -> dict:
    """All seeds on one task; writes results.json and results.md into out_dir (if given)."""
    cfg.validate()
    require_sink(cfg.report_to)  # a missing package is an error before any fine-tuning starts
    device = pick_device(cfg.device)
    model_dir = hf.resolve_model_dir(cfg.model)
    model_name = model_label(cfg.model, model_dir)
    # results.json's config records the precision used (auto resolves per machine)
    cfg = dataclasses.replace(cfg, model=str(model_dir), precision=resolve_precision(cfg.precision, device))
    task = load_task(cfg.task, cfg.text_cols, cfg.label_col)
    tok = hf.load_tokenizer(model_dir)
    tok.enable_truncation(max_length=cfg.max_len)
    pad_id = hf.special_token_ids(tok)["pad"]
    subsample_splits(task, cfg.max_train, cfg.max_eval, cfg.seed)
    label_ids = {lab: i for i, lab in enumerate(task.labels)}
    encoded = {split: encode_split(task, split, tok, label_ids, cfg.max_len) for split in task.splits}
    log.info("finetune %s (%s, %d labels): %s examples; model %s", task.name, task.kind, len(task.labels),
             {k: len(v) for k, v in encoded.items()}, model_dir)

    per_seed = []
    for s in range(cfg.seeds):
        r = run_seed(cfg, task, encoded, cfg.seed + s, device, pad_id)
        log.info("%s seed %d: %s", task.name, cfg.seed + s,
                 json.dumps({k: r[k] for k in ("dev", "test") if k in r}))
        per_seed.append(r)
    meta = json.loads((model_dir / hf.CONFIG).read_text()).get("mlsm") or {}
    result = {
        "task": task.name, "kind": task.kind, "labels": task.labels, "model": str(model_dir),
        "model_name": model_name,
        "model_step": meta.get("step"), "model_objective": meta.get("objective"),
        "sizes": {k: len(v) for k, v in encoded.items()},
        "config": config_json(cfg),
        "seeds": per_seed, "summary": summarize(per_seed), "mlsm_version": __version__,
    }
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        write_json_atomic(out / "results.json", result)
        (out / "results.md").write_text(markdown_table([result]), encoding="utf-8")
    return result
