"""What the login node reads about the hardware: sinfo's GPUs and cores, nvidia-smi, CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from promoter_dist.launch import resources as R


@pytest.mark.parametrize("gres, gpus", [
    ("(null)", 0), ("", 0), ("gpu:8", 8), ("gpu:a100:4", 4), ("gpu:4(S:0-1)", 4), ("gpu:a100:4(S:0-1)", 4),
    ("gpu:nvidia_a100-sxm4-80gb:8(S:0-1)", 8), ("gpu:a100:2(S:0),gpu:v100:2(S:1)", 4), ("gpu:2(S:0,1),nvme:1", 2),
    ("mps:400,gpu:tesla:2", 2), ("shard:8", 0), ("nvme:1", 0), ("gpu", 1), ("gpu:a100", 1), ("gpu:h100:8(IDX:0-7)", 8),
])
def test_gres_gpus(gres, gpus):
    assert R.gres_gpus(gres) == gpus


# What `sinfo -h -o "%P %G"` prints: one line per partition and group of alike nodes; '*' marks the default.
SINFO = """debug* (null)
gpu gpu:a100:4(S:0-1)
gpu gpu:a100:8(S:0-1)
mixed (null)
mixed gpu:2
cpu (null)
"""


@pytest.mark.parametrize("partition, expected", [
    (None, R.PartitionGpus("debug", 0, "(null)")),
    ("gpu", R.PartitionGpus("gpu", 8, "gpu:a100:8(S:0-1)")),
    ("mixed", R.PartitionGpus("mixed", 2, "gpu:2")),  # a GPU node in the partition is enough
    ("cpu", R.PartitionGpus("cpu", 0, "(null)")),
    ("cpu,gpu", R.PartitionGpus("gpu", 8, "gpu:a100:8(S:0-1)")),
    ("debug", R.PartitionGpus("debug", 0, "(null)")),
    ("nope", None),
])
def test_partition_gpus(partition, expected):
    assert R.partition_gpus(SINFO, partition) == expected


def test_partition_gpus_of_a_default_gpu_partition_and_of_nothing():
    assert R.partition_gpus("cpu (null)\ngpu* gpu:h100:8(S:0-1)\n") == R.PartitionGpus("gpu", 8, "gpu:h100:8(S:0-1)")
    assert R.partition_gpus("cpu (null)\n") is None  # no default partition
    assert R.partition_gpus("", "gpu") is None  # sinfo -p nope prints nothing


def test_visible_devices_and_nvidia_smi():
    assert R.visible_devices("0,1,2,3") == ["0", "1", "2", "3"]
    assert R.visible_devices("4, 5") == ["4", "5"]
    assert R.visible_devices("") == []
    assert R.visible_devices("GPU-8f2a,GPU-11bc") == ["GPU-8f2a", "GPU-11bc"]
    listing = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\n"
               "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-bbbb)\n"
               "  MIG 1g.5gb      Device  0: (UUID: MIG-cccc)\n")
    assert R.nvidia_smi_gpus(listing) == 2
    assert R.nvidia_smi_gpus("") == 0


def _tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_shell_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert R.shell_gpus({}) is None  # no nvidia-smi, no variable: nothing known
    assert R.shell_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ["4", "5", "6", "7"]
    assert R.shell_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    _tool(tmp_path / "bin", "nvidia-smi", "echo 'GPU 0: A (UUID: GPU-a)'; echo 'GPU 1: B (UUID: GPU-b)'")
    assert R.shell_gpus({}) == ["0", "1"]
    assert R.shell_gpus({"CUDA_VISIBLE_DEVICES": "1"}) == ["1"]  # the variable wins over the listing
    _tool(tmp_path / "bin", "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert R.shell_gpus({}) is None  # a driver that does not answer


def fake_sinfo(outputs: dict[str, str], calls: Path | None = None) -> str:
    """A stand-in for ``sinfo -h -o FORMAT [-p PARTITION]``: ``outputs[FORMAT]``, only PARTITION's lines with -p."""
    cases = "".join(f'  "{fmt}") out="{text}" ;;\n' for fmt, text in outputs.items())
    log = f'echo "$@" >> {calls}\n' if calls else ""
    return (f'{log}case "$3" in\n{cases}esac\n'
            'if [ "$4" = "-p" ]; then printf "%s\\n" "$out" | grep "^$5\\*\\? "; else printf "%s\\n" "$out"; fi')


def test_readers_run_sinfo(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    _tool(tmp_path / "bin", "sinfo", fake_sinfo({"%P %G": "debug* (null)\ngpu gpu:a100:4(S:0-1)",
                                                  "%P %c": "debug* 2\ngpu 64+"}, calls))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert R.read_partition_gpus() == R.PartitionGpus("debug", 0, "(null)")
    assert R.read_partition_gpus("gpu") == R.PartitionGpus("gpu", 4, "gpu:a100:4(S:0-1)")
    assert R.partition_cpus() == 2 and R.partition_cpus("gpu") == 64
    assert calls.read_text().splitlines() == ["-h -o %P %G", "-h -o %P %G -p gpu", "-h -o %P %c", "-h -o %P %c -p gpu"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert R.read_partition_gpus() is None and R.partition_cpus() is None  # no sinfo
