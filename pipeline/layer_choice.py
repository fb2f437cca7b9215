"""`--layers auto`: choose the auxiliary layer by the documented recipe before the full extract.

The recipe measures what the user wants from the targets, that the student learns context from
them: per candidate layer, a small dictionary codes a sample of the corpus and the tiny student
pre-trains on those codes for a few hundred steps; the layer whose loss ends lowest against its
own context-free baseline (KL to the mean target) wins. The held-out sparse-coding objective of
`mlsm layer-report` did not predict that ratio (docs/evaluation.md, "The layer recipe"), so it is
recorded beside the choice but does not make it.

Everything lands in one folder (`<extract out>/layer-choice/` by default): the sample's extract,
`layer_report.json`/`.md`, per layer `codes-L<n>/` and `run-L<n>/`, and `choice.json`, so a rerun
reuses them (each is a resumable stage) and a reader can see why the layer was chosen. The full
extract records the same choice in its manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from mlsm.core import hf
from mlsm.core.config import ExtractConfig, LayerReportConfig
from mlsm.core.errors import MLSMError
from mlsm.core.manifest import write_json_atomic

log = logging.getLogger(__name__)

CHOICE_DIR = "layer-choice"
CHOICE_FILE = "choice.json"
RULE = ("lowest proxy loss / context-free baseline among the candidate layers (the tiny student pre-trained "
        "for `proxy_steps` on K=`proxy_k` codes of the sample; the loss is the mean of the last fifth of its "
        "logged steps); layers within `tie` (relative) of the lowest count as tied, and the cheapest of them "
        "(the shallowest) wins")
PROXY_LR = 2e-3  # the demo's rate (Makefile LR); the proxy ranks layers, it does not tune the student


def pick_layer(scores: dict[int, float], tie: float) -> tuple[int, list[int]]:
    """The recipe's layer: (chosen, the layers tied with the best), lower score better."""
    if not scores:
        raise MLSMError("there are no candidate layers to choose from.")
    best = min(scores.values())
    tied = sorted(layer for layer, v in scores.items() if v <= best * (1.0 + tie))
    return tied[0], tied


def proxy_ratio(run_dir: Path) -> dict:
    """A proxy run's loss against its context-free baseline: the mean over the last fifth of the
    logged steps, as one batch's loss is too noisy to rank layers by."""
    from mlsm.trainer.metrics_log import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("loss") is not None]
    if not rows:
        raise MLSMError(f"{run_dir} logged no steps; rerun with --force.")
    last_step = rows[-1]["step"]
    tail = [r["loss"] for r in rows if r["step"] > 0.8 * last_step] or [rows[-1]["loss"]]
    baseline = json.loads((run_dir / "run.json").read_text())["context_free_baseline"]["loss"]
    loss = sum(tail) / len(tail)
    return {"loss": loss, "baseline": baseline, "ratio": loss / baseline, "steps": last_step}


def candidate_layers(cfg: ExtractConfig) -> list[int]:
    """The candidates asked for, or every block of the auxiliary model (1..L; 0 is the embeddings)."""
    if cfg.layer_candidates:
        return sorted(set(cfg.layer_candidates))
    return list(range(1, hf.read_config(hf.resolve_model_dir(cfg.aux)).num_hidden_layers + 1))


def choice_params(cfg: ExtractConfig, candidates: list[int]) -> dict:
    """What decides the choice: a recorded choice made with other values is redone, not reused."""
    return {"candidates": candidates, "sample_tokens": cfg.layer_sample_tokens, "tie": cfg.layer_tie,
            "seed": cfg.layer_seed, "proxy_steps": cfg.layer_proxy_steps, "proxy_k": cfg.layer_proxy_k,
            "proxy_lr": PROXY_LR, "max_len": cfg.max_len, "corpus": cfg.corpus, "text_field": cfg.text_field,
            "tokens": str(cfg.tokens) if cfg.tokens else None, "aux": str(cfg.aux or hf.DEFAULT_AUX)}


def choose_layer(cfg: ExtractConfig) -> dict:
    """Run (or reuse) the layer choice for this extract; returns choice.json's content."""
    from mlsm.pipeline.extract import run_extract
    from mlsm.pipeline.layer_report import layer_report

    folder = Path(cfg.layer_choice_dir or Path(cfg.out) / CHOICE_DIR)
    candidates = candidate_layers(cfg)
    params = choice_params(cfg, candidates)
    path = folder / CHOICE_FILE
    if path.is_file() and not cfg.force:
        old = json.loads(path.read_text())
        if old.get("params") == params:
            log.info("layer choice: reusing %s (layer %d)", path, old["chosen"])
            return old
        log.info("layer choice: %s was made with other settings; choosing again", path)
        shutil.rmtree(folder)
    elif cfg.force and folder.exists():
        shutil.rmtree(folder)
    t0 = time.time()
    if cfg.tokens is not None:
        _check_same_corpus(cfg)
    sample_tokens = cfg.layer_sample_tokens
    if cfg.max_tokens is not None:
        sample_tokens = min(sample_tokens, cfg.max_tokens)
    # the sample is read from the corpus even when the full extract reads a token stream of it: a
    # stream's head would need a cut that the stream's recorded packing does not have
    sample_cfg = dataclasses.replace(cfg, out=folder / "extract", layers=tuple(candidates), max_tokens=sample_tokens,
                                     tokens=None, worker_index=None, num_workers=None, force=False,
                                     layer_choice_only=False)
    log.info("layer choice: extracting layers %s on the first %d tokens -> %s", candidates, sample_tokens, folder)
    man = run_extract(sample_cfg)
    # the report's and the proxies' held-out tokens scale down with a small sample (report defaults: 20k + 5k)
    heldout = min(5_000, man["tokens"] // 5)
    samples = min(20_000, man["tokens"] - heldout)
    report = layer_report(LayerReportConfig(folder / "extract", folder, layers=tuple(candidates), samples=samples,
                                            heldout=heldout, seed=cfg.layer_seed, device=cfg.device,
                                            progress=cfg.progress))
    proxies = {layer: _proxy(cfg, folder, layer, man["tokens"] - heldout, heldout, man["sequences"])
               for layer in candidates}
    chosen, tied = pick_layer({layer: p["ratio"] for layer, p in proxies.items()}, cfg.layer_tie)
    choice = {
        "chosen": chosen, "tied": tied, "rule": RULE, "params": params,
        "proxy": {str(k): v for k, v in proxies.items()},
        "heldout_objective": {str(r["layer"]): r["heldout_objective"] for r in report["layers"]},
        "report": str(folder / "layer_report.json"), "sample_tokens": man["tokens"],
        "sample_wall_s": man.get("wall_s"),
        "wall_s": round(time.time() - t0, 2),  # what the choice cost: trainer/cost.py charges it to the chosen layer
    }
    write_json_atomic(path, choice)
    log.info("layer choice: layer %d (proxy loss / baseline %s; tied: %s) -> %s", chosen,
             ", ".join(f"L{k} {v['ratio']:.3f}" for k, v in proxies.items()), tied, path)
    return choice


def _proxy(cfg: ExtractConfig, folder: Path, layer: int, dict_samples: int, heldout: int, sequences: int) -> dict:
    """Code the sample's layer with a small dictionary and pre-train the tiny student on it briefly."""
    from mlsm.core.config import PretrainConfig, SparseCodeConfig
    from mlsm.pipeline.sparse_code import run_sparse_code
    from mlsm.trainer.train import run_pretrain

    codes, run_dir = folder / f"codes-L{layer}", folder / f"run-L{layer}"
    run_sparse_code(SparseCodeConfig(
        extract_dir=folder / "extract", out=codes, layer=layer, K=cfg.layer_proxy_k, dict_samples=dict_samples,
        heldout=heldout, seed=cfg.layer_seed, device=cfg.device, progress=cfg.progress))
    run_pretrain(PretrainConfig(
        data=codes / "codes.h5", out_dir=run_dir, steps=cfg.layer_proxy_steps, lr=PROXY_LR,
        batch_size=max(1, min(32, sequences)), max_len=cfg.max_len, milestones=False, seed=cfg.layer_seed,
        device=cfg.device, progress=cfg.progress))
    return proxy_ratio(run_dir)


def _check_same_corpus(cfg: ExtractConfig) -> None:
    """With --tokens, --corpus must be the corpus that stream was tokenized from."""
    from mlsm.pipeline import corpus as corpus_mod
    from mlsm.pipeline.token_stream import TokenStream

    stream = TokenStream(cfg.tokens)
    want = stream.manifest["inputs"]["corpus"]
    have = corpus_mod.corpus_fingerprint(corpus_mod.resolve_corpus(cfg.corpus, cfg.text_field), cfg.text_field)
    if have != want:
        raise MLSMError(f"--layers auto measures the layers on the head of the corpus, but --corpus {cfg.corpus} is "
                        f"not the corpus {cfg.tokens} was tokenized from; pass that one as --corpus (and its "
                        f"--text-field).")
    if stream.manifest["params"]["max_len"] != cfg.max_len:
        raise MLSMError(f"{cfg.tokens} packs {stream.manifest['params']['max_len']} tokens per sequence; pass "
                        f"--max-len {stream.manifest['params']['max_len']} so the layer sample is packed the same way.")
