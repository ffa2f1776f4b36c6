"""What the login node can learn about the hardware a job will get: a partition's cores and GPUs, this shell's GPUs.

The parsers are pure (they take the text ``sinfo``, ``nvidia-smi`` or ``CUDA_VISIBLE_DEVICES``
give); the readers run the command and return None when it is missing or says nothing useful.
Nothing here imports torch: asking CUDA would cost the login node seconds and need a driver.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Mapping, NamedTuple

# One generic resource of sinfo's %G: "gpu", "gpu:8", "gpu:a100:4", each maybe followed by "(S:0-1)".
_GRES_COUNT = re.compile(r"^\d+$")


def _split_outside_parentheses(text: str) -> list[str]:
    """``"gpu:2(S:0,1),nvme:1"`` -> ``["gpu:2(S:0,1)", "nvme:1"]``: socket lists may hold commas."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def gres_gpus(gres: str) -> int:
    """GPUs of one node from its generic resources as sinfo's ``%G`` prints them.

    ``"gpu:8"`` -> 8, ``"gpu:a100:4"`` -> 4, ``"gpu:4(S:0-1)"`` -> 4, ``"(null)"`` -> 0;
    several GPU types on one node add up (``"gpu:a100:2,gpu:v100:2"`` -> 4); other resources
    (``mps``, ``shard``, ``nvme``) are not GPUs. ``"gpu"`` or ``"gpu:a100"`` without a count is one.
    """
    text = gres.strip()
    if not text or text == "(null)":
        return 0
    total = 0
    for item in _split_outside_parentheses(text):
        fields = item.split("(", 1)[0].strip().split(":")
        if fields[0] != "gpu":
            continue
        total += int(fields[-1]) if len(fields) > 1 and _GRES_COUNT.match(fields[-1]) else 1
    return total


class PartitionGpus(NamedTuple):
    """The GPUs of a partition as sinfo reports them."""

    name: str
    """The partition (the default one's name without sinfo's ``*``)."""
    gpus: int
    """The most GPUs on one of its nodes (0: no node of it has any)."""
    gres: str
    """sinfo's ``%G`` of those nodes, to show the user."""


def partition_gpus(sinfo_output: str, partition: str | None = None) -> PartitionGpus | None:
    """The GPUs of ``partition`` from the output of ``sinfo -h -o "%P %G"``.

    ``partition`` None reads the default partition (the one sinfo marks with ``*``); a comma
    list reads all of them. sinfo prints one line per group of alike nodes, so a partition may
    have several lines; the largest count wins: one GPU node is enough for a job to land on
    GPUs. None when the partition is not listed (a wrong name: sbatch says so itself).
    """
    wanted = {name.strip() for name in partition.split(",")} if partition else None
    best: PartitionGpus | None = None
    for line in sinfo_output.splitlines():
        name, _, gres = line.strip().partition(" ")
        if not name:
            continue
        default = name.endswith("*")
        name = name.rstrip("*")
        if (wanted is None and not default) or (wanted is not None and name not in wanted):
            continue
        found = PartitionGpus(name, gres_gpus(gres), gres.strip())
        if best is None or found.gpus > best.gpus:
            best = found
    return best


def _sinfo(output_format: str, partition: str | None) -> str | None:
    """``sinfo -h -o FORMAT [-p PARTITION]``'s output, or None when sinfo is missing or fails."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    cmd = [sinfo, "-h", "-o", output_format] + (["-p", partition] if partition else [])
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def read_partition_gpus(partition: str | None = None) -> PartitionGpus | None:
    """The GPUs of ``partition`` (the default partition when None), from sinfo; None when sinfo cannot tell."""
    output = _sinfo("%P %G", partition)
    return None if output is None else partition_gpus(output, partition)


def partition_cpus(partition: str | None = None) -> int | None:
    """CPU cores of one node of ``partition`` (the default partition when None), from sinfo.

    The smallest node of the partition counts (sinfo prints "32+" for mixed sizes).
    None when sinfo is missing or says nothing useful.
    """
    output = _sinfo("%P %c", partition)
    for line in (output or "").splitlines():
        name, _, cpus = line.strip().partition(" ")
        if partition is None and not name.endswith("*"):
            continue  # the default partition is marked with '*'
        match = re.match(r"(\d+)", cpus.strip())
        if match:
            return int(match.group(1))
    return None


def visible_devices(value: str) -> list[str]:
    """The GPUs a ``CUDA_VISIBLE_DEVICES`` value shows: ``"4,5"`` -> ``["4", "5"]``, ``""`` -> none.

    Entries stay text: a site may name GPUs by UUID (``GPU-...``, ``MIG-...``) instead of index.
    """
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def nvidia_smi_gpus(listing: str) -> int:
    """GPUs in the output of ``nvidia-smi -L`` (one ``GPU <i>: ...`` line each; MIG lines below them are parts)."""
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def shell_gpus(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The GPUs this shell sees: its ``CUDA_VISIBLE_DEVICES`` when set, else ``0..n-1`` from ``nvidia-smi -L``.

    None when neither tells (no variable, no nvidia-smi, or nvidia-smi fails: no usable driver).
    """
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return visible_devices(environ["CUDA_VISIBLE_DEVICES"])
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return None
    try:
        result = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return [str(index) for index in range(nvidia_smi_gpus(result.stdout))]


__all__ = [
    "PartitionGpus", "gres_gpus", "nvidia_smi_gpus", "partition_cpus", "partition_gpus", "read_partition_gpus",
    "shell_gpus", "visible_devices",
]
