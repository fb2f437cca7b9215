"""Peak RSS of extract and sparse-code at a token budget of N tokens and of 10N tokens.

Bounded memory means the two peaks are about equal: every stage streams its input shard by shard,
so its peak depends on --shard-tokens, --dict-samples and K, not on the number of tokens.

What it measures: both runs stop at their budget (--max-tokens), so the large run reads the first
10N tokens of its corpus, not a whole 10x corpus (at the default N that would be hours of CPU
forward). Its corpus is the input listed 10 times (a folder of links), so that 10N tokens exist
even when the input is small; `tokens` in each row is what the stage actually processed.

    python bench/stage_memory.py --tokens 25000 --out runs/bench-memory    (make bench-memory)

Each stage runs as a child process; its peak RSS comes from os.wait4. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlsm.pipeline.corpus import resolve_corpus


def run_child(args: list[str]) -> dict:
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "mlsm.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"mlsm {' '.join(args)} failed:\n{err[-3000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "wall_s": round(time.time() - t0, 1)}


def repeated_corpus(corpus: str, folder: Path, times: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(times):
        for p in resolve_corpus(corpus):
            link = folder / f"r{r:02d}-{p.name}"
            if not link.exists():
                link.symlink_to(p.resolve())
    return folder


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--tokens", type=int, default=25_000, help="N: the small run's token budget (the large one: 10N).")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--shard-tokens", type=int, default=10_000, help="Same in both runs: memory scales with it.")
    ap.add_argument("-k", "--K", type=int, default=3000)
    ap.add_argument("--dict-samples", type=int, default=20_000, help="Same in both runs: memory scales with it.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-memory"))
    a = ap.parse_args(argv)
    small_corpus = sum(p.stat().st_size for p in resolve_corpus(a.corpus))
    big = repeated_corpus(a.corpus, a.out / "corpus-x10", 10)
    rows = []
    for corpus, tokens in ((a.corpus, a.tokens), (str(big), 10 * a.tokens)):
        ext, codes = a.out / f"extract-{tokens}", a.out / f"codes-{tokens}"
        e = run_child(["extract", "--corpus", corpus, "--out", str(ext), "--layers", str(a.layer), "--max-tokens",
                       str(tokens), "--shard-tokens", str(a.shard_tokens), "--device", a.device, "--force",
                       "--no-progress"])
        c = run_child(["sparse-code", "--extract-dir", str(ext), "--out", str(codes), "--layer", str(a.layer),
                       "-k", str(a.K), "--dict-samples", str(a.dict_samples), "--heldout", str(a.dict_samples // 10),
                       "--device", a.device, "--force", "--no-progress"])
        man = json.loads((ext / "manifest.json").read_text())
        rows.append({"corpus_bytes_available": small_corpus * (1 if corpus == a.corpus else 10), "tokens": man["tokens"],
                     "shards": len(man["shards"]), "extract": e, "sparse_code": c})
        print(json.dumps(rows[-1]), flush=True)
    result = {"shard_tokens": a.shard_tokens, "K": a.K, "dict_samples": a.dict_samples, "runs": rows,
              "extract_rss_ratio_10x": round(rows[1]["extract"]["peak_rss_mb"] / rows[0]["extract"]["peak_rss_mb"], 3),
              "sparse_code_rss_ratio_10x": round(rows[1]["sparse_code"]["peak_rss_mb"] / rows[0]["sparse_code"]["peak_rss_mb"], 3),
              "load": os.getloadavg()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
