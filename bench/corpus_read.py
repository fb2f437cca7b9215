"""The corpus reader on Parquet against plain text: rate and memory on the same ~1 GB of documents.

It writes one corpus twice, as `.txt` (blank line between documents) and as `.parquet` (one row
per document, --row-group-mb row groups), from --corpus's documents repeated with a varying prefix
on every line (so neither file compresses to a copy of the source), in a temporary folder outside
the repository that is deleted afterwards (--keep keeps it). Then, each in its own child process:
- the reader alone (`iter_documents` over the whole file): MB/s of the text file's size, lines/s,
  documents/s, peak RSS (getrusage of the child) and RSS at 25/50/75/100% of the documents;
- `mlsm tokenize` on the first --tokenize-tokens tokens (tokenizing 1 GB twice takes ~15 min on 2
  cores): packed tokens/s, peak RSS, and RSS sampled at 25/50/75/100% of its wall time.
The target: Parquet within 1.2x of the text rate, its RSS flat over the input.

    python bench/corpus_read.py --mb 1000          (make bench-corpus)

Prints a table, then the figures as one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MARKS = (25, 50, 75, 100)


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident set size now (Linux /proc), in MB; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def write_corpora(source: str, folder: Path, mb: float, row_group_mb: float) -> dict:
    """corpus.txt and corpus.parquet holding the same documents, about `mb` MB of text each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlsm.pipeline.corpus import iter_documents, resolve_corpus

    docs = list(iter_documents(resolve_corpus(source)))
    txt, parquet = folder / "corpus.txt", folder / "corpus.parquet"
    target = int(mb * 2**20)
    written = n_docs = n_lines = 0
    rows: list[str] = []
    rows_bytes = 0
    schema = pa.schema([("text", pa.string())])
    with open(txt, "w", encoding="utf-8") as ft, pq.ParquetWriter(parquet, schema) as fp:
        rep = 0
        while written < target:
            for doc in docs:
                body = "\n".join(f"r{rep}.{i} {line}" for i, line in enumerate(doc))
                ft.write(body + "\n\n")
                written += len(body.encode()) + 2
                rows.append(body)
                rows_bytes += len(body)
                n_docs += 1
                n_lines += len(doc)
                if rows_bytes >= row_group_mb * 2**20:
                    fp.write_table(pa.table({"text": rows}, schema=schema))
                    rows, rows_bytes = [], 0
                if written >= target:
                    break
            rep += 1
        if rows:
            fp.write_table(pa.table({"text": rows}, schema=schema))
    return {"documents": n_docs, "lines": n_lines, "txt": str(txt), "parquet": str(parquet),
            "txt_mb": round(txt.stat().st_size / 2**20, 1), "parquet_mb": round(parquet.stat().st_size / 2**20, 1),
            "row_groups": pq.ParquetFile(parquet).num_row_groups}


def child_read(path: str, expect_docs: int) -> None:
    """The reader alone, in this (child) process: prints its figures as JSON."""
    from mlsm.pipeline.corpus import CorpusStats, iter_documents, resolve_corpus

    stats = CorpusStats()
    marks = [(m, max(1, expect_docs * m // 100)) for m in MARKS]
    rss_at = {}
    t0 = time.perf_counter()
    for _doc in iter_documents(resolve_corpus(path), stats):
        while marks and stats.documents >= marks[0][1]:
            rss_at[str(marks.pop(0)[0])] = rss_mb()
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": round(wall, 2), "documents": stats.documents, "lines": stats.lines,
                      "rss_mb_at_percent_of_input": rss_at}))


def run_child(cmd: list[str], sample_every: float = 0.25) -> tuple[str, dict]:
    """Run `cmd`: its stdout, wall time, peak RSS (wait4's rusage of that child alone) and its RSS
    sampled at 25/50/75/100% of its wall time."""
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)

        def sample():  # never waits for the child: wait4 below reaps it
            while not done.is_set():
                r = rss_mb(p.pid)
                if r:
                    samples.append((time.perf_counter() - t0, r))
                done.wait(sample_every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    at = {}
    for m in MARKS:
        before = [r for t, r in samples if t <= wall * m / 100]
        at[str(m)] = before[-1] if before else None
    return stdout, {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                    "rss_mb_at_percent_of_wall": at}


def tokens_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of the token stream and its sequence offsets: the two formats must pack the same stream."""
    import hashlib

    import h5py

    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for name in ("tokens", "seq_offsets"):
            ds = f[name]
            for i in range(0, len(ds), chunk):
                h.update(ds[i:i + chunk].astype("<i8").tobytes())
    return h.hexdigest()


def measure(fmt: str, path: str, info: dict, tokens: int, work: Path) -> dict:
    read_out, read = run_child([sys.executable, __file__, "--child-read", path, "--expect-docs",
                                str(info["documents"])])
    read.update(json.loads(read_out.strip().splitlines()[-1]))
    read["mb_per_s"] = round(info["txt_mb"] / read["wall_s"], 1)
    read["lines_per_s"] = round(read["lines"] / read["wall_s"])
    read["documents_per_s"] = round(read["documents"] / read["wall_s"])
    tok_dir = work / f"tokens-{fmt}"
    _, tok = run_child([sys.executable, "-m", "mlsm.cli", "tokenize", "--corpus", path, "--out", str(tok_dir),
                        "--max-tokens", str(tokens), "--force", "--no-progress"])
    man = json.loads((tok_dir / "manifest.json").read_text())
    # the stage's own wall time (reading, tokenizing, packing, writing), without interpreter start and imports
    tok.update(tokens=man["tokens"], sequences=man["sequences"], stage_wall_s=man["wall_s"],
               tokens_per_s=round(man["tokens"] / man["wall_s"]), documents=man["corpus_stats"]["documents"],
               tokens_sha256=tokens_digest(tok_dir / "tokens.h5"))
    shutil.rmtree(tok_dir)
    return {"read": read, "tokenize": tok}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus", help="Documents to repeat (any corpus mlsm reads).")
    ap.add_argument("--mb", type=float, default=1000, help="Size of the generated text, MB.")
    ap.add_argument("--row-group-mb", type=float, default=128, help="Text per Parquet row group, MB.")
    ap.add_argument("--tokenize-tokens", type=int, default=25_000_000,
                    help="Tokens `mlsm tokenize` packs from each file (~100 MB of text at the default).")
    ap.add_argument("--workdir", type=Path, default=None, help="Where the temporary folder goes (default: the "
                                                                "system's temporary directory).")
    ap.add_argument("--keep", action="store_true", help="Keep the generated files.")
    ap.add_argument("--child-read", help=argparse.SUPPRESS)
    ap.add_argument("--child-generate", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--expect-docs", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_read:
        child_read(a.child_read, a.expect_docs)
        return {}
    if a.child_generate:
        print(json.dumps(write_corpora(a.corpus, a.child_generate, a.mb, a.row_group_mb)))
        return {}
    work = Path(tempfile.mkdtemp(prefix="mlsm-corpus-read-", dir=a.workdir))
    try:
        # Children only: this process stays small, because Linux counts the parent's RSS at fork time
        # in a child's peak (ru_maxrss); so it imports neither pyarrow nor mlsm and holds no text.
        out, gen = run_child([sys.executable, __file__, "--child-generate", str(work), "--corpus", a.corpus,
                              "--mb", str(a.mb), "--row-group-mb", str(a.row_group_mb)])
        info = json.loads(out.strip().splitlines()[-1])
        info["generate_s"] = gen["wall_s"]
        print(json.dumps(info), flush=True)
        rows = {}
        for fmt in ("txt", "parquet"):
            rows[fmt] = measure(fmt, info[fmt], info, a.tokenize_tokens, work)
            print(fmt, json.dumps(rows[fmt]), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    t, p = rows["txt"], rows["parquet"]
    result = {
        "input": {k: v for k, v in info.items() if k not in ("txt", "parquet")},
        **rows,
        "parquet_over_txt_read_time": round(p["read"]["wall_s"] / t["read"]["wall_s"], 3),
        "parquet_over_txt_tokenize_time": round(p["tokenize"]["stage_wall_s"] / t["tokenize"]["stage_wall_s"], 3),
        "same_documents": p["read"]["documents"] == t["read"]["documents"] == info["documents"],
        "same_tokens": p["tokenize"]["tokens_sha256"] == t["tokenize"]["tokens_sha256"],
        "load": os.getloadavg(),
    }
    print(f"{'':10} {'read MB/s':>10} {'lines/s':>10} {'peak RSS':>9} {'RSS 25/50/75/100% of input':>28} "
          f"{'tokenize tok/s':>15} {'peak RSS':>9}")
    for fmt in ("txt", "parquet"):
        r, k = rows[fmt]["read"], rows[fmt]["tokenize"]
        at = "/".join(f"{r['rss_mb_at_percent_of_input'].get(str(m)) or 0:.0f}" for m in MARKS)
        print(f"{fmt:10} {r['mb_per_s']:>10} {r['lines_per_s']:>10} {r['peak_rss_mb']:>9} {at:>28} "
              f"{k['tokens_per_s']:>15} {k['peak_rss_mb']:>9}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
