"""Step cost of GSAM against the plain optimizer under DeepSpeed, measured side by side.

Two engines on the same NAD model (same initial weights, AdamW as a client optimizer, the same ZeRO
stage, gradient clipping on): one trained with ordinary DeepSpeed steps, one through DeepSpeedGSAM.
Their steps are interleaved (plain, GSAM, GSAM, plain, ...) so that machine-load drift hits both alike.
GSAM does two forward/backward passes per optimizer step, so the ideal ratio of step times is about 2.0
(slightly less, as the optimizer step itself is not repeated); the target is <= 2.1.

Runs in one process without the launcher (sets RANK/WORLD_SIZE/... itself when absent). Example::

    python benchmarks/gsam_step.py --batch 64 --repeats 10 --stage 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def single_process_env() -> None:
    """The variables deepspeed.init_distributed needs, for a run without a launcher."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def nad_debug_model() -> torch.nn.Module:
    from promoter_dist.models.nad import NADConfig, NADModel

    torch.manual_seed(0)
    return NADModel(NADConfig(channels=(32, 48, 64, 80, 96), fpn_dim=64, heads=4, depths=(1, 1, 1, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="samples per micro-batch")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation micro-batches per step")
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()

    single_process_env()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import deepspeed

    from promoter_dist.optim import DeepSpeedGSAM, GSAMConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")

    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": args.accumulation,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": args.stage},
    }
    lr = 2e-4
    plain_model = nad_debug_model()
    gsam_model = copy.deepcopy(plain_model)
    plain, *_ = deepspeed.initialize(
        model=plain_model, optimizer=torch.optim.AdamW(plain_model.parameters(), lr=lr, weight_decay=0.05), config=config
    )
    engine, *_ = deepspeed.initialize(
        model=gsam_model, optimizer=torch.optim.AdamW(gsam_model.parameters(), lr=lr, weight_decay=0.05), config=config
    )
    gsam = DeepSpeedGSAM(engine, GSAMConfig(enabled=True), lr_max=lr, lr_min=lr * 0.01)

    gen = torch.Generator().manual_seed(1)
    micro_batches = [
        (torch.randint(0, 1024, (args.batch, 80), generator=gen), torch.rand(args.batch, generator=gen))
        for _ in range(args.accumulation)
    ]

    def loss_of(model_engine, batch):
        words, label = batch
        prediction = model_engine(words)  # (B, levels): every head is trained on the same label
        return F.smooth_l1_loss(prediction, label[:, None].expand_as(prediction), beta=0.1)

    def plain_step() -> None:
        for batch in micro_batches:
            plain.backward(loss_of(plain, batch))
            plain.step()

    # Time the engine's own work inside GSAM steps (forward, backward, optimizer step) so that what is
    # left is the driver's overhead: copies, perturbation, inner products, RNG and BatchNorm snapshots.
    engine_seconds = [0.0]

    def timed(function):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                engine_seconds[0] += time.perf_counter() - started

        return wrapper

    engine.backward = timed(engine.backward)
    engine.step = timed(engine.step)
    timed_loss = timed(lambda batch: loss_of(engine, batch))
    overheads: list[float] = []

    def gsam_step() -> None:
        engine_seconds[0] = 0.0
        started = time.perf_counter()
        gsam.step(micro_batches, timed_loss)
        overheads.append(time.perf_counter() - started - engine_seconds[0])

    times = {"plain": [], "gsam": []}
    steps = {"plain": plain_step, "gsam": gsam_step}
    for repeat in range(args.warmup + args.repeats):
        order = ("plain", "gsam") if repeat % 2 == 0 else ("gsam", "plain")
        for kind in order:
            started = time.perf_counter()
            steps[kind]()
            elapsed = time.perf_counter() - started
            if repeat >= args.warmup:
                times[kind].append(elapsed)

    samples = args.batch * args.accumulation
    figures = {
        "model": "NAD debug (channels 32-96, fpn 64, 4 heads, depths 1,1,1,1)",
        "parameters": sum(p.numel() for p in plain_model.parameters()),
        "zero_stage": args.stage,
        "samples_per_step": samples,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    for kind, values in times.items():
        figures[f"{kind}_median_s"] = statistics.median(values)
        figures[f"{kind}_samples_per_s"] = samples / statistics.median(values)
    figures["gsam_driver_overhead_median_s"] = statistics.median(overheads[args.warmup :])
    figures["ratio_median"] = figures["gsam_median_s"] / figures["plain_median_s"]
    # Paired ratios (each GSAM step against the plain step next to it) are less sensitive to drift.
    figures["ratio_paired_median"] = statistics.median(g / p for g, p in zip(times["gsam"], times["plain"]))

    print(
        f"plain: {figures['plain_samples_per_s']:.1f} samples/s ({figures['plain_median_s'] * 1e3:.1f} ms/step)   "
        f"gsam: {figures['gsam_samples_per_s']:.1f} samples/s ({figures['gsam_median_s'] * 1e3:.1f} ms/step)   "
        f"ratio {figures['ratio_median']:.3f} (paired {figures['ratio_paired_median']:.3f}; ideal 2.0, target <= 2.1)   "
        f"driver overhead {figures['gsam_driver_overhead_median_s'] * 1e3:.1f} ms/step"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
