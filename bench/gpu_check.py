"""One pass over every GPU path of the project, each step timed, one JSON line at the end (`make gpu-check`).

Steps (each in its own try: a failure is recorded as {"ok": false, "error": ...} and the next step runs):
  bpp               nn_lasso's bpp engine on the device vs the CPU active-set engine on the same vectors:
                    vectors/s, the bpp codes' relative duality gap recomputed here in float64 on the CPU,
                    max |codes difference| and objective ratio against the CPU codes.
  fused             `mlsm tokenize` on a slice of the corpus, then `mlsm sparse-code --from-tokens` (the
                    auxiliary forward and the coding in one process): wall seconds, tokens/s, rc.
  pretrain_compile  `mlsm pretrain --precision bf16 --compile`: steps/s after warm-up (metrics.jsonl), final loss.
  ddp               `torchrun --standalone --nproc-per-node 1 -m mlsm.cli pretrain` (checkpoint written), and a
                    world-size-1 probe that joins a process group (NCCL on cuda, gloo on cpu) and runs
                    all_reduce and a DDP backward.
  train_bench       bench/train_throughput.py with bench/train_gpu.sh's arguments: step times, ratios, MFU.

    python bench/gpu_check.py --device cuda            # one H100/H200, about 5-8 minutes
    python bench/gpu_check.py --device cpu --tiny      # every path at toy sizes on CPU (2-3 min on 2 cores)

Progress goes to stderr; stdout gets one JSON line (also written to <out>/gpu_check.json).
Exit status: 0 when every step is ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("bpp", "fused", "pretrain_compile", "ddp", "train_bench")

# Sizes: the GPU run (about 5-8 min on one H200) and --tiny (every path on 2 CPU cores in a minute or two).
SIZES = {
    "full": dict(
        d=384, K=3000, n=262_144, n_cmp=8192, nnz=40, chunk=16384,  # bpp
        tokens=500_000, fused_K=3000, dict_samples=100_000, heldout=5000, shard_tokens=200_000,
        batch_tokens=8192,  # fused
        model="medium", batch=64, steps=200, log_every=10,  # pretrain_compile
        ddp_model="tiny", ddp_batch=32, ddp_steps=20,  # ddp
        # bench/train_gpu.sh's two runs (the second is the MFU one)
        bench=[("modes", ["--model", "medium", "--batch-size", "32", "--precision", "bf16", "--warmup", "5",
                          "--iters", "30"]),
               ("mfu_run", ["--model", "base", "--batch-size", "256", "--precision", "bf16", "--modes", "mlsm",
                            "--warmup", "5", "--iters", "20"])],
    ),
    "tiny": dict(
        d=384, K=256, n=512, n_cmp=512, nnz=8, chunk=256,
        tokens=1600, fused_K=32, dict_samples=1000, heldout=100, shard_tokens=800, batch_tokens=512,
        model="tiny", batch=4, steps=5, log_every=1,
        ddp_model="tiny", ddp_batch=4, ddp_steps=2,
        bench=[("modes", ["--model", "tiny", "--batch-size", "4", "--precision", "bf16", "--warmup", "1",
                          "--iters", "2", "--loader-seconds", "0.2"]),
               ("mfu_run", ["--model", "tiny", "--batch-size", "8", "--precision", "bf16", "--modes", "mlsm",
                            "--warmup", "1", "--iters", "1", "--loader-seconds", "0.2"])],
    ),
}
LAMBDA, TOL = 0.05, 1e-4


def say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class StepFailed(Exception):
    """A step's failure that still carries the figures it measured (rc, wall seconds, ...)."""

    def __init__(self, msg: str, **figures):
        super().__init__(msg)
        self.figures = figures


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise TimeoutError in this (main) thread after `seconds` (checked between Python bytecodes)."""
    def fire(*_):
        raise TimeoutError(f"step timed out after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def tail(path: Path, lines: int = 12, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    keep = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    # click's usage errors ("No such option: --from-tokens") are the line that matters: keep it in view
    usage = [ln for ln in text.splitlines() if "No such option" in ln or ln.startswith("Error:")]
    out = "\n".join(dict.fromkeys(usage + keep))
    return out[-chars:]


def run_cmd(cmd: list[str], logs: Path, name: str, deadline: float, env: dict | None = None) -> tuple[int, float]:
    """Run cmd from the repository root, stdout to logs/<name>.out and stderr to logs/<name>.log.

    Returns (rc, wall seconds). Killed (its whole process group: torchrun's workers too) at `deadline`.
    """
    logs.mkdir(parents=True, exist_ok=True)
    timeout = max(1.0, deadline - time.monotonic())
    say(f"  $ {shlex.join(cmd)}")
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.log", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise StepFailed(f"{name}: timed out after {timeout:.0f} s (log {logs / (name + '.log')}): "
                                 f"{tail(logs / f'{name}.log', 4)}", rc=None,
                                 wall_s=round(time.perf_counter() - t0, 2)) from None
            raise
        return rc, time.perf_counter() - t0


def check_rc(rc: int, wall: float, logs: Path, name: str, figures: dict | None = None) -> None:
    """StepFailed (with the log's tail, rc, wall_s and `figures`) unless rc is 0."""
    if rc != 0:
        raise StepFailed(f"{name}: rc={rc}: {tail(logs / f'{name}.log')}",
                         **{**(figures or {}), "rc": rc, "wall_s": round(wall, 2)})


def last_json(path: Path) -> dict:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    raise StepFailed(f"no JSON line in {path}")


def mlsm(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlsm.cli", *args]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *args]


def torchrun_env() -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------- 1. bpp vs CPU engine


def synthetic(d: int, K: int, n: int, nnz: int, seed: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm atoms sharing a common direction (what makes real states hard to screen) and
    L2-normalised x = D a + noise with `nnz` non-negative atoms each; built on `dev` in chunks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(d, 1, generator=g), dim=0)
    D = torch.nn.functional.normalize(torch.randn(d, K, generator=g) + 1.5 * common, dim=0).to(dev)
    Dt = D.T.contiguous()
    X = torch.empty(n, d, device=dev)
    for s in range(0, n, 4096):
        c = min(4096, n - s)
        idx = torch.randint(0, K, (c, nnz), generator=g).to(dev)  # a repeated atom just adds its weights
        w = (torch.rand(c, nnz, generator=g) + 0.2).to(dev)
        noise = (0.3 / d ** 0.5) * torch.randn(c, d, generator=g).to(dev)
        X[s:s + c] = (Dt[idx] * w[..., None]).sum(1) + noise
    return torch.nn.functional.normalize(X, dim=1), D


def real_states(extract_dir: Path, layer: int, n: int, K: int, dictionary: Path | None, seed: int,
                dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n + K L2-normalised states of `layer` from an extract folder; the dictionary from
    `dictionary` (a dictionary.h5) or else K of the states not coded."""
    import numpy as np
    import pyarrow.parquet as pq

    shards = sorted(extract_dir.glob("shard-*.parquet"))
    if not shards:
        raise StepFailed(f"no shard-*.parquet in {extract_dir}")
    want = n + (0 if dictionary else K)
    rows, have = [], 0
    for s in shards:
        col = pq.read_table(s, columns=[f"h{layer}"]).column(0).to_pylist()
        rows.append(np.asarray(col, dtype=np.float32))
        have += len(col)
        if have >= want:
            break
    V = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(rows)[:want]), dim=1)
    if dictionary:
        import h5py
        with h5py.File(dictionary, "r") as f:
            D = torch.from_numpy(f["D"][:]).float()
        X = V
    else:
        if len(V) < 2 * K:
            raise StepFailed(f"{extract_dir} has {len(V)} states of layer {layer}: too few for a K={K} dictionary")
        perm = torch.randperm(len(V), generator=torch.Generator().manual_seed(seed))
        D, X = V[perm[:K]].T.contiguous(), V[perm[K:]]
    return X.to(dev), D.to(dev)


def gap64(X, D, A, lam: float, rows: int = 2048):
    """(primal, relative gap) per row, in float64 on the CPU, in row chunks."""
    from mlsm.pipeline.solvers import duality_gap

    D64 = D.detach().cpu().double()
    ps, rels = [], []
    for s in range(0, len(X), rows):
        p, g = duality_gap(X[s:s + rows].cpu().double(), D64, A[s:s + rows].cpu().double(), lam)
        ps.append(p)
        rels.append(g / p.clamp(min=1e-300))
    return torch.cat(ps), torch.cat(rels)


def step_bpp(args, sz, dev) -> dict:
    from mlsm.pipeline.solvers import LassoOptions, nn_lasso

    if args.extract_dir and Path(args.extract_dir).is_dir():
        X, D = real_states(Path(args.extract_dir), args.layer, sz["n"], sz["K"], args.dictionary, 0, dev)
        source = f"{args.extract_dir} layer {args.layer}"
    else:
        X, D = synthetic(sz["d"], sz["K"], sz["n"], sz["nnz"], 0, dev)
        source = f"synthetic (seed 0, nnz {sz['nnz']})"
    n, m = len(X), min(sz["n_cmp"], len(X))
    say(f"  bpp: {n} vectors, d={D.shape[0]}, K={D.shape[1]}, lambda={LAMBDA}, tol={TOL}, {source}")
    gram = D.T @ D
    opt = LassoOptions(engine="bpp", chunk_size=sz["chunk"])
    nn_lasso(X[:min(4096, n)], D, LAMBDA, tol=TOL, gram=gram, options=opt)  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    res = nn_lasso(X, D, LAMBDA, tol=TOL, gram=gram, options=opt)
    sync(dev)
    bpp_s = time.perf_counter() - t0
    say(f"  bpp: {n / bpp_s:,.0f} vectors/s on {dev}; now the CPU active-set engine on {m} of them")

    Xc, Dc = X[:m].cpu(), D.cpu()
    t0 = time.perf_counter()
    ref = nn_lasso(Xc, Dc, LAMBDA, tol=TOL, options=LassoOptions(engine="active-set"))
    cpu_s = time.perf_counter() - t0
    A = res.codes[:m].cpu()
    p_b, rel_b = gap64(Xc, Dc, A, LAMBDA)
    p_c, rel_c = gap64(Xc, Dc, ref.codes, LAMBDA)
    ratio = p_b / p_c.clamp(min=1e-300)
    diff = (A.double() - ref.codes.double()).abs()
    return {
        "data": source, "n": n, "d": int(D.shape[0]), "K": int(D.shape[1]), "lambda": LAMBDA, "tol": TOL,
        "bpp_s": round(bpp_s, 4), "bpp_vectors_per_s": n / bpp_s,
        "cpu_n": m, "cpu_s": round(cpu_s, 4), "cpu_vectors_per_s": m / cpu_s, "cpu_threads": torch.get_num_threads(),
        # recomputed here in float64 on the CPU (the solver's own float32 certificate is bpp_solver_rel_gap_max)
        "bpp_rel_gap_max": float(rel_b.max()), "bpp_rel_gap_mean": float(rel_b.mean()),
        "bpp_rows_above_tol": int((rel_b > TOL).sum()),
        "cpu_rel_gap_max": float(rel_c.max()),
        "bpp_solver_rel_gap_max": float(res.rel_gap.max()),
        "max_abs_diff_vs_cpu": float(diff.max()), "mean_abs_diff_vs_cpu": float(diff.mean()),
        "objective_ratio_max": float(ratio.max()), "objective_ratio_mean": float(ratio.mean()),
        "objective_ratio_total": float(p_b.sum() / p_c.sum()),
        "nnz_per_vector": float((A > 0).sum(1).double().mean()),
    }


# --------------------------------------------------------------------------- 2. fused extract + code


def step_fused(args, sz, dev, deadline, state) -> dict:
    out, logs = Path(args.out), Path(args.out) / "logs"
    tokens_dir, codes_dir = out / "tokens", out / "fused"
    rc, wall = run_cmd(mlsm("tokenize", "--corpus", args.corpus, "--out", str(tokens_dir), "--max-tokens",
                            str(sz["tokens"]), "--no-progress", "--force"), logs, "tokenize", deadline)
    check_rc(rc, wall, logs, "tokenize")
    tokenize_s = wall
    cmd = mlsm("sparse-code", "--from-tokens", str(tokens_dir), "--layer", str(args.layer), "--out", str(codes_dir),
               "--device", dev.type, "-k", str(sz["fused_K"]), "--dict-samples", str(sz["dict_samples"]),
               "--heldout", str(sz["heldout"]), "--shard-tokens", str(sz["shard_tokens"]), "--batch-tokens",
               str(sz["batch_tokens"]), "--no-progress", "--force")
    rc, wall = run_cmd(cmd, logs, "fused", deadline)
    check_rc(rc, wall, logs, "fused", {"tokenize_s": round(tokenize_s, 2)})
    man = json.loads((codes_dir / "manifest.json").read_text())
    report = man.get("report") if isinstance(man.get("report"), dict) else {}
    tokens = man.get("tokens", report.get("tokens"))
    codes = codes_dir / "codes.h5"
    if not codes.is_file():
        raise StepFailed(f"fused: rc 0 but no {codes}", rc=rc, wall_s=round(wall, 2))
    state["codes"], state["codes_from"] = str(codes), "the fused step"
    return {
        "rc": rc, "wall_s": round(wall, 2), "tokenize_s": round(tokenize_s, 2), "tokens": tokens,
        "tokens_per_s": tokens / wall if tokens and wall > 0 else None,  # end to end: start-up, dictionary and all
        "K": sz["fused_K"], "layer": args.layer, "codes": str(codes),
        # the stage's own account, read defensively: key names may change
        **{k: report[k] for k in ("forward_s", "dictionary_s", "coding_s", "coding_tokens_per_s", "device",
                                  "engine", "gap_max", "nnz_per_token") if k in report},
    }


# --------------------------------------------------------------------------- 3. bf16 pretrain with --compile


def staged_codes(args, sz, dev, deadline) -> str:
    """A codes.h5 the two-stage way (mlsm extract, then mlsm sparse-code) at the fused step's sizes."""
    out, logs = Path(args.out) / "staged", Path(args.out) / "logs"
    say("  no codes.h5 from the fused step nor data/codes/codes.h5: building one with extract + sparse-code")
    rc, wall = run_cmd(mlsm("extract", "--corpus", args.corpus, "--out", str(out / "extract"), "--layers",
                            str(args.layer), "--max-tokens", str(sz["tokens"]), "--shard-tokens",
                            str(sz["shard_tokens"]), "--batch-tokens", str(sz["batch_tokens"]), "--device", dev.type,
                            "--no-progress", "--force"), logs, "staged_extract", deadline)
    check_rc(rc, wall, logs, "staged_extract")
    rc, wall = run_cmd(mlsm("sparse-code", "--extract-dir", str(out / "extract"), "--out", str(out / "codes"),
                            "--layer", str(args.layer), "-k", str(sz["fused_K"]), "--dict-samples",
                            str(sz["dict_samples"]), "--heldout", str(sz["heldout"]), "--device", dev.type,
                            "--no-progress", "--force"), logs, "staged_sparse_code", deadline)
    check_rc(rc, wall, logs, "staged_sparse_code")
    return str(out / "codes" / "codes.h5")


def pick_codes(args, sz, dev, deadline, state) -> str:
    """--codes, else the fused step's codes.h5, else the staged data/codes/codes.h5, else one built here."""
    for c in (args.codes, state.get("codes"), "data/codes/codes.h5"):
        if c and (ROOT / c).is_file():
            return str(c)
    state["codes"] = staged_codes(args, sz, dev, deadline)
    state["codes_from"] = "staged (extract + sparse-code, built here)"
    return state["codes"]


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def step_pretrain(args, sz, dev, deadline, state) -> dict:
    codes = pick_codes(args, sz, dev, deadline, state)
    run_dir, logs = Path(args.out) / "pretrain-compile", Path(args.out) / "logs"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed (and finish at once)
    # inductor on CPU compiles C++ for minutes on 2 cores: --tiny on cpu leaves --compile out
    compile_ = not (args.tiny and dev.type == "cpu")
    steps = sz["steps"]
    cmd = mlsm("pretrain", "--data", codes, "--out", str(run_dir), "--steps", str(steps), "--precision", "bf16",
               "--compile" if compile_ else "--no-compile", "--device", dev.type, "--model", sz["model"],
               "--batch-size", str(sz["batch"]), "--log-every", str(sz["log_every"]), "--no-milestones",
               "--no-progress")
    rc, wall = run_cmd(cmd, logs, "pretrain_compile", deadline)
    check_rc(rc, wall, logs, "pretrain_compile", {"compile": compile_})
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise StepFailed(f"no rows in {run_dir / 'metrics.jsonl'}", rc=rc, wall_s=round(wall, 2), compile=compile_)
    warm_step = max(1, steps // 4)  # the first steps compile (and recompile for new shapes)
    w = next((r for r in rows if r["step"] >= warm_step), rows[0])
    last = rows[-1]
    dt = (last.get("elapsed_s") or 0) - (w.get("elapsed_s") or 0)
    sps = (last["step"] - w["step"]) / dt if dt > 0 else None
    loss = last.get("loss")
    finite = loss is not None and math.isfinite(loss)
    log_text = (logs / "pretrain_compile.log").read_text(errors="replace")
    out = {
        "rc": rc, "wall_s": round(wall, 2), "data": codes, "data_from": state.get("codes_from", "given or found"),
        "model": sz["model"], "batch": sz["batch"],
        "steps": last["step"], "compile": compile_, "compiled_per_log": "compiled" in log_text,
        "precision": "bf16", "steps_per_s_after_warmup": sps, "warmup_steps": w["step"],
        "tokens_per_s_last": last.get("tokens_per_s"), "first_loss": rows[0].get("loss"), "final_loss": loss,
        "final_loss_finite": finite, "skipped_steps": last.get("skipped_steps"),
    }
    if not compile_:
        out["compile_skipped"] = "--tiny on cpu: torch.compile (inductor C++) takes minutes on a small CPU"
    if not finite or last["step"] != steps:
        raise StepFailed(f"final loss {loss} after {last['step']} of {steps} steps", **out)
    return out


# --------------------------------------------------------------------------- 4. DDP, world size 1


def ddp_probe(device: str) -> None:
    """Run under torchrun: join a process group (nccl on cuda, gloo on cpu), all_reduce, one DDP backward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda"
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    kwargs = {}
    if cuda:
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    try:
        t = torch.full((4,), float(dist.get_rank() + 1), device=dev)
        dist.all_reduce(t)
        model = DistributedDataParallel(torch.nn.Linear(16, 16).to(dev), device_ids=[local] if cuda else None)
        model(torch.randn(8, 16, device=dev)).square().mean().backward()
        sync(dev)
        print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                          "all_reduce": float(t[0]), "ddp_backward": model.module.weight.grad is not None}))
    finally:
        dist.destroy_process_group()


def step_ddp(args, sz, dev, deadline, state) -> dict:
    codes = pick_codes(args, sz, dev, deadline, state)
    run_dir, logs = Path(args.out) / "ddp", Path(args.out) / "logs"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = torchrun("-m", "mlsm.cli", "pretrain", "--data", codes, "--out", str(run_dir), "--steps",
                   str(sz["ddp_steps"]), "--device", dev.type, "--model", sz["ddp_model"], "--batch-size",
                   str(sz["ddp_batch"]), "--log-every", "1", "--no-progress")
    rc, wall = run_cmd(cmd, logs, "ddp", deadline, env=torchrun_env())
    ckpts = sorted(glob.glob(str(run_dir / "step-*" / "model.safetensors")))
    log_text = (logs / "ddp.log").read_text(errors="replace")
    out = {"rc": rc, "wall_s": round(wall, 2), "steps": sz["ddp_steps"], "checkpoint": ckpts[-1] if ckpts else None,
           # mlsm joins a process group only when WORLD_SIZE > 1 (mlsm.core.ranks.launched_by_torchrun)
           "mlsm_joined_process_group": "DDP: rank" in log_text}
    if not out["mlsm_joined_process_group"]:
        out["note"] = ("at world size 1 mlsm pretrain runs without a process group (WORLD_SIZE > 1 decides), so "
                       "NCCL/gloo is exercised by the probe below, not by mlsm")
    probe: dict = {"ok": False}
    try:
        prc, pwall = run_cmd(torchrun(str(Path(__file__).resolve()), "--ddp-probe", "--device", dev.type), logs,
                             "ddp_probe", deadline, env=torchrun_env())
        check_rc(prc, pwall, logs, "ddp_probe")
        probe = {"ok": True, "rc": prc, "wall_s": round(pwall, 2), **last_json(logs / "ddp_probe.out")}
        want = "nccl" if dev.type == "cuda" else "gloo"
        if probe.get("backend") != want or probe.get("all_reduce") != 1.0 or not probe.get("ddp_backward"):
            probe.update(ok=False, error=f"expected backend {want}, all_reduce 1.0 and a DDP gradient")
    except Exception as e:  # the probe's failure is a figure of this step, not a reason to lose the others
        probe = {"ok": False, "error": str(e)}
    out["probe"] = probe
    check_rc(rc, wall, logs, "ddp", out)
    if not ckpts:
        raise StepFailed(f"torchrun pretrain exited 0 but wrote no {run_dir}/step-*/model.safetensors", **out)
    if not probe["ok"]:
        raise StepFailed(f"ddp probe: {probe.get('error')}", **out)
    return out


# --------------------------------------------------------------------------- 5. bench/train_gpu.sh's figures


def codes_K(codes: str) -> int:
    import h5py

    with h5py.File(ROOT / codes, "r") as f:
        return int(f.attrs["K"])


def step_train_bench(args, sz, dev, deadline, state) -> dict:
    logs = Path(args.out) / "logs"
    codes = args.codes or state.get("codes")
    common = ["--device", dev.type, "--build-device", dev.type, "--corpus", args.corpus, "--layer", str(args.layer)]
    if codes:
        common += ["--codes", str(codes), "-K", str(codes_K(codes))]  # -K: the FLOPs of the MFU
    elif args.tiny:  # no codes to reuse: a toy codes.h5 of its own rather than the 40k-token default
        common += ["--tokens", str(sz["tokens"]), "-K", str(sz["fused_K"]), "--bench-dir", str(Path(args.out) / "bench")]
    out: dict = {"codes": codes or "built by train_throughput.py (data/bench unless --tiny)"}
    errors = []
    for name, extra in sz["bench"]:
        try:
            rc, wall = run_cmd([sys.executable, str(ROOT / "bench" / "train_throughput.py"), *extra, *common], logs,
                               f"train_bench_{name}", deadline)
            check_rc(rc, wall, logs, f"train_bench_{name}")
            out[name] = {"rc": rc, "wall_s": round(wall, 2), **last_json(logs / f"train_bench_{name}.out")}
        except Exception as e:
            out[name] = {"ok": False, "error": str(e)}
            errors.append(f"{name}: {e}")
    m, f = out.get("modes", {}), out.get("mfu_run", {})
    out.update({  # the headline figures of train_gpu.sh, lifted out of the two runs
        "mlm_ms": m.get("mlm_ms"), "mlsm_ms": m.get("mlsm_ms"), "mlsm_mlm_ms": m.get("mlsm_mlm_ms"),
        "online_ms": m.get("online_ms"), "mlsm_over_mlm": m.get("mlsm_over_mlm"),
        "online_over_mlsm": m.get("online_over_mlsm"), "mfu": f.get("mfu"), "mfu_mlsm_ms": f.get("mlsm_ms"),
        "mfu_model": f.get("model"), "mfu_batch": f.get("batch"),
    })
    if errors:
        raise StepFailed("; ".join(errors), **out)
    return out


# --------------------------------------------------------------------------- main


def run_step(name: str, fn, results: dict, timeout: float, end: float | None) -> None:
    """Run one step with its own timeout, cut short at `end` (the whole script's budget; None: no budget)."""
    if end is not None and end - time.monotonic() < 10:
        results[name] = {"ok": False, "s": 0.0, "error": "not run: the script's --budget is spent"}
        say(f"{name}: not run (the --budget is spent)")
        return
    say(f"{name}: start")
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout if end is None else min(time.monotonic() + timeout, end)
    timeout = deadline - time.monotonic()
    try:
        with alarm(timeout + 30):  # the in-process work (bpp); subprocesses stop at the deadline themselves
            rec = {"ok": True, **fn(deadline)}
    except StepFailed as e:
        rec = {"ok": False, "error": str(e), **e.figures}
    except Exception as e:
        say("".join(traceback.format_exception(e)).rstrip())
        rec = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    rec["s"] = round(time.perf_counter() - t0, 2)
    results[name] = rec
    say(f"{name}: {'ok' if rec['ok'] else 'FAILED: ' + rec['error']} ({rec['s']} s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy sizes: every path on CPU (2-3 min on 2 cores)")
    p.add_argument("--out", default="runs/gpu-check", help="outputs, logs and gpu_check.json")
    p.add_argument("--corpus", default="data/corpus", help="text for the fused step (a file, folder or glob)")
    p.add_argument("--layer", type=int, default=6, help="auxiliary layer (fused step, real states)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per step")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole script: a step still running then is stopped, later ones are "
                        "recorded as not run (default 480 = 8 min; --tiny: none; 0: none)")
    p.add_argument("--extract-dir", default=None, help="bpp step on these real hidden states (shard-*.parquet)")
    p.add_argument("--dictionary", default=None, help="with --extract-dir: code against this dictionary.h5")
    p.add_argument("--codes", default=None, help="codes.h5 for the training steps (default: the fused step's, "
                                                 "else data/codes/codes.h5)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--ddp-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_probe:
        ddp_probe(args.device)
        return 0
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    result: dict = {"device": None, "torch": torch.__version__, "tiny": args.tiny}
    if dev.type == "cuda" and not torch.cuda.is_available():
        result["error"] = (f"--device cuda, but this torch ({torch.__version__}) sees no GPU: install a CUDA build "
                           "(make setup TORCH_SPEC=...) on a machine with one, or use --device cpu")
        say(result["error"])
        print(json.dumps(result))
        return 2
    result["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sz = SIZES["tiny" if args.tiny else "full"]
    wanted = [s for s in args.steps.split(",") if s]
    if set(wanted) - set(STEPS):
        p.error(f"unknown steps {sorted(set(wanted) - set(STEPS))}; choose from {','.join(STEPS)}")
    say(f"{result['device']}, torch {torch.__version__}, {'tiny' if args.tiny else 'full'} sizes, out {out}")
    state: dict = {}
    steps = {
        "bpp": lambda deadline: step_bpp(args, sz, dev),
        "fused": lambda deadline: step_fused(args, sz, dev, deadline, state),
        "pretrain_compile": lambda deadline: step_pretrain(args, sz, dev, deadline, state),
        "ddp": lambda deadline: step_ddp(args, sz, dev, deadline, state),
        "train_bench": lambda deadline: step_train_bench(args, sz, dev, deadline, state),
    }
    budget = args.budget if args.budget is not None else (0 if args.tiny else 480)
    end = time.monotonic() + budget if budget > 0 else None
    for name in STEPS:
        if name in wanted:
            run_step(name, steps[name], result, args.timeout, end)
        else:
            result[name] = {"ok": False, "skipped": True, "error": "not in --steps"}
    result["total_s"] = round(time.perf_counter() - t_start, 2)
    result["all_ok"] = all(result[s]["ok"] for s in STEPS)
    line = json.dumps(result, default=str)
    (out / "gpu_check.json").write_text(line + "\n")
    say(f"done in {result['total_s']} s: " + ", ".join(f"{s} {'ok' if result[s]['ok'] else 'FAILED'}" for s in STEPS))
    print(line)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
