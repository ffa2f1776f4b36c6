"""Everything distributed in one place: the process environment, DeepSpeed start-up, collectives.

The environment comes from whichever launcher started the process: the ``deepspeed``
launcher and ``torchrun`` export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
the SLURM job (``promoter_dist.launch``) exports the same names from SLURM's variables
before calling the trainer. A plain ``python train.py`` finds none of them and runs as a
single process (DeepSpeed would otherwise try MPI discovery).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import UserError

_LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes shared files."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_environment(local_rank_arg: int | None = None) -> DistEnv:
    """Read the launcher's variables, or set up a single process when there are none."""
    present = [k for k in _LAUNCHER_KEYS if k in os.environ]
    if not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank_arg or 0),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", str(local_rank_arg if local_rank_arg is not None else 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if int(os.environ["WORLD_SIZE"]) > 1:
                raise UserError("MASTER_PORT is not set: a multi-process run needs MASTER_ADDR and MASTER_PORT")
            os.environ["MASTER_PORT"] = str(free_port())
    else:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in os.environ]
        raise UserError(f"launcher environment is incomplete: {', '.join(present)} set but {', '.join(missing)} missing")
    try:
        env = DistEnv(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]), master_addr=os.environ["MASTER_ADDR"],
                      master_port=int(os.environ["MASTER_PORT"]))
    except ValueError as error:
        raise UserError(f"launcher environment: {error}") from None
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"RANK={env.rank} is not in [0, WORLD_SIZE={env.world_size})")
    return env


def local_world_size() -> int:
    """Processes of this job on this node (deepspeed: LOCAL_SIZE, torchrun/SLURM job: LOCAL_WORLD_SIZE)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return max(int(os.environ[key]), 1)
    return 1


def init_distributed(env: DistEnv) -> None:
    """Start the process group DeepSpeed uses (NCCL on GPUs, gloo on CPUs)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(env.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node would otherwise each start a thread per core and oversubscribe it.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)


def device() -> torch.device:
    """The device this rank computes on."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, get_accelerator().current_device())


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process without a group)."""
    if _initialized():
        torch.distributed.barrier()


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks."""
    if not _initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over ranks."""
    if not _initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / torch.distributed.get_world_size()


def _collective_device() -> torch.device:
    return torch.device("cpu") if torch.distributed.get_backend() == "gloo" else device()


def norm_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The BatchNorm running means and variances of ``module`` (the buffers themselves, in module order)."""
    buffers = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._NormBase) and layer.track_running_stats:
            buffers.extend(b for b in (layer.running_mean, layer.running_var) if b is not None)
    return buffers


def average_norm_statistics(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks, in place.

    DeepSpeed does not synchronise buffers, so each rank's running statistics follow its own
    batches; evaluation and checkpoints use the average, identical on every rank.
    """
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return
    world = torch.distributed.get_world_size()
    for buffer in norm_statistics(module):
        moved = buffer.to(_collective_device())
        torch.distributed.all_reduce(moved)
        buffer.copy_(moved / world)


def gather_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's 1-D arrays concatenated in rank order, returned on every rank.

    A rank with no rows passes an empty dict; the keys come from the others.
    """
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return arrays
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, arrays)
    keys = next((list(p) for p in parts if p), [])
    return {key: np.concatenate([p[key] for p in parts if p]) for key in keys}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- stop requests


@dataclass
class StopRequest:
    """A request to checkpoint and stop at the next step boundary (preemption, time limit).

    Set from a signal handler on any rank (:func:`request_stop`); the trainer asks
    :func:`stop_requested` once per step, which agrees over all ranks, so every rank saves
    the same step's checkpoint and stops together.
    """

    armed: bool = False
    """A handler that can request a stop is installed (:func:`arm_stop_requests`); until then the
    trainer's per-step check costs nothing (no collective)."""
    requested: bool = False
    """This process received the request."""
    signal_name: str = ""
    """The signal that carried it, for the log."""
    honoured_at_step: int | None = None
    """The step whose checkpoint the trainer wrote before stopping early (None: it did not stop early)."""


STOP = StopRequest()


def arm_stop_requests() -> None:
    """Make the trainer check for stop requests every step; call it on every rank (a SLURM task does)."""
    STOP.armed = True


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Signal handler: ask the trainer to checkpoint and stop at the next step (async-signal safe)."""
    import signal

    STOP.requested = True
    STOP.signal_name = signal.Signals(signum).name if signum is not None else "request"


def stop_requested() -> bool:
    """True on every rank when any rank got a stop request (a collective on all ranks once armed)."""
    if not STOP.armed:
        return False
    return all_reduce_max(1.0 if STOP.requested else 0.0) > 0
