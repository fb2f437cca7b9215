"""Loss curves of one or more runs in one PNG, so an MLSM and an MLM run compare at a glance.

Reads only each run's metrics.jsonl. matplotlib is an optional extra (`pip install -e ".[plot]"`,
or `make plot`), imported only here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlsm.core.errors import MLSMError
from mlsm.core.manifest import atomic_path

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
# (key in metrics.jsonl, panel title); a panel is drawn when any run has the key.
PANELS = (("mlsm_loss", "MLSM loss (KL)"), ("mlm_loss", "MLM loss (cross-entropy)"), ("loss", "total loss"))


def read_run(run: Path) -> list[dict]:
    """The run's logged rows; a line cut by a kill ends the readable part."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise MLSMError(f"{run} has no {METRICS}; point `mlsm plot` at run folders written by `mlsm pretrain`.")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if not rows:
        raise MLSMError(f"{path} holds no logged step yet.")
    return rows


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (NaNs of skipped steps are left out)."""
    out, acc = [], []
    for v in values:
        if v == v:  # not NaN
            acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc) if acc else float("nan"))
    return out


def plot_runs(runs: list[Path], out: Path, smooth: int = 1, labels: list[str] | None = None) -> Path:
    """Write a PNG with one panel per loss found in any run, one line per run; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MLSMError(
            "`mlsm plot` needs matplotlib, an optional extra: run `make plot` or `pip install -e \".[plot]\"`."
        ) from e
    if not runs:
        raise MLSMError("give at least one run folder to plot.")
    labels = labels or [Path(r).name or str(r) for r in runs]
    if len(labels) != len(runs):
        raise MLSMError(f"{len(labels)} labels for {len(runs)} runs; give one label per run.")
    data = [read_run(Path(r)) for r in runs]
    panels = [(k, t) for k, t in PANELS if any(row.get(k) is not None for rows in data for row in rows)]
    if len(panels) > 1 and all(
        all(row.get("loss") == row.get(panels[0][0]) for row in rows) for rows in data
    ) and panels[-1][0] == "loss":
        panels = panels[:-1]  # a total equal to the only loss adds nothing
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for rows, label in zip(data, labels, strict=True):
            pts = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
            if pts:
                steps, vals = zip(*pts, strict=True)
                ax.plot(steps, _smooth(list(vals), smooth), label=label, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    if smooth > 1:
        fig.suptitle(f"trailing mean over {smooth} logged steps", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    log.info("wrote %s (%d runs, panels: %s)", out, len(runs), ", ".join(k for k, _ in panels))
    return out
