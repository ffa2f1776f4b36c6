"""The models package stands alone: no import of the data, launch or trainer code, nor of DeepSpeed,
at module level or inside functions (the same wall import-linter checks)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import promoter_dist.models

MODELS = Path(promoter_dist.models.__file__).parent
FORBIDDEN = ("promoter_dist.data", "promoter_dist.launch", "promoter_dist.trainer", "deepspeed")


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module an ``import`` anywhere in ``path`` names (relative ones resolved)."""
    package = "promoter_dist.models"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def is_forbidden(name: str) -> bool:
    return any(name == wall or name.startswith(wall + ".") for wall in FORBIDDEN)


def test_no_model_source_imports_across_the_wall() -> None:
    sources = sorted(MODELS.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "common.py", "nad.py", "bert.py"}
    crossing = {p.name: [n for n in imported_modules(p) if is_forbidden(n)] for p in sources}
    assert {name: found for name, found in crossing.items() if found} == {}


def test_importing_the_models_loads_nothing_across_the_wall() -> None:
    code = (
        "import sys, promoter_dist.models.common, promoter_dist.models.nad, promoter_dist.models.bert, promoter_dist.models.legnet, promoter_dist.models.dream_rnn\n"
        f"print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
