"""Stage-aware access to the gradient a DeepSpeed engine has accumulated.

Shared by the GSAM driver and the trainer; the collectives they use are in
:mod:`promoter_dist.distributed`. Everything here works for ZeRO stages 0-3 with fp32
weights (bf16 only through autocast), data parallelism only (no tensor or pipeline parallelism), and
also in a single process where ``torch.distributed`` was never initialised.

Where the averaged gradient lives after the accumulation-boundary backward (DeepSpeed 0.19):

- stage 0: ``param.grad`` on every rank, already averaged over ranks (replicated);
- stages 1-2: each rank owns a contiguous fragment of the flattened gradient, reachable through the
  ``param._hp_mapping`` link that ``deepspeed.utils.safe_get_full_grad`` itself uses;
- stage 3: each rank owns a 1/world slice of every parameter
  (``deepspeed.utils.safe_get_local_grad``); the last rank's slice may be padding only.

Gradient resets, measured on this stack (a second accumulation window after the first, same batches,
gradient ratio second/first): stage 0 needs ``engine.zero_grad()`` (2.0 without); stages 1-2 start a
fresh window after a boundary on their own (1.0 with or without ``optimizer.zero_grad()``) but not after
a window abandoned before its boundary (1.42 at stage 2); stage 3 needs ``engine.optimizer.zero_grad()``
(``engine.zero_grad()`` leaves the partitioned fp32 gradient and gives 2.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as torch_dist

from ..distributed import all_reduce_sum_, several_ranks


def zero_engine_gradients(engine) -> None:
    """Forget the gradient accumulated so far, so the next backward starts from zero.

    Call it between backward passes that must not add up (e.g. the two GSAM passes) and after
    abandoning a step part-way (e.g. on a non-finite loss). Stage 0 keeps gradients in ``param.grad``;
    stage 3 keeps a partitioned fp32 gradient that only the ZeRO optimizer's ``zero_grad`` resets;
    stages 1-2 start afresh after a boundary but keep the sum of an unfinished window. Every rank must
    call it (no communication happens, but the states must agree).
    """
    stage = engine.zero_optimization_stage()
    if stage == 0:
        engine.zero_grad()
        return
    engine.optimizer.zero_grad()
    if stage in (1, 2):
        # A window cut short before its boundary backward (e.g. a non-finite loss) leaves the summed
        # micro-step gradients in ``all_grad_tensors``, which only the boundary clears; measured: the
        # next window's gradient was 1.42x too large without this.
        pending = getattr(engine.optimizer, "all_grad_tensors", None)
        if isinstance(pending, dict):
            for group in pending:
                pending[group] = None


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view sharing storage (never a copy: writes through it must reach the engine)."""
    if not tensor.is_contiguous():
        raise RuntimeError("expected a contiguous gradient/parameter tensor")
    return tensor.view(-1)


@dataclass
class LocalGradient:
    """This rank's share of the engine's averaged gradient, as flat views that can be written.

    ``pieces`` are disjoint across ranks and together cover the whole gradient once when
    ``partitioned`` is true; when it is false every rank holds the whole (identical) gradient.
    """

    pieces: list[torch.Tensor]
    partitioned: bool
    writeback: Callable[[], None] = field(default=lambda: None)
    """Pushes in-place edits of ``pieces`` back into the engine where they are not views."""

    def flat_copy(self, device: torch.device | None = None) -> torch.Tensor:
        """All pieces concatenated into one new fp32 vector (empty, on ``device``, when there are none)."""
        if not self.pieces:
            return torch.zeros(0, device=device)  # on the compute device: it still takes part in collectives
        return torch.cat([p.float() for p in self.pieces])

    def sizes(self) -> list[int]:
        return [p.numel() for p in self.pieces]


def managed_params(engine) -> list[torch.nn.Parameter]:
    """The trainable parameters whose gradients the engine reduces, in module order (same on every rank)."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return _stage0_params(engine)
    if stage in (1, 2):
        return _stage12_params(engine)
    return _stage3_params(engine)


def _stage0_params(engine) -> list[torch.nn.Parameter]:
    return [p for p in engine.module.parameters() if p.requires_grad]


def _stage12_params(engine) -> list[torch.nn.Parameter]:
    # Parameters the ZeRO-1/2 optimizer manages carry ``_hp_mapping`` (None when this rank owns no
    # part of them); the order is the module's, hence identical on every rank.
    return [p for p in engine.module.parameters() if p.requires_grad and hasattr(p, "_hp_mapping")]


def _stage3_params(engine) -> list[torch.nn.Parameter]:
    return [p for p in engine.module.parameters() if p.requires_grad and hasattr(p, "ds_id")]


def stage12_fragment(param: torch.nn.Parameter) -> tuple[int, torch.Tensor] | None:
    """(start within the flattened parameter, gradient fragment view) this rank owns, or None."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    fragment = _flat(mapping.get_lp_grad_fragment(param._index_in_param_group))
    if fragment.numel() != address.numel:
        # DeepSpeed's bf16 optimizer keeps the whole parameter's gradient; the owned part is a slice.
        fragment = fragment.narrow(0, address.start, address.numel)
    return address.start, fragment


def stage3_owned_numel(param: torch.nn.Parameter) -> int:
    """How many real (non-padding) elements of ``param`` this rank's ZeRO-3 partition holds."""
    partition_numel = param.ds_tensor.numel()
    partition_rank = torch_dist.get_rank(group=param.ds_process_group) if several_ranks() else 0
    return max(0, min(param.ds_numel - partition_rank * partition_numel, partition_numel))


def local_gradient(engine, params: list[torch.nn.Parameter] | None = None) -> LocalGradient:
    """This rank's share of the averaged gradient; valid between the boundary backward and step.

    ``params`` is ``managed_params(engine)``, passed to save recomputing it on every call.
    """
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    stage = engine.zero_optimization_stage()
    if params is None:
        params = managed_params(engine)
    if stage == 0:
        pieces = []
        for p in params:
            if p.grad is None:
                # An unused parameter: give it an explicit zero gradient so both passes line up.
                p.grad = torch.zeros_like(p)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            pieces.append(_flat(p.grad))
        return LocalGradient(pieces, partitioned=False)
    if stage in (1, 2):
        pieces = []
        for p in params:
            owned = stage12_fragment(p)
            if owned is not None:
                pieces.append(owned[1])
        return LocalGradient(pieces, partitioned=several_ranks())
    if stage == 3:
        partitions = [safe_get_local_grad(p) for p in params]
        # Without offload the API hands out the stored partition itself; otherwise write back.
        is_view = not params or partitions[0].data_ptr() == safe_get_local_grad(params[0]).data_ptr()
        pieces = [_flat(g).narrow(0, 0, stage3_owned_numel(p)) for p, g in zip(params, partitions)]

        def writeback() -> None:
            if not is_view:
                for p, g in zip(params, partitions):
                    safe_set_local_grad(p, g)

        return LocalGradient(pieces, partitioned=several_ranks(), writeback=writeback)
    raise ValueError(f"unknown ZeRO stage {stage}")


def global_dots(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], partitioned: bool) -> list[float]:
    """Inner products <x, y> of whole vectors from their local flat parts, with one all-reduce.

    When ``partitioned`` each rank holds a disjoint part and the partial sums are added over ranks;
    otherwise every rank already holds the whole vectors and no communication happens.
    """
    if not pairs:
        return []
    device = pairs[0][0].device
    packed = torch.stack([torch.dot(x.float(), y.float()).to(device) for x, y in pairs]).double()
    if partitioned:
        all_reduce_sum_(packed)
    return packed.tolist()
