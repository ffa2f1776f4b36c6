"""The import walls of setup.cfg's ``[importlinter]`` contracts hold: models, data, launch and the
reference GSAM stay clear of what they must not import, and no modules import each other in a cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the environment's own lint-imports, so the walls are checked against the installed package
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_every_import_contract_is_kept() -> None:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: install the test extra ('.[test]')"
    # --no-cache: no cache folder left in the working tree; the graph takes well under a second
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"lint-imports failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}", pytrace=False)
