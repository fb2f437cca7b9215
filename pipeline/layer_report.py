"""Per-layer measures that may predict a good target layer, computed cheaply on a sample.

For each extracted layer, on the same sampled tokens: learn a small dictionary, code held-out
tokens, and report
- the held-out sparse-coding objective (and the share of it the code removes: 1 - obj/0.5, since
  x has unit norm and a = 0 costs 0.5);
- nnz per token;
- atom-usage entropy over the held-out codes (bits, and divided by log2 K);
- how lexical the atoms are: the share of used atoms that fire for few token types, and the share
  of which one token type makes up at least half of the activations;
- the auxiliary FLOPs per token to reach the layer (forward only, at the extract's sequence length).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from mlsm import __version__
from mlsm.core.config import LayerReportConfig
from mlsm.core.device import pick_device
from mlsm.core.errors import MLSMError
from mlsm.core.manifest import read_manifest, write_json_atomic
from mlsm.pipeline.dictionary import DictOptions, learn_dictionary
from mlsm.pipeline.solvers import nn_lasso
from mlsm.pipeline.sparse_code import l2_normalize_states, read_sample, sample_rows

log = logging.getLogger(__name__)


def aux_flops_per_token(config: dict, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token through blocks 1..layer (2 per multiply-add; embeddings ~0).

    Per block: Q, K, V and output projections 4*H^2, feed-forward 2*H*I, attention scores and
    the weighted sum 2*T*H multiply-adds.
    """
    H, I = config["hidden_size"], config["intermediate_size"]
    per_block = 2 * (4 * H * H + 2 * H * I + 2 * seq_len * H)
    return float(layer * per_block)


def atom_type_profile(pair_atoms: np.ndarray, pair_counts: np.ndarray, K: int):
    """Per atom, from its (atom, token type) pairs and their counts: activations, token types, and
    the count of its most frequent type. `mlsm atoms` feeds it the whole code stream's pairs."""
    pair_atoms = np.asarray(pair_atoms, dtype=np.int64)
    pair_counts = np.asarray(pair_counts, dtype=np.int64)
    uses = np.bincount(pair_atoms, weights=pair_counts, minlength=K).astype(np.int64)
    types = np.bincount(pair_atoms, minlength=K).astype(np.int64)
    top_type = np.zeros(K, dtype=np.int64)
    np.maximum.at(top_type, pair_atoms, pair_counts)
    return uses, types, top_type


def lexical_atoms(uses: np.ndarray, top_type: np.ndarray) -> np.ndarray:
    """Used atoms of which one token type makes up at least half of the activations."""
    return (uses > 0) & (top_type >= 0.5 * uses)


def few_type_atoms(uses: np.ndarray, types: np.ndarray, few: int) -> np.ndarray:
    """Used atoms that fire for at most `few` token types."""
    return (uses > 0) & (types <= few)


def summarize_atoms(uses: np.ndarray, types: np.ndarray, top_type: np.ndarray, few: int) -> dict:
    """Usage entropy, and how lexical the atoms are: share spanning <= `few` types, share dominated by one."""
    K = len(uses)
    used = uses > 0
    n_used = int(used.sum())
    p = uses[used] / uses.sum() if n_used else np.zeros(0)
    entropy = float(-(p * np.log2(p)).sum()) if n_used else 0.0
    return {
        "atoms_used": n_used,
        "atoms_dead_share": 1.0 - n_used / K,
        "usage_entropy_bits": entropy,
        "usage_entropy_norm": entropy / math.log2(K),
        "few_type_atom_share": float(few_type_atoms(uses, types, few).sum() / n_used) if n_used else float("nan"),
        # one token type makes up >= half of the atom's activations
        "lexical_atom_share": float(lexical_atoms(uses, top_type).sum() / n_used) if n_used else float("nan"),
        # the lower median, as torch.median gives it (the measure's first implementation)
        "types_per_used_atom_median": float(np.sort(types[used])[(n_used - 1) // 2]) if n_used else float("nan"),
    }


def atom_stats(codes: torch.Tensor, token_ids: np.ndarray, few: int) -> dict:
    """`summarize_atoms` of dense codes (n, K) of tokens `token_ids`."""
    K = codes.shape[1]
    tok = torch.as_tensor(token_ids.astype(np.int64))
    rows, atoms = (codes > 0).nonzero(as_tuple=True)
    if len(rows):
        pairs, counts = torch.unique(torch.stack([atoms, tok[rows]]), dim=1, return_counts=True)
        pair_atoms, pair_counts = pairs[0].numpy(), counts.numpy()
    else:
        pair_atoms, pair_counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    return summarize_atoms(*atom_type_profile(pair_atoms, pair_counts, K), few)


def layer_report(cfg: LayerReportConfig) -> dict:
    extract_dir, out_dir, layers, K, lam = Path(cfg.extract_dir), cfg.out, list(cfg.layers), cfg.K, cfg.lam
    samples, heldout, few, seed, progress = cfg.samples, cfg.heldout, cfg.few, cfg.seed, cfg.progress
    device = str(pick_device(cfg.device))
    man = read_manifest(extract_dir, stage="extract", fix="run `mlsm extract --layers 2,4,6` first")
    have = list(man["params"]["layers"])
    layers = have if not layers else layers
    missing = sorted(set(layers) - set(have))
    if missing:
        raise MLSMError(f"{extract_dir} has layers {have}, not {missing}; re-extract with `mlsm extract --layers "
                        f"{','.join(map(str, sorted(set(have) | set(layers))))}`.")
    shards = man["shards"]
    rows = sample_rows(shards, samples + heldout, np.random.default_rng(seed))  # the same rows for every layer
    if len(rows) < samples + heldout:
        log.warning("only %d tokens extracted; using them all (%d for held-out)", len(rows), min(heldout, len(rows) // 5))
        heldout = min(heldout, len(rows) // 5)
    perm = np.random.default_rng(seed + 1).permutation(len(rows))
    train_idx, held_idx = perm[heldout:], perm[:heldout]
    token_ids = read_sample(extract_dir, shards, rows, None)
    aux_cfg = man.get("aux_config") or {}
    seq_len = int(man["params"].get("max_len", 128))
    last = aux_cfg.get("num_hidden_layers", max(layers))
    full_flops = aux_flops_per_token(aux_cfg, last, seq_len) if aux_cfg else float("nan")

    per_layer = []
    for layer in layers:
        X = l2_normalize_states(read_sample(extract_dir, shards, rows, layer), device)
        Xtr, Xho = X[torch.as_tensor(train_idx)], X[torch.as_tensor(held_idx)]
        res = learn_dictionary(Xtr, K=K, lam=lam, options=DictOptions(seed=seed, init_samples=min(len(Xtr), 50_000)),
                               device=device, progress=progress)
        codes = nn_lasso(Xho, res.D.to(Xho.device), lam, tol=1e-3)
        obj = float(codes.primal.double().mean())
        nnz = (codes.codes > 0).sum(1).double()
        flops = aux_flops_per_token(aux_cfg, layer, seq_len) if aux_cfg else float("nan")
        row = {
            "layer": layer,
            "heldout_objective": obj,
            "objective_removed_share": 1.0 - obj / 0.5,
            "nnz_mean": float(nnz.mean()),
            "empty_code_share": float((nnz == 0).double().mean()),
            **atom_stats(codes.codes.cpu(), token_ids[held_idx], few),
            "aux_gflops_per_token": flops / 1e9,
            "aux_cost_vs_last_layer": flops / full_flops if full_flops else float("nan"),
            "dictionary_s": res.stats.get("wall_s"),
        }
        log.info("layer %d: %s", layer, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        per_layer.append(row)
    report = {
        "extract_dir": str(extract_dir), "aux": man.get("aux"), "layers": per_layer,
        # the states' precision is the extract's: this command runs no forward pass of its own
        "aux_precision": man["params"].get("precision", "not recorded"),
        "params": {"K": K, "lambda": lam, "samples": len(train_idx), "heldout": len(held_idx), "few": few,
                   "seed": seed, "seq_len": seq_len},
        "mlsm_version": __version__,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json_atomic(out_dir / "layer_report.json", report)
        (out_dir / "layer_report.md").write_text(markdown(report), encoding="utf-8")
    return report


def markdown(report: dict) -> str:
    p = report["params"]
    lines = [
        f"Layer report for `{report['extract_dir']}` (aux {report['aux']}, states in {report['aux_precision']}): "
        f"K={p['K']}, lambda={p['lambda']}, "
        f"{p['samples']} training / {p['heldout']} held-out tokens, seed {p['seed']}.",
        "",
        "| layer | held-out objective | removed | nnz/token | empty codes | atoms used | usage entropy (norm.) "
        f"| atoms with <= {p['few']} types | atoms with one dominant type | aux GFLOPs/token | cost vs last |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["layers"]:
        lines.append(
            f"| {r['layer']} | {r['heldout_objective']:.4f} | {100 * r['objective_removed_share']:.1f}% | "
            f"{r['nnz_mean']:.1f} | {100 * r['empty_code_share']:.1f}% | {r['atoms_used']} | "
            f"{r['usage_entropy_bits']:.2f} ({r['usage_entropy_norm']:.3f}) | {100 * r['few_type_atom_share']:.1f}% | "
            f"{100 * r['lexical_atom_share']:.1f}% | "
            f"{r['aux_gflops_per_token']:.4f} | {r['aux_cost_vs_last_layer']:.2f} |"
        )
    return "\n".join(lines) + "\n"

