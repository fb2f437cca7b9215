"""Every stage's settings, in one place: a dataclass per command, the single source of its defaults,
its validation, its command-line options and the parameters its manifest records.

A field made with `opt` says how it appears on the command line; `click_options(Config)` turns the
fields into a command's options and `from_cli(Config, kwargs)` builds the config back. A stage
function takes its config and nothing else, so a default lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from mlsm.core.errors import MLSMError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the machinery


def opt(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (), type: Any = None,
        required: bool = False, multiple: bool = False, callback: Callable | None = None, record: str | bool = False,
        aliases: tuple[str, ...] = (), cli: bool = True):
    """A config field and its command-line option.

    flags: the option's names (default --field-name); type: a click type when the default does not
    say it; record: the stage's manifest records the field (under this key, if a string), so a
    change of it makes a folder's output another one; aliases: deprecated spellings, still accepted.
    """
    meta = dict(help=help, flags=flags, type=type, required=required, multiple=multiple, callback=callback,
                record=record, aliases=aliases, cli=cli)
    return field(default=default, metadata=meta)


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def click_options(cls) -> Callable:
    """Decorate a click command with one option per `opt` field of `cls`, in field order."""
    def decorate(f):
        for fld in reversed(fields(cls)):
            m = fld.metadata
            if not m.get("cli", False):
                continue
            default = None if fld.default is dataclasses.MISSING else fld.default
            names = list(m["flags"]) or [_dash(fld.name)]
            kw: dict[str, Any] = dict(help=m["help"], show_default=True)
            if isinstance(default, bool):
                if not m["flags"]:
                    names = [f"{_dash(fld.name)}/--no-{fld.name.replace('_', '-')}"] if default else names
                kw["default"] = default
                if "/" not in names[0]:
                    kw["is_flag"] = True
            else:
                kw.update(default=list(default) if m["multiple"] and default is not None else default,
                          required=m["required"], multiple=m["multiple"], callback=m["callback"])
                if m["type"] is not None:
                    kw["type"] = m["type"]
                elif isinstance(default, Path):
                    kw["type"] = click.Path(path_type=Path)
            f = click.option(*names, fld.name, **kw)(f)
            for alias in m["aliases"]:  # hidden, resolved by from_cli
                f = click.option(alias, f"{fld.name}__{alias.strip('-').replace('-', '_')}", hidden=True,
                                 default=None, type=kw.get("type"))(f)
        return f
    return decorate


def from_cli(cls, kwargs: dict, **extra):
    """The config a command's keyword arguments describe (deprecated aliases folded in, with a warning)."""
    values = dict(kwargs)
    for fld in fields(cls):
        for alias in fld.metadata.get("aliases", ()):
            key = f"{fld.name}__{alias.strip('-').replace('-', '_')}"
            given = values.pop(key, None)
            if given is not None:
                log.warning("%s is deprecated; use %s", alias, (fld.metadata["flags"] or (_dash(fld.name),))[0])
                if values.get(fld.name) is None:
                    values[fld.name] = given
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in {**values, **extra}.items() if k in names})


def recorded(cfg) -> dict:
    """The parameters a stage's manifest records: a folder holds the output of exactly these."""
    out = {}
    for fld in fields(cfg):
        key = fld.metadata.get("record")
        if key:
            value = getattr(cfg, fld.name)
            out[key if isinstance(key, str) else fld.name] = list(value) if isinstance(value, tuple) else value
    return out


def check(problems: list[str], what: str) -> None:
    """Raise one MLSMError listing every problem found in a config."""
    if problems:
        raise MLSMError(f"invalid {what} settings: " + "; ".join(problems) + ".")


class TokenCount(click.ParamType):
    """A token budget: an integer (1e6 and 300k are accepted) or 'all'."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in ("all", "", "none"):
            return None
        mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1], 1)
        try:
            n = int(float(text[:-1] if mult > 1 else text) * mult)
        except ValueError:
            self.fail(f"{value!r} is not a token count (e.g. 300000, 300k, 2M or all)", param, ctx)
        if n <= 0:
            self.fail("must be positive", param, ctx)
        return n


def parse_layers(ctx, param, value) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(x) for part in value for x in str(part).split(",") if x.strip()}))
    except ValueError:
        raise click.BadParameter("layers are integers, e.g. --layers 6 or --layers 2,4,6") from None


def parse_layer_or_auto(ctx, param, value) -> int | None:
    """sparse-code's --layer: an integer, or auto / nothing (the extract's single layer)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("a layer is an integer (HF numbering) or auto, e.g. --layer 3") from None


def parse_layers_or_auto(ctx, param, value) -> tuple[int, ...] | str:
    """extract's --layers: integers, or `auto` (the layer recipe picks one: pipeline/layer_choice.py)."""
    if [str(v).strip().lower() for v in value] == ["auto"]:
        return "auto"
    return parse_layers(ctx, param, value)


# Field factories for options several stages share (a dataclass field object serves one class only).
def _worker_index():
    return opt(None, "This worker's index (0..n-1); it takes shards i, i+n, i+2n, ... Under torchrun RANK sets it.",
               type=int, aliases=("--shard-index",))


def _num_workers():
    return opt(None, "Number of workers sharing --out (under torchrun: WORLD_SIZE).", type=int,
               aliases=("--num-shards",))


def _corpus():
    return opt("data/corpus", "A .txt/.txt.gz/.jsonl/.jsonl.gz/.parquet file, a Hugging Face datasets save_to_disk "
                              "folder or .arrow file, a folder of them, or a glob.")


def _text_field():
    return opt("text", "The jsonl field / Parquet or datasets column that holds each document's text (plain text "
                       "files have none). A resume with another one is refused: it reads another corpus.")


def _precision(what: str, record: bool = False):
    return opt("auto", _PRECISION_HELP + " " + what, type=click.Choice(PRECISIONS), record=record)


PRECISIONS = ("auto", "bf16", "fp32")
REPORT_TO = ("none", "tensorboard", "wandb")
_DEVICE_HELP = "auto picks cuda when torch sees a GPU, else cpu."
_PRECISION_HELP = ("auto: bf16 on CUDA and on CPUs with a native bf16 matmul (AMX, AVX512-BF16, Arm BF16), "
                   "fp32 elsewhere (emulated bf16 is slower).")
_FORCE_HELP = "Redo the stage, deleting its previous outputs in --out."
_PROGRESS_HELP = "Progress bars (logs stay either way)."


def _report_to(where: str):
    return opt("none", f"Also mirror every metrics.jsonl row ({where}) to TensorBoard (tensorboard/ beside it) or "
                       "Weights & Biases (offline unless WANDB_MODE, WANDB_API_KEY or `wandb login` says otherwise). "
                       "Optional extras: pip install mlsm[tensorboard] / mlsm[wandb].",
               type=click.Choice(REPORT_TO))


def worker_flag_problems(index: int | None, count: int | None) -> list[str]:
    """What is wrong with --worker-index/--num-workers (the configs' and core.ranks.join's one check)."""
    if (index is None) != (count is None):
        return ["--worker-index and --num-workers go together (e.g. --worker-index 0 --num-workers 4)"]
    if count is not None and (count < 1 or not 0 <= index < count):
        return [f"--worker-index must be in 0..{count - 1} and --num-workers >= 1 (got {index} of {count})"]
    return []


# --------------------------------------------------------------------------- the stages


@dataclass
class ExtractConfig:
    corpus: str = _corpus()
    text_field: str = _text_field()
    out: Path = opt(Path("data/extract"), "Output folder.")
    tokens: Path | None = opt(None, "A `mlsm tokenize` folder to read instead of --corpus: the corpus is tokenized "
                                    "once, and each worker reads only its shards' sequences (--max-len and "
                                    "--max-tokens then come from it).", type=click.Path(path_type=Path))
    aux: str | None = opt(None, "Auxiliary encoder: 'minilm' (default, the embedded all-MiniLM-L6-v2), a local HF "
                                "BERT directory, or one of our runs/checkpoints.")
    layers: tuple[int, ...] | str = opt((), "Layer(s) to store, HF numbering (0 = embeddings, i = block i). "
                                            "Explicit on purpose: the choice of layer shapes the targets. e.g. "
                                            "--layers 6 or 2,4,6, or auto: the layer recipe chooses one on a sample "
                                            "first (--layer-* options; docs/evaluation.md), and the manifest records "
                                            "the choice.",
                                        required=True, multiple=True, callback=parse_layers_or_auto, record=True)
    layer_candidates: tuple[int, ...] = opt((), "With --layers auto: the layers to choose from (default: every block "
                                                "of the auxiliary model, 1..L).", multiple=True, callback=parse_layers)
    layer_sample_tokens: int = opt(50_000, "With --layers auto: tokens at the head of the slice the candidates are "
                                           "extracted on, coded and pre-trained on.")
    layer_proxy_steps: int = opt(300, "With --layers auto: steps of the tiny student's proxy pre-training per "
                                      "candidate (about 45 s each on 2 CPU cores).")
    layer_proxy_k: int = opt(500, "With --layers auto: dictionary size of the proxy's codes of the sample.")
    layer_tie: float = opt(0.02, "With --layers auto: layers whose proxy loss / baseline is within this share of "
                                 "the lowest are tied; the shallowest (cheapest) of them wins.")
    layer_seed: int = opt(0, "With --layers auto: seed of the samples, dictionaries and proxy students.")
    layer_choice_dir: Path | None = opt(None, "With --layers auto: where the choice's sample extract, report and "
                                              "choice.json go (default <out>/layer-choice; reused when present).",
                                        type=click.Path(path_type=Path))
    layer_choice_only: bool = opt(False, "With --layers auto: make the choice, print the chosen layer and stop "
                                         "(before starting several workers, or for sparse-code --from-tokens).")
    max_len: int = opt(128, "Tokens per packed sequence, [CLS] and [SEP] included.", record=True)
    max_tokens: int | None = opt(None, "Stop after this many tokens (a slice of the corpus for quick runs).",
                                 type=TokenCount(), record=True)
    shard_tokens: int = opt(200_000, "Tokens per Parquet shard.", record=True)
    batch_tokens: int = opt(8192, "Padded tokens per forward batch.")
    precision: str = _precision("The auxiliary forward runs under bf16 autocast; shards store float16 either way. "
                                "The manifest records the precision used.", record=True)
    worker_index: int | None = _worker_index()
    num_workers: int | None = _num_workers()
    device: str = opt("auto", _DEVICE_HELP)
    force: bool = opt(False, _FORCE_HELP)
    progress: bool = opt(True, _PROGRESS_HELP)

    def validate(self) -> None:
        problems = worker_flag_problems(self.worker_index, self.num_workers)
        if not self.layers:
            problems.append("give at least one layer (--layers), or --layers auto")
        if self.layer_choice_only and self.layers != "auto":
            problems.append("--layer-choice-only goes with --layers auto")
        if self.layer_sample_tokens < 1000:
            problems.append("--layer-sample-tokens must be at least 1000")
        if self.layer_proxy_steps < 10:
            problems.append("--layer-proxy-steps must be at least 10 (the proxy loss averages its last logged steps)")
        if self.layer_proxy_k < 2:
            problems.append("--layer-proxy-k must be at least 2")
        if not 0.0 <= self.layer_tie < 1.0:
            problems.append("--layer-tie is a share in [0, 1)")
        if self.max_len < 3:
            problems.append("--max-len must leave room for [CLS], [SEP] and one token (>= 3)")
        for name in ("shard_tokens", "batch_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{_dash(name)} must be positive")
        check(problems, "extract")


SOLVERS = ("exact", "fista")


@dataclass
class SparseCodeConfig:
    extract_dir: Path = opt(Path("data/extract"), "Output folder of `mlsm extract`.")
    out: Path = opt(Path("data/codes"), "Output folder.")
    from_tokens: Path | None = opt(None, "The fused path: a `mlsm tokenize` folder. The auxiliary forward runs here, "
                                         "shard by shard, and each shard's states are coded while in memory: no "
                                         "hidden states are written (and --extract-dir is not used).",
                                   type=click.Path(path_type=Path))
    aux: str | None = opt(None, "With --from-tokens: the auxiliary encoder, as for `mlsm extract --aux`.")
    dictionary: Path | None = opt(None, "Code with this dictionary.h5 (of the same auxiliary model, layer, K and "
                                        "lambda) instead of learning one.", type=click.Path(path_type=Path))
    layer: int | None = opt(None, "Which extracted layer to code (needed if several were extracted). auto, or "
                                  "none given: the extract's one layer (the one `--layers auto` chose).",
                            callback=parse_layer_or_auto, record=True)
    K: int = opt(3000, "Dictionary size (number of latent semantic properties).", flags=("-k", "--K"), record=True)
    lam: float = opt(0.05, "L1 penalty of the non-negative lasso.", flags=("--lambda",), record="lambda")
    tol: float = opt(1e-4, "Certified relative duality gap each token's code is solved to.", record=True)
    dict_samples: int = opt(1_000_000, "Token vectors sampled to learn the dictionary.", record=True)
    heldout: int = opt(20_000, "Extra vectors held out to report the dictionary's objective.", record=True)
    dict_per_sequence: float = opt(2.0, "Tokens the dictionary sample takes from a full-length sequence, on "
                                        "average (uniform over the stream either way): fewer keep its contexts "
                                        "varied, more cut the forward the fused path runs for it.", record=True)
    dict_specials: bool = opt(False, "Let the dictionary sample (training and held-out) draw the [CLS] and [SEP] "
                                     "of each sequence too. Default: leave them out, as the reference does. Every "
                                     "token is coded either way; only the sample the dictionary learns from "
                                     "changes.", flags=("--dict-specials/--no-dict-specials",), record=True)
    batch_size: int = opt(8192, "Tokens per solver call; nn_lasso splits them into 1024-row chunks over the threads.")
    top_k: int | None = opt(None, "Keep only the N largest atoms per token (default: all); the target a/sum(a) is "
                                  "renormalised over them. `make bench-extract` reports the KL this costs for N in "
                                  "8..64.", type=int, record=True)
    solver: str = opt("exact", "How every token is coded: exact, the active-set non-negative lasso solved to a "
                               "certified duality gap (--tol); fista, a fixed --fista-steps FISTA steps from zero "
                               "(the reference's coder; no convergence claim, the part files record each code's "
                               "gap). The dictionary is learnt with its own solver either way.",
                      type=click.Choice(SOLVERS), record=True)
    fista_steps: int = opt(100, "With --solver fista: FISTA steps per token.", record=True)
    values: str = opt("float32", "Storage type of the code values (float16 halves their bytes).",
                      flags=("--values-dtype", "--values"), type=click.Choice(["float32", "float16"]), record=True)
    delete_hidden: bool = opt(False, "Delete each hidden-state shard of --extract-dir once its codes are written and "
                                     "synced (the stage stays resumable; extracting again needs `mlsm extract "
                                     "--force`).")
    dictionary_only: bool = opt(False, "Learn dictionary.h5 and stop: run this once before separate worker jobs "
                                       "(--worker-index).")
    seed: int = opt(0, "Seed of the dictionary sample and of its learning.", record=True)
    shard_tokens: int = opt(200_000, "With --from-tokens: tokens per part (the unit of resumption), cut as "
                                     "`mlsm extract` cuts its shards.", record=True)
    batch_tokens: int = opt(8192, "With --from-tokens: padded tokens per forward batch.")
    precision: str = _precision("With --from-tokens: the auxiliary forward, as for `mlsm extract`.", record=True)
    worker_index: int | None = _worker_index()
    num_workers: int | None = _num_workers()
    device: str = opt("auto", _DEVICE_HELP)
    force: bool = opt(False, _FORCE_HELP)
    progress: bool = opt(True, _PROGRESS_HELP)

    def validate(self) -> None:
        problems = worker_flag_problems(self.worker_index, self.num_workers)
        if self.values not in ("float32", "float16"):
            problems.append("--values-dtype must be float32 or float16")
        if not 1 <= self.K <= 65535:
            problems.append("K must be in 1..65535: atom indices are stored as uint16")
        if self.top_k is not None and self.top_k < 1:
            problems.append("--top-k must be at least 1 (leave it out to keep every atom)")
        if self.lam < 0 or not self.tol > 0:
            problems.append(f"need --lambda >= 0 and --tol > 0 (got {self.lam}, {self.tol})")
        if self.dict_samples < 1 or self.heldout < 0 or self.batch_size < 1:
            problems.append("--dict-samples and --batch-size must be positive, --heldout >= 0")
        if self.shard_tokens < 1 or self.batch_tokens < 1:
            problems.append("--shard-tokens and --batch-tokens must be positive")
        if not self.dict_per_sequence > 0:
            problems.append("--dict-per-sequence must be positive")
        if self.solver not in SOLVERS:
            problems.append(f"--solver must be one of {', '.join(SOLVERS)}")
        if self.fista_steps < 1:
            problems.append("--fista-steps must be at least 1")
        if self.from_tokens is not None and self.delete_hidden:
            problems.append("--delete-hidden has nothing to delete with --from-tokens (no hidden states are written)")
        check(problems, "sparse-code")


@dataclass
class TokenizeConfig:
    corpus: str = _corpus()
    text_field: str = _text_field()
    out: Path = opt(Path("data/tokens"), "Output folder.")
    tokenizer_from: str | None = opt(None, "Model folder whose tokenizer to use (default: the embedded MiniLM's).")
    max_len: int = opt(128, "Tokens per packed sequence, [CLS] and [SEP] included.", record=True)
    max_tokens: int | None = opt(None, "Stop after this many tokens.", type=TokenCount(), record=True)
    part_tokens: int = opt(1_000_000, "Tokens per part file (the unit of resumption).", record=True, cli=False)
    force: bool = opt(False, _FORCE_HELP)
    progress: bool = opt(True, _PROGRESS_HELP)

    def validate(self) -> None:
        check(["--max-len must be >= 3"] if self.max_len < 3 else [], "tokenize")


OBJECTIVES = ("mlsm", "mlm")
MASK_POLICIES = ("mask", "bert")


@dataclass
class PretrainConfig:
    # `resumable` fields decide how long a run goes and what it records, not what a step computes:
    # they may change when a run is resumed (steps may only grow, checked separately).
    data: Path = opt(Path("data/codes/codes.h5"), "codes.h5 (MLSM) or tokens.h5 / codes.h5 (MLM).")
    out_dir: Path | None = opt(None, "Run folder (default runs/<objective>-<model>).", flags=("--out",),
                               type=click.Path(path_type=Path))
    objective: str = opt("mlsm", "Pre-training objective.", type=click.Choice(OBJECTIVES))
    mlm_weight: float = opt(0.0, "w in L = L_MLSM + w * L_MLM (BabyLM used 1.0).")
    model: str = opt("tiny", "Student preset: tiny, mini, small, medium (the paper's) or base.")
    model_overrides: dict | None = opt(None, "BertConfig fields replacing the preset's (tests, ablations).", cli=False)
    init_from: Path | None = opt(None, "Start from one of our checkpoints.", type=click.Path(path_type=Path))
    steps: int = opt(1000, "Optimizer steps.")
    batch_size: int = opt(32, "Sequences per optimizer step, over all processes (paper: 1024).")
    grad_accum: int = opt(1, "Micro-batches per step; batch-size must divide by grad-accum x processes.")
    lr: float = opt(1e-4, "Peak learning rate (AdamW).")
    warmup: float = opt(0.01, "Fraction of steps of linear warm-up (then linear decay to 0).")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and LayerNorm weights, unless --decay-1d).")
    decay_1d: bool = opt(False, "Decay every parameter, biases and LayerNorm weights included (the reference's "
                                "AdamW). Default: matrices only.")
    clip: float = opt(1.0, "Gradient-norm clipping (0: none).", cli=False)
    mask_prob: float = opt(0.15, "Share of non-special tokens selected for masking.")
    mask_policy: str = opt("mask", "mask: every selected token becomes [MASK] (the reference); bert: 80/10/10.",
                           type=click.Choice(MASK_POLICIES))
    count_zero_codes: bool = opt(False, "Masked tokens whose code is all zero count in the MLSM loss's denominator "
                                        "with zero loss: the loss is the mean over every masked token, as the "
                                        "reference averages. Default: they are left out of the loss and of its "
                                        "denominator.")
    max_len: int = opt(128, "Longest sequence the student takes (the data's sequences must fit).")
    shuffle_window: int = opt(4096, "Sequences the loader reads and shuffles together (rounded up to whole batches): its memory, about 0.5 KB per token of them with K=3000 codes, whatever the corpus size.")
    seed: int = opt(0, "Seed of the initialisation, the data order and the masks.")
    device: str = opt("auto", _DEVICE_HELP)
    precision: str = _precision("bf16 is autocast; weights and optimizer stay fp32.")
    compile: bool = opt(False, "torch.compile the student.", flags=("--compile/--no-compile",))
    save_every: int = opt(0, "Also checkpoint every N steps (0: never).")
    milestones: bool = opt(True, "Checkpoint at 10/25/50/100% of the steps, as the paper reports.")
    keep_last: int = opt(0, "Keep only this many periodic checkpoints (milestones and the last are kept; 0: all).")
    log_every: int = opt(10, "Steps between metrics.jsonl records.")
    eval_sequences: int = opt(0, "Hold out the last N sequences from training and record the loss on them (fixed "
                                 "masks) at the milestones, every --eval-every steps and at the end (0: none).")
    eval_every: int = opt(0, "Also evaluate the held-out loss every N steps (0: milestones and the end only).")
    report_to: str = _report_to("<run>/metrics.jsonl")
    max_bad_steps: int = opt(10, "Steps with a non-finite loss or gradient are skipped; this many in a row stop "
                                 "the run.")
    progress: bool = opt(True, _PROGRESS_HELP)

    RESUMABLE = frozenset({"steps", "device", "log_every", "save_every", "milestones", "keep_last", "progress",
                           "data", "out_dir", "compile", "max_bad_steps", "report_to", "eval_every"})

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        default_out = Path("runs") / f"{self.objective}-{self.model}"
        self.out_dir = Path(self.out_dir) if self.out_dir is not None else default_out
        self.init_from = None if self.init_from is None else Path(self.init_from)

    def validate(self) -> None:
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.mask_policy not in MASK_POLICIES:
            problems.append(f"mask policy {self.mask_policy!r} is not one of {', '.join(MASK_POLICIES)}")
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.grad_accum < 1 or self.batch_size < 1 or self.batch_size % self.grad_accum:
            problems.append(f"batch size {self.batch_size} must be a positive multiple of grad_accum {self.grad_accum}")
        if not 0.0 <= self.warmup <= 1.0:
            problems.append(f"warmup is a fraction of steps in [0, 1] (got {self.warmup})")
        if not 0.0 < self.mask_prob < 1.0:
            problems.append(f"mask_prob must be in (0, 1) (got {self.mask_prob})")
        if self.mlm_weight < 0:
            problems.append(f"mlm_weight must be >= 0 (got {self.mlm_weight})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.shuffle_window < 1:
            problems.append(f"shuffle_window must be >= 1 (got {self.shuffle_window})")
        if self.max_bad_steps < 1:
            problems.append(f"max_bad_steps must be >= 1 (got {self.max_bad_steps})")
        if self.eval_sequences < 0 or self.eval_every < 0:
            problems.append("eval_sequences and eval_every must be >= 0")
        check(problems, "pretrain")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("data", "out_dir", "init_from"):
            d[k] = None if d[k] is None else str(d[k])
        return d


@dataclass
class FinetuneConfig:
    model: str = opt(None, "A run (its latest checkpoint), a step-XXXXXXX/ checkpoint, an exported HF BERT dir or "
                           "'minilm'.", required=True)
    task: Path | None = opt(None, "Task folder with train.* and dev.*/test.* (.tsv/.csv/.jsonl or .conll).",
                            cli=False)
    out_dir: Path | None = opt(None, "Write <out>/<task>/results.json and <out>/results.md.", flags=("--out",),
                               type=click.Path(path_type=Path))
    seeds: int = opt(3, "Fine-tuning runs with seeds seed, seed+1, ...")
    seed: int = opt(0, "The first seed.")
    epochs: float = opt(3.0, "Epochs over the training set.")
    lr: float = opt(2e-5, "Peak learning rate (AdamW).")
    batch: int = opt(32, "Examples per step.")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and LayerNorm weights).")
    warmup: float = opt(0.1, "Fraction of steps of linear warm-up, then linear decay.")
    max_len: int = opt(128, "Tokens per example, [CLS]/[SEP] included (longer ones are cut).")
    max_train: int | None = opt(None, "Seeded subsample of the training set (quick runs).", type=int)
    max_eval: int | None = opt(None, "Score a seeded subsample of N dev and N test examples.", type=int)
    text_cols: tuple[str, ...] | None = opt(None, "Text column(s) by name or 0-based index, e.g. "
                                                  "sentence1,sentence2.",
                                            callback=lambda c, p, v: tuple(v.split(",")) if v else None)
    label_col: str | None = opt(None, "Label column by name or 0-based index.")
    device: str = opt("auto", _DEVICE_HELP)
    precision: str = _precision("bf16 is autocast; weights and optimizer stay fp32.")
    log_every: int = opt(10, "Steps between the training-loss records of <out>/<task>/seed-<seed>/metrics.jsonl.")
    report_to: str = _report_to("<out>/<task>/seed-<seed>/metrics.jsonl; needs --out")
    progress: bool = opt(True, _PROGRESS_HELP)

    def validate(self) -> None:
        problems = []
        if self.report_to != "none" and self.out_dir is None:
            problems.append(f"--report-to {self.report_to} mirrors metrics.jsonl, which is written only with --out")
        if self.log_every < 1:
            problems.append(f"log_every must be >= 1 (got {self.log_every})")
        if self.seeds < 1:
            problems.append(f"seeds must be >= 1 (got {self.seeds})")
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0 (got {self.epochs})")
        if self.lr <= 0 or self.batch < 1:
            problems.append(f"lr must be > 0 and batch >= 1 (got {self.lr}, {self.batch})")
        if self.max_len < 8:
            problems.append(f"max_len must be >= 8 (got {self.max_len})")
        check(problems, "finetune")


@dataclass
class LayerReportConfig:
    extract_dir: Path = opt(Path("data/extract"), "Output of `mlsm extract --layers 2,4,6` (several layers in one "
                                                  "pass).")
    out: Path | None = opt(Path("results/layer-report"), "Folder for layer_report.json and .md.")
    layers: tuple[int, ...] = opt((), "Subset of the extracted layers (default: all).", multiple=True,
                                  callback=parse_layers)
    K: int = opt(500, "Dictionary size for the report (smaller than training's K: cheap).", flags=("-k", "--K"))
    lam: float = opt(0.05, "L1 penalty of the non-negative lasso.", flags=("--lambda",))
    samples: int = opt(20_000, "Tokens to learn each layer's dictionary on.")
    heldout: int = opt(5_000, "Held-out tokens the measures are computed on (same for every layer).")
    few: int = opt(3, "An atom is 'lexical' if it fires for at most this many token types.")
    seed: int = opt(0, "Seed of the sample and of the dictionaries.")
    device: str = opt("auto", _DEVICE_HELP)
    progress: bool = opt(True, _PROGRESS_HELP)


@dataclass
class AtomsConfig:
    codes: Path = opt(Path("data/codes"), "Output folder of `mlsm sparse-code` (codes.h5, dictionary.h5, tokenizer/).")
    extract_dir: Path | None = opt(None, "Optional: the `mlsm extract` folder the codes were made from. Checked against "
                                         "the codes' fingerprint; its tokenizer/ is used if the codes folder has none. "
                                         "Not needed otherwise: codes.h5 holds the token stream the contexts come "
                                         "from.", type=click.Path(path_type=Path))
    out: Path = opt(Path("reports/atoms.html"), "The HTML page to write; its JSON twin goes next to it (.json).")
    top_tokens: int = opt(10, "Tokens listed per atom, by count and by mean weight.")
    min_count: int = opt(3, "Occurrences a token needs with an atom to be ranked by mean weight (single "
                            "occurrences of rare tokens would fill the list otherwise).")
    contexts: int = opt(5, "Contexts shown per atom: the best occurrence of its strongest token types first, then "
                           "its strongest occurrences.")
    window: int = opt(12, "Tokens of context on each side of the firing token (within its sequence).")
    neighbours: int = opt(5, "Nearest atoms listed per atom (cosine similarity of dictionary atoms).")
    token_atoms: int = opt(8, "Atoms the search lists per token: those its occurrences use most often.")
    few: int = opt(3, "As for `mlsm layer-report`: an atom is 'few-type' if it fires for at most this many token "
                      "types.")
    max_tokens: int | None = opt(None, "Scan a seeded sample of whole sequences of about this many tokens (default: "
                                       "every token).", type=TokenCount())
    seed: int = opt(0, "Seed of the --max-tokens sample.")
    progress: bool = opt(True, _PROGRESS_HELP)

    def __post_init__(self) -> None:
        self.codes, self.out = Path(self.codes), Path(self.out)
        self.extract_dir = None if self.extract_dir is None else Path(self.extract_dir)

    def validate(self) -> None:
        problems = []
        if self.out.suffix.lower() not in (".html", ".htm"):
            problems.append(f"--out names the HTML page to write (e.g. reports/atoms.html), not {self.out}")
        for name in ("top_tokens", "min_count", "contexts", "neighbours", "token_atoms", "few"):
            if getattr(self, name) < 1:
                problems.append(f"{_dash(name)} must be at least 1")
        if self.window < 0:
            problems.append("--window must be >= 0")
        check(problems, "atoms")


def parse_probe_layers(ctx, param, value) -> str:
    """'last', 'all' or a comma list of layer numbers (0 = embeddings), kept as text until the model is known."""
    text = str(value).strip().lower()
    if text in ("last", "all") or all(x.strip().isdigit() for x in text.split(",") if x.strip()) and text:
        return text
    raise click.BadParameter("give last, all, or layer numbers such as 0,1,2 (0 = embeddings)")


@dataclass
class ProbeConfig:
    model: str | None = opt(None, "A run (its latest checkpoint), a step-XXXXXXX/ checkpoint, an exported HF BERT dir "
                                  "or 'minilm'; with --never-trained, the preset to initialise (tiny, mini, ...).")
    tasks: tuple[Path, ...] = opt((), "Task folders (see mlsm finetune).", cli=False)
    never_trained: bool = opt(False, "Probe a randomly initialised student of preset --model (seeded by --seed): "
                                     "the floor a pre-trained student must beat.")
    tokenizer: str | None = opt(None, "With --never-trained: the model dir whose tokenizer (and vocabulary size) the "
                                      "random student gets (default: the bundled MiniLM, the default aux model).")
    layers: str = opt("last", "Layers to probe: last, all, or numbers like 0,2 (HF numbering, 0 = embeddings).",
                      callback=parse_probe_layers)
    out_dir: Path | None = opt(None, "Write <out>/probe.json and <out>/probe.md.", flags=("--out",),
                               type=click.Path(path_type=Path))
    l2_grid: tuple[float, ...] = opt((1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), "L2 strengths tried (penalty l2 * ||W||^2 on the "
                                                               "mean loss); the best on dev is kept.",
                                     flags=("--l2",), multiple=True, type=float)
    max_iter: int = opt(100, "L-BFGS iterations per fit (full batch).")
    seed: int = opt(0, "Seed of the subsamples and of --never-trained's weights.")
    max_train: int | None = opt(None, "Seeded subsample of N training sentences/documents per task.", type=int)
    max_eval: int | None = opt(None, "Seeded subsample of N dev and N test sentences/documents.", type=int)
    max_len: int = opt(128, "Tokens per example, [CLS]/[SEP] included (longer ones are cut).")
    batch: int = opt(64, "Examples per forward pass of the feature extraction.")
    device: str = opt("auto", _DEVICE_HELP)
    progress: bool = opt(True, _PROGRESS_HELP)

    def validate(self) -> None:
        problems = []
        if not self.tasks:
            problems.append("give at least one --task")
        if self.model is None and not self.never_trained:
            problems.append("give --model (a run or checkpoint), or --never-trained --model PRESET")
        if not self.l2_grid or any(x < 0 for x in self.l2_grid):
            problems.append(f"--l2 values must be >= 0 (got {self.l2_grid})")
        if self.max_iter < 1 or self.batch < 1:
            problems.append(f"max_iter and batch must be >= 1 (got {self.max_iter}, {self.batch})")
        if self.max_len < 8:
            problems.append(f"max_len must be >= 8 (got {self.max_len})")
        check(problems, "probe")
