"""metrics.jsonl: one JSON object per logged step, the record of a run that every other view derives from.

A resumed run first drops the records past the step it resumes from, so the file always reads as
one uninterrupted run. A line cut by a kill ends the readable part. Every row written is also
mirrored to the run's `--report-to` sink (trainer/report_to.py), here, once for every trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlsm.core.manifest import atomic_path
from mlsm.trainer.report_to import Report, open_sink, scalars

METRICS = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is suspect too
    return rows


class MetricsLog:
    """Appends rows to <run>/metrics.jsonl (rank 0 only: other ranks get a log that writes nothing),
    and mirrors each to `report`'s sink, opened at the first row (a run with nothing to do opens none)."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True, report: Report | None = None):
        self.path = Path(run_dir) / METRICS
        self._file = None
        self._resume_step = resume_step
        self._report = report if enabled and report is not None and report.to != "none" else None
        self._sink = None
        if enabled:
            rows = read_metrics(self.path)
            with atomic_path(self.path) as tmp:
                with open(tmp, "w") as f:
                    for r in rows:
                        if r.get("step", 0) <= resume_step:
                            f.write(json.dumps(r) + "\n")
            self._file = open(self.path, "a")

    def write(self, row: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._report is not None:
            if self._sink is None:
                self._sink = open_sink(self.path.parent, self._resume_step, self._report)
            self._sink.log(int(row["step"]), scalars(row))

    def rows(self) -> list[dict]:
        return read_metrics(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
