"""Training-step throughput of the DeepSpeed engine against a plain torch loop, measured side by side.

    python benchmarks/train_step.py                          # NAD debug size: ZeRO-2 engine vs plain torch
    python benchmarks/train_step.py --model all              # + BERT regression and masked-LM (debug sizes)
    python benchmarks/train_step.py --size full --json out.json   # published sizes (slow on a CPU)

One process, no launcher (``promoter_dist.launch.environment.from_launcher`` supplies the
single-rank environment). Each model's shipped config file (``configs/nad/*.yaml``,
``configs/bert/*.yaml``; GSAM off, no GloVe file or pretrained export) gives two copies of the
same initial weights: one driven by a plain torch loop (``loss.backward()``,
``optimizer.step()``), one by a DeepSpeed engine (ZeRO-2 by default) built through
``promoter_dist.engine.build_engine``. Both use the config's torch optimizer (AdamW; Adam for the
BERT fine-tuning config) as ``promoter_dist.engine.build_optimizer`` builds it, the same random
batches of the model's input shape, the same loss (the task's ``training_loss``, as the trainer
calls it), the same learning-rate call per step and, in one process, the same torch thread count
(1 by default without a GPU). After warm-up steps of each, timed blocks of ``--steps`` steps
alternate between the two (A B, B A, A B, ...: the order flips each round so that neither always
runs second). Printed: median samples/s of each, the ratio plain/engine (target <= 1.10) both as
a ratio of medians and as the median of the per-round ratios, and the median milliseconds per
phase (forward + loss, backward, optimizer step), which shows where a gap comes from. On a CPU
every figure is also taken on the process's CPU-time clock, which leaves out the time spent
waiting for a core and is therefore much steadier on a shared machine. In bf16 both run
``torch.autocast`` over fp32 weights, as the trainer does for ``engine.precision=bf16``.

Memory per rank by ZeRO stage is ``benchmarks/zero_memory.py``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promoter_dist.engine import build_engine, build_optimizer, set_learning_rate
from promoter_dist.models.common import count_parameters
from promoter_dist.tasks import build_task

from _common import (CLOCKS, MODELS, STAGES, autocast, bench_config, default_precision, default_threads,
                     machine_report, make_batches, median, median_paired_ratio, start_process, synchronize)

PHASES = ("forward", "backward", "step")


def _now() -> tuple[float, float, int]:
    """Both clocks and the minor page faults so far (fresh pages the kernel had to map and zero)."""
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Runner:
    """One way of taking a training step, with per-phase timings of the timed steps on both clocks."""

    name: str
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    set_lr: Callable[[float], None]
    phases: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {c: {p: [] for p in PHASES} for c in (*CLOCKS, "faults")})
    rates: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})

    def run(self, batches: list[dict[str, torch.Tensor]], steps: int, device: torch.device, lr: float,
            record: bool) -> dict[str, float]:
        """``steps`` training steps; samples/s by clock, kept (with the phase times) when ``record``."""
        samples = 0
        synchronize(device)
        start = _now()
        for i in range(steps):
            batch = batches[i % len(batches)]
            self.set_lr(lr)  # the trainer sets the rate every step; both sides pay for it
            marks = [_now()]
            loss = self.forward(batch)
            synchronize(device)
            marks.append(_now())
            self.backward(loss)
            synchronize(device)
            marks.append(_now())
            self.step()
            synchronize(device)
            marks.append(_now())
            if record:
                for c, clock in enumerate((*CLOCKS, "faults")):
                    for k, phase in enumerate(PHASES):
                        self.phases[clock][phase].append(marks[k + 1][c] - marks[k][c])
            samples += len(batch["y"])
        end = _now()
        rates = {clock: samples / max(end[c] - start[c], 1e-9) for c, clock in enumerate(CLOCKS)}
        if record:
            for clock in CLOCKS:
                self.rates[clock].append(rates[clock])
        return rates


def plain_runner(model: torch.nn.Module, task: Any, config: Any, precision: str, device: torch.device) -> Runner:
    """The plain torch loop: the config's optimizer built the same way the engine's is."""
    model.to(device).train()
    optimizer = build_optimizer(model, config, device)

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, precision):
            return task.training_loss(model, batch)

    def backward(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def set_lr(lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr

    return Runner("plain torch", forward, backward, optimizer.step, set_lr)


def engine_runner(engine: Any, task: Any, stage: int, precision: str, device: torch.device) -> Runner:
    """The DeepSpeed engine as the trainer drives it (without GSAM)."""

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, precision):
            return task.training_loss(engine, batch)

    return Runner(f"ZeRO-{stage}", forward, engine.backward, engine.step, lambda lr: set_learning_rate(engine, lr))


def measure_throughput(model_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Plain torch vs the DeepSpeed engine on one model, interleaved; medians and ratios."""
    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as out_dir:
        config = bench_config(model_name, args.size, args.precision, args.stage, args.batch, args.bucket, out_dir)
        batch = config.data.batch_size
        task = build_task(config)
        torch.manual_seed(config.run.seed)
        model = task.build_model()
        params = count_parameters(model, trainable_only=True)
        plain_model = copy.deepcopy(model)  # same initial weights; the engine may cast or wrap its copy
        engine = build_engine(model, config, world_size=1, device=device)
        runners = [plain_runner(plain_model, task, config, args.precision, device),
                   engine_runner(engine, task, args.stage, args.precision, device)]
        batches = make_batches(model_name, batch, count=4, device=device)
        lr = config.optim.lr
        for runner in runners:
            runner.run(batches, args.warmup, device, lr, record=False)
        for round_index in range(args.repeats):
            order = runners if round_index % 2 == 0 else runners[::-1]
            for runner in order:
                runner.run(batches, args.steps, device, lr, record=True)
        plain, zero = runners
        result = {
            "model": model_name, "size": args.size, "precision": args.precision, "stage": args.stage, "batch": batch,
            "params": params, "threads": torch.get_num_threads(), "device": str(device),
            "steps_per_block": args.steps, "blocks": args.repeats,
        }
        for clock in CLOCKS:
            result[clock] = {
                "plain_samples_per_s": median(plain.rates[clock]), "engine_samples_per_s": median(zero.rates[clock]),
                "ratio_of_medians": median(plain.rates[clock]) / median(zero.rates[clock]),
                "median_paired_ratio": median_paired_ratio(plain.rates[clock], zero.rates[clock]),
                "plain_blocks": plain.rates[clock], "engine_blocks": zero.rates[clock],
                "phases_ms": {r.name: {k: 1e3 * median(v) for k, v in r.phases[clock].items()} for r in runners},
            }
        result["page_faults_per_step"] = {r.name: {k: median(v) for k, v in r.phases["faults"].items()}
                                          for r in runners}
        del engine, runners, model, plain_model
        gc.collect()
    return result


def print_throughput(rows: list[dict[str, Any]]) -> None:
    """The throughput table and the per-phase table."""
    if not rows:
        return
    stage, first = rows[0]["stage"], rows[0]
    # CPU time only means something for CPU work; on a GPU the kernels run asynchronously.
    clocks = CLOCKS if first["device"] == "cpu" else ("wall",)
    print(f"\nTraining step, one process, {first['threads']} torch thread(s): plain torch loop vs DeepSpeed "
          f"ZeRO-{stage} engine; medians over {first['blocks']} interleaved blocks of {first['steps_per_block']} "
          f"steps each")
    print(f"{'model':<24}{'params':>10}{'batch':>6}{'prec':>5}{'clock':>6}{'plain':>9}{'ZeRO-' + str(stage):>9}"
          f"{'plain/ZeRO':>11}{'paired':>8}  (samples/s; target ratio <= 1.10)")
    for r in rows:
        for clock in clocks:
            c = r[clock]
            verdict = "ok" if c["median_paired_ratio"] <= 1.10 else "above"
            print(f"{r['model'] + ' (' + r['size'] + ')':<24}{r['params']:>10,}{r['batch']:>6}{r['precision']:>5}"
                  f"{clock:>6}{c['plain_samples_per_s']:>9.1f}{c['engine_samples_per_s']:>9.1f}"
                  f"{c['ratio_of_medians']:>10.3f}x{c['median_paired_ratio']:>7.3f}x  {verdict}")
    if len(clocks) > 1:
        print("wall: elapsed time; cpu: CPU seconds of this process (on a shared machine the steadier of the two,\n"
              "as time spent waiting for a core is left out); paired: median over rounds of plain/ZeRO in one round")
    clock = clocks[-1]
    print(f"\nMedian ms per step by phase, {clock} clock (forward = forward + loss), and minor page faults per step:")
    print(f"{'model':<17}{'variant':<13}{'forward':>9}{'backward':>10}{'step':>8}{'total':>8}{'faults':>9}")
    for r in rows:
        for name, phases in r[clock]["phases_ms"].items():
            total = sum(phases.values())
            faults = sum(r["page_faults_per_step"][name].values())
            print(f"{r['model']:<17}{name:<13}{phases['forward']:>9.1f}{phases['backward']:>10.1f}"
                  f"{phases['step']:>8.1f}{total:>8.1f}{faults:>9,.0f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; unset precision and threads get their device-dependent defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="nad", help="model(s) timed (default: nad)")
    parser.add_argument("--size", choices=["debug", "full"], default="debug",
                        help="debug or full (published sizes): the model's config file under configs/")
    parser.add_argument("--batch", type=int, default=0, help="micro batch (0: the config file's data.batch_size)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed blocks of each variant, interleaved (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps of each variant first (default: %(default)s)")
    parser.add_argument("--stage", type=int, choices=STAGES, default=2,
                        help="ZeRO stage of the timed engine (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="fp32 or bf16 (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 without a GPU, else torch's default; 0: torch's default)")
    parser.add_argument("--bucket", type=int, default=0,
                        help="engine.reduce_bucket_size in elements (0: the config default, 5e6)")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    args = parser.parse_args(argv)
    args.precision = default_precision(args.precision)
    args.threads = default_threads(args.threads)
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Time every chosen model and print the tables (and the JSON file with ``--json``)."""
    args = parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    report: dict[str, Any] = {"machine": machine_report(), "args": vars(args)}
    _, device = start_process(args.threads)
    models = MODELS if args.model == "all" else (args.model,)
    report["throughput"] = [measure_throughput(name, args, device) for name in models]
    print_throughput(report["throughput"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
