"""Whole cost of a pre-trained checkpoint, on two axes, and the compute ratio the claim is about.

Analytic FLOPs:
- the auxiliary forward up to the coded layer, per corpus token (`layer_report.aux_flops_per_token`,
  at the extract's sequence length), times the tokens extracted;
- the student's forward + backward per step, 3x the forward (`student_flops_per_step`): 6 x
  non-embedding parameters x tokens, plus attention (scores and mixing, 4 T H per token and layer
  forward) and the prediction heads on the masked tokens only;
- the dictionary and the coding are solvers, not a matmul count: they are on the seconds axis only.

Measured seconds on this machine: MLSM's extract, dictionary, coding and merge seconds from the
stages' manifests, in full, plus the trainer's elapsed seconds at each logged step, without the
held-out evaluations. MLM pays no preprocessing beyond tokenizing, which both objectives share
(and which MLSM's extract seconds already include).

`--layers auto` pays for its choice before the full extract (`layer_choice_cost`): the sample's aux
forward to the deepest candidate and the proxy students' training on the FLOPs axis, the choice's
measured wall seconds on the other. The run whose layer the recipe chose carries it.

`amortised_over` n students trained on the same codes pays 1/n of the preprocessing each.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mlsm.core.bert import BertConfig
from mlsm.core.manifest import read_manifest
from mlsm.pipeline.layer_report import aux_flops_per_token
from mlsm.trainer.metrics_log import read_metrics


def student_flops_per_step(config: BertConfig, tokens: float, seq_len: float, masked: float,
                           head_widths: tuple[int, ...]) -> float:
    """Training FLOPs (forward + backward = 3x forward) of the encoder and the masked-only heads
    (`head_widths`: K for MLSM, the vocabulary for MLM, both in joint mode; each head has its H x H transform)."""
    H, L, I = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token_layer = 2 * (4 * H * H + 2 * H * I) + 4 * seq_len * H  # matmuls + attention scores and mixing
    head = sum(2 * (H * H + H * w) * masked for w in head_widths)
    return 3 * (tokens * L * per_token_layer + head)


def run_flops_per_step(checkpoint_dir: Path, codes_h5: Path) -> float:
    """`student_flops_per_step` of a pre-training run, from its checkpoint's config.json, its
    run.json (objective, w, batch, mask share) and the mean sequence length of the codes it read."""
    from mlsm.pipeline.codes import TokenData

    checkpoint_dir = Path(checkpoint_dir)
    cfg = BertConfig.from_hf(json.loads((checkpoint_dir / "config.json").read_text()))
    run = json.loads((checkpoint_dir.parent / "run.json").read_text())["config"]
    with TokenData(codes_h5) as data:
        mean_len = data.num_tokens / data.num_sequences
        K = data.K
    mlsm_heads = () if run["objective"] == "mlm" else (K,)
    heads = mlsm_heads + ((cfg.vocab_size,) if run["objective"] == "mlm" or run["mlm_weight"] > 0 else ())
    batch = run["batch_size"]
    masked = run["mask_prob"] * batch * max(mean_len - 2, 1)  # [CLS] and [SEP] are never masked
    return student_flops_per_step(cfg, batch * mean_len, mean_len, masked, heads)


def layer_choice_cost(choice_dir: Path) -> dict:
    """What `--layers auto` paid for its choice (pipeline/layer_choice.py's folder): the sample's
    aux forward to the deepest candidate plus each proxy student's training, and the choice's wall seconds."""
    from mlsm.core.errors import MLSMError

    choice_dir = Path(choice_dir)
    choice = json.loads((choice_dir / "choice.json").read_text())
    if choice.get("wall_s") is None:
        raise MLSMError(f"{choice_dir / 'choice.json'} predates the recorded wall time; rerun the choice with --force.")
    ex = read_manifest(choice_dir / "extract", stage="extract", fix="mlsm extract --layers auto --force")
    seq_len = int(ex["params"].get("max_len", 128))
    flops = aux_flops_per_token(ex["aux_config"], max(choice["params"]["candidates"]), seq_len) * int(ex["tokens"])
    for layer, proxy in choice["proxy"].items():
        ck = choice_dir / f"run-L{layer}" / f"step-{int(proxy['steps']):07d}"
        flops += run_flops_per_step(ck, choice_dir / f"codes-L{layer}" / "codes.h5") * int(proxy["steps"])
    return {"flops": flops, "seconds": float(choice["wall_s"]), "chosen": choice["chosen"]}


def preprocessing_cost(extract_dir: Path, codes_dir: Path, layer: int) -> dict:
    """MLSM's cost before its first step: the aux forward to `layer` and the coding of that layer."""
    ex = read_manifest(extract_dir, stage="extract", fix="mlsm extract")
    sc = read_manifest(codes_dir, stage="sparse-code", fix="mlsm sparse-code")
    seq_len = int(ex["params"].get("max_len", 128))
    rep = sc.get("report", {})
    seconds = {"extract_s": float(ex["wall_s"]), "dictionary_s": float(rep.get("dictionary_s") or 0.0),
               "coding_s": float(rep.get("coding_s") or 0.0), "finalize_s": float(rep.get("finalize_s") or 0.0)}
    return {"flops": aux_flops_per_token(ex["aux_config"], layer, seq_len) * int(ex["tokens"]),
            "seconds": sum(seconds.values()), **seconds}


def training_cost_by_step(run_dir: Path, flops_per_step: float) -> dict[int, dict]:
    """Cumulative student cost at each logged step of a run: analytic FLOPs and measured seconds.

    elapsed_s restarts with each invocation; a resumed run's rows are chained onto the last
    elapsed value before it. Held-out evaluation seconds (heldout_s) are not training and are taken out.
    """
    out, offset, last, evals = {}, 0.0, 0.0, 0.0
    for r in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if r.get("elapsed_s") is None:
            continue
        if r["elapsed_s"] < last:
            offset += last
        last = r["elapsed_s"]
        evals += r.get("heldout_s") or 0.0
        out[int(r["step"])] = {"flops": flops_per_step * r["step"], "seconds": offset + last - evals}
    return out


def cost_curve(points: list[tuple[int, float]], by_step: dict[int, dict], preprocessing: dict | None,
               amortised_over: int = 1) -> list[dict]:
    """(step, score) checkpoints -> rows with the whole cost to make each, sorted by step."""
    pre = preprocessing or {"flops": 0.0, "seconds": 0.0}
    rows = []
    for step, score in sorted(points):
        c = by_step[step]
        rows.append({"step": step, "score": score, "flops": c["flops"] + pre["flops"] / amortised_over,
                     "seconds": c["seconds"] + pre["seconds"] / amortised_over})
    return rows


def cost_to_reach(curve: list[dict], target: float, axis: str) -> float | None:
    """The cost of the cheapest checkpoint scoring at least `target` (None: none does)."""
    costs = [r[axis] for r in curve if r["score"] >= target]
    return min(costs) if costs else None


def reach_ratio(mlm: dict[int, list[dict]], mlsm: dict[int, list[dict]], axis: str) -> dict:
    """Per pre-training seed s: the cost MLSM seed s needs to reach MLM seed s's best score, over what
    MLM seed s needed for it; then their mean and std over the seeds where MLSM reached it."""
    per_seed = {}
    for s in sorted(set(mlm) & set(mlsm)):
        best = max(r["score"] for r in mlm[s])
        c_mlm = cost_to_reach(mlm[s], best, axis)
        c_mlsm = cost_to_reach(mlsm[s], best, axis)
        per_seed[s] = {"target": best, "mlm_cost": c_mlm, "mlsm_cost": c_mlsm,
                       "ratio": None if c_mlsm is None else c_mlsm / c_mlm}
    ratios = [v["ratio"] for v in per_seed.values() if v["ratio"] is not None]
    return {"axis": axis, "per_seed": per_seed, "reached": len(ratios), "seeds": len(per_seed),
            "mean": statistics.fmean(ratios) if ratios else None,
            "std": statistics.stdev(ratios) if len(ratios) > 1 else (0.0 if ratios else None)}
