"""What a run reports as it goes: rank logs, ``metrics.jsonl``, DeepSpeed's monitor, the curves and
the best checkpoint's validation predictions.

``metrics.jsonl`` holds one JSON object per line, ``{"kind": "train"|"val", "step": N,
"epoch": E, ...metrics}``, non-finite values as ``null`` (strict JSON). Rank 0 writes it;
every rank keeps the records in memory for the curves.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed as dist
from .io import atomic_open

log = logging.getLogger("promoter_dist")

Record = dict[str, Any]


def setup_logging(out_dir: Path, rank: int) -> None:
    """Rank 0 logs to the console; every rank logs to <out_dir>/logs/rank<r>.log."""
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    file_handler = logging.FileHandler(out_dir / "logs" / f"rank{rank}.log")
    file_handler.setFormatter(fmt)
    log.addHandler(file_handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        log.addHandler(console)


def _strict(record: Record) -> Record:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class MetricsLog:
    """The run's records: logged on every rank, written by rank 0, sent to DeepSpeed's monitor."""

    def __init__(self, out_dir: Path, is_main: bool, monitor: Any = None):
        self.path = out_dir / "metrics.jsonl"
        self.out_dir = out_dir
        self.is_main = is_main
        self.monitor = monitor
        self.history: list[Record] = []

    def start_fresh(self) -> None:
        """A new run: forget the records of an earlier one in the same folder."""
        if self.is_main:
            self.path.unlink(missing_ok=True)

    def resume_at(self, step: int) -> None:
        """Keep the records up to ``step`` (those written after the resumed checkpoint are dropped)."""
        records = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if record["step"] <= step:
                    records.append(record)
        dist.barrier()  # every rank has read before rank 0 rewrites
        if self.is_main:
            with atomic_open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        self.history = records

    def record(self, record: Record) -> None:
        """Log a record: console/file, metrics.jsonl and DeepSpeed's monitor (TensorBoard, CSV)."""
        self.history.append(record)
        text = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        log.info("%s", text)
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_strict(record)) + "\n")
        if self.monitor is not None and self.monitor.enabled:
            events = [(f"{record['kind']}/{k}", float(v), record["step"]) for k, v in record.items()
                      if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v)]
            self.monitor.write_events(events)

    def last(self, kind: str) -> Record | None:
        """The newest record of ``kind``."""
        return next((r for r in reversed(self.history) if r["kind"] == kind), None)

    def plot(self, title: str) -> None:
        """Loss and metric curves into <out_dir>/curves.png."""
        from .plots import plot_curves

        flat = [{"step": r["step"], **{f"{r['kind']}_{k}": v for k, v in r.items() if k not in ("kind", "step", "epoch")}}
                for r in self.history]
        keys = [k for k in ("train_loss", "val_loss", "val_pearson", "val_spearman", "val_accuracy", "train_lr")
                if any(k in r for r in flat)]
        if keys:
            plot_curves(flat, self.out_dir / "curves.png", keys, title=title)


BEST_PREDICTIONS = "best_val_predictions.npz"
"""The best checkpoint's validation outputs (``pred``, ``y``, ...), in the run folder."""
BEST_PREDICTIONS_PLOT = "val_predicted_vs_measured.png"


def write_best_predictions(out_dir: Path, outputs: dict[str, np.ndarray], step: int, plot: bool) -> None:
    """The best checkpoint's validation predictions as ``best_val_predictions.npz`` and, with ``plot``, their
    predicted-vs-measured figure; nothing for outputs without predictions (masked-LM runs)."""
    if "pred" not in outputs:
        return
    with atomic_open(out_dir / BEST_PREDICTIONS, "wb") as f:
        np.savez(f, **outputs)
    if plot:
        from .plots import plot_predicted_vs_measured

        plot_predicted_vs_measured(outputs["pred"], outputs["y"], out_dir / BEST_PREDICTIONS_PLOT,
                                   title=f"validation, step {step}")
