"""Where a process sits in its job: one :class:`DistEnv`, whoever started the process.

Training reads the usual ``torch.distributed`` variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with
:func:`from_launcher`, exactly as the ``deepspeed`` launcher and ``torchrun`` export them;
a plain ``python train.py`` finds none and runs as one process. Inside a submitted job
nothing sets them: :func:`setup` derives them from what the job system does set and
exports them before the trainer starts.

=====================  ==================================  ==================================
variable               SLURM task (``srun``)               submitit ``local`` executor
=====================  ==================================  ==================================
``RANK``               ``SLURM_PROCID``                    ``SUBMITIT_LOCAL_GLOBALID``
``LOCAL_RANK``         ``SLURM_LOCALID``                   ``SUBMITIT_LOCAL_LOCALID``
``WORLD_SIZE``         ``SLURM_NTASKS``                    ``SUBMITIT_LOCAL_NTASKS``
``LOCAL_WORLD_SIZE``   this node's entry of                ``SUBMITIT_LOCAL_NTASKS``
                       ``SLURM_STEP_TASKS_PER_NODE``
``NODE_RANK``          ``SLURM_NODEID``                    0
``MASTER_ADDR``        first host of the step's node list  127.0.0.1
``MASTER_PORT``        :func:`master_port` of the job id   :func:`master_port` of the job id
=====================  ==================================  ==================================

Outside any job (submitit's ``debug`` executor, a plain ``python`` call) it is one process:
rank 0 of 1 on 127.0.0.1.

``CUDA_VISIBLE_DEVICES`` is deliberately left as SLURM or the site set it: a task that sees
every GPU of its node computes on ``cuda:LOCAL_RANK``, a task bound to one GPU on the only one
it sees (:func:`promoter_dist.distributed.device_index` decides, and refuses more tasks than
GPUs). Overwriting it here, as submitit's ``TorchDistributedEnvironment().export()`` does by
default, would hide the binding a site chose.

MASTER_ADDR is the first host of the node list because SLURM's default (block)
distribution puts task 0 on the first node (``--distribution=cyclic`` etc. also start it
there). A job whose rank 0 may run elsewhere (``--distribution=arbitrary``), or whose nodes
talk over another interface than their SLURM names resolve to, sets
``PROMOTER_DIST_MASTER_ADDR`` (e.g. with ``--setup 'export PROMOTER_DIST_MASTER_ADDR=...'``).
A plain ``MASTER_ADDR`` is not read: sbatch copies the submitting shell's environment into
the job, and a stale value from there must not win.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, MutableMapping

from ..errors import UserError

# Ports below Linux's ephemeral range (32768-60999), so an outgoing connection can never
# already hold the port, and above the well-known/registered services usually running on
# cluster nodes. 29500 (torch's default) is inside, which is harmless: the port depends
# on the job id, and two jobs sharing a node differ in their job ids.
PORT_LOW = 20000
PORT_SPAN = 10000

# One bracket group of a SLURM host list: "[01-04,07]".
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
# One element of a bracket group: "07" or "01-04".
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# One entry of SLURM_TASKS_PER_NODE: "2" or "2(x3)".
_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")

MASTER_ADDR_OVERRIDE = "PROMOTER_DIST_MASTER_ADDR"
"""Set in a SLURM job to choose rank 0's address instead of the node list's first host."""

VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where one process sits in its job, and how the processes find each other."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    local_rank: int
    """Rank among the processes of this node (the GPU index when each process sees the node's GPUs)."""
    world_size: int
    """Processes in the job."""
    local_world_size: int
    """Processes of the job on this node."""
    node_rank: int
    """This node's index in the job."""
    num_nodes: int
    """Nodes in the job."""
    master_addr: str
    """Host of rank 0 (the rendezvous)."""
    master_port: int
    """TCP port of the rendezvous."""
    job_id: str = ""
    """The job system's id ('' under a plain launcher)."""
    source: str = "launcher"
    """Where the values came from: "launcher", "slurm", "local" or "single"."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes shared files."""
        return self.rank == 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} is outside local world size {self.local_world_size}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node {self.node_rank} is outside the job's {self.num_nodes} nodes")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} is not a TCP port")

    def variables(self) -> dict[str, str]:
        """The ``torch.distributed`` environment variables, as strings."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write :meth:`variables` into ``environ`` (default: this process's environment)."""
        (os.environ if environ is None else environ).update(self.variables())


# --------------------------------------------------------------------------- host lists


def _expand_bracket(body: str, text: str) -> list[str]:
    """``"01-04,07"`` -> ``["01", "02", "03", "04", "07"]`` (zero padding kept)."""
    out: list[str] = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(f"bad range '{part}' in host list '{text}'")
        low, high = match.group(1), match.group(2)
        if high is None:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range '{part}' in host list '{text}'")
        width = len(low)  # SLURM pads every number to the width of the lower bound
        out.extend(f"{n:0{width}d}" for n in range(int(low), int(high) + 1))
    return out


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets: ``"a1,b[2-3]"`` -> ``["a1", "b[2-3]"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in host list '{text}'")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list '{text}'")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list '{text}'")
    parts.append(text[start:])
    return parts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list into host names, in order, without calling SLURM.

    Handles every form SLURM writes: single hosts (``node7``), comma lists, bracket
    ranges with zero padding and mixed elements (``gpu[01-04,07]``), text after a bracket
    (``n[001-003]-ib``) and several brackets in one name (``r[1-2]n[01-02]`` ->
    ``r1n01 r1n02 r2n01 r2n02``). Duplicates and order are kept, as in ``scontrol show
    hostnames``. A malformed list raises :class:`ValueError`.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("empty host list")
    hosts: list[str] = []
    for group in _split_top_level(text):
        group = group.strip()
        if not group:
            raise ValueError(f"empty entry in host list '{nodelist}'")
        names = [""]
        pos = 0
        for match in _BRACKET.finditer(group):
            literal = group[pos : match.start()]
            names = [name + literal for name in names]
            names = [name + number for name in names for number in _expand_bracket(match.group(1), nodelist)]
            pos = match.end()
        names = [name + group[pos:] for name in names]
        if any("[" in name or "]" in name for name in names):
            raise ValueError(f"bad brackets in host list '{nodelist}'")
        hosts.extend(names)
    return hosts


def scontrol_hostnames(nodelist: str, timeout_s: float = 10.0) -> list[str] | None:
    """``scontrol show hostnames NODELIST``, or None when scontrol is missing or refuses it."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = result.stdout.split()
    return hosts if result.returncode == 0 and hosts else None


def hostnames(nodelist: str, prefer_scontrol: bool = False) -> list[str]:
    """The hosts of ``nodelist``: SLURM's own expansion when asked and available, else ours.

    Older ``scontrol`` versions reject some valid forms (22.05 refuses ``n[1-3]-ib``), so a
    refusal falls back to :func:`expand_nodelist` rather than failing the job.
    """
    if prefer_scontrol:
        hosts = scontrol_hostnames(nodelist)
        if hosts:
            return hosts
    return expand_nodelist(nodelist)


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` -> tasks of each node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = _TASKS.match(part.strip())
        if not match:
            raise ValueError(f"bad tasks-per-node entry '{part}' in '{spec}'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def master_port(job_id: str | int) -> int:
    """A TCP port in ``[PORT_LOW, PORT_LOW + PORT_SPAN)`` that depends only on the job id.

    Every task of a job computes the same port without talking to the others; a requeued job
    keeps its id and so its port. Numeric ids map to consecutive ports (no two of 10,000
    consecutive jobs collide); other ids (array ``123_4``, debug runs) are hashed.
    """
    text = str(job_id).strip()
    number = int(text) if text.isdigit() else zlib.crc32(text.encode())
    return PORT_LOW + number % PORT_SPAN


# --------------------------------------------------------------------------- derivation


def _int(environ: Mapping[str, str], *names: str) -> int:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None
    raise KeyError(f"none of {', '.join(names)} is set")


def from_slurm(environ: Mapping[str, str], expand: Callable[[str], list[str]] = expand_nodelist) -> DistEnv:
    """The environment of one SLURM task (started by ``srun``), from its ``SLURM_*`` variables.

    ``expand`` turns the node list into hosts (:func:`expand_nodelist` by default, which
    needs no SLURM; pass ``lambda s: hostnames(s, prefer_scontrol=True)`` to use scontrol).
    """
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _int(environ, "SLURM_LOCALID")
    node = _int(environ, "SLURM_NODEID")
    # The step's values first: they describe the tasks actually started by this srun.
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise KeyError("none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set")
    hosts = expand(nodelist)
    per_node_spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if per_node_spec:
        per_node = expand_tasks_per_node(per_node_spec)
        if len(per_node) != len(hosts):
            raise ValueError(f"tasks per node '{per_node_spec}' lists {len(per_node)} nodes, node list "
                             f"'{nodelist}' has {len(hosts)}")
        if sum(per_node) != world:
            raise ValueError(f"tasks per node '{per_node_spec}' sum to {sum(per_node)}, not SLURM_NTASKS={world}")
        if node >= len(per_node):
            raise ValueError(f"SLURM_NODEID={node} but the job has {len(per_node)} nodes")
        local_world = per_node[node]
    elif environ.get("SLURM_NTASKS_PER_NODE"):
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    else:
        local_world = world // len(hosts)
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job_id:
        raise KeyError("SLURM_JOB_ID is not set")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                   node_rank=node, num_nodes=len(hosts), master_addr=environ.get(MASTER_ADDR_OVERRIDE) or hosts[0],
                   master_port=master_port(job_id), job_id=job_id, source="slurm")


def from_submitit_local(environ: Mapping[str, str]) -> DistEnv:
    """The environment of one task of submitit's ``local`` executor (all tasks on this machine)."""
    world = _int(environ, "SUBMITIT_LOCAL_NTASKS")
    job_id = environ.get("SUBMITIT_LOCAL_JOB_ID", "0")
    return DistEnv(rank=_int(environ, "SUBMITIT_LOCAL_GLOBALID"), local_rank=_int(environ, "SUBMITIT_LOCAL_LOCALID"),
                   world_size=world, local_world_size=world, node_rank=0, num_nodes=1, master_addr="127.0.0.1",
                   master_port=master_port(job_id), job_id=job_id, source="local")


def single_process(job_id: str = "0") -> DistEnv:
    """One process alone: rank 0 of 1 on this machine."""
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1,
                   master_addr="127.0.0.1", master_port=master_port(job_id), job_id=job_id, source="single")


def derive(environ: Mapping[str, str] | None = None, prefer_scontrol: bool = False) -> DistEnv:
    """The environment of the current task, whichever executor started it.

    submitit's own marker decides first (a ``local`` job started inside a SLURM allocation
    still sees ``SLURM_*`` variables of that allocation); then a SLURM task; else one process.
    Variables already set (``RANK``...) are ignored on purpose: sbatch copies the submitting
    shell's environment into the job, and stale values from there must not win.
    """
    environ = os.environ if environ is None else environ
    executor = environ.get("SUBMITIT_EXECUTOR", "")
    if executor == "local":
        return from_submitit_local(environ)
    if executor == "slurm" or "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return from_slurm(environ, lambda text: hostnames(text, prefer_scontrol))
    return single_process(environ.get("SUBMITIT_DEBUG_JOB_ID", "0"))


def setup(environ: MutableMapping[str, str] | None = None, prefer_scontrol: bool = True) -> DistEnv:
    """Derive this task's environment and export it; returns what was exported."""
    environ = os.environ if environ is None else environ
    dist = derive(environ, prefer_scontrol=prefer_scontrol)
    dist.export(environ)
    return dist


# --------------------------------------------------------------------------- a launcher's variables

LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What ``deepspeed``, ``torchrun`` and :func:`setup` export for every process."""


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def from_launcher(local_rank_arg: int | None = None, environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """This process's place from the launcher's variables, or one process alone when there are none.

    A lone process gets the variables DeepSpeed needs written into ``environ`` (it would
    otherwise try MPI discovery). ``local_rank_arg`` is the ``--local_rank`` the deepspeed
    launcher passes. Bad or partial variables raise :class:`UserError`.
    """
    environ = os.environ if environ is None else environ
    present = [k for k in LAUNCHER_KEYS if k in environ]
    if not present:
        environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank_arg or 0),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        environ.setdefault("LOCAL_RANK", str(local_rank_arg if local_rank_arg is not None else 0))
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in environ:
            if int(environ["WORLD_SIZE"]) > 1:
                raise UserError("MASTER_PORT is not set: a multi-process run needs MASTER_ADDR and MASTER_PORT")
            environ["MASTER_PORT"] = str(free_port())
    else:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in environ]
        raise UserError(f"launcher environment is incomplete: {', '.join(present)} set but {', '.join(missing)} missing")
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank, port = int(environ["LOCAL_RANK"]), int(environ["MASTER_PORT"])
        # deepspeed exports LOCAL_SIZE, torchrun and setup() LOCAL_WORLD_SIZE.
        local_world = next((int(environ[k]) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if environ.get(k, "").isdigit()),
                           None)
    except ValueError as error:
        raise UserError(f"launcher environment: {error}") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if not local_world:  # not exported: assume every rank on this node
        local_world = world
    num_nodes = -(-world // local_world)
    node = int(environ["NODE_RANK"]) if environ.get("NODE_RANK", "").isdigit() else rank // local_world
    try:
        return DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                       node_rank=node, num_nodes=num_nodes, master_addr=environ["MASTER_ADDR"],
                       master_port=port, job_id=environ.get("SLURM_JOB_ID", ""), source="launcher")
    except ValueError as error:
        raise UserError(f"launcher environment: {error}") from None

