"""Worker for test_legnet.py: LegNet on 2 DeepSpeed ranks, one launch for every case.

1. Engines: for ZeRO stages 0-3 (AdamW, fp32 and bf16) and stages 1 and 3 with Lion, a tiny LegNet
   trains a few steps of the soft-classification task on this rank's share of fixed global batches
   (gradient accumulation, clipping, both orientations of every row); rank 0 repeats the same
   steps in one plain-torch process, feeding each rank's micro batch separately (BatchNorm
   normalises per rank's batch, as on the ranks) and averaging, and records the largest weight
   difference.
2. Trainer: ``Trainer`` runs of the tiny LegNet on the shards given, ZeRO-3 with GSAM, gradient
   accumulation and the one-cycle schedule with cycled beta1: one run straight to
   ``--steps``, and one run stopped at half way then resumed from its checkpoint in the same
   folder. The test compares their logged losses and validation records.

Usage: legnet_worker.py --shards DIR --work DIR --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as torch_dist

from promoter_dist import distributed as dist
from promoter_dist.config import load_config
from promoter_dist.engine import build_engine, set_learning_rate
from promoter_dist.launch.environment import DistEnv, from_launcher
from promoter_dist.tasks import build_task

MICRO, ACCUM, STEPS, CLIP = 4, 2, 3, 1.0
TINY = ["model.name=legnet", "task.name=soft_classification", "model.legnet.stem_channels=16",
        "model.legnet.block_channels=[16,8]", "model.legnet.expand_ratio=2", "data.onehot_window=40"]
CASES = ([(stage, "fp32", "adamw") for stage in range(4)] + [(stage, "bf16", "adamw") for stage in range(4)]
         + [(1, "fp32", "lion"), (3, "fp32", "lion")])


def batches(step: int, world: int) -> list[list[dict[str, torch.Tensor]]]:
    """[rank][micro] -> a batch of window codes (N included), singleton flags and values; the same on every process."""
    gen = torch.Generator().manual_seed(11 + step)
    out = []
    for _ in range(world):
        micro = []
        for _ in range(ACCUM):
            y = torch.randint(0, 18, (MICRO,), generator=gen).float() + (torch.rand(MICRO, generator=gen) > 0.5) * 0.37
            micro.append({"window": torch.randint(0, 5, (MICRO, 40), generator=gen, dtype=torch.uint8),
                          "singleton": (y == y.round()).to(torch.uint8), "y": y})
        out.append(micro)
    return out


def lr(step: int, optimizer: str) -> float:
    peak = 0.02 if optimizer == "adamw" else 0.002
    return peak * (1.0 - 0.2 * step)


def reference(model: torch.nn.Module, config, world: int) -> torch.nn.Module:
    """The same steps in one process: the mean of every rank's micro-batch losses, torch clipping."""
    model = copy.deepcopy(model)
    task = build_task(config)
    if config.optim.name == "lion":
        from lion_pytorch import Lion

        opt = Lion(model.parameters(), lr=lr(0, "lion"), weight_decay=0.05, betas=tuple(config.optim.betas))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr(0, "adamw"), weight_decay=0.05)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr(step, config.optim.name)
        micro = [b for rank in batches(step, world) for b in rank]
        opt.zero_grad()
        for b in micro:  # one forward per rank's micro batch: BatchNorm statistics of that batch
            (task.training_loss(model, b) / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return model


def gathered_state(engine, stage: int) -> dict[str, torch.Tensor]:
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def run_engine_case(stage: int, precision: str, optimizer: str, env: DistEnv) -> dict:
    config = load_config(None, [*TINY, f"engine.zero_stage={stage}", f"engine.precision={precision}",
                                f"engine.grad_accum={ACCUM}", f"engine.gradient_clipping={CLIP}",
                                f"data.batch_size={MICRO}", f"optim.name={optimizer}", "optim.weight_decay=0.05",
                                "engine.tensorboard=false", "engine.csv=false"])
    task = build_task(config)
    torch.manual_seed(0)
    model = task.build_model()
    start = copy.deepcopy(model)
    engine = build_engine(model, config, env.world_size)
    for step in range(STEPS):
        set_learning_rate(engine, lr(step, optimizer))
        for b in batches(step, env.world_size)[env.rank]:
            loss = task.training_loss(engine, b)
            engine.backward(loss)
            engine.step()
    trained = gathered_state(engine, stage)
    result = {}
    if env.is_main:
        expected = dict(reference(start, config, env.world_size).named_parameters())
        initial = dict(start.named_parameters())
        # Parameters only: each rank keeps BatchNorm running statistics of its own batches.
        result = {
            "max_abs_diff": max(float((trained[k] - v.detach()).abs().max()) for k, v in expected.items()),
            "median_param_change": float(torch.tensor([float((v.detach() - initial[k].detach()).abs().max())
                                                       for k, v in expected.items()]).median()),
            "parameters": len(expected),
            # bf16: Adam moves an element by about the rate whatever its gradient's size, so a tiny gradient whose
            # sign bf16 flips moves it the other way; the change as a whole is what must agree.
            "relative_diff": float(torch.cat([(trained[k] - v.detach()).reshape(-1) for k, v in expected.items()]).norm()
                                   / torch.cat([(v.detach() - initial[k].detach()).reshape(-1)
                                                for k, v in expected.items()]).norm()),
        }
    torch_dist.barrier()
    return result


def trainer_overrides(shards: str, out: Path, steps: int) -> list[str]:
    return [*TINY, f"run.out_dir={out}", f"data.shards={shards}", "data.batch_size=8", "data.eval_batch_size=64",
            "engine.zero_stage=3", "engine.grad_accum=2", "optim.gsam.enabled=true", "schedule.name=one_cycle",
            "schedule.decay_steps=8", "optim.lr=0.01", "run.log_every=1", "run.checkpoint_every=4",
            "run.eval_every=4", f"run.max_steps={steps}", "run.plots=false", "engine.tensorboard=false",
            "engine.csv=false", "run.seed=5"]


def run_trainer(shards: str, out: Path, steps: int, env: DistEnv) -> dict:
    from promoter_dist.trainer import Trainer

    config = load_config(None, trainer_overrides(shards, out, steps))
    result = Trainer(config, env).train()
    return {"steps": result["steps"], "best": result["best"], "last": result["last"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    env = from_launcher(args.local_rank)
    dist.init_distributed(env)
    cases = {f"stage{stage}_{precision}_{optimizer}": run_engine_case(stage, precision, optimizer, env)
             for stage, precision, optimizer in CASES}
    work = Path(args.work)
    straight = run_trainer(args.shards, work / "straight", 8, env)
    first_half = run_trainer(args.shards, work / "resumed", 4, env)
    second_half = run_trainer(args.shards, work / "resumed", 8, env)  # the same folder: resumes from step 4
    if env.is_main:
        with open(args.out, "w") as f:
            json.dump({"world_size": env.world_size, "cases": cases, "straight": straight,
                       "first_half": first_half, "second_half": second_half}, f, indent=1)


if __name__ == "__main__":
    main()
