"""Shared by the reliability suites: a tiny random auxiliary model, a small corpus, the CLI as a
subprocess that SIGKILLs itself at a chosen write event, and output comparison.

Kill points are events, not wall-clock delays, so a loaded CI machine hits the same points:
every atomic write ends in os.replace, so "the n-th os.replace" (just before or just after the
rename, or with the temp file half written) walks through every state a real kill can leave.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "the committee met on friday to discuss the budget for the coming year.",
    "farmers in the valley reported a good harvest despite the late rain.",
    "she played the violin at the concert and the audience stood to applaud.",
    "the bridge over the river was closed for repairs after the storm.",
    "scientists measured the temperature of the lake every morning.",
    "he wrote a long letter to his brother who lived in another city.",
]

# Runs a CLI command in a child process; MLSM_KILL="N:when" SIGKILLs it at the N-th os.replace
# (when = before | after | torn: the temp file cut to half its size, then killed before the rename).
# MLSM_COUNT=path writes the number of os.replace calls of a run that finished.
_RUNNER = r"""
import os, signal, sys
kill = os.environ.get("MLSM_KILL")
count_path = os.environ.get("MLSM_COUNT")
real_replace = os.replace
n = 0
def replace(src, dst, *a, **k):
    global n
    n += 1
    if kill:
        at, when = kill.split(":")
        if n == int(at):
            if when == "torn" and os.path.isfile(src):
                os.truncate(src, os.path.getsize(src) // 2)
            if when in ("before", "torn"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
from mlsm.cli import main
try:
    main(sys.argv[1:])
finally:
    if count_path:
        with open(count_path, "w") as f:
            f.write(str(n))
"""


def write_vocab(folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """A WordPiece vocabulary big enough to spell any ASCII text (letters as pieces) plus the test words."""
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,") for s in SENTENCES for w in s.split()})
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + words + list(extra)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder


def make_tiny_aux(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0, extra_words=()) -> Path:
    """A random-init BERT saved with our checkpoint code: extract runs in a fraction of MiniLM's time."""
    import torch

    from mlsm.core.bert import BertConfig, BertEncoder
    from mlsm.core.hf import save_model_dir

    tok_dir = write_vocab(folder.parent / (folder.name + "-vocab"), tuple(extra_words))
    n_vocab = len((tok_dir / "vocab.txt").read_text().splitlines())
    config = BertConfig(vocab_size=n_vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    torch.manual_seed(seed)
    enc = BertEncoder(config)
    save_model_dir(folder, config, enc.state_dict(), tok_dir)
    return folder


def write_corpus(path: Path, docs: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(docs):
        out.append("\n".join(SENTENCES[i] for i in rng.permutation(len(SENTENCES))[:4]))
    path.write_text("\n\n".join(out) + "\n")
    return path


def run_cli(args: list[str], kill: str | None = None, count: Path | None = None, timeout: float = 300):
    """The CLI in a fresh interpreter; returns the CompletedProcess (returncode -9 when killed)."""
    env = dict(os.environ)
    env.pop("MLSM_KILL", None)
    env.pop("MLSM_COUNT", None)
    if kill:
        env["MLSM_KILL"] = kill
    if count:
        env["MLSM_COUNT"] = str(count)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", _RUNNER, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def parquet_tables(folder: Path) -> dict:
    return {p.name: pq.read_table(p) for p in sorted(folder.glob("shard-*.parquet"))}


def assert_parquet_equal(a: Path, b: Path) -> None:
    ta, tb = parquet_tables(a), parquet_tables(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].equals(tb[name]), name


def h5_contents(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        f.visititems(visit)
        out["@attrs"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    return out


def assert_h5_equal(a: Path, b: Path, skip_attrs: tuple[str, ...] = ()) -> None:
    ca, cb = h5_contents(a), h5_contents(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        if k == "@attrs":
            strip = lambda d: {x: y for x, y in d.items() if x not in skip_attrs}  # noqa: E731
            assert strip(ca[k]) == strip(cb[k])
        else:
            np.testing.assert_array_equal(ca[k], cb[k], err_msg=f"{a}:{k}")


def leftovers(folder: Path) -> list[str]:
    """Temp files and progress files: what a finished stage must not leave behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == "progress.json")


def cli(args: list[str]) -> int:
    """The CLI in this interpreter; its exit code (0 when it returns normally)."""
    from mlsm.cli import main

    try:
        main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return e.code or 0


def small_pipeline(root: Path, layers: str = "1,2", layer: int = 2, K: int = 16) -> dict:
    """corpus -> tiny aux -> extract -> sparse-code in `root`, in-process, a few seconds."""
    aux = make_tiny_aux(root / "aux")
    corpus = write_corpus(root / "corpus.txt", docs=20)
    extract = ["extract", "--corpus", corpus, "--aux", aux, "--layers", layers, "--max-tokens", "800",
               "--shard-tokens", "300", "--batch-tokens", "128", "--no-progress"]
    assert cli(extract + ["--out", root / "extract"]) == 0
    code = ["sparse-code", "--extract-dir", root / "extract", "-k", K, "--dict-samples", "400", "--heldout", "40",
            "--no-progress"]
    assert cli(code + ["--out", root / "codes", "--layer", layer]) == 0
    return dict(root=root, aux=aux, corpus=corpus, extract_cmd=extract, code_cmd=code,
                extract=root / "extract", codes=root / "codes")
