"""MLSM vs MLM at equal pre-training budget: pre-train, fine-tune every milestone, table + plot.

    python bench/compare.py --size cpu      # about 2 h on 2 CPU cores (make compare)
    python bench/compare.py --size mini     # BERT-mini, 2000 steps, on 2 CPU cores: about 2.5 h (COMPARE_SIZE=mini)
    python bench/compare.py --size gpu      # BERT-mini, a few thousand steps (make compare COMPARE_SIZE=gpu)
    python bench/compare.py --size smoke    # minutes: proves the pipeline end to end, numbers mean nothing

Steps (each skips what an earlier invocation finished, so an interrupted compare resumes):
0. the layer recipe (`mlsm extract --layers auto --layer-choice-only`) picks the main layer on the
   corpus slice (smoke and cpu sizes); its seconds are MLSM preprocessing in the whole-cost headline;
1. extract the auxiliary model's hidden states of the pre-training corpus, all layers in one pass;
2. `mlsm layer-report` on them (the cheap per-layer measures);
3. sparse-code each layer;
4. pre-train the students with the same budget (steps x batch) on the same token stream:
   MLM, MLSM, MLSM+MLM (w=1) from the main layer, and MLSM from each variant layer; with
   pretrain_seeds > 1 (cpu and mini size: 2), MLM and each layer's MLSM (mini size: the main
   layer's only) again with other pre-training seeds;
5. fine-tune each checkpoint at 25/50/100% (mini size: 50/100%; variants and the random-init
   baseline: 100% only) on each task, several seeds;
6. probe the final checkpoints (and the random init) with a linear probe on the frozen last layer
   (--probe-tasks, default pos and supersense);
7. write <out>/compare[-size].md, .json and .png (and -cost.png).
The pre-training corpus defaults to the SOTU speeches only, so no evaluation text (BBC, WordNet
glosses, Brown) is in it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from mlsm.core.errors import MLSMError

log = logging.getLogger("compare")

FRACTIONS = (0.25, 0.5, 1.0)
LR_GRID = (5e-4, 1e-3, 2e-3, 4e-3)  # every size sweeps the pre-training rate of each objective on it (--lr-grid)
SIZES = {
    # Numbers mean nothing at this size: it only proves every stage runs and the outputs are written.
    "smoke": dict(tokens=20_000, layers=[6], main_layer="auto", K=200, dict_samples=15_000, dict_heldout=2_000,
                  model="tiny", steps=40, batch=16, lr=2e-3, ft_seeds=1, ft_epochs=1, ft_lr=1e-4, ft_batch=32,
                  max_train=200, max_eval=200, report_samples=4_000, report_heldout=1_000, report_K=100, device="cpu",
                  pretrain_seeds=1, eval_sequences=32,
                  choice=dict(candidates="3,6", sample_tokens=10_000, proxy_steps=20, proxy_k=100)),
    # Fine-tuning lr 1e-3 and 2000 training examples: at 1e-4 and 500 the tiny students stayed at the
    # majority class (docs/evaluation.md). The main layer is the recipe's (`--layers auto`, the make
    # pretrain default: every MiniLM block a candidate, 50k-token sample); the last layer is the other.
    "cpu": dict(tokens=200_000, layers=[6], main_layer="auto", K=1000, dict_samples=100_000, dict_heldout=10_000,
                model="tiny", steps=500, batch=32, lr=2e-3, ft_seeds=3, ft_epochs=3, ft_lr=1e-3, ft_batch=32,
                max_train=2000, max_eval=500, report_samples=20_000, report_heldout=5_000, report_K=500, device="cpu",
                pretrain_seeds=2, eval_sequences=128, choice=dict(sample_tokens=50_000)),
    # The bigger student on 2 CPU cores (about 2.5 h): BERT-mini, 2000 steps x 16 on 1M SOTU tokens
    # (about 4 passes over the data; the cpu size's 200k tokens would be 20). The layer choice is
    # the cpu size's (the same 50k-token sample and rule, so a cpu-size work dir's layer-choice/
    # can be reused). What was cut to fit: one pre-training rate for every objective
    # (1e-3, MLM's best at cpu size), no second seed for the last layer's run or for MLSM+MLM,
    # milestones at 50/100% only, 2 fine-tuning epochs (cpu size: 3), and fine-tuning on POS and
    # supersense only (BBC took half the fine-tuning time and the never-trained student led it at
    # cpu size).
    "mini": dict(tokens=1_000_000, layers=[6], main_layer="auto", K=1000, dict_samples=100_000, dict_heldout=10_000,
                 model="mini", steps=2000, batch=16, lr=1e-3, lr_grid=[1e-3], ft_seeds=3, ft_epochs=2, ft_lr=1e-3,
                 ft_batch=32, max_train=2000, max_eval=500, report_samples=20_000, report_heldout=5_000, report_K=500,
                 device="cpu", pretrain_seeds=2, eval_sequences=128, choice=dict(sample_tokens=50_000),
                 fractions=(0.5, 1.0), tasks="pos,supersense", repeat_layers="main"),
    # One GPU: BERT-mini, 4000 steps of 128 sequences over the whole SOTU corpus, the paper's K.
    "gpu": dict(tokens=None, layers=[2, 4, 6], main_layer=6, K=3000, dict_samples=1_000_000, dict_heldout=20_000,
                model="mini", steps=4000, batch=128, lr=1e-3, ft_seeds=3, ft_epochs=3, ft_lr=1e-4, ft_batch=32, max_train=None,
                max_eval=None, report_samples=50_000, report_heldout=10_000, report_K=1000, device="cuda", pretrain_seeds=1,
                eval_sequences=512),
}


def mlsm_cmd(*args: str) -> None:
    """Run one `mlsm` stage as the user would (its own process: stages are resumable and skip finished work)."""
    cmd = [sys.executable, "-m", "mlsm.cli", *map(str, args)]
    log.info("$ mlsm %s", " ".join(map(str, args)))
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise MLSMError(f"`mlsm {' '.join(map(str, args))}` failed (exit {r.returncode}); see its output above.")
    log.info("  done in %.0fs", time.time() - t0)


def recipe_layer(corpus: str, folder: Path, p: dict) -> dict:
    """The layer recipe (`mlsm extract --layers auto --layer-choice-only`) on the compare's corpus slice;
    returns its choice.json. Its wall seconds are MLSM preprocessing (trainer/cost.py)."""
    c = p["choice"]
    opts = ["--layer-sample-tokens", c["sample_tokens"]]
    for key in ("candidates", "proxy_steps", "proxy_k"):
        if key in c:
            opts += [f"--layer-{key.replace('_', '-')}", c[key]]
    mlsm_cmd("extract", "--corpus", corpus, "--out", folder, "--layers", "auto", "--layer-choice-only",
             "--layer-choice-dir", folder, "--max-tokens", "all" if p["tokens"] is None else p["tokens"],
             "--device", p["device"], "--no-progress", *opts)
    return json.loads((folder / "choice.json").read_text())


def swept_runs(p: dict, L: int) -> dict[str, tuple]:
    """The three objectives on the main layer, each swept over the size's rates.
    Values: (objective, mlm weight, layer, milestone fractions to fine-tune)."""
    fractions = tuple(p.get("fractions", FRACTIONS))
    return {"mlm": ("mlm", 0.0, L, fractions), f"mlsm-L{L}": ("mlsm", 0.0, L, fractions),
            f"mlsm+mlm-L{L}": ("mlsm", 1.0, L, fractions)}


def planned_runs(p: dict, runs: dict, layers: list[int], L: int, best_lr: dict) -> tuple[dict, dict, dict]:
    """Add the other layers' MLSM runs and the other pre-training seeds to `runs`, each at its best
    rate (filled into best_lr); returns (runs, pretrain seed, the seed-0 run it repeats)."""
    runs = dict(runs)
    for layer in layers:  # other layers' codes: at MLSM's best rate (their losses are not comparable to L's)
        if layer != L:
            runs[f"mlsm-L{layer}"] = ("mlsm", 0.0, layer, (1.0,))
            best_lr[f"mlsm-L{layer}"] = best_lr.get(f"mlsm-L{L}", p["lr"])
    pretrain_seed = {name: 0 for name in runs}
    base_run = {name: name for name in runs}
    # Fine-tuning seeds do not show how much the pre-training run itself varies: MLM and the MLSM
    # run of every layer are repeated with other seeds (init, masks, data order) at their best rate,
    # with the same milestones, so the cost curves have a band and the headline a spread.
    repeated = layers if p.get("repeat_layers", "all") == "all" else [L]  # mini size: the main layer only
    for k in range(1, p["pretrain_seeds"]):
        for base in ["mlm"] + [f"mlsm-L{layer}" for layer in repeated]:
            objective, w, layer, fr = runs[base]
            runs[f"{base}-s{k}"] = (objective, w, layer, fr)
            pretrain_seed[f"{base}-s{k}"], base_run[f"{base}-s{k}"] = k, base
            best_lr[f"{base}-s{k}"] = best_lr.get(base, p["lr"])
    return runs, pretrain_seed, base_run


def milestone_dirs(run: Path, steps: int, fractions) -> dict[float, Path]:
    out = {}
    for f in fractions:
        step = max(1, int(round(steps * f)))
        d = run / f"step-{step:07d}"
        if not d.is_dir():
            raise MLSMError(f"{d} is missing: the pre-training run did not write its {int(f * 100)}% milestone.")
        out[f] = d
    return out


def random_init_dir(work: Path, like: Path, model: str, seed: int) -> Path:
    """A never-trained student of the same size and tokenizer: the floor every objective must beat."""
    import torch

    from mlsm.core.bert import BertConfig, Student
    from mlsm.core.hf import save_model_dir

    out = work / "runs" / "random-init" / "step-0000000"
    if (out / "model.safetensors").is_file():
        return out
    cfg = BertConfig.from_hf(json.loads((like / "config.json").read_text()))
    torch.manual_seed(seed)
    student = Student(cfg, num_atoms=None, mlm=True)
    save_model_dir(out, cfg, student.encoder_state_dict(), like,
                   extra_json={"mlsm": {"objective": "none", "step": 0, "preset": model}})
    return out


def finetune_cached(model_dir: Path, task: Path, out: Path, p: dict) -> dict:
    from mlsm.trainer.finetune import FinetuneConfig, run_finetune

    path = out / "results.json"
    want = dict(seeds=p["ft_seeds"], epochs=p["ft_epochs"], lr=p["ft_lr"], batch=p["ft_batch"],
                max_train=p["max_train"], max_eval=p["max_eval"])
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(cached["config"].get(k) == v for k, v in want.items()):
            return cached
        log.info("%s was fine-tuned with other settings; redoing it", out)
    cfg = FinetuneConfig(model=str(model_dir), task=task, out_dir=out, seeds=p["ft_seeds"], epochs=p["ft_epochs"],
                         lr=p["ft_lr"], batch=p["ft_batch"], max_train=p["max_train"], max_eval=p["max_eval"],
                         device=p["device"], progress=False)
    return run_finetune(cfg)


def probe_cached(model_dir: Path, tasks: list[Path], out: Path, p: dict) -> dict:
    """Linear probes on the frozen last layer (trainer/probe.py): deterministic, so one per checkpoint."""
    from mlsm.trainer.probe import PROBE_JSON, probe_checkpoint

    want = dict(max_train=p["max_train"], max_eval=p["max_eval"], layers="last")
    path = out / PROBE_JSON
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(cached["config"].get(k) == v for k, v in want.items()) and set(cached["tasks"]) == {t.name for t in tasks}:
            return cached
    return probe_checkpoint(model_dir, tasks, want.pop("layers"), out_dir=out, device=p["device"], progress=False, **want)


# --------------------------------------------------------------------------- report


def _score(res: dict, metric: str) -> tuple[float, float]:
    split = "test" if "test" in res["summary"] else "dev"
    s = res["summary"][split][metric]
    return s["mean"], s["std"]


def write_report(rows: list[dict], layer_rep: dict | None, p: dict, size: str, out: Path, timings: dict,
                 plateau: dict | None = None, tag: str = "", extra: dict | None = None) -> Path:
    """Write <out>/compare[-size][tag].md, .json and .png; returns that path without its suffix."""
    from mlsm.pipeline.layer_report import markdown as layer_md

    tasks = sorted({r["task"] for r in rows})
    lines = [f"# MLSM vs MLM at equal pre-training budget ({size} size)", "",
             f"Student `{p['model']}`, {p['steps']} steps x {p['batch']} sequences, each objective at its best lr of "
             f"{', '.join(map(str, p.get('lr_grid', [p['lr']])))} (sweep below), corpus "
             f"`{p['corpus']}` ({'all' if p['tokens'] is None else p['tokens']} tokens); targets from "
             f"MiniLM layer {p['main_layer']}{' (the layer recipe chose it: section below)' if extra and extra.get('layer_choice') else ''} "
             f"and {', '.join(f'layer {x}' for x in sorted(set(p['layers']) - {p['main_layer']})) or 'no other layer'} with K={p['K']}. Fine-tuning: {p['ft_seeds']} seeds, {p['ft_epochs']} "
             f"epochs, lr {p['ft_lr']}, batch {p['ft_batch']}, at most {p['max_train']} training and "
             f"{p['max_eval']} test examples per task. Cells: test accuracy / macro-F1 in %, mean ± std over seeds.",
             "", "| run | objective | step | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["run"], r["step"]), {})[r["task"]] = r
    for (run, step), cells in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        obj = next(iter(cells.values()))["objective"]
        vals = []
        for t in tasks:
            if t in cells:
                (a, sa), (f, sf) = _score(cells[t]["result"], "accuracy"), _score(cells[t]["result"], "macro_f1")
                vals.append(f"{100 * a:.1f} ± {100 * sa:.1f} / {100 * f:.1f} ± {100 * sf:.1f}")
            else:
                vals.append("–")
        lines.append(f"| {run} | {obj} | {step} | " + " | ".join(vals) + " |")
    extra = extra or {}
    lines += seed_spread(rows, tasks)
    lines += probe_section(extra.get("probes", []))
    lines += sweep_section(extra.get("sweep", []), extra.get("best_lr", {}))
    lines += cost_section(extra)
    lines += plateau_section(plateau or {})
    lines += choice_section(extra.get("layer_choice"))
    if layer_rep is not None:
        lines += ["", "## Layer report (auxiliary model)", "", layer_md(layer_rep)]
    lines += ["", "## Stage timings of the last invocation (s)", "",
              "Work finished by an earlier invocation is skipped and does not count here.", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    suffix = ("" if size == "cpu" else f"-{size}") + tag
    (out / f"compare{suffix}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / f"compare{suffix}.json").write_text(json.dumps(
        {"size": size, "params": p, "rows": [{k: v for k, v in r.items() if k != "result"} | {
            "summary": r["result"]["summary"], "seeds": r["result"]["seeds"]} for r in rows],
         "layer_report": layer_rep, "plateau": plateau, "timings_s": timings, **extra}, indent=2, default=str),
        encoding="utf-8")
    plot(rows, tasks, out / f"compare{suffix}.png", size)
    if extra.get("curves"):
        plot_cost(extra["curves"], out / f"compare{suffix}-cost.png", size)
    return out / f"compare{suffix}"


def marginal_baselines(codes_h5: Path, max_tokens: int = 500_000) -> dict:
    """Losses of a student that ignores the context (what the trainer records in run.json):
    MLM predicting unigram frequencies, MLSM predicting the mean target. A checkpoint still on
    these plateaus has learnt nothing contextual to fine-tune from."""
    from mlsm.core import hf
    from mlsm.pipeline.codes import TokenData
    from mlsm.trainer.objectives import context_free_baselines

    special = hf.special_token_ids(hf.load_tokenizer(codes_h5.parent / "tokenizer")).values()
    with TokenData(codes_h5) as data:
        return context_free_baselines(data, special, max_tokens=max_tokens)


def final_losses(run_dir: Path, last: int = 3) -> dict:
    """Mean of the last `last` logged MLSM and MLM losses of a run (single logged steps are noisy)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for key in ("mlsm_loss", "mlm_loss"):
        vals = [r[key] for r in rows[-last:] if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    out["steps"] = [r["step"] for r in rows[-last:]]
    return out


def choice_section(choice: dict | None) -> list[str]:
    if not choice:
        return []
    lines = ["", "## The layer recipe's choice (`mlsm extract --layers auto`)", "",
             f"Rule: {choice['rule']}. Sample: {choice['sample_tokens']} tokens; {choice['wall_s']:.0f} s in all.", "",
             "| layer | proxy loss / baseline | held-out sparse-coding objective |", "|---|---|---|"]
    for layer, v in sorted(choice["proxy"].items(), key=lambda kv: int(kv[0])):
        mark = " (chosen)" if int(layer) == choice["chosen"] else ""
        lines.append(f"| {layer}{mark} | {v['ratio']:.3f} | {choice['heldout_objective'].get(layer, float('nan')):.4f} |")
    return lines


def plateau_section(plateau: dict) -> list[str]:
    if not plateau:
        return []
    lines = ["", "## Did pre-training leave the marginal plateau?", "",
             "Final losses (mean of the last 3 logged steps) next to the loss of a student that ignores the "
             "context (same layer's codes): MLM predicting unigram frequencies (their entropy), MLSM predicting "
             "the mean target (mean KL to it). A loss at its baseline means nothing contextual was learnt yet.", "",
             "| run | MLSM loss | MLSM baseline | MLM loss | MLM baseline |", "|---|---|---|---|---|"]
    for run, d in sorted(plateau.items()):
        f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {run} | {f(d['mlsm_loss'])} | {f(d['mlsm_loss'] and d['mlsm_marginal_kl'])} | "
                     f"{f(d['mlm_loss'])} | {f(d['mlm_loss'] and d['unigram_entropy'])} |")
    return lines


def seed_spread(rows: list[dict], tasks: list[str]) -> list[str]:
    """Final checkpoints of runs repeated with other pre-training seeds: mean ± std over those seeds
    of each run's fine-tuning mean, next to the fine-tuning-seed std of seed 0 alone."""
    final = max(r["step"] for r in rows)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["step"] == final:
            groups.setdefault(r["base_run"], []).append(r)
    groups = {b: g for b, g in groups.items() if len({r.get("pretrain_seed", 0) for r in g}) > 1}
    if not groups:
        return []
    lines = ["", "## Pre-training seeds (final checkpoint)", "",
             "Cells: test accuracy in %, mean ± std over pre-training seeds of each run's mean over fine-tuning "
             "seeds; in brackets the fine-tuning-seed std of the seed-0 run.", "",
             "| run | pre-training seeds | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for base, g in sorted(groups.items()):
        vals = []
        for t in tasks:
            per = sorted((r.get("pretrain_seed", 0), *_score(r["result"], "accuracy")) for r in g if r["task"] == t)
            means = [m for _, m, _ in per]
            std = statistics.stdev(means) if len(means) > 1 else 0.0
            vals.append(f"{100 * statistics.fmean(means):.1f} ± {100 * std:.1f} ({100 * per[0][2]:.1f})")
        lines.append(f"| {base} | {len({r.get('pretrain_seed', 0) for r in g})} | " + " | ".join(vals) + " |")
    return lines


def probe_section(probes: list[dict]) -> list[str]:
    """Final checkpoints' last-layer probe accuracy, mean ± std over pre-training seeds per run."""
    if not probes:
        return []
    tasks = sorted({t for r in probes for t in r["test"]})
    lines = ["", "## Linear probes on the frozen last layer (final checkpoints)", "",
             "A logistic regression per task on frozen features (trainer/probe.py; L2 chosen on dev): no fine-tuning "
             "variance, so the spread is over pre-training seeds only (std 0.0 with one seed). Cells: test accuracy / "
             "macro-F1 in %.", "", "| run | pre-training seeds | " + " | ".join(tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    groups: dict[str, list[dict]] = {}
    for r in probes:
        groups.setdefault(r["base_run"], []).append(r)

    def cell(g: list[dict], t: str, key: str) -> str:
        vals = [100 * r["test"][t][key] for r in g]
        return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.1f}"

    for base, g in sorted(groups.items()):
        lines.append(f"| {base} | {len(g)} | " + " | ".join(
            f"{cell(g, t, 'accuracy')} / {cell(g, t, 'macro_f1')}" for t in tasks) + " |")
    major = probes[0]["majority"]
    lines.append("| majority class | – | " + " | ".join(f"{100 * major[t]['accuracy']:.1f} / {100 * major[t]['macro_f1']:.1f}"
                                                    for t in tasks) + " |")
    return lines


def plot(rows: list[dict], tasks: list[str], path: Path, size: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        runs = sorted({r["run"] for r in rows if r["task"] == task and not r.get("pretrain_seed")})
        for run in runs:
            pts = sorted((r["step"], *_score(r["result"], "accuracy")) for r in rows if r["task"] == task and r["run"] == run)
            xs, ys, es = zip(*pts, strict=True)
            style = dict(marker="o", capsize=3) if len(xs) > 1 else dict(marker="s", linestyle="none", capsize=3)
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], label=run, **style)
        ax.set_title(task)
        ax.set_xlabel("pre-training steps")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    _save_figure(fig, axes, f"Fine-tuning score vs pre-training steps ({size} size; bars: std over seeds)", path)


def _save_figure(fig, axes, title: str, path: Path) -> None:
    """The plots' one ending: legend on the first row's last panel, title, PNG."""
    import matplotlib.pyplot as plt

    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dev_score(res: dict) -> float:
    """Mean dev accuracy over fine-tuning seeds: the score the cost curves and the headline use
    (test stays out of every choice and of the headline)."""
    split = "dev" if "dev" in res["summary"] else "test"
    return res["summary"][split]["accuracy"]["mean"]


def whole_costs(rows: list[dict], runs: dict, run_dirs: dict, codes: dict, extract_dir: Path, p: dict,
                base_run: dict, pretrain_seed: dict, choice_dir: Path | None = None) -> dict:
    """Cost curves (dev accuracy averaged over tasks vs cumulative cost) of every run, and the
    headline ratio of each MLSM run against MLM, preprocessing paid in full and halved. With the
    recipe's layer (choice_dir), the runs on that layer also pay for the choice."""
    from mlsm.trainer.cost import (
        cost_curve,
        layer_choice_cost,
        preprocessing_cost,
        reach_ratio,
        run_flops_per_step,
        training_cost_by_step,
    )

    pre = {layer: preprocessing_cost(extract_dir, codes[layer], layer) for layer in {runs[n][2] for n in runs}}
    if choice_dir is not None:
        chosen = layer_choice_cost(choice_dir)
        if chosen["chosen"] in pre:
            c = pre[chosen["chosen"]]
            c.update(layer_choice_s=chosen["seconds"], layer_choice_flops=chosen["flops"],
                     seconds=c["seconds"] + chosen["seconds"], flops=c["flops"] + chosen["flops"])
    scores: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["run"] in runs:
            scores.setdefault(r["run"], {}).setdefault(r["step"], []).append(dev_score(r["result"]))
    curves: dict[str, dict] = {}
    for name, (objective, _, layer, _) in runs.items():
        if name not in scores:
            continue
        d = run_dirs[name]
        fps = run_flops_per_step(d / f"step-{p['steps']:07d}", codes[layer] / "codes.h5")
        by_step = training_cost_by_step(d, fps)
        pts = [(step, statistics.fmean(v)) for step, v in scores[name].items()]
        shared = None if objective == "mlm" else pre[layer]
        curves[name] = {"base_run": base_run[name], "seed": pretrain_seed[name], "objective": objective, "flops_per_step": fps,
                        "full": cost_curve(pts, by_step, shared), "amortised": cost_curve(pts, by_step, shared, 2)}
    headline = {}
    mlm = {k: v for k, v in curves.items() if v["base_run"] == "mlm"}
    for base in sorted({v["base_run"] for v in curves.values()} - {"mlm"}):
        other = {k: v for k, v in curves.items() if v["base_run"] == base}
        headline[base] = {f"{pay}_{axis}": reach_ratio({c["seed"]: c[pay] for c in mlm.values()},
                                                        {c["seed"]: c[pay] for c in other.values()}, axis)
                          for pay in ("full", "amortised") for axis in ("seconds", "flops")}
    return {"preprocessing": {str(k): v for k, v in pre.items()}, "curves": curves, "headline": headline}


def sweep_section(sweep: list[dict], best_lr: dict) -> list[str]:
    if not sweep:
        return []
    lrs = sorted({r["lr"] for r in sweep})
    lines = ["", "## Pre-training learning-rate sweep (held-out pre-training loss, seed 0)", "",
             "Each objective's rate is the one of its lowest held-out loss (the last sequences of the token stream, "
             "never trained on, fixed masks). MLM cross-entropy and MLSM KL are different quantities: compare "
             "within a row only.", "", "| run | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for run in dict.fromkeys(r["run"] for r in sweep):
        cell = {r["lr"]: r["heldout_loss"] for r in sweep if r["run"] == run}
        lines.append(f"| {run} | " + " | ".join(f"{cell[lr]:.4f}" if lr in cell else "–" for lr in lrs)
                     + f" | {best_lr[run]:g} |")
    return lines


def cost_section(extra: dict) -> list[str]:
    if not extra.get("headline"):
        return []
    fmt = lambda h: ("not reached" if h["mean"] is None else f"{h['mean']:.2f} ± {h['std']:.2f}") + (  # noqa: E731
        f" (reached by {h['reached']} of {h['seeds']} seeds)")
    lines = ["", "## Whole cost: MLSM's cost to reach MLM's best dev score, over MLM's", "",
             "Per pre-training seed: the best dev accuracy (mean over tasks and fine-tuning seeds) any MLM checkpoint "
             "reaches, the cost of the cheapest MLM checkpoint reaching it, and of the cheapest MLSM checkpoint "
             "reaching it, preprocessing included (the layer choice on the recipe's layer, aux extract, dictionary, coding; "
             "trainer/cost.py). Mean ± std over "
             "pre-training seeds of the ratio, where reached. Goal: <= 0.5. FLOPs: the aux forward and the student "
             "(the coding is not a matmul count, it is on the seconds axis only); seconds: measured on this machine.", "",
             "| run | seconds, preprocessing in full | seconds, amortised over 2 students | FLOPs, in full | "
             "FLOPs, amortised |", "|---|---|---|---|---|"]
    for base, h in extra["headline"].items():
        lines.append(f"| {base} | {fmt(h['full_seconds'])} | {fmt(h['amortised_seconds'])} | {fmt(h['full_flops'])} | "
                     f"{fmt(h['amortised_flops'])} |")
    lines += ["", "Preprocessing per coded layer (the extract is one pass for all layers and counts in full for each; "
              "the recipe's layer also pays for the layer choice, its FLOPs being the sample's aux forward and the "
              "proxy students):", "", "| layer | GFLOPs | layer choice s | extract s | dictionary s | coding s | "
              "merge s | total s |", "|---|---|---|---|---|---|---|---|"]
    for layer, c in extra["preprocessing"].items():
        lines.append(f"| {layer} | {c['flops'] / 1e9:.1f} | {c.get('layer_choice_s', 0.0):.0f} | {c['extract_s']:.0f} | "
                     f"{c['dictionary_s']:.0f} | {c['coding_s']:.0f} | {c['finalize_s']:.0f} | {c['seconds']:.0f} |")
    return lines


def plot_cost(curves: dict, path: Path, size: str) -> None:
    """Dev score vs cumulative cost, one line per run (mean over its pre-training seeds, band: min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, axis, unit in zip(axes[0], ("seconds", "flops"), ("s on this machine", "analytic FLOPs"), strict=True):
        for base in dict.fromkeys(v["base_run"] for v in curves.values()):
            seeds = [v["full"] for v in curves.values() if v["base_run"] == base]
            steps = sorted(set.intersection(*[{r["step"] for r in c} for c in seeds]))
            at = [[next(r for r in c if r["step"] == s) for c in seeds] for s in steps]
            xs = [statistics.fmean(r[axis] for r in rs) for rs in at]
            ys = [[100 * r["score"] for r in rs] for rs in at]
            line, = ax.plot(xs, [statistics.fmean(y) for y in ys], marker="o", label=base)
            if len(seeds) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel(f"cumulative cost, preprocessing in full ({unit})")
        ax.set_ylabel("dev accuracy, mean over tasks (%)")
        ax.grid(alpha=0.3)
    _save_figure(fig, axes, f"Fine-tuned dev score vs whole cost ({size} size; bands: pre-training seeds)", path)


# --------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--corpus", default="data/corpus/sotu.txt", help="Pre-training text (keep evaluation text out).")
    ap.add_argument("--eval-dir", type=Path, default=Path("data/eval"), help="Output of `make eval-data`.")
    ap.add_argument("--tasks", default=None, help="Fine-tuning tasks, comma-separated (default: the size's; bbc,supersense,pos).")
    ap.add_argument("--work", type=Path, default=None, help="Intermediate files (default data/compare-<size>).")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--device", default=None, help="Override the size's device (cpu, cuda).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="Pre-training steps instead of the size's (another budget on the same data and codes).")
    ap.add_argument("--runs", default=None,
                    help="Only these runs, comma-separated (mlm, mlsm-L6, mlsm+mlm-L6, mlsm-L3, mlm-s1, ...).")
    ap.add_argument("--lr-grid", default=None,
                    help=f"Pre-training rates swept per objective, comma-separated (default {','.join(map(str, LR_GRID))}).")
    ap.add_argument("--probe-tasks", default="pos,supersense",
                    help="Tasks of --tasks that the final checkpoints are also probed on (linear probe, frozen last layer; "
                         "empty: none).")
    ap.add_argument("--final-only", action="store_true", help="Fine-tune only each run's final checkpoint.")
    ap.add_argument("--tag", default=None,
                    help="Suffix of the run/finetune folders and the report (default with --steps N: -N-steps).")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except MLSMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    try:
        import matplotlib  # noqa: F401  (checked first: failing after an hour of training would be cruel)
    except ImportError as e:
        raise MLSMError("the compare plot needs matplotlib: pip install -e '.[plot]' (make compare does it).") from e
    p = dict(SIZES[args.size], corpus=args.corpus)
    p["lr_grid"] = [float(x) for x in args.lr_grid.split(",")] if args.lr_grid else list(p.get("lr_grid", LR_GRID))
    if len(p["lr_grid"]) < 1:
        raise MLSMError("--lr-grid needs at least one rate")
    if args.device:
        p["device"] = args.device
    if args.steps:
        p["steps"] = args.steps
    tag = args.tag if args.tag is not None else (f"-{args.steps}-steps" if args.steps else "")
    os.chdir(ROOT)
    work = args.work or Path(f"data/compare-{args.size}")
    tasks = [args.eval_dir / t for t in (args.tasks or p.get("tasks", "bbc,supersense,pos")).split(",") if t]
    for t in tasks:
        if not (t / "task.json").is_file() and not any(t.glob("train.*")):
            raise MLSMError(f"task {t} not found; run `make eval-data` first (or pass --eval-dir/--tasks).")
    if not Path(args.corpus).exists():
        raise MLSMError(f"corpus {args.corpus} not found; run `make corpus` first (or pass --corpus).")
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    progress = ["--no-progress"]
    choice = None
    if p["main_layer"] == "auto":
        t0 = time.time()
        choice = recipe_layer(args.corpus, work / "layer-choice", p)
        p["main_layer"] = choice["chosen"]
        timings["layer-choice"] = time.time() - t0
        log.info("the recipe chose layer %d", p["main_layer"])
    layers = sorted(set(p["layers"]) | {p["main_layer"]})

    t0 = time.time()
    ex = work / "extract"
    mlsm_cmd("extract", "--corpus", args.corpus, "--out", ex, "--layers", ",".join(map(str, layers)),
             "--max-tokens", "all" if p["tokens"] is None else p["tokens"], "--device", p["device"], *progress)
    timings["extract"] = time.time() - t0

    t0 = time.time()
    from mlsm.core.config import LayerReportConfig
    from mlsm.pipeline.layer_report import layer_report

    rep_path = work / "layer-report" / "layer_report.json"
    if rep_path.is_file():
        layer_rep = json.loads(rep_path.read_text())
    else:
        layer_rep = layer_report(LayerReportConfig(ex, work / "layer-report", K=p["report_K"], samples=p["report_samples"],
                                                   heldout=p["report_heldout"], seed=args.seed, device=p["device"],
                                                   progress=False))
    timings["layer-report"] = time.time() - t0

    t0 = time.time()
    codes = {}
    for layer in layers:
        codes[layer] = work / f"codes-L{layer}"
        mlsm_cmd("sparse-code", "--extract-dir", ex, "--out", codes[layer], "--layer", layer, "-k", p["K"],
                 "--dict-samples", p["dict_samples"], "--heldout", p["dict_heldout"], "--seed", args.seed, "--device", p["device"], *progress)
    timings["sparse-code"] = time.time() - t0

    t0 = time.time()
    L = p["main_layer"]
    runs = swept_runs(p, L)
    run_dirs, best_lr = {}, {}

    def pretrain(folder: str, objective: str, w: float, layer: int, lr: float, seed: int) -> Path:
        d = work / f"runs{tag}" / folder
        mlsm_cmd("pretrain", "--data", codes[layer] / "codes.h5", "--out", d, "--objective", objective,
                 "--mlm-weight", w, "--model", p["model"], "--steps", p["steps"], "--batch-size", p["batch"],
                 "--lr", lr, "--seed", seed, "--device", p["device"], "--milestones", "--log-every", 50,
                 "--eval-sequences", p["eval_sequences"], *progress)
        return d

    # Each objective at its own best rate: the grid is run with seed 0 and the rate of the lowest
    # held-out pre-training loss wins (docs/evaluation.md says why not the dev score).
    sweep = []
    for name in [n for n in runs if not args.runs or n in args.runs.split(",")]:
        objective, w, layer, _ = runs[name]
        for lr in p["lr_grid"]:
            d = pretrain(f"{name}-lr{lr:g}", objective, w, layer, lr, args.seed)
            held = json.loads((d / "run.json").read_text())["heldout"]
            sweep.append({"run": name, "lr": lr, "heldout_loss": held["heldout_loss"], "dir": str(d)})
        best = min((r for r in sweep if r["run"] == name), key=lambda r: r["heldout_loss"])
        best_lr[name], run_dirs[name] = best["lr"], Path(best["dir"])
    runs, pretrain_seed, base_run = planned_runs(p, runs, layers, L, best_lr)
    if args.runs:
        wanted = [r for r in args.runs.split(",") if r]
        unknown = sorted(set(wanted) - set(runs))
        if unknown:
            raise MLSMError(f"--runs: no run named {', '.join(unknown)}; this size has {', '.join(runs)}.")
        runs = {k: v for k, v in runs.items() if k in wanted}
    if args.final_only:
        runs = {k: (*v[:3], (1.0,)) for k, v in runs.items()}
    for name, (objective, w, layer, _) in runs.items():
        if name not in run_dirs:
            run_dirs[name] = pretrain(f"{name}-lr{best_lr[name]:g}", objective, w, layer, best_lr[name],
                                      args.seed + pretrain_seed[name])
    timings["pretrain"] = time.time() - t0
    baselines = {layer: marginal_baselines(codes[layer] / "codes.h5") for layer in {runs[n][2] for n in runs}}
    plateau = {name: {**final_losses(run_dirs[name]), **baselines[layer]} for name, (_, _, layer, _) in runs.items()}

    t0 = time.time()
    checkpoints = []  # (run, objective label, step, dir)
    for name, (objective, w, layer, fractions) in runs.items():
        label = "MLM" if objective == "mlm" else ("MLSM+MLM" if w > 0 else "MLSM") + f" (L{layer})"
        for d in milestone_dirs(run_dirs[name], p["steps"], fractions).values():
            checkpoints.append((name, label, int(d.name.split("-")[1]), d))
    first = checkpoints[0][3]
    checkpoints.append(("random-init", "none", 0, random_init_dir(work, first, p["model"], args.seed)))
    rows = []
    for name, label, step, d in checkpoints:
        for task in tasks:
            log.info("fine-tune %s step %d on %s", name, step, task.name)
            ft_dir = work / ("finetune" if name == "random-init" else f"finetune{tag}")  # random init: any budget
            res = finetune_cached(d, task, ft_dir / d.parent.name / d.name / task.name, p)  # the run's folder names its rate
            rows.append({"run": name, "base_run": base_run.get(name, name), "objective": label, "step": step,
                         "task": task.name, "result": res, "pretrain_seed": pretrain_seed.get(name, 0)})
    timings["finetune"] = time.time() - t0

    t0 = time.time()
    probe_tasks = [t for t in tasks if t.name in args.probe_tasks.split(",")]
    probes = []
    for name, label, step, d in checkpoints if probe_tasks else []:
        if step != p["steps"] and name != "random-init":
            continue
        log.info("probe %s step %d", name, step)
        res = probe_cached(d, probe_tasks, work / f"probe{tag}" / d.parent.name / d.name, p)
        last = {t: next(iter(v["layers"].values())) for t, v in res["tasks"].items()}  # layers="last": one each
        probes.append({"run": name, "base_run": base_run.get(name, name), "objective": label, "step": step,
                       "pretrain_seed": pretrain_seed.get(name, 0), "layer": res["layers"][0],
                       "test": {t: v.get("test", v["dev"]) for t, v in last.items()}, "dev": {t: v["dev"] for t, v in last.items()},
                       "majority": {t: v["majority"].get("test", v["majority"]["dev"]) for t, v in res["tasks"].items()}})
    timings["probe"] = time.time() - t0

    costs = whole_costs(rows, runs, run_dirs, codes, ex, p, base_run, pretrain_seed,
                        choice_dir=None if choice is None else work / "layer-choice")
    stem = write_report(rows, layer_rep, p, args.size, args.out, timings, plateau, tag,
                        extra={"sweep": sweep, "best_lr": best_lr, "probes": probes, "layer_choice": choice, **costs})
    log.info("wrote %s.md, .json and .png", stem)


if __name__ == "__main__":
    sys.exit(main())
