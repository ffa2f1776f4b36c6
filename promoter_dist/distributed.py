"""Everything collective in one place: process-group start-up, the rank's device, collectives.

Where a process sits in its job (rank, world size, rendezvous) is a
:class:`~promoter_dist.launch.environment.DistEnv`, read once by the entry point and passed
in. Every collective here also works in a single process where ``torch.distributed`` was
never initialised (it then returns its input), so single-process tools and tests call the
same functions as a multi-rank run.
"""

from __future__ import annotations

import importlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist

from .errors import UserError
from .launch.environment import DistEnv


def init_distributed(env: DistEnv, timeout_s: float = 600.0) -> None:
    """Start the process group DeepSpeed uses (NCCL on GPUs, gloo on CPUs).

    A collective that waits longer than ``timeout_s`` (a rank died or hangs) fails on the ranks
    still waiting instead of blocking them forever.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if initialized():
        return
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(device_index(env, accelerator.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")))
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node would otherwise each start a thread per core and oversubscribe it.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    skip_shared_memory_op()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False,
                               timeout=timedelta(seconds=timeout_s))


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when a process group starts.

    On CPU ranks DeepSpeed 0.19 JIT-builds ``deepspeed_shm_comm`` at every start, under a lock file in
    ``~/.cache/torch_extensions``; a rank killed while holding it (preemption, a timeout, another
    rank's error) leaves the lock behind, and every later launch of any user sharing that home
    folder waits on it forever. The op serves only DeepSpeed's inference all-reduce, which training
    never calls, so the process group starts without it.
    """
    # By module path: ``deepspeed.comm.torch`` as an attribute is the torch package itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def device_index(env: DistEnv, visible: int, visible_list: str | None = None) -> int:
    """The index, among the GPUs this process sees, of the one its rank computes on.

    - every GPU of the node visible (``--gpus-per-node`` with no binding, or the site's own
      ``CUDA_VISIBLE_DEVICES`` listing as many as there are tasks): the local rank's;
    - one GPU visible (one GPU per task: ``--gpus-per-task=1``, ``--gpu-bind=single:1``, a site
      that masks each task to its own GPU): that one;
    - fewer GPUs than tasks on the node: a clear error (several ranks would share one GPU or
      ask for one that is not there).
    """
    shown = f" (CUDA_VISIBLE_DEVICES={visible_list})" if visible_list is not None else ""
    if visible < 1:
        raise UserError(f"rank {env.rank}: no GPU visible{shown}; ask the job for GPUs, or run on CPUs")
    if visible == 1:
        return 0
    if env.local_world_size <= visible:
        return env.local_rank
    raise UserError(f"rank {env.rank}: {env.local_world_size} tasks on this node but {visible} GPUs visible to each"
                    f"{shown}: start one task per GPU (--tasks-per-node = --gpus-per-node) or bind one GPU per task")


def device() -> torch.device:
    """The device this rank computes on."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, get_accelerator().current_device())


def initialized() -> bool:
    """True once a process group exists."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    """Number of data-parallel ranks (1 without a process group)."""
    return torch_dist.get_world_size() if initialized() else 1


def several_ranks() -> bool:
    """True when a process group of more than one rank exists."""
    return initialized() and torch_dist.get_world_size() > 1


def _collective_device() -> torch.device:
    return torch.device("cpu") if torch_dist.get_backend() == "gloo" else device()


def barrier() -> None:
    """Wait for every rank (no-op in a single process without a group)."""
    if initialized():
        torch_dist.barrier()


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks."""
    if not initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over ranks."""
    if not initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch_dist.all_reduce(tensor)
    return float(tensor.item()) / torch_dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank."""
    return all_reduce_max(1.0 if flag else 0.0) > 0


def raise_together(error: UserError | None) -> None:
    """Collective: when any rank passes an error, every rank raises the first one, naming its rank.

    Costs one scalar all-reduce when no rank failed. In a single process it raises ``error``.
    """
    if not several_ranks():
        if error is not None:
            raise error
        return
    if not any_rank(error is not None):
        return
    messages: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(messages, None if error is None else str(error))
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise UserError(f"rank {rank}: {message}")


@contextmanager
def failing_together() -> Iterator[None]:
    """Run a block that may fail on some ranks only; a :class:`UserError` on any rank ends it on all.

    Every rank must enter the block; the collective is at its end, so the block itself must not
    hold collectives that a failed rank would skip.
    """
    error: UserError | None = None
    try:
        yield
    except UserError as caught:
        error = caught
    raise_together(error)


def all_reduce_sum_(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks in place and return it; a no-op in a single process."""
    if several_ranks():
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


def finite_global_sum(value: torch.Tensor) -> tuple[bool, float]:
    """One scalar all-reduce: whether ``value`` is finite on every rank, and its sum over ranks.

    The sum is NaN when some rank's value is not finite.
    """
    local = value.detach().reshape(()).float()
    # The flag travels with the value, so one collective and one device sync answer both questions.
    packed = torch.stack([(~torch.isfinite(local)).float(), local])
    all_reduce_sum_(packed)
    nonfinite_ranks, total = packed.tolist()
    if nonfinite_ranks > 0:
        return False, math.nan
    return True, total


@dataclass(frozen=True)
class StepAgreement:
    """What every rank learns from the one collective of an optimizer step (the same on every rank)."""

    nonfinite_ranks: int
    """Ranks with a non-finite loss in some micro batch of the step."""
    loss_mean: float
    """The step's loss averaged over ranks and micro batches; NaN when some loss is not finite."""
    stop_ranks: int
    """Ranks that got a stop request (preemption, time limit)."""
    failed_ranks: int
    """Ranks whose micro batches failed to load."""


def agree_on_step(losses: torch.Tensor, stop_requested: bool, load_failed: bool) -> StepAgreement:
    """One all-reduce and one host synchronisation for everything a step must agree on.

    ``losses`` are this rank's micro-batch losses, still on the device: each device-to-host
    read drains the GPU's queue, so the finiteness check, the logged loss, the stop request and
    a failed load travel together in one small vector and are read back once.
    """
    local = losses.detach().float().reshape(-1)
    flags = local.new_tensor([float(stop_requested), float(load_failed)])
    packed = torch.cat([(~torch.isfinite(local)).any().float().reshape(1), local.sum().reshape(1), flags])
    all_reduce_sum_(packed)
    nonfinite, total, stop, failed = packed.tolist()
    count = world_size() * local.numel()
    return StepAgreement(nonfinite_ranks=round(nonfinite), loss_mean=math.nan if nonfinite else total / count,
                         stop_ranks=round(stop), failed_ranks=round(failed))


def gather_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's 1-D arrays concatenated in rank order, returned on every rank.

    A rank with no rows passes an empty dict; the keys come from the others.
    """
    if not several_ranks():
        return arrays
    parts: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, arrays)
    keys = next((list(p) for p in parts if p), [])
    return {key: np.concatenate([p[key] for p in parts if p]) for key in keys}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- BatchNorm statistics


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
    if not several_ranks():
        return
    world = torch_dist.get_world_size()
    for buffer in norm_statistics(module):
        moved = buffer.to(_collective_device())
        torch_dist.all_reduce(moved)
        buffer.copy_(moved / world)
