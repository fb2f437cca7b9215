"""The scaled path against the staged one at N and 10N tokens (`make bench-scale`, docs/scaling.md).

For each size, from one `mlsm tokenize` of the corpus:
- staged: `mlsm extract --tokens` then `mlsm sparse-code` (hidden states written to Parquet, read back);
- scaled: `mlsm sparse-code --from-tokens` (the forward runs in the coding process; no states on disk).
Each is a child process: its peak RSS comes from os.wait4, and a thread samples the bytes of
hidden-state files (Parquet shards and their temp files) under the run's folders every 0.2 s.
Then: `mlsm finalize --merge` on a copy of the scaled folder (today's self-contained file), the
training loader over both codes.h5 files (same batches, alternated, best of rounds), and a short
`mlsm pretrain` for the trainer's peak RSS.

The trainer's memory is bounded by its shuffle window (default 4,096 sequences, about 0.5M tokens),
which is larger than the whole of N (about 2,300 sequences at N=250k): from N to 10N the window
fills. To show where it stops, the same pretrain also runs on 10x and 100x the 10N codes: codes.h5
files of virtual datasets that repeat the 10N parts (no copy), 25M and 250M tokens.

At 10N the staged extract also feeds bench/dictionary_sample.py: the held-out objective of the
dictionary learnt on both paths' sample (about two tokens per sequence) against a token-level one.

At N only, the tokenization measure of issue 13: the extract workers of `--num-workers 8` run one
after another (each alone on the machine), once reading the token stream (`--tokens`) and once
tokenizing the corpus themselves; their summed packing seconds (`packing_s` in each worker's
record) against one `mlsm tokenize` pass.

Lines before the last: per-step progress and the extra tables as JSON; the last line is the JSON
list with one object per size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(args: list[str], watch: list[Path] = (), env: dict | None = None) -> dict:
    """`mlsm <args>` as a child: wall seconds, peak RSS (MB) and peak hidden-state bytes under `watch`."""
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            total = 0
            for folder in watch:
                for p in Path(folder).rglob("*shard-*.parquet*"):  # shards and their .tmp files
                    try:
                        total += p.stat().st_size
                    except FileNotFoundError:
                        pass
            peak[0] = max(peak[0], total)
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "mlsm.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.time() - t0
    stop.set()
    t.join()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"mlsm {' '.join(args)} failed:\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_hidden_bytes": peak[0]}


def loader_rates(files: dict[str, Path], batches: int, rounds: int, batch_size: int) -> dict[str, dict]:
    """Tokens/s of the training loader (targets included) over each file: the same batches, rounds alternated."""
    from mlsm.core import hf
    from mlsm.pipeline.codes import TokenData
    from mlsm.trainer.data import BatchIterator, Masking

    tok = hf.load_tokenizer(hf.resolve_model_dir(None))
    masking = Masking.of(hf.special_token_ids(tok), tok.get_vocab_size(with_added_tokens=True), 0.15, "mask")
    times: dict[str, list[float]] = {name: [] for name in files}
    tokens = {}
    for _ in range(rounds):
        for name, path in files.items():
            with TokenData(path) as data:
                it = BatchIterator(data, batch_size, seed=0, masking=masking, with_targets=True)
                next(it)  # first window read outside the clock, as in bench-train
                n, t0 = 0, time.perf_counter()
                for _ in range(batches):
                    n += sum(m["n_tokens"] for m in next(it))
                times[name].append(time.perf_counter() - t0)
                tokens[name] = n
    return {name: {"tokens_per_s": round(tokens[name] / min(ts), 1),
                   "spread": round(max(ts) / min(ts) - 1, 3)} for name, ts in times.items()}


def tokenization_work(a, tokens_dir: Path, out: Path, workers: int = 8) -> dict:
    """Summed packing seconds of `workers` extract workers run one at a time, --tokens vs --corpus."""
    tok_wall = json.loads((tokens_dir / "manifest.json").read_text())["wall_s"]
    result = {"workers": workers, "tokenize_pass_s": tok_wall}
    for mode in ("tokens", "corpus"):
        folder = out / f"extract-x{workers}-{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        src = (["--tokens", str(tokens_dir)] if mode == "tokens"
               else ["--corpus", a.corpus, "--max-tokens", str(a.tokens)])
        for i in range(workers):
            run_child(["extract", *src, "--out", str(folder), "--layers", str(a.layer), "--shard-tokens",
                       str(a.tokens // (2 * workers)), "--device", a.device, "--worker-index", str(i),
                       "--num-workers", str(workers), "--no-progress"])
        recs = [json.loads(p.read_text()) for p in sorted((folder / "workers").glob("worker-*.json"))]
        result[f"packing_s_sum_{mode}"] = round(sum(r["packing_s"] for r in recs), 2)
        result[f"packing_over_one_pass_{mode}"] = round(result[f"packing_s_sum_{mode}"] / tok_wall, 3)
        shutil.rmtree(folder, ignore_errors=True)
    # how the one pass scales with cores: the tokenizer's batch API runs on RAYON_NUM_THREADS threads
    for threads in (1, 2):
        folder = out / f"tokens-{threads}-threads"
        run_child(["tokenize", "--corpus", a.corpus, "--max-tokens", str(a.factor * a.tokens), "--out", str(folder),
                   "--force", "--no-progress"], env={"RAYON_NUM_THREADS": str(threads)})
        man = json.loads((folder / "manifest.json").read_text())
        result[f"tokenize_tokens_per_s_{threads}_threads"] = round(man["tokens"] / man["wall_s"], 1)
        shutil.rmtree(folder)
    return result


def train_plateau(a, scaled: Path, out: Path, repeats=(10, 100)) -> list[dict]:
    """Trainer peak RSS on codes.h5 files that repeat `scaled`'s parts (virtual datasets: no copy)."""
    import h5py

    from mlsm.pipeline.codes import merge_parts

    parts = sorted((scaled / "parts").glob("part-*.h5"))
    with h5py.File(scaled / "codes.h5") as f:
        attrs = {k: f.attrs[k] for k in ("lambda", "K", "layer", "tokenizer_fingerprint", "dictionary_fingerprint")}
    rows = []
    for r in repeats:
        folder = out / f"codes-x{r}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copytree(scaled / "tokenizer", folder / "tokenizer")
        stats = merge_parts(parts * r, folder / "codes.h5", attrs, copy=False)
        train = run_child(["pretrain", "--data", str(folder / "codes.h5"), "--out", str(out / f"run-x{r}"), "--steps",
                           str(a.train_steps), "--batch-size", str(a.batch_size), "--device", a.device,
                           "--no-progress"])
        rows.append({"repeats": r, "tokens": stats["tokens"], "peak_rss_mb_train": train["peak_rss_mb"]})
        print(json.dumps({"train_plateau": rows[-1]}), flush=True)
        shutil.rmtree(folder)
        shutil.rmtree(out / f"run-x{r}")
    return rows


def dictionary_sample_check(a, extract: Path) -> dict:
    """bench/dictionary_sample.py on this extract: its last line."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "dictionary_sample.py"), "--extract-dir", str(extract),
                        "--layer", str(a.layer), "-k", str(a.K), "--dict-samples", str(a.dict_samples),
                        "--heldout", str(a.dict_samples), "--seeds", str(a.dict_seeds)],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"bench/dictionary_sample.py failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def loader_check(a, scaled: Path) -> tuple[Path, float, dict]:
    """A merged copy of `scaled` (`finalize --merge`: seconds), and the loader's rates through both files."""
    merged = scaled.parent / "codes-merged"
    shutil.rmtree(merged, ignore_errors=True)
    shutil.copytree(scaled, merged)
    t0 = time.time()
    run_child(["finalize", str(merged), "--merge"])
    merge_s = time.time() - t0
    rates = loader_rates({"finalized": scaled / "codes.h5", "merged": merged / "codes.h5"}, a.loader_batches,
                         a.loader_rounds, a.batch_size)
    return merged, merge_s, rates


def loader_only(a) -> list[dict]:
    """--loader-only: the loader measure again on a previous run's codes (`--out` of a run with --keep or not)."""
    rows = []
    for tokens in (a.tokens, a.factor * a.tokens):
        scaled = a.out / f"n{tokens}" / "codes-scaled"
        if not (scaled / "codes.h5").exists():
            sys.exit(f"{scaled / 'codes.h5'} is missing: run bench/scale.py with the same --out first.")
        merged, _, rates = loader_check(a, scaled)
        shutil.rmtree(merged)
        rows.append({"tokens": tokens, "loader_tokens_per_s": rates["finalized"]["tokens_per_s"],
                     "loader_merged_tokens_per_s": rates["merged"]["tokens_per_s"],
                     "loader_spread": {k: v["spread"] for k, v in rates.items()},
                     "loader_finalized_over_merged": round(rates["finalized"]["tokens_per_s"]
                                                           / rates["merged"]["tokens_per_s"], 3)})
    print(json.dumps(rows))
    return rows


def one_size(a, tokens: int, large: bool = False) -> dict:
    out = a.out / f"n{tokens}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokens_dir, extract, staged, scaled = out / "tokens", out / "extract", out / "codes-staged", out / "codes-scaled"
    tok = run_child(["tokenize", "--corpus", a.corpus, "--max-tokens", str(tokens), "--out", str(tokens_dir),
                     "--no-progress"])
    code = ["--layer", str(a.layer), "-k", str(a.K), "--dict-samples", str(a.dict_samples),
            "--heldout", str(a.dict_samples // 10), "--device", a.device, "--no-progress"]
    ext = run_child(["extract", "--tokens", str(tokens_dir), "--out", str(extract), "--layers", str(a.layer),
                     "--device", a.device, "--no-progress"], watch=[extract])
    stg = run_child(["sparse-code", "--extract-dir", str(extract), "--out", str(staged), *code],
                    watch=[extract, staged])
    fus = run_child(["sparse-code", "--from-tokens", str(tokens_dir), "--out", str(scaled), *code],
                    watch=[scaled])
    print(json.dumps({"tokens": tokens, "tokenize": tok, "extract": ext, "staged_code": stg, "fused": fus}), flush=True)
    report = json.loads((scaled / "manifest.json").read_text())["report"]
    merged, merge_s, rates = loader_check(a, scaled)
    train = run_child(["pretrain", "--data", str(scaled / "codes.h5"), "--out", str(out / "run"), "--steps",
                       str(a.train_steps), "--batch-size", str(a.batch_size), "--device", a.device, "--no-progress"])
    n = json.loads((tokens_dir / "manifest.json").read_text())["tokens"]
    row = {
        "tokens": n,
        "peak_hidden_bytes": fus["peak_hidden_bytes"],
        "staged_peak_hidden_bytes": max(ext["peak_hidden_bytes"], stg["peak_hidden_bytes"]),
        "peak_rss_mb_extract": ext["peak_rss_mb"],
        "peak_rss_mb_code": stg["peak_rss_mb"],
        "peak_rss_mb_fused": fus["peak_rss_mb"],
        "peak_rss_mb_train": train["peak_rss_mb"],
        "coding_s": report["coding_s"],
        "finalize_s": report["finalize_s"],
        "merge_s": round(merge_s, 1),
        "loader_tokens_per_s": rates["finalized"]["tokens_per_s"],
        "loader_merged_tokens_per_s": rates["merged"]["tokens_per_s"],
        "loader_spread": {k: v["spread"] for k, v in rates.items()},
        "staged_s": round(ext["wall_s"] + stg["wall_s"], 1),
        "scaled_s": fus["wall_s"],
        "tokenize_s": tok["wall_s"],
        "bytes_per_token": {"tokens_h5": round((tokens_dir / "tokens.h5").stat().st_size / n, 2),
                            "codes_h5_finalized": round((scaled / "codes.h5").stat().st_size / n, 2),
                            "parts": round(sum(p.stat().st_size for p in (scaled / "parts").glob("*.h5")) / n, 2),
                            "codes_h5_merged": round((merged / "codes.h5").stat().st_size / n, 2)},
        "device": report["device"],
    }
    shutil.rmtree(merged)
    if large and a.dict_seeds:
        row["dictionary_sample"] = dictionary_sample_check(a, extract)
        print(json.dumps({"dictionary_sample": row["dictionary_sample"]}), flush=True)
    if large and a.plateau:
        row["train_plateau"] = train_plateau(a, scaled, out)
    if not a.keep:
        shutil.rmtree(extract, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--tokens", type=int, default=250_000, help="N: the small size (the large one: 10N).")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("-k", "--K", type=int, default=3000)
    ap.add_argument("--dict-samples", type=int, default=20_000, help="Same at both sizes (memory scales with it).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    # One window (4,096 sequences) is read per 128 batches: 1000 batches read 8 of them per round,
    # and the best of 5 rounds (200 x 3 gave 0.70-0.96 for the same two files).
    ap.add_argument("--loader-batches", type=int, default=1000)
    ap.add_argument("--loader-rounds", type=int, default=5)
    ap.add_argument("--loader-only", action="store_true",
                    help="Only the loader measure, on the codes a previous run left in --out.")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8, help="Extract workers of the tokenization measure (0: skip).")
    ap.add_argument("--dict-seeds", type=int, default=3, help="Seeds of the dictionary-sample check at 10N (0: skip).")
    ap.add_argument("--no-plateau", dest="plateau", action="store_false",
                    help="Skip the trainer RSS at 10x and 100x the 10N codes.")
    ap.add_argument("--keep", action="store_true", help="Keep the staged extract folders.")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    a = ap.parse_args(argv)
    a.out = a.out.resolve()
    if a.loader_only:
        return loader_only(a)
    rows = [one_size(a, a.tokens), one_size(a, a.factor * a.tokens, large=True)]
    if a.workers:
        print(json.dumps({"tokenization": tokenization_work(a, a.out / f"n{a.tokens}" / "tokens", a.out, a.workers)}),
              flush=True)
    small, big = rows
    ratios = {
        "peak_hidden_10x_over_1x": (big["peak_hidden_bytes"] / small["peak_hidden_bytes"]
                                    if small["peak_hidden_bytes"] else None),
        "scaled_over_staged_s": [round(r["scaled_s"] / r["staged_s"], 3) for r in rows],
        "finalize_over_coding": [round(r["finalize_s"] / r["coding_s"], 4) for r in rows],
        "loader_finalized_over_merged": [round(r["loader_tokens_per_s"] / r["loader_merged_tokens_per_s"], 3)
                                         for r in rows],
        "train_rss_10x_over_1x": round(big["peak_rss_mb_train"] / small["peak_rss_mb_train"], 3),
        "train_rss_repeats_over_10n": ([round(p["peak_rss_mb_train"] / big["peak_rss_mb_train"], 3)
                                     for p in big["train_plateau"]] if "train_plateau" in big else None),
        "dict_sample_rel_diff": ({k: big["dictionary_sample"][k] for k in ("rel_diff_mean", "rel_diff_min",
                                                                           "rel_diff_max")}
                                 if "dictionary_sample" in big else None),
        "load": os.getloadavg(),
    }
    print(json.dumps({"ratios": ratios}), flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
