"""The pre-training loop: one file, one loop; a step's work is `train_step`, the run's is `run_pretrain`.

The student learns from the data file alone (codes.h5, or tokens.h5 for plain MLM); the auxiliary
model that produced the codes is never loaded here. Checkpoints carry everything needed to resume
bit-identically on CPU: weights, optimizer, RNG state (per rank under DDP), the data position and
the count of skipped steps; each one records its files' checksums, so a checkpoint damaged on disk
is noticed on resume and passed over for the previous one. A step whose loss or gradient is not
finite is skipped (counted in metrics.jsonl); `max_bad_steps` of them in a row stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mlsm import __version__
from mlsm.core.device import pick_device
from mlsm.core.errors import MLSMError
from mlsm.core.manifest import atomic_path, write_json_atomic
from mlsm.core import hf, manifest
from mlsm.trainer import distributed
from mlsm.pipeline.codes import TokenData, check_codes_file
from mlsm.trainer.data import MASK_POLICIES, BatchIterator, Prefetcher
from mlsm.core.bert import BertConfig, Student
from mlsm.trainer.objectives import mlm_loss, mlsm_kl_loss

log = logging.getLogger(__name__)

OBJECTIVES = ("mlsm", "mlm")
PRECISIONS = ("auto", "bf16", "fp32")
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
TRAINER_STATE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d{7})$")
# Settings that may change when a run is resumed: they decide how long it runs and what it
# records, not what a step computes. `steps` may only grow (checked separately).
_RESUMABLE = {"steps", "device", "log_every", "save_every", "milestones", "keep_last", "progress", "data", "out_dir",
              "compile", "max_bad_steps"}
_DAMAGED = "damaged-"  # prefix a checkpoint that fails its checksums is renamed to (kept, never loaded)


@dataclass
class PretrainConfig:
    data: Path  # codes.h5 (or tokens.h5 for objective "mlm")
    out_dir: Path  # runs/<name>
    objective: str = "mlsm"  # "mlsm" | "mlm"
    mlm_weight: float = 0.0  # L = L_MLSM + w * L_MLM
    model: str = "tiny"  # preset
    model_overrides: dict | None = None  # BertConfig fields replacing the preset's (tests, ablations)
    init_from: Path | None = None
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step (global)
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.01  # fraction of steps
    weight_decay: float = 0.01
    clip: float = 1.0
    mask_prob: float = 0.15
    mask_policy: str = "mask"
    seed: int = 0
    device: str = "auto"  # auto → cuda if available
    save_every: int = 0  # 0 → only at the end
    milestones: bool = False  # also checkpoint at 10/25/50/100% of steps
    keep_last: int = 0  # >0: keep only this many periodic checkpoints (milestones and the last are kept)
    log_every: int = 10
    max_len: int = 128
    progress: bool = True  # tqdm bar (the CLI's --no-progress)
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False  # torch.compile the student
    max_bad_steps: int = 10  # this many consecutive non-finite steps stop the run

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("data", "out_dir", "init_from"):
            d[k] = None if d[k] is None else str(d[k])
        return d


# --------------------------------------------------------------------------- small pieces


def _validate(cfg: PretrainConfig) -> None:
    problems = []
    if cfg.objective not in OBJECTIVES:
        problems.append(f"objective {cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg.mask_policy not in MASK_POLICIES:
        problems.append(f"mask policy {cfg.mask_policy!r} is not one of {', '.join(MASK_POLICIES)}")
    if cfg.steps < 1:
        problems.append(f"steps must be >= 1 (got {cfg.steps})")
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.batch_size % cfg.grad_accum:
        problems.append(f"batch size {cfg.batch_size} must be a positive multiple of grad_accum {cfg.grad_accum}")
    if not 0.0 <= cfg.warmup <= 1.0:
        problems.append(f"warmup is a fraction of steps in [0, 1] (got {cfg.warmup})")
    if not 0.0 < cfg.mask_prob < 1.0:
        problems.append(f"mask_prob must be in (0, 1) (got {cfg.mask_prob})")
    if cfg.mlm_weight < 0:
        problems.append(f"mlm_weight must be >= 0 (got {cfg.mlm_weight})")
    if cfg.lr <= 0:
        problems.append(f"lr must be > 0 (got {cfg.lr})")
    if cfg.precision not in PRECISIONS:
        problems.append(f"precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.max_bad_steps < 1:
        problems.append(f"max_bad_steps must be >= 1 (got {cfg.max_bad_steps})")
    if problems:
        raise MLSMError("invalid pretrain settings: " + "; ".join(problems) + ".")


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to cfg.lr over the first `warmup` fraction of steps, then linear decay to 0.

    `step` is the 0-based index of the update about to be made, so the first update already
    has a non-zero rate.
    """
    warm = int(round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and LayerNorm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # shared (tied) parameters appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (they are written atomically, so present = complete)."""
    found = []
    if out_dir.is_dir():
        for sub in out_dir.iterdir():
            m = _STEP_RE.match(sub.name)
            if m and sub.is_dir() and all(
                (sub / f).is_file() for f in (TRAINER_STATE, hf.SAFETENSORS, hf.CONFIG)
            ):
                found.append((int(m.group(1)), sub))
    return sorted(found)


def _load_problem(ck_dir: Path) -> str | None:
    """For checkpoints written before checksums existed: can its files be read at all?"""
    from safetensors.torch import load_file

    try:
        load_file(ck_dir / hf.SAFETENSORS)
        torch.load(ck_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
        json.loads((ck_dir / hf.CONFIG).read_text())
    except Exception as e:  # any damage: a cut file raises all sorts of errors
        return f"it cannot be read ({type(e).__name__}: {str(e)[:200]})"
    return None


def _latest_good_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose files are intact. Damaged newer ones are renamed aside (kept, not loaded)."""
    for step, path in reversed(_checkpoints(out_dir)):
        problem = manifest.checksum_problem(path)
        if problem is None and not (path / manifest.CHECKSUMS).is_file():
            problem = _load_problem(path)
        if problem is None:
            return step, path
        aside = path.with_name(_DAMAGED + path.name)
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{_DAMAGED}{n}-{path.name}"), n + 1
        path.rename(aside)
        log.warning("checkpoint %s is damaged: %s. Moved it to %s; falling back to the previous checkpoint.",
                    path, problem, aside.name)
    return None


def _milestone_steps(cfg: PretrainConfig) -> set[int]:
    if not cfg.milestones:
        return set()
    return {max(1, int(round(cfg.steps * f))) for f in (0.10, 0.25, 0.50, 1.0)}


def _check_resume_config(old: dict, new: dict, latest_step: int) -> None:
    # A setting added after the run was started counts as unchanged while it keeps its default.
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}
    diff = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE and old.get(k) != new.get(k))
    if diff:
        what = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise MLSMError(
            f"this run directory was started with other settings ({what}). Resume with the original settings "
            "(only --steps may grow), or pass a new output directory to start a new run."
        )
    if new["steps"] < latest_step:
        raise MLSMError(
            f"--steps {new['steps']} is below the run's latest checkpoint (step {latest_step}); "
            f"pass --steps >= {latest_step} or use a new output directory."
        )


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is suspect too
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the step we resume from, so the file reads as one uninterrupted run."""
    rows = _read_metrics(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for r in rows:
                if r.get("step", 0) <= step:
                    f.write(json.dumps(r) + "\n")


def _check_tokenizers(cfg: PretrainConfig, data: TokenData, tok_dir: Path, init_dir: Path | None):
    """The student's tokenizer must be the one the codes were built with; returns (tokenizer, fingerprint)."""
    if not tok_dir.is_dir():
        raise MLSMError(
            f"no tokenizer folder next to the data ({tok_dir}). The stage that wrote {data.path.name} puts it "
            "there; re-run it, or copy the auxiliary model's tokenizer files into that folder."
        )
    tok = hf.load_tokenizer(tok_dir)
    fp = hf.tokenizer_fingerprint(tok)
    data_fp = data.attrs.get("tokenizer_fingerprint")
    if data_fp is None:
        log.warning("%s records no tokenizer fingerprint; cannot verify %s belongs to it", data.path, tok_dir)
    elif data_fp != fp:
        raise MLSMError(
            f"the tokenizer in {tok_dir} is not the one {data.path.name} was built with (fingerprints "
            f"{fp[:12]} vs {data_fp[:12]}). Restore the tokenizer folder written next to the data by its stage."
        )
    if init_dir is not None:
        init_fp = hf.tokenizer_fingerprint(hf.load_tokenizer(init_dir))
        if init_fp != (data_fp or fp):
            raise MLSMError(
                f"codes were built with another tokenizer than the student's: {init_dir} (init_from) has tokenizer "
                f"{init_fp[:12]}, {data.path.name} was built with {(data_fp or fp)[:12]}. Fix: initialise from a "
                "model that uses the auxiliary model's tokenizer, or re-run `mlsm extract` and `mlsm sparse-code` "
                "with an auxiliary model that shares the student's tokenizer."
            )
    return tok, fp


def _build_config(cfg: PretrainConfig, vocab_size: int, pad_id: int) -> BertConfig:
    config = BertConfig.preset(cfg.model, vocab_size)
    overrides = dict(cfg.model_overrides or {})
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise MLSMError(f"unknown model settings {unknown}; valid ones are {sorted(fields)}.")
    overrides.setdefault("pad_token_id", pad_id)
    overrides["vocab_size"] = vocab_size
    return dataclasses.replace(config, **overrides)


def _to(batch: dict, device: torch.device) -> dict:
    """Tensors to the device, except target_indptr: the loss counts rows from it without a sync."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "target_indptr" else v
        for k, v in batch.items()
    }


@dataclass
class StepResult:
    loss: float  # the step's total loss (NaN/inf when it was skipped)
    mlsm_loss: float | None
    mlm_loss: float | None
    grad_norm: float
    applied: bool  # False: a non-finite loss or gradient, the optimizer did not step
    n_targets: int  # global counts (all ranks, all micro-batches)
    n_masked: int
    n_tokens: int


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    micro: list[dict],
    *,
    use_mlsm: bool,
    use_mlm: bool,
    mlm_weight: float,
    clip: float,
    device: torch.device,
    bf16: bool,
    step_model: torch.nn.Module | None = None,
    ddp=None,
    dist_info: distributed.DistInfo | None = None,
) -> StepResult:
    """One optimizer step over a step's micro-batches (the trainer's and the benchmark's one copy).

    `model` owns the parameters; `step_model` runs them (DDP-wrapped and/or compiled, default
    `model`). An update whose loss or gradient is not finite is not applied.
    """
    step_model = model if step_model is None else step_model
    dist_info = dist_info or distributed.DistInfo()
    world_size = dist_info.world_size
    # Global counts: every micro-batch on every rank weighs by its share of the step's targets,
    # so the update is the full batch's mean whatever the split.
    counts = [sum(m.get("n_targets", 0) for m in micro), sum(m["n_masked"] for m in micro),
              sum(m["n_tokens"] for m in micro)]
    if dist_info.active:
        counts = [int(c) for c in distributed.all_reduce_sum(
            torch.tensor(counts, dtype=torch.float64, device=device), dist_info).tolist()]
    n_targets, n_masked, n_tokens = counts
    step_mlsm = step_mlm = torch.zeros((), device=device)
    for i, m in enumerate(micro):
        m = _to(m, device)
        # Gradients are averaged over the processes once per step, after the last micro-batch.
        with ddp.no_sync() if ddp is not None and i < len(micro) - 1 else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = step_model(m["input_ids"], m["attention_mask"], m["masked_index"])
            loss = torch.zeros((), device=device)
            if use_mlsm:
                kl, n = mlsm_kl_loss(out["mlsm_logits"], m["target_indptr"], m["target_indices"], m["target_values"])
                part = kl * (n / max(n_targets, 1))
                step_mlsm = step_mlsm + part.detach()
                loss = loss + part
            if use_mlm:
                part = mlm_loss(out["mlm_logits"], m["mlm_labels"]) * (m["n_masked"] / max(n_masked, 1))
                step_mlm = step_mlm + part.detach()
                loss = loss + (mlm_weight if use_mlsm else 1.0) * part
            # DDP averages gradients over the processes; the parts above already sum to the mean.
            (loss * world_size if world_size > 1 else loss).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    # One host transfer per step decides whether the update is safe to apply (the same on every
    # rank: gradients are already averaged, and the losses are summed here).
    parts = distributed.all_reduce_sum(torch.stack([step_mlsm.float(), step_mlm.float()]), dist_info)
    mlsm_v, mlm_v, gn = torch.cat([parts, grad_norm.reshape(1).float()]).tolist()
    total = mlsm_v + mlm_weight * mlm_v if use_mlsm and use_mlm else (mlsm_v if use_mlsm else mlm_v)
    good = math.isfinite(total) and math.isfinite(gn)
    if good:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(total, mlsm_v if use_mlsm else None, mlm_v if use_mlm else None, gn, good,
                      n_targets, n_masked, n_tokens)


# --------------------------------------------------------------------------- the run


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) a student; returns a summary of this invocation.

    Under `torchrun` every process calls this; each reads its own part of every batch, gradients
    are averaged by DDP, and rank 0 alone writes the run directory.
    """
    _validate(cfg)
    cfg = dataclasses.replace(
        cfg, data=Path(cfg.data), out_dir=Path(cfg.out_dir),
        init_from=None if cfg.init_from is None else Path(cfg.init_from),
    )
    device = pick_device(cfg.device)
    dist_info = distributed.init(device)
    try:
        device = distributed.device_for(dist_info, device)
        data = TokenData(cfg.data)
        try:
            return _run(cfg, data, device, dist_info)
        finally:
            data.close()
    finally:
        distributed.shutdown(dist_info)


def _prepare_run_dir(cfg: PretrainConfig, cfg_json: dict, data_fp: str, tok_fp: str) -> tuple[int, Path] | None:
    """Rank 0: clean what a kill left, check a resumed run's settings, pick the checkpoint to resume."""
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*step-*.tmp"):  # left by a killed save (the inner one of save_model_dir too)
        shutil.rmtree(stale, ignore_errors=True)
    latest = _latest_good_checkpoint(out_dir)
    run_json = out_dir / RUN_JSON
    if run_json.is_file():
        with open(run_json) as f:
            old = json.load(f)
        if latest:
            if old.get("data_fingerprint") != data_fp:
                raise MLSMError(
                    f"{cfg.data} is not the data this run was trained on (its fingerprint changed). Point --data "
                    "at the original file, or start a new run directory."
                )
            _check_resume_config(old["config"], cfg_json, latest[0])
        else:
            log.info("%s has no usable checkpoint yet; starting afresh", out_dir)
    write_json_atomic(
        run_json,
        {"config": cfg_json, "data_fingerprint": data_fp, "tokenizer_fingerprint": tok_fp, "mlsm_version": __version__},
    )
    return latest


def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The fused kernel where this torch has one for the device (CUDA, and CPU since torch 2.4)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError) as e:
        log.info("fused AdamW unavailable here (%s); using the default implementation", e)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _run(cfg: PretrainConfig, data: TokenData, device: torch.device, dist_info: distributed.DistInfo) -> dict:
    is_cuda = device.type == "cuda"
    rank, world_size, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    use_mlsm = cfg.objective == "mlsm"
    use_mlm = cfg.objective == "mlm" or cfg.mlm_weight > 0
    if use_mlsm and not data.has_codes:
        raise MLSMError(
            f"{cfg.data} has no /codes, so it cannot train --objective mlsm. Run `mlsm sparse-code` to build "
            "codes.h5 and point --data at it, or use --objective mlm for a tokens-only file."
        )
    if data.max_seq_len > cfg.max_len:
        raise MLSMError(
            f"{cfg.data} has sequences of {data.max_seq_len} tokens, longer than --max-len {cfg.max_len}; "
            f"pass --max-len {data.max_seq_len} or rebuild the data with the shorter length."
        )
    if cfg.batch_size % (cfg.grad_accum * world_size):
        raise MLSMError(
            f"batch size {cfg.batch_size} is not divisible by grad_accum x processes = {cfg.grad_accum} x {world_size}; "
            "choose a batch size that is (it is the global batch, split over the processes)."
        )
    init_dir = hf.resolve_model_dir(str(cfg.init_from)) if cfg.init_from is not None else None
    tok_dir = cfg.data.parent / "tokenizer"
    check_codes_file(cfg.data)  # codes.h5 vs its folder's manifest.json and dictionary.h5
    tok, tok_fp = _check_tokenizers(cfg, data, tok_dir, init_dir)
    special = hf.special_token_ids(tok)
    data.pad_id = special["pad"]
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if int(data.tokens.max()) >= vocab_size:
        raise MLSMError(
            f"{cfg.data} holds token id {int(data.tokens.max())}, outside the tokenizer's vocabulary "
            f"({vocab_size}) in {tok_dir}; the data and the tokenizer folder do not belong together."
        )
    num_atoms = data.K if use_mlsm else None
    data_fp = data.fingerprint()

    # ---- run directory (rank 0), then every rank learns which checkpoint to resume from
    out_dir = cfg.out_dir
    cfg_json = cfg.to_json()
    latest, setup_error = None, None
    if main:
        try:
            latest = _prepare_run_dir(cfg, cfg_json, data_fp, tok_fp)
        except MLSMError as e:
            setup_error = str(e)
    latest, setup_error = distributed.broadcast_object((latest, setup_error), dist_info)
    if setup_error is not None:
        raise MLSMError(setup_error)

    # ---- model
    torch.manual_seed(cfg.seed)
    start_step, state = 0, None
    if latest:
        start_step, ck_dir = latest
        if main:
            log.info("resuming from %s", ck_dir)
        model = hf.load_student(ck_dir, num_atoms, use_mlm)
        state = torch.load(ck_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
    elif init_dir is not None:
        log.info("initialising the student from %s", init_dir)
        if cfg.model_overrides:
            log.warning("model_overrides are ignored: the architecture comes from %s", init_dir)
        model = hf.load_student(init_dir, num_atoms, use_mlm)
    else:
        model = Student(_build_config(cfg, vocab_size, special["pad"]), num_atoms, use_mlm)
    config = model.config
    if config.vocab_size < vocab_size:
        raise MLSMError(
            f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({vocab_size}); "
            "initialise from a model built for this tokenizer."
        )
    if config.max_position_embeddings < cfg.max_len:
        raise MLSMError(
            f"--max-len {cfg.max_len} exceeds the model's max_position_embeddings {config.max_position_embeddings}."
        )
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and is_cuda)
    if main:
        log.info("student: %d layers, hidden %d, %.2fM parameters, objective %s%s, device %s%s%s%s",
                 config.num_hidden_layers, config.hidden_size, n_params / 1e6, cfg.objective,
                 f" + {cfg.mlm_weight} x MLM" if use_mlsm and use_mlm else "", device,
                 f", {world_size} processes" if world_size > 1 else "", ", bf16 autocast" if bf16 else "",
                 ", compiled" if cfg.compile else "")
    # `model` is what is saved; `step_model` is what runs the steps (DDP-wrapped and/or compiled).
    step_model: torch.nn.Module = model
    ddp = None
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel

        step_model = ddp = DistributedDataParallel(model, device_ids=[device.index] if is_cuda else None)
    if cfg.compile:
        step_model = torch.compile(step_model)

    opt = _adamw(param_groups(model, cfg.weight_decay), cfg.lr)
    batches = BatchIterator(
        data, cfg.batch_size, seed=cfg.seed, mask_id=special["mask"], vocab_size=vocab_size,
        special_ids=[special[k] for k in ("cls", "sep", "pad", "mask")], mask_prob=cfg.mask_prob,
        mask_policy=cfg.mask_policy, micro_batches=cfg.grad_accum, rank=rank, world_size=world_size,
        with_targets=use_mlsm,
    )
    skipped_total = bad_streak = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        rng = state["rng"]
        per_rank = rng.get("per_rank")
        if per_rank is not None and len(per_rank) == world_size:
            rng = per_rank[rank]
        elif rank > 0:
            log.warning("the checkpoint holds RNG states for %s processes, this run has %d: dropout on rank %d "
                        "will differ from an uninterrupted run", len(per_rank or [0]), world_size, rank)
        torch.set_rng_state(rng["torch"])
        if is_cuda and rng.get("cuda") is not None:
            cuda_state = rng["cuda"]
            if isinstance(cuda_state, (list, tuple)):  # written by get_rng_state_all
                cuda_state = cuda_state[device.index or 0]
            torch.cuda.set_rng_state(cuda_state, device)
        skipped_total = int(state.get("skipped_steps", 0))
        bad_streak = int(state.get("bad_streak", 0))
    metrics_path = out_dir / METRICS
    if main:
        _truncate_metrics(metrics_path, start_step)

    last_ckpt = latest[1] if latest else None
    if start_step >= cfg.steps:
        if main:
            log.info("%s already reached step %d; nothing to do", out_dir, start_step)
        rows = _read_metrics(metrics_path)
        return _summary(cfg, start_step, start_step, rows[0]["loss"] if rows else None,
                        rows[-1]["loss"] if rows else None, 0.0, 0, last_ckpt, device, skipped_total)

    extra = {
        "mlsm": {
            "objective": cfg.objective, "num_atoms": num_atoms, "mlm_weight": cfg.mlm_weight,
            "preset": None if init_dir is not None else cfg.model,
            "init_from": None if init_dir is None else str(init_dir),
            "data_fingerprint": data_fp, "tokenizer_fingerprint": tok_fp,
            "codes_layer": data.attrs.get("layer"), "codes_lambda": data.attrs.get("lambda"),
            "mask_policy": cfg.mask_policy, "mask_prob": cfg.mask_prob, "mlsm_version": __version__,
        }
    }

    def save(step: int) -> Path:
        final = out_dir / f"step-{step:07d}"
        per_rank = distributed.gather_object(_rng_state(device), dist_info)  # every rank takes part
        if not main:
            return final
        trainer_state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": {"kind": "linear_warmup_linear_decay", "peak_lr": cfg.lr, "total_steps": cfg.steps,
                          "warmup_steps": int(round(cfg.warmup * cfg.steps))},
            "rng": {**per_rank[0], "per_rank": per_rank if world_size > 1 else None},
            "data": batches.state_dict(),
            "config": cfg_json,
            "skipped_steps": skipped_total,
            "bad_streak": bad_streak,
            "world_size": world_size,
        }
        tensors = {**model.encoder_state_dict(), **model.head_state_dict()}
        extra["mlsm"]["step"] = step
        with atomic_path(final) as tmp:
            hf.save_model_dir(tmp, config, tensors, tok_dir, extra_json=extra)
            torch.save(trainer_state, tmp / TRAINER_STATE)
            manifest.write_checksums(tmp)
        log.info("saved %s", final)
        if cfg.keep_last > 0:
            keep = _milestone_steps(cfg) | {cfg.steps}
            periodic = [p for s, p in _checkpoints(out_dir) if s not in keep]
            for p in periodic[: -cfg.keep_last]:
                shutil.rmtree(p, ignore_errors=True)
        return final

    save_at = _milestone_steps(cfg) | {cfg.steps}
    if is_cuda:
        # The host would otherwise idle while the GPU computes; on CPU the thread only competes
        # with the compute threads. From here on, the position is the prefetcher's.
        batches = Prefetcher(batches, pin_memory=True)
    model.train()
    step = start_step
    initial_loss = final_loss = None
    t_start = t_last = time.time()
    tokens_since = tokens_total = 0
    pbar = tqdm(total=cfg.steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and main))
    metrics_file = open(metrics_path, "a") if main else None
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            r = train_step(model, opt, next(batches), use_mlsm=use_mlsm, use_mlm=use_mlm, mlm_weight=cfg.mlm_weight,
                           clip=cfg.clip, device=device, bf16=bf16, step_model=step_model, ddp=ddp, dist_info=dist_info)
            total, good, n_tokens = r.loss, r.applied, r.n_tokens
            if good:
                bad_streak = 0
            else:
                skipped_total += 1
                bad_streak += 1
                if main:
                    log.warning("step %d: the loss is %s and the gradient norm %s; skipped (no update), %d in a row, "
                                "%d in all", step + 1, total, r.grad_norm, bad_streak, skipped_total)
            step += 1
            tokens_since += n_tokens
            tokens_total += n_tokens
            pbar.update(1)

            # Which steps are logged must not depend on where a run was resumed.
            log_now = step % cfg.log_every == 0 or step == 1 or step == cfg.steps or not good
            if good:
                if initial_loss is None:
                    initial_loss = total
                    if main:
                        log.info("initial loss %.4f (step %d)", total, step)
                final_loss = total
            if log_now and main:
                now = time.time()
                row = {
                    "step": step, "loss": total, "mlsm_loss": r.mlsm_loss, "mlm_loss": r.mlm_loss, "lr": lr,
                    "grad_norm": r.grad_norm, "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                    "masked_tokens": r.n_masked, "targets": r.n_targets if use_mlsm else None,
                    "skipped_steps": skipped_total, "elapsed_s": now - t_start,
                }
                t_last, tokens_since = now, 0
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                pbar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
                log.debug("step %d: %s", step, row)
            if bad_streak >= cfg.max_bad_steps:
                raise MLSMError(
                    f"stopped at step {step}: {bad_streak} consecutive steps ({step - bad_streak + 1}..{step}) had a "
                    f"non-finite loss or gradient, so none of them changed the weights (those of step "
                    f"{step - bad_streak}). The last good checkpoint is "
                    f"{last_ckpt if last_ckpt is not None else 'none (no checkpoint was written yet)'}. Lower --lr or "
                    "raise --warmup and start a new run from it with --init-from, or check the data "
                    "(--max-bad-steps sets how many bad steps in a row are tolerated)."
                )

            if step in save_at or (cfg.save_every > 0 and step % cfg.save_every == 0):
                last_ckpt = save(step)
        distributed.barrier(dist_info)  # rank 0's last checkpoint is complete before anyone returns
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
        if metrics_file is not None:
            metrics_file.close()
        pbar.close()

    wall = time.time() - t_start
    if main:
        log.info("final loss %s after %d steps (%.1f s, %.0f tokens/s%s)", final_loss, step, wall,
                 tokens_total / max(wall, 1e-9), f", {skipped_total} skipped" if skipped_total else "")
    return _summary(cfg, start_step, step, initial_loss, final_loss, wall, tokens_total, last_ckpt, device,
                    skipped_total)


def _summary(cfg, start_step, step, initial_loss, final_loss, wall, tokens, last_ckpt, device, skipped=0) -> dict:
    done = step - start_step
    return {
        "steps": step,
        "start_step": start_step,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "wall_s": wall,
        "steps_per_s": done / wall if wall > 0 else None,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "out_dir": str(cfg.out_dir),
        "last_checkpoint": None if last_ckpt is None else str(last_ckpt),
        "device": str(device),
        "skipped_steps": skipped,
    }
