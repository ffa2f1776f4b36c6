"""A process group starts without DeepSpeed's JIT-built shared-memory op.

DeepSpeed 0.19 builds ``deepspeed_shm_comm`` under a lock file in the torch extensions folder at
every CPU start; a rank killed while holding that lock stalls every later launch that shares the
folder. The trainer never uses the op, so a start must neither build it nor wait on its lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LAUNCHER_KEYS

START_ONE_RANK = """
from promoter_dist import distributed as dist
from promoter_dist.launch.environment import from_launcher
import torch.distributed
dist.init_distributed(from_launcher(), timeout_s=30)
torch.distributed.all_reduce(torch.ones(1))
print("started", torch.distributed.get_world_size(), flush=True)
# Left to interpreter teardown, the group's threads can end after the C++ runtime is gone, which
# aborts the process (SIGABRT, "terminate called without an active exception"): end it here.
torch.distributed.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_a_stale_extension_lock_does_not_stall_the_start(tmp_path: Path, monkeypatch) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    # The folder torch builds the op in (``py<version>_cpu/deepspeed_shm_comm``), as torch names it.
    (Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock").touch()  # left by a killed rank
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    result = subprocess.run([sys.executable, "-c", START_ONE_RANK], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    assert "started 1" in result.stdout
    built = [p.name for p in extensions.rglob("*") if p.is_file() and p.name != "lock"]
    assert built == []
