"""bf16 through the DeepSpeed engine is bf16, on the code path DeepSpeed takes on a GPU.

``engine.forward`` turns autocast off around the module when autocast is on outside the engine and
its config has no ``torch_autocast`` section; it asks ``torch.is_autocast_enabled()``, which reports
CUDA's autocast state, so a CPU run never takes that branch. The tests switch CUDA's autocast flag on
(which torch allows without a GPU) so DeepSpeed's wrapper disables autocast as it would on a GPU, and
look at the dtype of the activations inside the model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from promoter_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def gpu_like_outer_autocast():
    """CUDA's autocast flag on, as a caller's ``torch.autocast("cuda")`` sets it on a GPU."""
    before = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", before)


def tiny_engine(precision: str, stage: int):
    from promoter_dist.engine import build_engine
    from promoter_dist.tasks import build_task

    config = load_config(REPO / "configs" / "nad" / "debug.yaml", [
        "data.glove=", "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2",
        "model.nad.head_dim=8", f"engine.precision={precision}", f"engine.zero_stage={stage}",
        "engine.tensorboard=false", "engine.csv=false", "data.batch_size=4"])
    torch.manual_seed(0)
    model = build_task(config).build_model()
    return build_engine(model, config, world_size=1, device=torch.device("cpu"))


def activation_dtypes(engine, outer=contextlib.nullcontext) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in engine.module.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
    try:
        words = torch.randint(0, 1024, (4, 80))
        with outer():
            engine(words)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_compute_survives_the_engine_turning_autocast_off(lone_process_group, stage):
    engine = tiny_engine("bf16", stage)
    assert activation_dtypes(engine) == {torch.bfloat16}
    with gpu_like_outer_autocast():
        assert activation_dtypes(engine) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())  # weights stay fp32


def test_the_check_sees_the_gpu_path(lone_process_group):
    """Control: autocast around engine(...), as the trainer once did, computes in fp32 on that path."""
    engine = tiny_engine("fp32", 0)

    @contextlib.contextmanager
    def outer():
        with gpu_like_outer_autocast(), torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    assert activation_dtypes(engine, outer) == {torch.float32}
    assert activation_dtypes(engine, lambda: torch.autocast("cpu", dtype=torch.bfloat16)) == {torch.bfloat16}


def test_fp32_stays_fp32(lone_process_group):
    assert activation_dtypes(tiny_engine("fp32", 2)) == {torch.float32}
