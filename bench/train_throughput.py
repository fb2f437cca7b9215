"""Step time of MLM, MLSM, MLSM+MLM and an online-reference emulation on one student and batch, in one run.

The claim this measures: with the targets computed offline, an MLSM step costs no more than an
MLM step (its K-way head is smaller than the vocabulary head, and reading the codes is cheap),
while the reference's online recipe pays for an auxiliary forward and a sparse solver every step.

- mlm, mlsm, mlsm+mlm: `trainer.train.train_step` (the trainer's own step) on batches from
  `trainer.data.BatchIterator` reading a real codes.h5 (masking, CSR targets and all).
- online: the reference's per-step work, emulated with this project's pieces: the auxiliary
  MiniLM (mlsm/core/bert.py) run on the unmasked batch up to --layer, 100 FISTA iterations
  (pipeline/solvers.fista_fixed) on the masked tokens against the real dictionary, and a
  vocabulary+K head trained with the KL to the resulting targets.
- loader: BatchIterator alone (with targets), tokens per second it can deliver.

If no codes.h5 is given or cached, a small one is built once through the real pipeline
(`mlsm extract` + `mlsm sparse-code` on --tokens tokens) under data/bench/.
Prints a table, and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from mlsm.core import hf
from mlsm.core.bert import BertConfig, Student
from mlsm.core.device import native_bf16, resolve_precision
from mlsm.pipeline.codes import TokenData
from mlsm.pipeline.solvers import fista_fixed, lipschitz
from mlsm.trainer.cost import student_flops_per_step
from mlsm.trainer.data import BatchIterator, Masking, Prefetcher
from mlsm.trainer.train import StepSpec, _to, adamw, param_groups, train_step

log = logging.getLogger("bench.train")
MODES = ("mlm", "mlsm", "mlsm+mlm", "online")
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown cards get mfu null rather than a guess.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}


# --------------------------------------------------------------------------- data


def build_codes(args) -> Path:
    """codes.h5 through the real stages, cached: extract then sparse-code on a small token budget."""
    out = Path(args.bench_dir)
    codes = out / "codes" / "codes.h5"
    if codes.is_file():
        return codes
    corpus = args.corpus
    if not Path(corpus).exists() and not any(ch in corpus for ch in "*?["):
        sys.exit(f"error: no codes.h5 at {codes} and no corpus at {corpus} to build one from; "
                 "run `make corpus` (or pass --corpus FILES, or --codes PATH).")
    mlsm = [sys.executable, "-m", "mlsm.cli"]
    steps = [
        mlsm + ["extract", "--corpus", corpus, "--aux", "minilm", "--layers", str(args.layer),
                "--max-tokens", str(args.tokens), "--out", str(out / "extract"), "--device", args.build_device,
                "--no-progress"],
        mlsm + ["sparse-code", "--extract-dir", str(out / "extract"), "--out", str(out / "codes"),
                "--layer", str(args.layer), "-k", str(args.K), "--dict-samples", str(int(args.tokens * 0.8)),
                "--heldout", str(int(args.tokens * 0.1)), "--seed", "0", "--device", args.build_device,
                "--no-progress"],
    ]
    for cmd in steps:
        log.info("building the benchmark's codes.h5: %s", " ".join(cmd[2:]))
        subprocess.run(cmd, check=True, cwd=ROOT)
    return codes


def make_batches(data: TokenData, tok, args, with_targets: bool, device: torch.device):
    special = hf.special_token_ids(tok)
    masking = Masking.of(special, tok.get_vocab_size(with_added_tokens=True), 0.15, "mask")
    it = BatchIterator(data, args.batch_size, seed=0, masking=masking, with_targets=with_targets)
    return Prefetcher(it, pin_memory=True) if device.type == "cuda" else it


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Median and mean milliseconds of `step()` (which returns the tokens it trained on)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times, tokens = [], 0
    for _ in range(iters):
        t0 = time.perf_counter()
        tokens += step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, tokens / sum(times)


def student(config: BertConfig, num_atoms, mlm: bool, device, compile_: bool):
    torch.manual_seed(0)
    model = Student(config, num_atoms, mlm).to(device).train()
    return model, (torch.compile(model) if compile_ else model)


def trainer_mode(mode: str, config, data, tok, args, device, bf16) -> dict:
    use_mlsm, use_mlm = mode != "mlm", mode != "mlsm"
    model, step_model = student(config, data.K if use_mlsm else None, use_mlm, device, args.compile)
    opt = adamw(param_groups(model, 0.01), 1e-4)
    batches = make_batches(data, tok, args, with_targets=use_mlsm, device=device)
    spec = StepSpec(use_mlsm=use_mlsm, use_mlm=use_mlm, mlm_weight=1.0, clip=1.0, bf16=bf16)

    def step() -> int:
        r = train_step(model, opt, next(batches), spec, step_model=step_model)
        return r.n_tokens

    try:
        ms, tps = time_steps(step, device, args.warmup, args.iters)
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
    return {"ms": ms, "train_tokens_per_s": tps, "params": sum(p.numel() for p in model.parameters())}


def online_mode(config, data, tok, args, device, bf16) -> dict:
    """The reference's step: aux forward (unmasked) → FISTA on masked tokens → vocabulary+K head, KL loss."""
    aux, aux_cfg, _ = hf.load_encoder("minilm", device=device)
    with h5py.File(Path(args.codes).parent / "dictionary.h5", "r") as f:
        D = torch.from_numpy(f["D"][:]).to(device)
    lam = float(data.attrs.get("lambda", 0.05))
    L = lipschitz(D)  # once, as the reference
    V, K = config.vocab_size, D.shape[1]
    model, step_model = student(config, V + K, False, device, args.compile)
    opt = adamw(param_groups(model, 0.01), 1e-4)
    batches = make_batches(data, tok, args, with_targets=False, device=device)

    def step() -> int:
        n_tokens = 0
        for m in next(batches):
            m = _to(m, device)
            ids = m["input_ids"].clone()
            ids.view(-1)[m["masked_index"]] = m["mlm_labels"]  # the unmasked text the aux model sees
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                h = aux(ids, m["attention_mask"], num_layers=args.layer)
            x = h.reshape(-1, h.shape[-1]).index_select(0, m["masked_index"]).float()
            x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-6)
            a = fista_fixed(x, D, lam, n_iter=100, L=L)
            s = a.sum(1, keepdim=True)
            has = s.squeeze(1) > 0
            t = a / s.clamp(min=1e-12)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                z = step_model(m["input_ids"], m["attention_mask"], m["masked_index"])["mlsm_logits"].float()
            kl = (torch.xlogy(t, t).sum(1) - (t * z[:, V:]).sum(1) + torch.logsumexp(z, dim=1))[has]
            loss = kl.sum() / has.sum().clamp(min=1)
            loss.backward()
            n_tokens += m["n_tokens"]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return n_tokens

    try:
        ms, tps = time_steps(step, device, args.warmup, args.iters)  # the same warm-up and iterations as every mode
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
    return {"ms": ms, "train_tokens_per_s": tps, "aux_layers": args.layer, "aux_hidden": aux_cfg.hidden_size}


def loader_alone(data, tok, args) -> float:
    it = make_batches(data, tok, args, with_targets=True, device=torch.device("cpu"))
    for _ in range(2):
        next(it)
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.loader_seconds:
        tokens += sum(m["n_tokens"] for m in next(it))
    return tokens / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when torch sees a GPU)")
    p.add_argument("--model", default="mini", help="student preset (tiny, mini, small, medium, base)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--loader-seconds", type=float, default=5.0)
    p.add_argument("--codes", default=None, help="a codes.h5 (default: data/bench/codes/codes.h5, built if missing)")
    p.add_argument("--bench-dir", default="data/bench")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--tokens", type=int, default=40000, help="token budget of the codes.h5 built when none exists")
    p.add_argument("--layer", type=int, default=6, help="auxiliary layer (of the codes and of the online emulation)")
    p.add_argument("-K", type=int, default=3000)
    p.add_argument("--build-device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    precision = resolve_precision(args.precision, device)  # the trainer's rule: auto is bf16 where native
    bf16 = precision == "bf16"
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        sys.exit(f"error: unknown modes {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    args.codes = str(Path(args.codes) if args.codes else build_codes(args))

    data = TokenData(args.codes)
    tok = hf.load_tokenizer(Path(args.codes).parent / "tokenizer")
    data.pad_id = hf.special_token_ids(tok)["pad"]
    config = BertConfig.preset(args.model, tok.get_vocab_size(with_added_tokens=True))
    results: dict[str, dict] = {}
    for mode in modes:
        log.info("timing %s (%s, batch %d, %s, %s)", mode, args.model, args.batch_size, device, precision)
        results[mode] = (online_mode(config, data, tok, args, device, bf16) if mode == "online"
                         else trainer_mode(mode, config, data, tok, args, device, bf16))
    # MLM and MLSM in both precisions, same run: what bf16 buys a training step.
    by_precision = {precision: {m: results[m]["ms"] for m in ("mlm", "mlsm") if m in results}}
    other = "fp32" if bf16 else "bf16"
    by_precision[other] = {}
    for mode in ("mlm", "mlsm"):
        if mode in modes:
            log.info("timing %s in %s", mode, other)
            by_precision[other][mode] = trainer_mode(mode, config, data, tok, args, device, not bf16)["ms"]
    log.info("timing the loader alone")
    loader_tps = loader_alone(data, tok, args)

    # Batch shape as the student sees it, for FLOPs (mean over a few batches).
    it = make_batches(data, tok, args, with_targets=False, device=torch.device("cpu"))
    shapes = [(sum(m["n_tokens"] for m in b), max(m["input_ids"].shape[1] for m in b), sum(m["n_masked"] for m in b))
              for b in (next(it) for _ in range(8))]
    tokens, seq_len, masked = (float(np.mean(c)) for c in zip(*shapes, strict=True))
    data.close()

    mfu = None
    if device.type == "cuda" and "mlsm" in results:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name.replace("NVIDIA ", "").split()[0]), None)
        if peak and bf16:
            mfu = student_flops_per_step(config, tokens, seq_len, masked, (args.K,)) / (results["mlsm"]["ms"] / 1e3) / peak
    ms = {m: results[m]["ms"] if m in results else None for m in MODES}
    train_tps = results["mlsm"]["train_tokens_per_s"] if "mlsm" in results else None
    out = {
        "mlm_ms": ms["mlm"], "mlsm_ms": ms["mlsm"], "mlsm_mlm_ms": ms["mlsm+mlm"], "online_ms": ms["online"],
        "mlsm_over_mlm": ms["mlsm"] / ms["mlm"] if ms["mlsm"] and ms["mlm"] else None,
        "online_over_mlsm": ms["online"] / ms["mlsm"] if ms["online"] and ms["mlsm"] else None,
        "loader_tokens_per_s": loader_tps, "train_tokens_per_s": train_tps,
        "loader_over_train": loader_tps / train_tps if train_tps else None,
        **{f"{m}_{p}_ms": by_precision[p].get(m) for p in ("fp32", "bf16") for m in ("mlm", "mlsm")},
        "mlsm_bf16_over_fp32": (by_precision["bf16"]["mlsm"] / by_precision["fp32"]["mlsm"]
                                if "mlsm" in by_precision["bf16"] else None),
        "native_bf16": native_bf16(device),
        "mfu": mfu, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model, "batch": args.batch_size, "tokens_per_batch": tokens, "padded_len": seq_len,
        "masked_per_batch": masked, "K": int(args.K), "precision": precision,
        "compile": args.compile, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "codes": args.codes,
    }
    print()
    print(f"{'mode':<12}{'ms/step':>10}{'tokens/s':>12}{'x MLM':>8}")
    for m in MODES:
        if m in results:
            r = results[m]
            rel = f"{r['ms'] / ms['mlm']:.2f}" if ms["mlm"] else "-"
            print(f"{m:<12}{r['ms']:>10.1f}{r['train_tokens_per_s']:>12.0f}{rel:>8}")
    print(f"{'loader':<12}{'':>10}{loader_tps:>12.0f}"
          f"{'' if not train_tps else f'  ({loader_tps / train_tps:.1f}x what MLSM training consumes)'}")
    if mfu is not None:
        print(f"MFU (MLSM step, bf16 peak of {out['device']}): {100 * mfu:.1f}%")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
