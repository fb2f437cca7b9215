"""Mirrors of metrics.jsonl in the dashboards people already watch (`--report-to`, the HF Trainer's convention).

metrics.jsonl stays the record (trainer/metrics_log.py); a sink receives each row it writes, as
scalars at the row's step, so the two can never disagree. TensorBoard and W&B are optional extras,
imported only when asked for; `require_sink` refuses a missing one before any training starts.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlsm.core.config import REPORT_TO
from mlsm.core.errors import MLSMError

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"  # the W&B run a resumed run appends to
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass(frozen=True)
class Report:
    """Where a run's rows go besides metrics.jsonl, and how the dashboard names the run."""

    to: str = "none"
    name: str | None = None
    group: str | None = None
    config: dict = field(default_factory=dict)


def require_sink(report_to: str) -> None:
    """An `error:` now, not after the first logged step, when the sink's package is not installed."""
    if report_to not in REPORT_TO:
        raise MLSMError(f"--report-to {report_to!r} is not one of {', '.join(REPORT_TO)}.")
    pkg = _PACKAGE.get(report_to)
    if pkg is not None and importlib.util.find_spec(pkg) is None:
        raise MLSMError(f"--report-to {report_to} needs the {pkg} package: pip install mlsm[{report_to}]")


def scalars(row: dict) -> dict[str, float]:
    """The row's numbers but its step (None, strings and flags are not scalars a dashboard plots)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """<run>/tensorboard/ event files; a resumed run purges the steps it replays, so none shows twice."""

    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()  # as metrics.jsonl is flushed: a killed run loses no logged row

    def close(self) -> None:
        self.writer.close()


def wandb_configured() -> bool:
    """Whether the user chose a W&B mode or logged in: then their setting holds, else the run stays offline."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:  # where `wandb login` stores the key
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """One W&B run per run folder; a resumed run appends to it (its id is kept in the folder)."""

    def __init__(self, run_dir: Path, resume_step: int, report: Report):
        import wandb

        run_dir = Path(run_dir)
        id_path = run_dir / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if resume_step > 0 and id_path.is_file() else None
        kw = dict(project=os.environ.get("WANDB_PROJECT") or "mlsm", name=report.name, group=report.group,
                  config=report.config)
        if run_id is not None:
            kw.update(id=run_id, resume="allow")
        if not os.environ.get("WANDB_DIR"):
            kw["dir"] = str(run_dir)
        if not wandb_configured():
            kw["mode"] = "offline"
        self.run = wandb.init(**kw)
        id_path.write_text(self.run.id + "\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sink(run_dir: Path, resume_step: int, report: Report) -> TensorBoardSink | WandbSink | None:
    require_sink(report.to)
    if report.to == "tensorboard":
        return TensorBoardSink(run_dir, resume_step)
    if report.to == "wandb":
        return WandbSink(run_dir, resume_step, report)
    return None
