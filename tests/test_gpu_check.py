"""``benchmarks/gpu_check.py --device cpu --quick``: the GPU check runs end to end on a CPU, every row OK.

The same parts as on a GPU (DeepSpeed launches of every debug config, resumed; validation; peak
memory; GSAM at ZeRO 0 and 3; predict; the shard build), at debug sizes over gloo, so that the
script is known to work before a GPU machine is lent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from promoter_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def debug_configs() -> dict[str, str]:
    """Task of every debug config under configs/, by name (what the check is expected to train)."""
    paths = [p for p in sorted((REPO / "configs").glob("*/*.yaml")) if p.stem == "debug" or p.stem.endswith("_debug")]
    return {f"{p.parent.name}/{p.stem}": load_config(p).task.name for p in paths}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_check_on_cpu_passes_every_part(tmp_path: Path) -> None:
    report_path = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--work", str(tmp_path / "work"),
         "--json", str(report_path)],
        check=False, capture_output=True, text=True, timeout=880, cwd=REPO)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]

    report = json.loads(report_path.read_text())
    rows = {row["part"]: row for row in report["rows"]}
    assert report["ok"] and report["device"] == "cpu" and report["quick"]
    assert [part for part, row in rows.items() if row["status"] != "OK"] == []

    configs = debug_configs()
    assert "nad/debug" in configs
    expected = {"environment", "synthetic data", "GSAM ZeRO 0 vs 3 (nad/debug)", "shard build (20,000 rows)",
                "fp16 bert/finetune_debug"}
    for name, task in configs.items():
        expected |= {f"train {name}", f"validation {name}", f"resume {name}"}
        if task != "mlm":
            expected.add(f"predict {name}")
    assert set(rows) == expected

    # One table on stdout: the header and a line per row.
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| part | result | figures | s (plan) |"
    assert len(table) == 1 + len(rows)

    assert rows["environment"]["figures"]["module_errors"] == []
    for name, task in configs.items():
        train = rows[f"train {name}"]["figures"]
        assert train["samples_per_s"] > 0 and train["peak_memory_bytes"] > 0 and train["parameters"] > 0
        if name.startswith("bert/"):
            assert train["tokens_per_s"] > 0
        if name.startswith("legnet/"):  # the published 80,000 steps of 512 rows at the measured rows/s
            assert train["published_steps_hours"] == pytest.approx(80_000 * 512 / train["samples_per_s"] / 3600)
        assert rows[f"validation {name}"]["figures"]["step"] == 4
        assert rows[f"resume {name}"]["figures"] == {"checkpoint": "step00000002", "final_step": 4}
        if task != "mlm":
            predict = rows[f"predict {name}"]["figures"]
            assert predict["rows"] == 500 and predict["rows_per_s"] > 0 and predict["rows_per_s_all_in"] > 0
    # DeepSpeed has no fp16 on a CPU: the check asserts the toolkit's one-line refusal there.
    fp16 = rows["fp16 bert/finetune_debug"]
    assert fp16["figures"] == {"refused": True} and "engine.precision=fp16" in fp16["summary"]
    gsam = rows["GSAM ZeRO 0 vs 3 (nad/debug)"]["figures"]
    assert gsam["steps"] == 3 and 0 <= gsam["max_relative_difference"] <= gsam["tolerance"]
    build = rows["shard build (20,000 rows)"]["figures"]
    assert build["rows"] == 20_000 and build["build_rows_per_s"] > 0 and build["bytes_per_row"] > 0
