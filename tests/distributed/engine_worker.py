"""Worker for test_engine.py: DeepSpeed engines built by promoter_dist.engine against one plain process.

For every ZeRO stage (and bf16 for stages 1-3) a fresh engine trains a few steps on this rank's share
of fixed global batches, with gradient accumulation, clipping and a learning rate that changes every
step; rank 0 repeats the same steps in plain torch on the whole global batches and records the
largest parameter difference. Rank 0 writes ``{case: {"max_abs_diff": ..., "clipped_steps": ...}}``.

Usage: engine_worker.py --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.distributed as torch_dist
from torch import nn

from promoter_dist import distributed as dist
from promoter_dist.config import load_config
from promoter_dist.engine import build_engine, set_learning_rate
from promoter_dist.launch.environment import DistEnv, from_launcher

MICRO, ACCUM, FEATURES, STEPS, CLIP = 3, 2, 5, 4, 0.5
CASES = [(stage, "fp32") for stage in range(4)] + [(stage, "bf16") for stage in range(4)]


class TinyNet(nn.Module):
    """Odd-sized layers (not divisible by 2 ranks), a LayerNorm and a 1-element bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.gelu(self.norm(self.inp(x)))).squeeze(-1)


def batches(step: int, world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[rank][micro] -> (x, y), identical on every process."""
    gen = torch.Generator().manual_seed(7 + step)
    return [[(torch.randn(MICRO, FEATURES, generator=gen), torch.randn(MICRO, generator=gen) * 3)
             for _ in range(ACCUM)] for _ in range(world)]


def lr(step: int) -> float:
    return 0.05 * (1.0 - 0.2 * step)


def reference(model: nn.Module, world: int) -> tuple[nn.Module, int]:
    """The same optimisation in one process: mean loss over the whole global batch, torch clipping."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr(0), weight_decay=0.05)
    clipped = 0
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr(step)
        micro = [b for rank in batches(step, world) for b in rank]
        loss = sum(torch.nn.functional.mse_loss(model(x), y) for x, y in micro) / len(micro)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        clipped += int(norm > CLIP)
        opt.step()
    return model, clipped


def run_case(stage: int, precision: str, env: DistEnv) -> dict:
    config = load_config(None, [f"engine.zero_stage={stage}", f"engine.precision={precision}",
                                f"engine.grad_accum={ACCUM}", f"engine.gradient_clipping={CLIP}",
                                f"data.batch_size={MICRO}", "optim.weight_decay=0.05", "engine.tensorboard=false",
                                "engine.csv=false"])
    torch.manual_seed(0)
    model = TinyNet()
    start = copy.deepcopy(model)
    engine = build_engine(model, config, env.world_size)
    for step in range(STEPS):
        set_learning_rate(engine, lr(step))
        for x, y in batches(step, env.world_size)[env.rank]:
            # engine.precision=bf16 is autocast over fp32 weights, as the trainer's forward does it.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = engine(x)
            loss = torch.nn.functional.mse_loss(out.float(), y)
            engine.backward(loss)
            engine.step()
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            trained = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    else:
        trained = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    result = {}
    if env.is_main:
        expected, clipped = reference(start, env.world_size)
        diffs = [float((trained[k] - v.float()).abs().max()) for k, v in expected.state_dict().items()]
        moved = [float((v.float() - s.float()).abs().max()) for v, s in zip(expected.state_dict().values(),
                                                                             start.state_dict().values())]
        result = {"max_abs_diff": max(diffs), "min_param_change": min(moved), "clipped_steps": clipped,
                  "lr_after": engine.get_lr()[0]}
    torch_dist.barrier()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    env = from_launcher(args.local_rank)
    dist.init_distributed(env)
    results = {f"stage{stage}_{precision}": run_case(stage, precision, env) for stage, precision in CASES}
    if env.is_main:
        with open(args.out, "w") as f:
            json.dump({"world_size": env.world_size, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
