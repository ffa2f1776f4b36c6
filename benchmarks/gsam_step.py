"""Step cost of GSAM against the plain optimizer under DeepSpeed, measured side by side.

Two engines on the same model, built from the shipped config exactly as ``train_step.py`` builds
them (``_common.bench_config``, ``promoter_dist.engine.build_engine``; ``configs/nad/debug.yaml`` by
default: NAD's debug model, its batch, AdamW, the chosen ZeRO stage, gradient clipping on): one takes
ordinary DeepSpeed steps, the other is driven by ``promoter_dist.optim.gsam_deepspeed.DeepSpeedGSAM``
with NAD's settings (rho 0.1, alpha 0.05). Both compute the loss with the task's ``training_loss``, as
the trainer does. Blocks of steps alternate (plain, GSAM, GSAM, plain, ...) so that a change in
machine load hits both alike.

GSAM takes two forward/backward passes per optimizer step, so the ideal ratio of step times is about
2.0 (a little less: the optimizer step itself is not repeated); the target is <= 2.1. The script also
times the engine's own work inside the GSAM steps (forward, backward, optimizer step): the rest is the
driver's overhead (gradient copies, perturbation, inner products, RNG and BatchNorm snapshots).

One process, no launcher (``promoter_dist.launch.environment.from_launcher`` sets it up). Printed on
both clocks (``wall``: elapsed; ``cpu``: this process's CPU time, much steadier on a shared machine):
samples/s of each, the ratio of medians and the median of per-round paired ratios. Example::

    python benchmarks/gsam_step.py                       # NAD debug, ZeRO-2, the config's batch (128)
    python benchmarks/gsam_step.py --stage 3 --accumulation 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from promoter_dist.engine import build_engine, set_learning_rate
from promoter_dist.models.common import count_parameters
from promoter_dist.optim.gsam import GSAMConfig
from promoter_dist.optim.gsam_deepspeed import DeepSpeedGSAM
from promoter_dist.tasks import build_task

from _common import (CLOCKS, autocast, bench_config, default_precision, default_threads, make_batches, median,
                     median_paired_ratio, read_clocks, start_process, synchronize)


def main(argv: list[str] | None = None) -> int:
    """Time plain and GSAM steps in alternating blocks and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nad", choices=["nad", "bert-regression", "bert-mlm"],
                        help="model and its config file (default: nad)")
    parser.add_argument("--size", default="debug", choices=["debug", "full"], help="config size (default: debug)")
    parser.add_argument("--batch", type=int, default=0, help="samples per micro batch (0: the config's)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro batches per optimizer step (default: 1)")
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage (default: 2)")
    parser.add_argument("--precision", default="", choices=["", "fp32", "bf16"],
                        help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed block (default: 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed blocks of each kind (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (default: 2)")
    parser.add_argument("--threads", type=int, default=-1,
                        help="torch CPU threads (default: 1 without a GPU, see benchmarks/README.md; 0: leave)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)

    precision = default_precision(args.precision)
    _, device = start_process(default_threads(args.threads if args.threads >= 0 else None))

    with tempfile.TemporaryDirectory(prefix="gsam-bench-") as out_dir:
        config = bench_config(args.model, args.size, precision, args.stage, args.batch, 0, out_dir)
        config.engine.gradient_clipping = 1.0  # clipping on, as in NAD's recipe runs
        config.engine.grad_accum = args.accumulation
        task = build_task(config)
        torch.manual_seed(config.run.seed)
        model = task.build_model()
        params = count_parameters(model, trainable_only=True)
        plain = build_engine(copy.deepcopy(model), config, world_size=1, device=device)
        engine = build_engine(model, config, world_size=1, device=device)
    lr = config.optim.lr
    gsam = DeepSpeedGSAM(engine, GSAMConfig(enabled=True), lr_max=lr, lr_min=lr * config.schedule.final_factor)
    micro_batches = make_batches(args.model, config.data.batch_size, args.accumulation, device)

    def loss_of(model_engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, precision):
            return task.training_loss(model_engine, batch)

    def plain_step() -> None:
        set_learning_rate(plain, lr)
        for batch in micro_batches:
            plain.backward(loss_of(plain, batch))
            plain.step()

    # The engine's own work inside the GSAM steps, so that the rest is the driver's overhead.
    engine_seconds = [0.0]

    def timed(function: Callable) -> Callable:
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                engine_seconds[0] += time.perf_counter() - started

        return wrapper

    engine.backward, engine.step = timed(engine.backward), timed(engine.step)
    timed_loss = timed(lambda batch: loss_of(engine, batch))
    overheads: list[float] = []

    def gsam_step() -> None:
        set_learning_rate(engine, lr)
        engine_seconds[0] = 0.0
        started = time.perf_counter()
        gsam.step(micro_batches, timed_loss)
        overheads.append(time.perf_counter() - started - engine_seconds[0])

    steps = {"plain": plain_step, "gsam": gsam_step}

    def block(kind: str, count: int) -> tuple[float, float]:
        """Seconds of ``count`` steps of one kind on each clock."""
        synchronize(device)
        start = read_clocks()
        for _ in range(count):
            steps[kind]()
        synchronize(device)
        end = read_clocks()
        return end[0] - start[0], end[1] - start[1]

    for kind in steps:
        block(kind, args.warmup)
    overheads.clear()
    seconds: dict[str, dict[str, list[float]]] = {k: {c: [] for c in CLOCKS} for k in steps}
    for repeat in range(args.repeats):
        for kind in (("plain", "gsam") if repeat % 2 == 0 else ("gsam", "plain")):
            for clock, value in zip(CLOCKS, block(kind, args.steps)):
                seconds[kind][clock].append(value / args.steps)

    samples = config.data.batch_size * args.accumulation
    figures: dict[str, Any] = {
        "model": args.model, "size": args.size, "parameters": params, "zero_stage": args.stage,
        "precision": precision, "device": str(device), "samples_per_step": samples,
        "accumulation": args.accumulation, "threads": torch.get_num_threads(), "steps_per_block": args.steps,
        "blocks": args.repeats, "gsam_driver_overhead_ms": 1e3 * median(overheads),
    }
    print(f"{args.model} {args.size} ({params:,} parameters), ZeRO-{args.stage}, {precision}, {samples} samples "
          f"per step, {torch.get_num_threads()} thread(s), {args.repeats} blocks of {args.steps} steps each")
    print(f"{'clock':<6}{'plain samples/s':>17}{'GSAM samples/s':>16}{'GSAM / plain step time':>24}{'paired':>9}")
    for clock in CLOCKS:
        plain_s, gsam_s = median(seconds["plain"][clock]), median(seconds["gsam"][clock])
        paired = median_paired_ratio(seconds["gsam"][clock], seconds["plain"][clock])
        figures[clock] = {"plain_samples_per_s": samples / plain_s, "gsam_samples_per_s": samples / gsam_s,
                          "ratio_of_medians": gsam_s / plain_s, "median_paired_ratio": paired,
                          "plain_step_s": seconds["plain"][clock], "gsam_step_s": seconds["gsam"][clock]}
        print(f"{clock:<6}{samples / plain_s:>17.1f}{samples / gsam_s:>16.1f}{gsam_s / plain_s:>23.3f}x"
              f"{paired:>8.3f}x")
    print(f"ideal 2.0x, target <= 2.1x; GSAM driver overhead (outside the engine's forward, backward and step) "
          f"{figures['gsam_driver_overhead_ms']:.1f} ms per step (wall)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
