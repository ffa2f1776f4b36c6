"""Figures: predicted vs measured, per-subset score panels, training curves.

Matplotlib is imported inside each function and drawn through its Agg canvas on a
``Figure`` object (no pyplot, no global backend switch), so importing this module costs
nothing, it works on headless nodes, and it never disturbs a caller's own backend.
Each PNG is written to a temporary file and renamed over the target
(:func:`promoter_dist.io.atomic_open`), so a reader never sees half a figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .errors import UserError
from .io import atomic_open
from .metrics import pearson, spearman

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .scoring import ScoreReport

__all__ = ["plot_predicted_vs_measured", "plot_subsets", "plot_curves"]

HEXBIN_ABOVE = 5000
"""Above this many points a hexbin density replaces the scatter (millions of dots hide each other)."""


def _new_figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: "Figure", path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as handle:
            figure.savefig(handle, format="png")
    except OSError as exc:  # a folder in the way, no permission, disk full: the user's to fix
        raise UserError(f"{path}: cannot write the figure ({exc.strerror or exc})") from None
    return path


def _finite_pairs(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(true, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise UserError(f"predicted and measured differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)  # a plot can skip what a metric must not
    return x[keep], y[keep]


def _draw_pairs(axes: "Axes", pred: np.ndarray, true: np.ndarray, label: str, difference: bool = False) -> None:
    """Measured on x, predicted on y, with r, rho and n in the title."""
    if pred.size == 0:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(label)
        return
    if pred.size > HEXBIN_ABOVE:
        axes.hexbin(true, pred, gridsize=80, bins="log", mincnt=1, cmap="viridis")
    else:
        axes.scatter(true, pred, s=max(2.0, 30.0 / math.sqrt(max(pred.size, 1) / 50)), alpha=0.5,
                     linewidths=0, color="tab:blue")
    r, rho = pearson(pred, true), spearman(pred, true)
    axes.set_title(f"{label}\nr={r:.3f}  r²={r * r:.3f}  ρ={rho:.3f}  n={pred.size:,}", fontsize=9)
    axes.set_xlabel("measured alt − ref" if difference else "measured")
    axes.set_ylabel("predicted alt − ref" if difference else "predicted")


def plot_predicted_vs_measured(pred: Any, true: Any, path: str | os.PathLike, title: str = "") -> Path:
    """One panel of predicted vs measured values (scatter, or hexbin for many points).

    The title carries Pearson r, r², Spearman rho and n; non-finite pairs are left out.
    """
    x, y = _finite_pairs(pred, true)
    figure = _new_figure(5.5, 5.0)
    _draw_pairs(figure.add_subplot(1, 1, 1), x, y, title or "predicted vs measured")
    return _save(figure, path)


def plot_subsets(report_or_pairs: "ScoreReport | Mapping[str, tuple[Any, Any]]", path: str | os.PathLike,
                 title: str = "") -> Path:
    """A grid with one predicted-vs-measured panel per score subset.

    Takes a :class:`~promoter_dist.scoring.ScoreReport` (pair subsets are drawn as
    alt-minus-ref differences, and each panel shows the subset's status when it was not
    scored) or a mapping ``{name: (predicted, measured)}``.
    """
    statuses: dict[str, str] = {}
    pair_subsets: set[str] = set()
    if isinstance(report_or_pairs, Mapping):
        panels = {name: _finite_pairs(*pair) for name, pair in report_or_pairs.items()}
    else:
        report = report_or_pairs
        panels = {}
        for row in report.subsets:
            pred, true = report.points.get(row.name, (np.zeros(0), np.zeros(0)))
            panels[row.name] = _finite_pairs(pred, true)
            statuses[row.name] = row.status
            if row.kind == "pair":
                pair_subsets.add(row.name)
        if not title:
            title = (f"Pearson score {report.pearson_score:.4f}   Spearman score {report.spearman_score:.4f}"
                     + ("" if report.complete else "   (partial)"))
    if not panels:
        raise UserError("nothing to plot: no subsets given")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = _new_figure(4.2 * columns, 3.9 * rows)
    for at, (name, (pred, true)) in enumerate(panels.items(), start=1):
        axes = figure.add_subplot(rows, columns, at)
        status = statuses.get(name, "ok")
        if status != "ok":
            axes.text(0.5, 0.5, f"not scored: {status}", ha="center", va="center", transform=axes.transAxes)
            axes.set_title(name)
            axes.set_xticks([])
            axes.set_yticks([])
            continue
        _draw_pairs(axes, pred, true, name, difference=name in pair_subsets)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, keys: Sequence[str],
                x: str | None = None, title: str = "") -> Path:
    """Loss and metric curves from log records, one panel per key, sharing the x axis.

    ``records`` are dicts such as ``{"step": 100, "epoch": 0, "train_loss": 0.21}``; ``x``
    is the record field for the x axis (default: ``"step"`` if any record has it, else
    ``"epoch"``). Records without a key, or with a non-finite value, are skipped for that
    key; a key that never appears is drawn as an empty panel marked "no values".
    """
    if not keys:
        raise UserError("plot_curves needs at least one key to draw")
    if x is None:
        x = "step" if any("step" in r for r in records) else "epoch"
    figure = _new_figure(6.0, 2.4 * len(keys) + 0.4)
    first: Axes | None = None
    for at, key in enumerate(keys, start=1):
        axes = figure.add_subplot(len(keys), 1, at, sharex=first)
        first = first or axes
        xs, ys = [], []
        for record in records:
            xv, yv = record.get(x), record.get(key)
            if _is_finite_number(xv) and _is_finite_number(yv):
                xs.append(float(xv))
                ys.append(float(yv))
        if xs:
            axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
            if "loss" in key and min(ys) > 0 and max(ys) / min(ys) > 100:
                axes.set_yscale("log")  # losses span decades early in training
        else:
            axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
        axes.set_ylabel(key)
        axes.grid(True, alpha=0.3)
    figure.axes[-1].set_xlabel(x)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
