"""--report-to: TensorBoard and W&B mirror metrics.jsonl, the run's record, for pretrain and finetune.

Every figure compared here is read back from what the sinks wrote (event files, the offline W&B
run folder) against metrics.jsonl; a test skips, saying why, only when the sink's package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest

from mlsm.cli import main
from mlsm.core.config import FinetuneConfig
from mlsm.core.errors import MLSMError
from mlsm.trainer import report_to
from mlsm.trainer.finetune import run_finetune
from mlsm.trainer.metrics_log import MetricsLog
from mlsm.trainer.report_to import TENSORBOARD_DIR, WANDB_ID_FILE, Report
from mlsm.trainer.train import run_pretrain
from tests.test_finetune import _write_topic_task, model_dir  # noqa: F401  (fixture)
from tests.test_train import _cfg, _metrics, codes_h5, one_thread, run_until_killed  # noqa: F401  (fixtures)


def _needs(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed (pip install mlsm[{pkg}]); its sink cannot be tested")


def _events(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar, as TensorBoard itself reads the folder (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _as_logged(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """metrics.jsonl's values as TensorBoard stores them (float32)."""
    return [(r["step"], float(np.float32(r[key]))) for r in rows if r.get(key) is not None]


def test_tensorboard_mirrors_metrics_and_a_resume_replays_no_step_twice(codes_h5, tmp_path, monkeypatch):
    _needs("tensorboard")
    kw = dict(save_every=5, report_to="tensorboard")
    run = tmp_path / "run"
    run_until_killed(_cfg(codes_h5, run, **kw), monkeypatch)
    assert [s for s, _ in _events(run / TENSORBOARD_DIR, "loss")] == list(range(1, 7))
    run_pretrain(_cfg(codes_h5, run, **kw))  # resumes from step 5: steps 6.. are replayed
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("loss", "mlsm_loss", "lr", "grad_norm", "targets"):
        assert _events(run / TENSORBOARD_DIR, key) == _as_logged(rows, key), key
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2  # one file per invocation


def test_another_sink_on_resume_is_recorded_not_refused(codes_h5, tmp_path):
    _needs("tensorboard")
    run = tmp_path / "run"
    run_pretrain(_cfg(codes_h5, run, steps=5))
    assert not (run / TENSORBOARD_DIR).exists()
    summary = run_pretrain(_cfg(codes_h5, run, steps=8, report_to="tensorboard"))
    assert summary["start_step"] == 5
    assert json.loads((run / "run.json").read_text())["config"]["report_to"] == "tensorboard"
    assert _events(run / TENSORBOARD_DIR, "loss") == _as_logged(_metrics(run)[5:], "loss")


def test_a_missing_sink_package_is_an_error_before_training(codes_h5, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(report_to.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    with pytest.raises(MLSMError, match=r"--report-to tensorboard needs the tensorboard package: "
                                        r"pip install mlsm\[tensorboard\]"):
        run_pretrain(_cfg(codes_h5, tmp_path / "run", report_to="tensorboard"))
    with pytest.raises(SystemExit):
        main(["pretrain", "--data", str(codes_h5), "--out", str(tmp_path / "cli"), "--report-to", "tensorboard"])
    assert capsys.readouterr().err.startswith("error: --report-to tensorboard needs the tensorboard package")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()  # nothing written


def test_only_the_writing_rank_reports(tmp_path):
    _needs("tensorboard")
    with MetricsLog(tmp_path, 0, enabled=False, report=Report("tensorboard")) as log:  # rank > 0
        log.write({"step": 1, "loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_finetune_mirrors_each_seed_and_its_scores(tmp_path, model_dir):
    _needs("tensorboard")
    task = _write_topic_task(tmp_path / "topics", n_train=48, n_eval=16)
    out = tmp_path / "ft" / "topics"
    res = run_finetune(FinetuneConfig(model=str(model_dir), task=task, out_dir=out, seeds=2, epochs=1, lr=1e-3,
                                      batch=8, log_every=2, device="cpu", progress=False, report_to="tensorboard"))
    for seed in (0, 1):
        rows = _metrics(out / f"seed-{seed}")
        train_rows = [r for r in rows if "loss" in r]
        assert [r["step"] for r in train_rows] == [1, 2, 4, 6]  # every 2nd step, the first and the last (6)
        assert _events(out / f"seed-{seed}" / TENSORBOARD_DIR, "loss") == _as_logged(train_rows, "loss")
        acc = _events(out / f"seed-{seed}" / TENSORBOARD_DIR, "test_accuracy")
        assert acc == [(6, pytest.approx(res["seeds"][seed]["test"]["accuracy"], rel=1e-6))]
    with pytest.raises(MLSMError, match="needs --out|written only with --out"):
        run_finetune(FinetuneConfig(model=str(model_dir), task=task, report_to="tensorboard"))


def _wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file: a 7-byte header, then a LevelDB-style log (32 KiB
    blocks of records: crc32, length, kind 1 full / 2 first / 3 middle / 4 last) of wandb Record protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (2, 3):
            parts = (b"" if kind == 2 else parts) + chunk
            continue
        if kind not in (1, 4):
            break
        record = pb.Record()
        record.ParseFromString(parts + chunk if kind == 4 else chunk)
        if record.WhichOneof("record_type") == "history":
            rows.append({"_step": record.history.step.num,
                         **{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item}})
    return rows


def test_wandb_offline_run_holds_the_logged_rows_and_a_resume_reuses_it(codes_h5, tmp_path, monkeypatch):
    _needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    run = tmp_path / "run"
    run_pretrain(_cfg(codes_h5, run, steps=4, report_to="wandb"))
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    offline = sorted((tmp_path / "wandb-dir" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    rows = _metrics(run)
    for _ in range(100):  # wandb-core may still be writing the file when finish() returns: wait, bounded
        history = _wandb_history(offline[0] / f"run-{run_id}.wandb")
        if len(history) >= len(rows):
            break
        time.sleep(0.1)
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == [1, 2, 3, 4]
    for h, r in zip(history, rows, strict=True):
        assert {k: h[k] for k in report_to.scalars(r)} == report_to.scalars(r)
    run_pretrain(_cfg(codes_h5, run, steps=6, report_to="wandb"))  # resumes from step 4, same W&B run
    assert (run / WANDB_ID_FILE).read_text().strip() == run_id
