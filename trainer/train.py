"""The pre-training loop: one file, one loop; a step's work is `train_step`, the run's is `run_pretrain`.

The student learns from the data file alone (codes.h5, or tokens.h5 for plain MLM); the auxiliary
model that produced the codes is never loaded here. Checkpoints (trainer/checkpoint.py) carry
everything needed to resume bit-identically on CPU. A step whose loss or gradient is not finite is
skipped (counted in metrics.jsonl); `max_bad_steps` of them in a row stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mlsm import __version__
from mlsm.core import hf
from mlsm.core.bert import BertConfig, Student
from mlsm.core.config import PretrainConfig
from mlsm.core.device import pick_device, resolve_precision
from mlsm.core.errors import MLSMError
from mlsm.core.layout import TOKENIZER_DIR
from mlsm.core.manifest import write_json_atomic
from mlsm.core.ranks import ONE_PROCESS, Rank, join
from mlsm.pipeline.codes import TokenData, check_codes_file
from mlsm.trainer.checkpoint import Checkpoints
from mlsm.trainer.data import BatchIterator, Masking, Prefetcher
from mlsm.trainer.heldout import MASK_SEED, heldout_batches, heldout_loss
from mlsm.trainer.metrics_log import MetricsLog
from mlsm.trainer.objectives import context_free_baselines, mlm_loss, mlsm_kl_loss
from mlsm.trainer.provenance import data_provenance
from mlsm.trainer.report_to import Report, require_sink

log = logging.getLogger(__name__)

RUN_JSON = "run.json"


# --------------------------------------------------------------------------- schedule and optimizer


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to cfg.lr over the first `warmup` fraction of steps, then linear decay to 0.

    `step` is the 0-based index of the update about to be made, so the first update already
    has a non-zero rate.
    """
    warm = int(round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def param_groups(model: torch.nn.Module, weight_decay: float, decay_1d: bool = False) -> list[dict]:
    """Decay matrices only: biases and LayerNorm weights (1-D) are not decayed, unless decay_1d
    (`pretrain --decay-1d`, the reference's AdamW: every parameter is decayed)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # shared (tied) parameters appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 or decay_1d else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The fused kernel where this torch has one for the device (CUDA, and CPU since torch 2.4)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError) as e:
        log.info("fused AdamW unavailable here (%s); using the default implementation", e)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def milestone_steps(cfg: PretrainConfig) -> set[int]:
    if not cfg.milestones:
        return set()
    return {max(1, int(round(cfg.steps * f))) for f in (0.10, 0.25, 0.50, 1.0)}


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepSpec:
    """What a step computes: which losses, their weighting, clipping and precision; count_zero_codes:
    the MLSM loss's denominator counts masked tokens with an all-zero code (objectives.mlsm_kl_loss)."""

    use_mlsm: bool
    use_mlm: bool
    mlm_weight: float = 0.0
    clip: float = 1.0
    bf16: bool = False
    count_zero_codes: bool = False

    @classmethod
    def of(cls, cfg: PretrainConfig, bf16: bool) -> StepSpec:
        return cls(use_mlsm=cfg.objective == "mlsm", use_mlm=cfg.objective == "mlm" or cfg.mlm_weight > 0,
                   mlm_weight=cfg.mlm_weight, clip=cfg.clip, bf16=bf16, count_zero_codes=cfg.count_zero_codes)

    def total(self, mlsm_v: float | None, mlm_v: float | None) -> float:
        """The objective from its parts: L_MLSM + w * L_MLM jointly, else the one part."""
        if self.use_mlsm and self.use_mlm:
            return mlsm_v + self.mlm_weight * mlm_v
        return mlsm_v if self.use_mlsm else mlm_v


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


def _to(batch: dict, device: torch.device) -> dict:
    """Tensors to the device, except target_indptr: the loss counts rows from it without a sync."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "target_indptr" else v
        for k, v in batch.items()
    }


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, micro: list[dict], spec: StepSpec, *,
               step_model: torch.nn.Module | None = None, ddp=None, rank: Rank = ONE_PROCESS) -> StepResult:
    """One optimizer step over a step's micro-batches (the trainer's and the benchmark's one copy).

    `model` owns the parameters; `step_model` runs them (DDP-wrapped and/or compiled, default
    `model`). An update whose loss or gradient is not finite is not applied.
    """
    step_model = model if step_model is None else step_model
    device = next(model.parameters()).device
    # Global counts: every micro-batch on every rank weighs by its share of the step's targets,
    # so the update is the full batch's mean whatever the split.
    counts = [sum(m.get("n_targets", 0) for m in micro), sum(m["n_masked"] for m in micro),
              sum(m["n_tokens"] for m in micro)]
    if rank.active:
        counts = [int(c) for c in rank.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()]
    n_targets, n_masked, n_tokens = counts
    mlsm_rows = n_masked if spec.count_zero_codes else n_targets  # the MLSM mean's denominator
    step_mlsm = step_mlm = torch.zeros((), device=device)
    for i, m in enumerate(micro):
        m = _to(m, device)
        # Gradients are averaged over the processes once per step, after the last micro-batch.
        with ddp.no_sync() if ddp is not None and i < len(micro) - 1 else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                out = step_model(m["input_ids"], m["attention_mask"], m["masked_index"])
            loss = torch.zeros((), device=device)
            if spec.use_mlsm:
                kl, n = mlsm_kl_loss(out["mlsm_logits"], m["target_indptr"], m["target_indices"], m["target_values"],
                                     count_zero_codes=spec.count_zero_codes)
                part = kl * (n / max(mlsm_rows, 1))
                step_mlsm = step_mlsm + part.detach()
                loss = loss + part
            if spec.use_mlm:
                part = mlm_loss(out["mlm_logits"], m["mlm_labels"]) * (m["n_masked"] / max(n_masked, 1))
                step_mlm = step_mlm + part.detach()
                loss = loss + (spec.mlm_weight if spec.use_mlsm else 1.0) * part
            # DDP averages gradients over the processes; the parts above already sum to the mean.
            (loss * rank.count if rank.active else loss).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip if spec.clip > 0 else math.inf)
    # One host transfer per step decides whether the update is safe to apply (the same on every
    # rank: gradients are already averaged, and the losses are summed here).
    parts = rank.all_reduce_sum(torch.stack([step_mlsm.float(), step_mlm.float()]))
    mlsm_v, mlm_v, gn = torch.cat([parts, grad_norm.reshape(1).float()]).tolist()
    total = spec.total(mlsm_v, mlm_v)
    good = math.isfinite(total) and math.isfinite(gn)
    if good:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(total, mlsm_v if spec.use_mlsm else None, mlm_v if spec.use_mlm else None, gn, good,
                      n_targets, n_masked, n_tokens)


# --------------------------------------------------------------------------- before the loop


@dataclass
class RunSetup:
    """What the checks before training establish, the same on every rank."""

    tok_dir: Path
    special: dict
    vocab_size: int
    tok_fp: str
    data_fp: str
    init_dir: Path | None
    resume: tuple[int, Path] | None  # (step, checkpoint) to continue from


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


def _check_resume_config(old: dict, new: dict, latest_step: int, device_type: str = "cpu") -> None:
    # A setting added after the run was started counts as unchanged while it keeps its default.
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}
    if old.get("precision") == "auto":  # recorded before runs stored the precision used: the rule of then
        old["precision"] = "bf16" if device_type == "cuda" else "fp32"
    diff = sorted(k for k in set(old) | set(new) if k not in PretrainConfig.RESUMABLE and old.get(k) != new.get(k))
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


def _prepare_run_dir(cfg: PretrainConfig, ckpts: Checkpoints, data: TokenData, data_fp: str, tok_fp: str,
                     device: torch.device) -> tuple[int, Path] | None:
    """Rank 0: clean what a kill left, check a resumed run's settings, pick the checkpoint to resume."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    ckpts.remove_stale()
    latest = ckpts.latest_good()
    run_json = cfg.out_dir / RUN_JSON
    kept = {}
    if run_json.is_file():
        old = json.loads(run_json.read_text())
        if latest:
            if old.get("data_fingerprint") != data_fp:
                raise MLSMError(
                    f"{cfg.data} is not the data this run was trained on (its fingerprint changed). Point --data "
                    "at the original file, or start a new run directory."
                )
            _check_resume_config(old["config"], cfg.to_json(), latest[0], device.type)
            # what earlier invocations recorded (context_free_baseline, heldout) stays until this one
            # recomputes it: a run resumed at its last step computes nothing and must not lose them
            kept = old
        else:
            log.info("%s has no usable checkpoint yet; starting afresh", cfg.out_dir)
    write_json_atomic(run_json, {**kept, "config": cfg.to_json(), "data_fingerprint": data_fp, "tokenizer_fingerprint": tok_fp,
                                 "data": data_provenance(data), "mlsm_version": __version__})
    return latest


def prepare_run(cfg: PretrainConfig, data: TokenData, rank: Rank, ckpts: Checkpoints,
                device: torch.device) -> RunSetup:
    """Refuse data, settings and folders that cannot train this student; find the checkpoint to resume."""
    if cfg.objective == "mlsm" and not data.has_codes:
        raise MLSMError(
            f"{cfg.data} has no /codes, so it cannot train --objective mlsm. Run `mlsm sparse-code` to build "
            "codes.h5 and point --data at it, or use --objective mlm for a tokens-only file."
        )
    if data.max_seq_len > cfg.max_len:
        raise MLSMError(
            f"{cfg.data} has sequences of {data.max_seq_len} tokens, longer than --max-len {cfg.max_len}; "
            f"pass --max-len {data.max_seq_len} or rebuild the data with the shorter length."
        )
    if cfg.batch_size % (cfg.grad_accum * rank.count):
        raise MLSMError(
            f"batch size {cfg.batch_size} is not divisible by grad_accum x processes = {cfg.grad_accum} x "
            f"{rank.count}; choose a batch size that is (it is the global batch, split over the processes)."
        )
    init_dir = hf.resolve_model_dir(str(cfg.init_from)) if cfg.init_from is not None else None
    tok_dir = cfg.data.parent / TOKENIZER_DIR
    check_codes_file(cfg.data)  # codes.h5 vs its folder's manifest.json and dictionary.h5
    tok, tok_fp = _check_tokenizers(cfg, data, tok_dir, init_dir)
    special = hf.special_token_ids(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if data.max_token_id >= vocab_size:
        raise MLSMError(
            f"{cfg.data} holds token id {data.max_token_id}, outside the tokenizer's vocabulary "
            f"({vocab_size}) in {tok_dir}; the data and the tokenizer folder do not belong together."
        )
    data_fp = data.fingerprint()
    latest, error = None, None
    if rank.is_main:  # the run folder is rank 0's; every rank learns which checkpoint to resume from
        try:
            latest = _prepare_run_dir(cfg, ckpts, data, data_fp, tok_fp, device)
        except MLSMError as e:
            error = str(e)
    latest, error = rank.broadcast_object((latest, error))
    if error is not None:
        raise MLSMError(error)
    return RunSetup(tok_dir, special, vocab_size, tok_fp, data_fp, init_dir, latest)


def _model_config(cfg: PretrainConfig, vocab_size: int, pad_id: int) -> BertConfig:
    config = BertConfig.preset(cfg.model, vocab_size)
    overrides = dict(cfg.model_overrides or {})
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise MLSMError(f"unknown model settings {unknown}; valid ones are {sorted(fields)}.")
    overrides.setdefault("pad_token_id", pad_id)
    overrides["vocab_size"] = vocab_size
    return dataclasses.replace(config, **overrides)


def build_student(cfg: PretrainConfig, setup: RunSetup, num_atoms: int | None, use_mlm: bool) -> Student:
    """The student to train: from the checkpoint to resume, from --init-from, or freshly initialised."""
    torch.manual_seed(cfg.seed)
    if setup.resume:
        log.info("resuming from %s", setup.resume[1])
        model = hf.load_student(setup.resume[1], num_atoms, use_mlm)
    elif setup.init_dir is not None:
        log.info("initialising the student from %s", setup.init_dir)
        if cfg.model_overrides:
            log.warning("model_overrides are ignored: the architecture comes from %s", setup.init_dir)
        model = hf.load_student(setup.init_dir, num_atoms, use_mlm)
    else:
        model = Student(_model_config(cfg, setup.vocab_size, setup.special["pad"]), num_atoms, use_mlm)
    if model.config.vocab_size < setup.vocab_size:
        raise MLSMError(
            f"the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"({setup.vocab_size}); initialise from a model built for this tokenizer."
        )
    if model.config.max_position_embeddings < cfg.max_len:
        raise MLSMError(f"--max-len {cfg.max_len} exceeds the model's max_position_embeddings "
                        f"{model.config.max_position_embeddings}.")
    return model


# --------------------------------------------------------------------------- the run


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) a student; returns a summary of this invocation.

    Under `torchrun` every process calls this; each reads its own part of every batch, gradients
    are averaged by DDP, and rank 0 alone writes the run directory.
    """
    cfg.validate()
    require_sink(cfg.report_to)  # a missing package is an error before any training starts
    device = pick_device(cfg.device)
    # run.json records the precision used; a resumed run must use the same one (auto resolves alike
    # on the same machine; moving a run to a machine where it does not is refused, not silent).
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    rank = join(device)
    try:
        with TokenData(cfg.data) as data:
            return _train(cfg, data, device, rank)
    finally:
        rank.close()


def _train(cfg: PretrainConfig, data: TokenData, device: torch.device, rank: Rank) -> dict:
    save_at = milestone_steps(cfg) | {cfg.steps}
    ckpts = Checkpoints(cfg.out_dir, cfg.keep_last, keep=save_at)
    setup = prepare_run(cfg, data, rank, ckpts, device)
    spec = StepSpec.of(cfg, bf16=cfg.precision == "bf16")
    num_atoms = data.K if spec.use_mlsm else None
    model = build_student(cfg, setup, num_atoms, spec.use_mlm).to(device)
    _describe(cfg, model, spec, rank, device)
    step_model, ddp = model, None  # `model` is what is saved; `step_model` is what runs the steps
    if rank.active:
        from torch.nn.parallel import DistributedDataParallel

        step_model = ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)
    opt = adamw(param_groups(model, cfg.weight_decay, cfg.decay_1d), cfg.lr)
    data.pad_id = setup.special["pad"]
    masking = Masking.of(setup.special, setup.vocab_size, cfg.mask_prob, cfg.mask_policy)
    batches = BatchIterator(data, cfg.batch_size, seed=cfg.seed, masking=masking, micro_batches=cfg.grad_accum,
                            rank=rank, with_targets=spec.use_mlsm, shuffle_window=cfg.shuffle_window,
                            held_out=cfg.eval_sequences)
    start = setup.resume[0] if setup.resume else 0
    state = ckpts.restore(setup.resume[1], opt, batches, rank, device) if setup.resume else {}
    skipped, bad_streak = int(state.get("skipped_steps", 0)), int(state.get("bad_streak", 0))
    metrics = MetricsLog(cfg.out_dir, start, enabled=rank.is_main,
                         report=Report(cfg.report_to, name=cfg.out_dir.name, config=cfg.to_json()))
    last_ckpt = setup.resume[1] if setup.resume else None
    if start >= cfg.steps:
        log.info("%s already reached step %d; nothing to do", cfg.out_dir, start) if rank.is_main else None
        rows = metrics.rows()
        metrics.close()
        return _summary(cfg, start, start, (rows[0]["loss"] if rows else None, rows[-1]["loss"] if rows else None),
                        0.0, 0, last_ckpt, device, skipped)
    extra = _checkpoint_json(cfg, setup, data, num_atoms)
    baseline = _baseline(cfg, spec, data, setup, rank)
    held = heldout_batches(data, cfg.eval_sequences, cfg.batch_size, masking, spec.use_mlsm) if cfg.eval_sequences else []
    eval_at = (save_at | ({s for s in range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)} if cfg.eval_every else set())
               if held else set())
    heldout_final = None
    if device.type == "cuda":  # on CPU a prefetch thread only competes with the compute threads
        batches = Prefetcher(batches, pin_memory=True)

    model.train()
    step, first_loss, final_loss, tokens_total, tokens_since = start, None, None, 0, 0
    t_start = t_last = time.time()
    pbar = tqdm(total=cfg.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and rank.is_main))
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            r = train_step(model, opt, next(batches), spec, step_model=step_model, ddp=ddp, rank=rank)
            step += 1
            pbar.update(1)
            tokens_since, tokens_total = tokens_since + r.n_tokens, tokens_total + r.n_tokens
            skipped, bad_streak = (skipped, 0) if r.applied else (skipped + 1, bad_streak + 1)
            if r.applied:
                first_loss = r.loss if first_loss is None else first_loss
                final_loss = r.loss
            elif rank.is_main:
                log.warning("step %d: the loss is %s and the gradient norm %s; skipped (no update), %d in a row, "
                            "%d in all", step, r.loss, r.grad_norm, bad_streak, skipped)
            ev = {}
            if step in eval_at:  # every rank scores the same batches; rank 0 writes them
                t_ev = time.time()
                ev = heldout_loss(model, held, spec)
                ev["heldout_s"] = time.time() - t_ev
                heldout_final = ev
            # Which steps are logged must not depend on where a run was resumed.
            if step % cfg.log_every == 0 or step in (1, cfg.steps) or not r.applied or ev:
                now = time.time()
                metrics.write({**ev,
                    "step": step, "loss": r.loss, "mlsm_loss": r.mlsm_loss, "mlm_loss": r.mlm_loss, "lr": lr,
                    "grad_norm": r.grad_norm, "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                    "masked_tokens": r.n_masked, "targets": r.n_targets if spec.use_mlsm else None,
                    "skipped_steps": skipped, "elapsed_s": now - t_start,
                })
                t_last, tokens_since = now, 0
                pbar.set_postfix(loss=f"{r.loss:.4f}", **({"of_base": f"{r.loss / baseline:.3f}"} if baseline else {}),
                                 lr=f"{lr:.2e}")
            if bad_streak >= cfg.max_bad_steps:
                _stop_on_bad_steps(step, bad_streak, last_ckpt)
            if step in save_at or (cfg.save_every > 0 and step % cfg.save_every == 0):
                position = batches.state_dict()
                state = {"optimizer": opt.state_dict(), "data": position, "config": cfg.to_json(),
                         "scheduler": {"kind": "linear_warmup_linear_decay", "peak_lr": cfg.lr,
                                       "total_steps": cfg.steps, "warmup_steps": int(round(cfg.warmup * cfg.steps))},
                         "skipped_steps": skipped, "bad_streak": bad_streak}
                last_ckpt = ckpts.save(step, model, state, setup.tok_dir, extra, rank)
        rank.barrier()  # rank 0's last checkpoint is complete before anyone returns
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
        metrics.close()
        pbar.close()
    wall = time.time() - t_start
    if rank.is_main:
        log.info("final loss %s after %d steps (%.1f s, %.0f tokens/s%s)%s", final_loss, step, wall,
                 tokens_total / max(wall, 1e-9), f", {skipped} skipped" if skipped else "",
                 f"; {final_loss / baseline:.3f}x its context-free baseline {baseline:.4f}"
                 if baseline and final_loss is not None else "")
    summary = _summary(cfg, start, step, (first_loss, final_loss), wall, tokens_total, last_ckpt, device, skipped)
    summary.update(context_free_baseline=baseline,
                   loss_over_baseline=final_loss / baseline if baseline and final_loss is not None else None)
    if held:
        summary["heldout"] = {"sequences": cfg.eval_sequences, "mask_seed": MASK_SEED, "which": "last",
                              "step": step, **(heldout_final or {})}
        if rank.is_main:
            run_json = cfg.out_dir / RUN_JSON
            write_json_atomic(run_json, {**json.loads(run_json.read_text()), "heldout": summary["heldout"]})
            log.info("held-out loss %.4f on the last %d sequences", summary["heldout"].get("heldout_loss"),
                     cfg.eval_sequences)
    return summary


def _baseline(cfg: PretrainConfig, spec: StepSpec, data: TokenData, setup: RunSetup, rank: Rank) -> float | None:
    """The run's loss for a student that ignores the context (objectives.context_free_baselines),
    weighted as the step weights its losses; rank 0 records it in run.json."""
    b = context_free_baselines(data, setup.special.values(), seed=cfg.seed)
    kl, ent = b["mlsm_marginal_kl"], b["unigram_entropy"]
    if kl is not None and spec.count_zero_codes:  # tokens without a target count with zero loss
        kl *= b["coded_tokens"] / max(1, b["tokens"])
    total = ((kl or 0.0) if spec.use_mlsm else 0.0) + ((spec.mlm_weight if spec.use_mlsm else 1.0) * ent
                                                       if spec.use_mlm else 0.0)
    if spec.use_mlsm and kl is None:
        total = None
    if rank.is_main:
        run_json = cfg.out_dir / RUN_JSON
        doc = json.loads(run_json.read_text())
        doc["context_free_baseline"] = {**b, "loss": total}
        write_json_atomic(run_json, doc)
        if total:
            log.info("context-free baseline of this run's loss: %.4f (MLSM KL to the mean target %s, unigram "
                     "entropy %.4f, on %d tokens)", total, f"{kl:.4f}" if kl is not None else "-", ent, b["tokens"])
    return total


def _describe(cfg: PretrainConfig, model: Student, spec: StepSpec, rank: Rank, device: torch.device) -> None:
    if rank.is_main:
        c = model.config
        log.info("student: %d layers, hidden %d, %.2fM parameters, objective %s%s, device %s%s%s%s",
                 c.num_hidden_layers, c.hidden_size, sum(p.numel() for p in model.parameters()) / 1e6, cfg.objective,
                 f" + {cfg.mlm_weight} x MLM" if spec.use_mlsm and spec.use_mlm else "", device,
                 f", {rank.count} processes" if rank.count > 1 else "", ", bf16 autocast" if spec.bf16 else "",
                 ", compiled" if cfg.compile else "")


def _checkpoint_json(cfg: PretrainConfig, setup: RunSetup, data: TokenData, num_atoms: int | None) -> dict:
    """What every checkpoint's config.json records about how the student was made."""
    return {"mlsm": {
        "objective": cfg.objective, "num_atoms": num_atoms, "mlm_weight": cfg.mlm_weight,
        "preset": None if setup.init_dir is not None else cfg.model,
        "init_from": None if setup.init_dir is None else str(setup.init_dir),
        "data_fingerprint": setup.data_fp, "tokenizer_fingerprint": setup.tok_fp,
        "codes_layer": data.attrs.get("layer"), "codes_lambda": data.attrs.get("lambda"),
        "mask_policy": cfg.mask_policy, "mask_prob": cfg.mask_prob, "mlsm_version": __version__,
    }}


def _stop_on_bad_steps(step: int, bad_streak: int, last_ckpt: Path | None) -> None:
    raise MLSMError(
        f"stopped at step {step}: {bad_streak} consecutive steps ({step - bad_streak + 1}..{step}) had a "
        f"non-finite loss or gradient, so none of them changed the weights (those of step "
        f"{step - bad_streak}). The last good checkpoint is "
        f"{last_ckpt if last_ckpt is not None else 'none (no checkpoint was written yet)'}. Lower --lr or "
        "raise --warmup and start a new run from it with --init-from, or check the data "
        "(--max-bad-steps sets how many bad steps in a row are tolerated)."
    )


def _summary(cfg, start_step, step, losses, wall, tokens, last_ckpt, device, skipped=0) -> dict:
    done = step - start_step
    return {
        "steps": step,
        "start_step": start_step,
        "initial_loss": losses[0],
        "final_loss": losses[1],
        "wall_s": wall,
        "steps_per_s": done / wall if wall > 0 else None,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "out_dir": str(cfg.out_dir),
        "last_checkpoint": None if last_ckpt is None else str(last_ckpt),
        "device": str(device),
        "skipped_steps": skipped,
    }
