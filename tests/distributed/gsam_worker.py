"""Worker for test_gsam_deepspeed.py: DeepSpeedGSAM against ReferenceGSAM, many cases in one launch.

Run by ``tests/distributed/launch.run_deepspeed`` (or alone in one process with RANK etc. set). Every
case builds a fresh engine (``deepspeed.initialize`` can be called again in the same process group),
trains a few steps on this rank's share of fixed global batches, and compares with a reference run in
the same process on the whole global batches. Rank 0 writes ``{case: measurements}`` as JSON.

Usage: gsam_worker.py --out results.json [--cases name,name] [--steps N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

MICRO_BATCH = 4
ACCUMULATION = 2
FEATURES = 6
CLIP = 10.0  # binds on some steps and not on others (the test checks both happen)
LR = 1e-2
LR_END = 0.4  # LambdaLR factor after STEPS steps: rho moves between rho_min and rho_max
STEPS = 4


@dataclass(frozen=True)
class Case:
    name: str
    stage: int
    bf16: bool = False
    rho_max: float = 0.1
    rho_min: float = 0.03
    alpha: float = 0.05
    adaptive: bool = False
    against: str = "reference"  # or "plain": DeepSpeed's own AdamW loop
    model_autocast: bool = False  # bf16 as the trainer runs it: autocast inside the model's forward, an fp32 engine


CASES = [Case(f"gsam_stage{s}", s) for s in range(4)]
CASES += [Case("gsam_adaptive_stage3", 3, adaptive=True, rho_max=0.5, rho_min=0.2)]
CASES += [Case(f"rho0_stage{s}", s, rho_max=0.0, rho_min=0.0, against="plain") for s in (0, 1, 2, 3)]
CASES += [Case(f"sam_stage{s}", s, alpha=0.0) for s in range(4)]
CASES += [Case(f"bf16_stage{s}", s, bf16=True) for s in range(4)]
CASES += [Case(f"bf16_trainer_autocast_stage{s}", s, bf16=True, model_autocast=True) for s in range(4)]


class TinyNet(nn.Module):
    """Input BatchNorm, odd-sized layers, dropout, a second BatchNorm and a 1-element output bias."""

    def __init__(self):
        super().__init__()
        self.input_norm = nn.BatchNorm1d(FEATURES)
        self.hidden = nn.Linear(FEATURES, 7)  # 42 + 7 elements: odd bias, not divisible by 2 ranks
        self.dropout = nn.Dropout(0.25)
        # 35 elements; no bias: before BatchNorm its gradient is rounding noise, which Adam blows up.
        self.middle = nn.Linear(7, 5, bias=False)
        self.norm = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 1)  # bias of size 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.hidden(self.input_norm(x))))
        return self.out(torch.nn.functional.elu(self.norm(self.middle(h)))).squeeze(-1)


def make_model() -> TinyNet:
    torch.manual_seed(1234)
    return TinyNet()


def global_batches(step: int, world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[rank][micro] -> (x, y), the same on every process."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(world):
        micros = []
        for _ in range(ACCUMULATION):
            x = torch.randn(MICRO_BATCH, FEATURES, generator=gen) * 2 + 0.5
            y = x[:, 0] - 0.5 * x[:, 1] ** 2 + 0.1 * torch.randn(MICRO_BATCH, generator=gen)
            micros.append((x, y))
        out.append(micros)
    return out


def dropout_seed(step: int, rank: int) -> int:
    return 7_000 + 31 * step + rank


def make_loss_fn(forward, bf16: bool):
    def loss_fn(batch):
        x, y, seed = batch
        if seed is not None:  # the reference stands in for rank `seed`'s RNG stream at its first micro-batch
            torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            prediction = forward(x)
        return torch.nn.functional.mse_loss(prediction.float(), y)

    return loss_fn


def lr_lambda(step: int) -> float:
    return 1.0 - (1.0 - LR_END) * step / STEPS


def ds_config(case: Case, world: int) -> dict:
    cfg = {
        "train_batch_size": MICRO_BATCH * ACCUMULATION * world,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": case.stage},
    }
    if case.stage == 3:
        # Some parameters stay gathered between steps ("persistent", <= 20 elements), others do not.
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 20
    if case.bf16 and not case.model_autocast:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


def full_params(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    context = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else nullcontext()
    with context:
        return [p.detach().clone() for p in params]


def run_case(case: Case, steps: int) -> dict:
    import deepspeed

    from promoter_dist.optim.gsam import GSAMConfig, ReferenceGSAM
    from promoter_dist.optim.gsam_deepspeed import DeepSpeedGSAM

    world, rank = dist.get_world_size(), dist.get_rank()
    config = GSAMConfig(
        enabled=True, rho_max=case.rho_max, rho_min=case.rho_min, alpha=case.alpha, adaptive=case.adaptive
    )
    lr_min = LR * LR_END

    model = make_model()
    ref_model = copy.deepcopy(model)
    if case.model_autocast:
        from promoter_dist.engine import autocast_forward

        autocast_forward(model, "cpu")  # what build_engine does for engine.precision=bf16
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    started = time.perf_counter()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(case, world)
    )
    init_seconds = time.perf_counter() - started
    # DeepSpeed's torch_autocast casts inside the engine; the trainer's model autocasts its own forward.
    ds_loss = make_loss_fn(engine, False)

    if case.against == "reference":
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=LR, weight_decay=0.05)
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lr_lambda)
        reference = ReferenceGSAM(ref_model, ref_opt, config, LR, lr_min, gradient_clipping=CLIP)
        ref_loss = make_loss_fn(ref_model, case.bf16)
        # The same run without the perturbation, to show how far apart "wrong" results would be.
        base_model = copy.deepcopy(ref_model)
        base_opt = torch.optim.AdamW(base_model.parameters(), lr=LR, weight_decay=0.05)
        base_sched = torch.optim.lr_scheduler.LambdaLR(base_opt, lr_lambda)
        no_rho = GSAMConfig(enabled=True, rho_max=0.0, rho_min=0.0, alpha=case.alpha)
        baseline = ReferenceGSAM(base_model, base_opt, no_rho, LR, lr_min, gradient_clipping=CLIP)
        base_loss = make_loss_fn(base_model, case.bf16)
    gsam = DeepSpeedGSAM(engine, config, LR, lr_min)

    # The input BatchNorm's running statistics depend on the inputs only: predict this rank's.
    input_norm = copy.deepcopy(ref_model.input_norm)

    losses, ref_losses, norms, rhos = [], [], [], []
    started = time.perf_counter()
    for step in range(steps):
        batches = global_batches(step, world)
        mine = [(x, y, None) for x, y in batches[rank]]
        torch.manual_seed(dropout_seed(step, rank))
        losses.append(float(gsam.step(mine, ds_loss)))
        rhos.append(gsam.last_rho)
        with torch.no_grad():
            for x, _ in batches[rank]:
                input_norm(x)
        if case.against == "reference":
            everything = [
                (x, y, dropout_seed(step, r) if m == 0 else None)
                for r in range(world)
                for m, (x, y) in enumerate(batches[r])
            ]
            ref_losses.append(float(reference.step(everything, ref_loss)))
            norms.append(reference.last_direction_norm)
            ref_sched.step()
            baseline.step(everything, base_loss)
            base_sched.step()
    step_seconds = (time.perf_counter() - started) / steps

    if case.against == "plain":
        plain_model = copy.deepcopy(ref_model)
        plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=LR, weight_decay=0.05)
        plain_sched = torch.optim.lr_scheduler.LambdaLR(plain_opt, lr_lambda)
        plain, *_ = deepspeed.initialize(
            model=plain_model, optimizer=plain_opt, lr_scheduler=plain_sched, config=ds_config(case, world)
        )
        plain_loss = make_loss_fn(plain, False)
        for step in range(steps):
            torch.manual_seed(dropout_seed(step, rank))
            for x, y in global_batches(step, world)[rank]:
                loss = plain_loss((x, y, None))
                plain.backward(loss)
                plain.step()
        expected = full_params(plain)
    else:
        expected = [p.detach().clone() for p in ref_model.parameters()]

    got = full_params(engine)
    param_diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    scale = max(float(b.abs().max()) for b in expected)
    if case.against == "reference":
        unperturbed = max(float((a.detach() - b).abs().max()) for a, b in zip(base_model.parameters(), expected))
    else:
        unperturbed = float("nan")
    norm = engine.module.input_norm
    bn_diff = torch.tensor(
        max(
            float((norm.running_mean - input_norm.running_mean).abs().max()),
            float((norm.running_var - input_norm.running_var).abs().max()),
        )
    )
    batches_tracked_ok = torch.tensor(float(int(norm.num_batches_tracked) == steps * ACCUMULATION))
    dist.all_reduce(bn_diff, op=dist.ReduceOp.MAX)
    dist.all_reduce(batches_tracked_ok, op=dist.ReduceOp.MIN)
    loss_diff = max((abs(a - b) for a, b in zip(losses, ref_losses)), default=0.0)
    return {
        "param_max_abs_diff": param_diff,
        "param_max_abs": scale,
        "reference_vs_unperturbed_max_abs_diff": unperturbed,
        "bn_running_stats_max_abs_diff": float(bn_diff),
        "num_batches_tracked_ok": bool(batches_tracked_ok),
        "loss_max_abs_diff": loss_diff,
        "losses": losses,
        "rhos": rhos,
        "direction_norms": norms,
        "clipped_steps": sum(n > CLIP for n in norms),
        "init_seconds": round(init_seconds, 3),
        "step_seconds": round(step_seconds, 4),
    }


def run_checks() -> dict:
    """Error paths: unsupported config, a NaN loss on one rank in either pass, state_dict round trip."""
    import deepspeed

    from promoter_dist.errors import NonFiniteLossError, UserError
    from promoter_dist.optim.gsam import GSAMConfig, ReferenceGSAM
    from promoter_dist.optim.gsam_deepspeed import DeepSpeedGSAM

    world, rank = dist.get_world_size(), dist.get_rank()
    config = GSAMConfig(enabled=True)
    out = {}

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    bf16_cfg = ds_config(Case("bf16_weights", 2), world) | {"bf16": {"enabled": True}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=bf16_cfg)
    try:
        DeepSpeedGSAM(engine, config, LR, LR)
        out["bf16_weights_refused"] = ""
    except UserError as error:
        out["bf16_weights_refused"] = str(error)

    for stage in range(4):
        # Non-finite loss on the last rank only: in pass 1 after one backward (an abandoned
        # accumulation window), or at the first micro-batch of the perturbed pass.
        for bad_call in (1, ACCUMULATION, "grad"):
            model = make_model()
            ref_model = copy.deepcopy(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config(Case("nan", stage), world)
            )
            gsam = DeepSpeedGSAM(engine, config, LR, LR)
            before = full_params(engine)
            calls = []

            def bad_loss(batch, engine=engine, bad_call=bad_call):
                prediction = engine(batch[0])
                loss = torch.nn.functional.mse_loss(prediction, batch[1])
                calls.append(1)
                if rank == world - 1 and bad_call == "grad" and len(calls) == 1:
                    # A finite loss (+0) whose gradient is NaN: d sqrt(|x|)/dx at 0.
                    return loss + torch.sqrt((prediction - prediction.detach()).abs().sum())
                if rank == world - 1 and len(calls) - 1 == bad_call:
                    return loss * float("nan")
                return loss

            batches = global_batches(0, world)
            mine = [(x, y, None) for x, y in batches[rank]]
            key = f"nan_stage{stage}_call{bad_call}"
            result = {"raised": False}
            try:
                gsam.step(mine, bad_loss)
            except NonFiniteLossError as error:
                after = full_params(engine)
                result = {
                    "raised": True,
                    "error_type": type(error).__name__,
                    "step": error.step,
                    "loss_is_nan": error.loss != error.loss,
                    "message": str(error),
                    "weights_unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                    "engine_steps_unchanged": engine.global_steps == 0,
                }
            raised = torch.tensor(float(result["raised"]))
            dist.all_reduce(raised, op=dist.ReduceOp.MIN)
            result["raised_on_all_ranks"] = bool(raised)
            # The next step must not see leftovers of the failed one: compare with one reference step.
            torch.manual_seed(dropout_seed(0, rank))
            gsam.step(mine, make_loss_fn(engine, False))
            ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=LR)
            reference = ReferenceGSAM(ref_model, ref_opt, config, LR, LR, gradient_clipping=CLIP)
            everything = [
                (x, y, dropout_seed(0, r) if m == 0 else None) for r in range(world) for m, (x, y) in enumerate(batches[r])
            ]
            reference.step(everything, make_loss_fn(ref_model, False))
            got = full_params(engine)
            result["next_step_max_abs_diff"] = max(
                float((a - b.detach()).abs().max()) for a, b in zip(got, ref_model.parameters())
            )
            out[key] = result

    gsam.load_state_dict({"steps": 41, "last_rho": 0.07})
    out["state_dict_round_trip"] = gsam.state_dict() == {"steps": 41, "last_rho": 0.07}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = parser.parse_args()

    import deepspeed

    from promoter_dist.distributed import skip_shared_memory_op

    skip_shared_memory_op()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)  # two ranks share two cores
    wanted = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    results = {}
    for case in wanted:
        results[case.name] = run_case(case, args.steps)
        if dist.get_rank() == 0:
            print(f"{case.name}: {results[case.name]}", flush=True)
    checks = run_checks() if not args.cases or "checks" in args.cases.split(",") else {}
    if dist.get_rank() == 0:
        print(f"checks: {checks}", flush=True)
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "cases": results, "checks": checks}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # Interpreter teardown with many engines' worker threads alive occasionally aborted a rank
    # ("terminate called without an active exception", 1 run in ~5) after all work was done and
    # written; leave without that teardown so the exit status reflects the work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
