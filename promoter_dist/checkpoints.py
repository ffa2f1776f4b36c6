"""Reading a run's checkpoints without DeepSpeed engines: pointers, trainer state, fp32 weights.

Layout of ``<run>/checkpoints/`` (written by the trainer)::

    latest                 text: tag of the newest periodic checkpoint (moved only after every rank wrote)
    best                   text: tag of the best validation checkpoint
    step00001200/          DeepSpeed tag folder: model states, ZeRO optimizer partitions,
                           trainer-rank<r>.pt (loader position and RNG state of rank r)
    best-step00001100/     the same, for the best checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError


def checkpoint_tag(run_dir: str | os.PathLike, which: str = "best") -> str:
    """The tag ``which`` ('best', 'latest' or a tag name) points to in a run folder."""
    ckpt = Path(run_dir) / "checkpoints"
    if (ckpt / which).is_dir():
        return which
    pointer = ckpt / which
    if not pointer.is_file():
        known = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []
        raise UserError(f"{pointer}: no such checkpoint pointer or tag (found: {', '.join(known) or 'nothing'})")
    return pointer.read_text().strip()


def fp32_state_dict(run_dir: str | os.PathLike, which: str = "best") -> dict[str, torch.Tensor]:
    """Plain fp32 weights of a checkpoint, for any ZeRO stage: loads with ``model.load_state_dict``."""
    ckpt = Path(run_dir) / "checkpoints"
    tag = checkpoint_tag(run_dir, which)
    folder = ckpt / tag
    if (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists() or list(folder.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
        except (ValueError, KeyError, FileNotFoundError):
            state = None  # ZeRO-0 checkpoints hold optimizer files too but no partitioned weights
        if state is not None:
            return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model_file = folder / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        raise UserError(f"{folder}: not a DeepSpeed checkpoint (no model states file)")
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def export_fp32(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "best") -> Path:
    """Write a checkpoint's fp32 weights as one ``torch.save`` file (atomically)."""
    from .io import atomic_open

    state = fp32_state_dict(run_dir, which)
    out = Path(out)
    with atomic_open(out, "wb") as f:
        torch.save(state, f)
    return out
