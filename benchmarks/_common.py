"""What the training-step benchmarks share: the benchmark config, random batches, clocks and start-up.

The scripts here (``train_step.py``, ``zero_memory.py``, ``gsam_step.py``) build their models,
tasks and engines with the package's own functions; this module only adds what a benchmark needs
on top: the overrides that turn a shipped config into a benchmark case, batches of the model's
input shape, the two clocks, paired ratios and the one-process start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from promoter_dist.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
MODELS = ("nad", "bert-regression", "bert-mlm")
STAGES = (0, 1, 2, 3)

#: Config file of each model and size, under configs/ (the runs the toolkit ships).
CONFIG_FILES = {
    ("nad", "debug"): "nad/debug.yaml", ("nad", "full"): "nad/full.yaml",
    ("bert-regression", "debug"): "bert/finetune_debug.yaml", ("bert-regression", "full"): "bert/finetune.yaml",
    ("bert-mlm", "debug"): "bert/pretrain_debug.yaml", ("bert-mlm", "full"): "bert/pretrain.yaml",
}
BERT_TOKENS = 128  # a nominal 110-bp row in its 380-bp context: 126 3-mers + [CLS] + [SEP]

CLOCKS = ("wall", "cpu")  # perf_counter; process_time (CPU seconds of every thread of this process)


# --------------------------------------------------------------------------- config and batches


def bench_config(model: str, size: str, precision: str, stage: int, batch: int, bucket: int,
                 out_dir: str) -> TrainConfig:
    """The run config of one benchmark case: the shipped config file with the benchmark's overrides.

    ``batch`` 0 keeps the file's ``data.batch_size``; ``bucket`` 0 keeps its
    ``engine.reduce_bucket_size``. Models start from random weights (no GloVe file, no pretrained
    export), GSAM is off and the monitors write nothing.
    """
    overrides = [
        f"engine.zero_stage={stage}",
        f"engine.precision={precision}",
        "engine.gradient_clipping=0",  # explicit: DeepSpeed's own default would clip at 1.0
        "engine.tensorboard=false",
        "engine.csv=false",
        "optim.gsam.enabled=false",  # full.yaml turns GSAM on; this measures the plain engine step
        f"run.out_dir={out_dir}",
        "data.glove=",
    ]
    if batch:
        overrides.append(f"data.batch_size={batch}")
    if bucket:
        overrides.append(f"engine.reduce_bucket_size={bucket}")
    if model != "nad":
        overrides.append("model.bert.pretrained=")
    return load_config(REPO / "configs" / CONFIG_FILES[(model, size)], overrides)


def make_batches(model: str, batch: int, count: int, device: torch.device,
                 seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` random but valid batches of the model's input, labels uniform in 0..17."""
    from promoter_dist.data.kmer_tokenizer import CLS_ID, SEP_ID, SPECIAL_TOKENS, VOCAB_SIZE
    from promoter_dist.data.nad_words import NUM_WORDS, WORDS_PER_ROW

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.rand(batch, generator=gen) * 17
        if model == "nad":
            item = {"words": torch.randint(0, NUM_WORDS, (batch, WORDS_PER_ROW), generator=gen), "y": y}
        else:
            ids = torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (batch, BERT_TOKENS), generator=gen)
            ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
            item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "y": y}
        # Labels stay on the CPU: the regression task draws its label noise on the CPU and moves the
        # target to the predictions' device itself (a CUDA label would meet CPU noise and fail).
        out.append({k: v if k == "y" else v.to(device) for k, v in item.items()})
    return out


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 compute over fp32 weights for ``precision`` bf16, as the trainer runs ``engine.precision=bf16``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- process set-up


def default_precision(precision: str | None) -> str:
    """``precision``, or bf16 on a GPU and fp32 on a CPU when it is unset."""
    return precision or ("bf16" if torch.cuda.is_available() else "fp32")


def default_threads(threads: int | None) -> int:
    """``threads``, or when unset 1 without a GPU and 0 (torch's default) with one.

    On a shared CPU, multi-threaded kernels slow down many times over once the cores are
    oversubscribed (measured 5-15x on 2 busy cores), which swamps any comparison.
    """
    if threads is not None:
        return threads
    return 0 if torch.cuda.is_available() else 1


def set_threads(threads: int) -> None:
    """Torch's intra-op thread count (0: leave it)."""
    if threads:
        torch.set_num_threads(threads)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every initialize at INFO; the tables are the output here."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def start_process(threads: int, local_rank: int | None = None) -> tuple[Any, torch.device]:
    """Join the launcher's process group (or start a one-process one); returns the rank's place and device.

    ``threads`` is applied after ``init_distributed``, which picks a count of its own on a CPU.
    """
    from promoter_dist import distributed as dist
    from promoter_dist.launch.environment import from_launcher

    env = from_launcher(local_rank)
    dist.init_distributed(env)
    set_threads(threads)
    quiet_deepspeed()
    return env, dist.device()


def machine_report() -> dict[str, Any]:
    """CPU count and library versions, printed as the first line of a benchmark's output."""
    import deepspeed

    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
               "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"machine: {machine['cpus']} CPUs, torch {machine['torch']}, "
          f"deepspeed {machine['deepspeed']}, GPU: {machine['gpu'] or 'none'}")
    return machine


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a clock read after it covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_clocks() -> tuple[float, float]:
    """Both clocks of ``CLOCKS`` now: elapsed and this process's CPU seconds."""
    return time.perf_counter(), time.process_time()


def median(values: list[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def median_paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of one variant's figure over the other's in the same round.

    Both runs of a round see the same machine load, so on a shared machine this is the steadier
    figure than the ratio of the two medians.
    """
    return median([a / b for a, b in zip(numerators, denominators)])
