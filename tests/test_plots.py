"""Figures are written as whole, non-empty PNGs, atomically, without pyplot state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promoter_dist.errors import UserError
from promoter_dist.plots import plot_curves, plot_predicted_vs_measured, plot_subsets
from promoter_dist.scoring import load_truth, score

PUBLIC = Path(__file__).resolve().parents[1] / "data" / "dream2022" / "public_leaderboard"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) >= min_bytes, (path, len(data))
    leftovers = [p.name for p in path.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[16:24]  # IHDR width and height, big-endian
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


@pytest.mark.parametrize("n", [300, 20_000], ids=["scatter", "hexbin"])
def test_predicted_vs_measured(tmp_path, n):
    rng = np.random.default_rng(0)
    true = rng.normal(size=n)
    pred = true + rng.normal(0, 0.5, n)
    pred[:3] = np.nan  # skipped, not an error
    path = plot_predicted_vs_measured(pred, true, tmp_path / "sub" / "pvm.png", title="val")
    assert path == tmp_path / "sub" / "pvm.png"
    assert_png(path)


def test_predicted_vs_measured_length_mismatch(tmp_path):
    with pytest.raises(UserError, match="differ in length"):
        plot_predicted_vs_measured([1, 2, 3], [1, 2], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_subsets_from_a_score_report(tmp_path):
    folder = tmp_path / "public"
    folder.mkdir()
    for source in PUBLIC.iterdir():
        if source.name != "SNVs_exp_indices.json":  # one subset not scored: its panel says so
            (folder / source.name).write_bytes(source.read_bytes())
    truth = load_truth(folder)
    noisy = truth.values + np.random.default_rng(1).normal(0, 0.3, truth.values.size)
    report = score(dict(zip(truth.rows.tolist(), noisy.tolist())), truth)
    path = plot_subsets(report, tmp_path / "subsets.png")
    assert_png(path, min_bytes=50_000)
    width, height = png_size(path)
    assert width > 1000 and height > 1000  # a 3 x 3 grid


def test_subsets_from_pairs(tmp_path):
    rng = np.random.default_rng(2)
    pairs = {name: (rng.normal(size=50), rng.normal(size=50)) for name in ["a", "b", "c", "d"]}
    pairs["empty"] = (np.zeros(0), np.zeros(0))
    assert_png(plot_subsets(pairs, tmp_path / "pairs.png", title="four subsets"))
    with pytest.raises(UserError, match="nothing to plot"):
        plot_subsets({}, tmp_path / "none.png")


def test_curves(tmp_path):
    records = [{"step": s, "epoch": s // 100, "train_loss": 1.0 / (1 + s), "lr": 2e-4 * (1 - s / 1000)}
               for s in range(0, 1000, 10)]
    records += [{"epoch": e, "step": 100 * e + 99, "val_pearson": 0.5 + 0.03 * e} for e in range(10)]
    records.append({"step": 5, "train_loss": float("nan")})  # skipped
    records.append({"step": "bad", "train_loss": 0.1})  # skipped
    path = plot_curves(records, tmp_path / "curves.png", ["train_loss", "val_pearson", "lr", "never_logged"])
    assert_png(path)
    assert png_size(path)[1] > png_size(path)[0]  # one row per key
    by_epoch = plot_curves(records, tmp_path / "epoch.png", ["val_pearson"], x="epoch")
    assert_png(by_epoch)
    with pytest.raises(UserError, match="at least one key"):
        plot_curves(records, tmp_path / "none.png", [])


def test_overwrites_atomically(tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(b"old")
    plot_predicted_vs_measured([1.0, 2.0, 3.0], [1.0, 2.5, 2.9], path)
    assert_png(path)


def test_unwritable_target_is_a_user_error(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="taken: cannot write the figure"):
        plot_predicted_vs_measured([1.0, 2.0], [1.0, 3.0], tmp_path / "taken")


def test_no_pyplot_state(tmp_path):
    # Drawing through Figure + Agg canvas never loads pyplot (no global figures, no backend switch).
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    code = ("import sys; from promoter_dist.plots import plot_curves; "
            f"plot_curves({records!r}, {str(tmp_path / 'c.png')!r}, ['loss']); "
            "print('matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert_png(tmp_path / "c.png", min_bytes=1000)
