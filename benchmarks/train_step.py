"""Training-step throughput and per-rank memory of the DeepSpeed engine, measured side by side.

    python benchmarks/train_step.py                          # NAD debug size: ZeRO-2 engine vs plain torch
    python benchmarks/train_step.py --model all              # + BERT regression and masked-LM (debug sizes)
    python benchmarks/train_step.py --memory                 # + memory per rank by ZeRO stage, 2 ranks
    python benchmarks/train_step.py --memory --no-speed      # the memory table alone
    python benchmarks/train_step.py --size full --json out.json   # published sizes (slow on a CPU)

Throughput (one process, no launcher; the environment comes from
``promoter_dist.distributed.resolve_environment``). Each model's shipped config file
(``configs/nad/*.yaml``, ``configs/bert/*.yaml``; GSAM off, no GloVe file or pretrained export)
gives two copies of the same initial weights: one driven by a plain torch loop
(``loss.backward()``, ``optimizer.step()``), one by a DeepSpeed engine (ZeRO-2 by default) built
through ``promoter_dist.engine.build_engine``. Both use the config's torch optimizer (AdamW; Adam
for the BERT fine-tuning config) as ``promoter_dist.engine.build_optimizer`` builds it, the same
random batches of the model's input shape, the same loss (the task's ``training_loss``, as the
trainer calls it), the same learning-rate call per step and, in one process, the same torch
thread count (1 by default without a GPU). After warm-up steps of each, timed blocks of
``--steps`` steps alternate between the two (A B, B A, A B, ...: the order flips each round so
that neither always runs second). Printed: median samples/s of each, the ratio plain/engine
(target <= 1.10) both as a ratio of medians and as the median of the per-round ratios, and the
median milliseconds per phase (forward + loss, backward, optimizer step), which shows where a gap
comes from. On a CPU every figure is also taken on the process's CPU-time clock, which leaves out
the time spent waiting for a core and is therefore much steadier on a shared machine. In bf16 both
run ``torch.autocast`` over fp32 weights, as the trainer does for ``engine.precision=bf16``.

Memory (``--memory``). The real ``deepspeed --num_gpus N`` launcher starts N ranks of this script
in ``--worker-memory`` mode. Each rank builds the NAD model and a fresh engine for ZeRO stages 0, 1,
2 and 3 in turn (one launch; ``deepspeed.initialize`` again in the same process group), trains a few
steps, and reports, during the last backward (when gradients are held):

* the bytes of the model states this rank holds, by kind: parameters (the module's weights, or its
  ``ds_tensor`` partitions under ZeRO-3), gradients, the fp32 master copy, optimizer states
  (Adam's two moments), each storage counted once;
* work buffers: other tensors the engine holds (ZeRO's gradient-reduction buckets);
* the resident-set growth over the stage: its peak while the model and engine are built, its peak
  over the training steps (Linux ``VmHWM``, reset in between through ``/proc/self/clear_refs``)
  and what is still resident after the last step. The ranks run with a fixed glibc mmap
  threshold, so freed tensors leave the resident set, and a first discarded round takes the
  process's one-time costs;
* on a GPU, the same three figures from ``torch.cuda.max_memory_allocated`` / ``memory_allocated``.

Expected model-state bytes for P trainable parameters on N ranks, from the ZeRO paper
(Rajbhandari et al. 2020; mixed precision: 2 + 2 + 12 bytes per parameter, K = 12 for the fp32
master copy and Adam's moments) or its fp32 analogue (4 + 4 + 8: weights, gradients, moments)::

    stage   mixed precision        fp32
    0       16 P                   16 P
    1       4 P + 12 P / N         8 P + 8 P / N
    2       2 P + 14 P / N         4 P + 12 P / N
    3       16 P / N               16 P / N

In fp32 DeepSpeed's ZeRO optimizers (stages 1-3) still keep a separate fp32 master partition
besides the fp32 weights, 4 P / N more than the fp32 column (ZeRO-3 means to alias the two, but its
check compares a torch.device with a device-name string, which never matches); the table shows both.
Gradients are counted twice: when autograd has produced all of them (just before DeepSpeed's
end-of-backward reduction, where ZeRO-1 still holds full gradients) and after ``engine.backward``
returns (ZeRO-1 has then dropped all but its partition).
On a CPU the reduction buckets are ``torch.empty`` allocations whose untouched pages never become
resident, so they show under work buffers but hardly in the RSS growth.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = ("nad", "bert-regression", "bert-mlm")
STAGES = (0, 1, 2, 3)
MB = 1024.0**2

#: Config file of each model and size, under configs/ (the runs the toolkit ships).
CONFIG_FILES = {
    ("nad", "debug"): "nad/debug.yaml", ("nad", "full"): "nad/full.yaml",
    ("bert-regression", "debug"): "bert/finetune_debug.yaml", ("bert-regression", "full"): "bert/finetune.yaml",
    ("bert-mlm", "debug"): "bert/pretrain_debug.yaml", ("bert-mlm", "full"): "bert/pretrain.yaml",
}
NAD_WORDS, NAD_VOCAB = 80, 1024
BERT_TOKENS = 128  # a nominal 110-bp row in its 380-bp context: 126 3-mers + [CLS] + [SEP]


# --------------------------------------------------------------------------- config, model, batches


def bench_config(model: str, size: str, precision: str, stage: int, batch: int, bucket: int, out_dir: str) -> Any:
    """The run config of one benchmark case: the shipped config file with the benchmark's overrides.

    ``batch`` 0 keeps the file's ``data.batch_size``. Models start from random weights (no GloVe
    file, no pretrained export), GSAM is off and the monitors write nothing.
    """
    from promoter_dist.config import load_config

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


def build_task(config: Any) -> Any:
    """The task object the trainer would use for ``config``."""
    if config.task.name == "mlm":
        from promoter_dist.tasks.mlm import MLMTask

        return MLMTask(config)
    from promoter_dist.tasks.regression import RegressionTask

    return RegressionTask(config)


def make_batches(model: str, batch: int, count: int, device: torch.device,
                 seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` random but valid batches of the model's input, labels uniform in 0..17."""
    from promoter_dist.data.kmer_tokenizer import CLS_ID, SEP_ID, SPECIAL_TOKENS, VOCAB_SIZE

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.rand(batch, generator=gen) * 17
        if model == "nad":
            item = {"words": torch.randint(0, NAD_VOCAB, (batch, NAD_WORDS), generator=gen), "y": y}
        else:
            ids = torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (batch, BERT_TOKENS), generator=gen)
            ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
            item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "y": y}
        # Labels stay on the CPU: the regression task draws its label noise on the CPU and moves the
        # target to the predictions' device itself (a CUDA label would meet CPU noise and fail).
        out.append({k: v if k == "y" else v.to(device) for k, v in item.items()})
    return out


def compute_device() -> torch.device:
    from promoter_dist import distributed as dist

    return dist.device()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int) -> None:
    """Torch's intra-op thread count (0: leave it)."""
    if threads:
        torch.set_num_threads(threads)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every initialize at INFO; the tables are the output here."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


# --------------------------------------------------------------------------- throughput


CLOCKS = ("wall", "cpu")  # perf_counter; process_time (CPU seconds of every thread of this process)
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
    from promoter_dist.engine import build_optimizer

    model.to(device).train()
    optimizer = build_optimizer(model, config)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast():
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
    from promoter_dist.engine import set_learning_rate

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return task.training_loss(engine, batch)

    return Runner(f"ZeRO-{stage}", forward, engine.backward, engine.step, lambda lr: set_learning_rate(engine, lr))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure_throughput(model_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Plain torch vs the DeepSpeed engine on one model, interleaved; medians and ratios."""
    from promoter_dist.engine import build_engine

    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as out_dir:
        config = bench_config(model_name, args.size, args.precision, args.stage, args.batch, args.bucket, out_dir)
        batch = config.data.batch_size
        task = build_task(config)
        torch.manual_seed(config.run.seed)
        model = task.build_model()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        plain_model = copy.deepcopy(model)  # same initial weights; the engine may cast or wrap its copy
        engine = build_engine(model, config, world_size=1)
        runners = [plain_runner(plain_model, task, config, args.precision, device),
                   engine_runner(engine, task, args.stage, args.precision, device)]
        batches = make_batches(model_name, batch, count=4, device=device)
        lr = config.optim.lr
        for runner in runners:
            runner.run(batches, args.warmup, device, lr, record=False)
        paired: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
        for round_index in range(args.repeats):
            order = runners if round_index % 2 == 0 else runners[::-1]
            rates = {runner.name: runner.run(batches, args.steps, device, lr, record=True) for runner in order}
            for clock in CLOCKS:
                paired[clock].append(rates[runners[0].name][clock] / rates[runners[1].name][clock])
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
                "median_paired_ratio": median(paired[clock]),
                "plain_blocks": plain.rates[clock], "engine_blocks": zero.rates[clock],
                "phases_ms": {r.name: {k: 1e3 * median(v) for k, v in r.phases[clock].items()} for r in runners},
            }
        result["page_faults_per_step"] = {r.name: {k: median(v) for k, v in r.phases["faults"].items()}
                                          for r in runners}
        del engine, runners, model, plain_model
        gc.collect()
    return result


def print_throughput(rows: list[dict[str, Any]]) -> None:
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
    cast = [r["model"] for r in rows if r.get("buffers_cast")]
    if cast:
        print(f"{', '.join(cast)}: floating buffers cast to bf16 for DeepSpeed's bf16 mode (it casts parameters only)")
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


# --------------------------------------------------------------------------- memory worker (one rank)


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` size field (VmRSS, VmHWM) in bytes; 0 where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS, so the next stage's growth is not hidden by reuse."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _storage_key(tensor: torch.Tensor) -> tuple[int, str] | None:
    storage = tensor.untyped_storage()
    return (storage.data_ptr(), str(tensor.device)) if storage.nbytes() else None


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage a tensor uses (a non-contiguous view: the whole storage)."""
    if not tensor.is_contiguous():
        return 0, tensor.untyped_storage().nbytes()
    start = tensor.storage_offset() * tensor.element_size()
    return start, start + tensor.numel() * tensor.element_size()


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _walk_tensors(root: Any, max_depth: int = 8) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``root`` through DeepSpeed / torch.optim objects and containers."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > max_depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
            if obj.is_leaf and obj.grad is not None:
                stack.append((obj.grad, depth + 1))
            if hasattr(obj, "ds_tensor"):
                stack.append((obj.ds_tensor, depth + 1))
            continue
        if isinstance(obj, dict):
            children: Any = [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set)):
            children = obj
        elif type(obj).__module__.startswith(("deepspeed.", "torch.optim")) and hasattr(obj, "__dict__"):
            children = vars(obj).values()
        else:
            continue
        stack.extend((child, depth + 1) for child in children)


def _innermost_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO keeps the client AdamW inside)."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _tensors(value: Any) -> list[torch.Tensor]:
    """Tensors in a tensor, or a (nested) list / dict of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def model_state_bytes(engine: Any) -> dict[str, int]:
    """Bytes of the tensors this rank holds, by kind.

    A tensor counts the bytes of its storage it uses, and each storage belongs to the first kind
    that uses it, so a flat ZeRO buffer and its per-parameter views are counted once. What the
    engine holds beyond that (the unused rest of a reduction bucket, other tensors reachable from
    the engine) is ``buffers``.
    """
    zero = engine.optimizer
    module_params = list(engine.module.parameters())
    params = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module_params]
    master = [t for name in ("single_partition_of_fp32_groups",  # ZeRO-1/2
                             "fp32_partitioned_groups_flat",  # ZeRO-3
                             "fp32_groups_flat_partition",  # BF16_Optimizer
                             "fp32_groups")  # FP16_UnfusedOptimizer: stage 0, bf16, client optimizer
              for t in _tensors(getattr(zero, name, None))]
    optim_state = _tensors(dict(_innermost_optimizer(engine).state))
    grads = [p.grad for p in module_params if p.grad is not None] + [t.grad for t in master if t.grad is not None]
    for name in ("grads_in_partition", "averaged_gradients", "grad_partitions_flat_buffer",
                 "fp32_groups_gradients_flat", "fp32_groups_gradient_flat_partition"):
        grads += _tensors(getattr(zero, name, None))
    kinds = {"params": params, "master": master, "optimizer": optim_state, "grads": grads}
    owner: dict[tuple[int, str], str] = {}
    spans: dict[tuple[int, str], list[tuple[int, int]]] = {}
    storage_bytes: dict[tuple[int, str], int] = {}
    for kind, tensors in kinds.items():
        for tensor in tensors:
            key = _storage_key(tensor)
            if key is None or owner.setdefault(key, kind) != kind:
                continue
            spans.setdefault(key, []).append(_byte_span(tensor))
            storage_bytes[key] = tensor.untyped_storage().nbytes()
    out = dict.fromkeys(kinds, 0)
    for key, kind in owner.items():
        out[kind] += _union_length(spans[key])
    for tensor in _walk_tensors(engine):
        key = _storage_key(tensor)
        if key is not None:
            storage_bytes.setdefault(key, tensor.untyped_storage().nbytes())
    out["buffers"] = sum(size - _union_length(spans.get(key, [])) for key, size in storage_bytes.items())
    out["model_states"] = sum(out[kind] for kind in kinds)
    return out


class _Memory:
    """Resident and (on a GPU) allocated bytes relative to a baseline, with resettable peaks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.can_reset = _reset_peak_rss()
        self.rss_base = _status_bytes("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.cuda_base = torch.cuda.memory_allocated(device)

    def peaks(self, prefix: str) -> dict[str, int | None]:
        """Peaks since the last reset, under ``prefix``; then reset them."""
        synchronize(self.device)
        out: dict[str, int | None] = {
            f"rss_{prefix}_peak": _status_bytes("VmHWM") - self.rss_base if self.can_reset else None}
        if self.device.type == "cuda":
            out[f"cuda_{prefix}_peak"] = torch.cuda.max_memory_allocated(self.device) - self.cuda_base
            torch.cuda.reset_peak_memory_stats(self.device)
        _reset_peak_rss()
        return out

    def held(self) -> dict[str, int]:
        out = {"rss_held": _status_bytes("VmRSS") - self.rss_base}
        if self.device.type == "cuda":
            out["cuda_held"] = torch.cuda.memory_allocated(self.device) - self.cuda_base
        return out


def _memory_stage(stage: int, args: argparse.Namespace, world_size: int, rank: int, device: torch.device,
                  out_dir: str) -> dict[str, Any]:
    """Build the NAD engine for one stage, train ``args.memory_steps`` steps, and measure."""
    from promoter_dist.engine import build_engine

    _release_freed_heap()
    torch.distributed.barrier()
    memory = _Memory(device)
    config = bench_config("nad", args.size, args.precision, stage, args.memory_batch, args.bucket, out_dir)
    task = build_task(config)
    torch.manual_seed(config.run.seed)
    model = task.build_model()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = build_engine(model, config, world_size)
    record: dict[str, Any] = {"stage": stage, "rank": rank, "params": params,
                              "bucket": config.engine.reduce_bucket_size, **memory.peaks("setup")}
    batches = make_batches("nad", args.memory_batch, count=2, device=device, seed=11 + rank)
    snapshots: dict[str, dict[str, int]] = {}
    epilogue = engine._backward_epilogue
    last_step = [False]

    def snapshot_then_epilogue() -> None:
        # Every gradient of the micro batch exists here; the epilogue then reduces them, and ZeRO-1
        # keeps only this rank's partition: a measurement after backward would miss them.
        if last_step[0]:
            snapshots["autograd_end"] = model_state_bytes(engine)
        epilogue()

    engine._backward_epilogue = snapshot_then_epilogue
    for step in range(args.memory_steps):
        last_step[0] = step == args.memory_steps - 1  # optimizer states exist after the first step
        loss = task.training_loss(engine, batches[step % len(batches)])
        engine.backward(loss)
        if last_step[0]:
            snapshots["after_backward"] = model_state_bytes(engine)
        engine.step()
    engine._backward_epilogue = epilogue
    record.update(memory.peaks("train"))
    record.update(memory.held())
    record["snapshots"] = snapshots
    record["bytes"] = max(snapshots.values(), key=lambda b: b["model_states"])
    del engine, model, task, batches, loss
    torch.distributed.barrier()
    return record


def memory_worker(args: argparse.Namespace) -> None:
    """One rank of the memory launch: ZeRO stages in turn, figures gathered to rank 0's JSON file."""
    from promoter_dist import distributed as dist

    env = dist.resolve_environment(args.local_rank)
    dist.init_distributed(env)
    set_threads(args.threads)
    quiet_deepspeed()
    device = compute_device()
    with tempfile.TemporaryDirectory(prefix="train-step-mem-") as out_dir:
        # A discarded first round over every stage: the first engine of each kind in a process pays
        # one-time costs (measured: ~130 MB for the first engine, ~45 MB more for the first ZeRO
        # optimizer) that would otherwise land on whichever stage is measured first.
        for stage in args.stages:
            _memory_stage(stage, args, env.world_size, env.rank, device, out_dir)
        results = [_memory_stage(stage, args, env.world_size, env.rank, device, out_dir) for stage in args.stages]
    gathered: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, results)
    if env.is_main:
        payload = {"world_size": env.world_size, "device": str(device), "precision": args.precision,
                   "size": args.size, "batch": args.memory_batch, "steps": args.memory_steps,
                   "maxrss_bytes_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "records": [r for rank in gathered for r in rank]}
        Path(args.worker_out).write_text(json.dumps(payload, indent=1))


# --------------------------------------------------------------------------- memory launch (parent)


def expected_bytes(stage: int, params: int, ranks: int, precision: str) -> dict[str, float]:
    """Model-state bytes per rank: the ZeRO paper's count and DeepSpeed's layout (see the module docstring)."""
    p, n = float(params), float(ranks)
    if precision == "fp32":
        paper = {0: 16 * p, 1: 8 * p + 8 * p / n, 2: 4 * p + 12 * p / n, 3: 16 * p / n}[stage]
        extra_master = 4 * p / n if stage else 0.0  # ZeRO keeps an fp32 master partition even in fp32
        return {"paper": paper, "deepspeed": paper + extra_master}
    paper = {0: 16 * p, 1: 4 * p + 12 * p / n, 2: 2 * p + 14 * p / n, 3: 16 * p / n}[stage]
    return {"paper": paper, "deepspeed": paper}


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Start the worker under the deepspeed launcher and read back every rank's figures."""
    sys.path.insert(0, str(REPO))  # the launcher helper lives with the multi-process tests
    from tests.distributed.launch import run_deepspeed

    ranks = args.ranks
    if torch.cuda.is_available() and torch.cuda.device_count() < ranks:
        ranks = torch.cuda.device_count()  # one rank per GPU; ZeRO partitions over what there is
        print(f"memory: {ranks} GPU(s) visible, running {ranks} rank(s)")
    with tempfile.TemporaryDirectory(prefix="train-step-launch-") as tmp:
        out = Path(tmp) / "memory.json"
        worker_args = ["--worker-memory", "--worker-out", str(out), "--size", args.size, "--precision", args.precision,
                       "--memory-batch", str(args.memory_batch), "--memory-steps", str(args.memory_steps),
                       "--threads", str(args.threads),
                       "--bucket", str(args.bucket), "--stages", *map(str, args.stages)]
        started = time.perf_counter()
        # A fixed mmap threshold stops glibc from raising it after each large free, so large tensors
        # are always mapped and unmapped: resident memory then follows the live tensors.
        env = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        run_deepspeed(Path(__file__).resolve(), worker_args, nprocs=ranks, timeout=args.memory_timeout,
                      env=env, cwd=REPO)
        payload = json.loads(out.read_text())
    payload["launch_seconds"] = time.perf_counter() - started
    for record in payload["records"]:
        record["expected"] = expected_bytes(record["stage"], record["params"], payload["world_size"],
                                            payload["precision"])
    return payload


def _mb(value: int | None, width: int) -> str:
    return f"{value / MB:>{width}.1f}" if value is not None else f"{'n/a':>{width}}"


def print_memory(payload: dict[str, Any]) -> None:
    records = sorted(payload["records"], key=lambda r: (r["stage"], r["rank"]))
    n, params = payload["world_size"], records[0]["params"]
    cuda = any("cuda_train_peak" in r for r in records)
    print(f"\nMemory per rank by ZeRO stage: NAD ({payload['size']}, {params:,} trainable parameters), "
          f"{n} ranks on {payload['device']}, {payload['precision']}, micro batch {payload['batch']} "
          f"(MB = 2^20 bytes; launch {payload['launch_seconds']:.0f} s)")
    print(f"{'':10}{'model states held by the rank':^48}{'expected':^17}{'':8}{'':9}"
          f"{'resident growth' if not cuda else 'CUDA allocated growth':^24}")
    print(f"{'stage':>5}{'rank':>5}{'params':>8}{'grads':>8}{'kept':>7}{'master':>8}{'optim':>8}{'total':>9}"
          f"{'DS':>9}{'paper':>8}{'B/param':>8}{'buffers':>9}{'set-up':>8}{'train':>8}{'held':>8}")
    for r in records:
        b, e = r["bytes"], r["expected"]
        kept = r["snapshots"].get("after_backward", b)["grads"]
        kind = "cuda" if cuda else "rss"
        print(f"{r['stage']:>5}{r['rank']:>5}{b['params'] / MB:>8.2f}{b['grads'] / MB:>8.2f}{kept / MB:>7.2f}"
              f"{b['master'] / MB:>8.2f}{b['optimizer'] / MB:>8.2f}{b['model_states'] / MB:>9.2f}"
              f"{e['deepspeed'] / MB:>9.2f}{e['paper'] / MB:>8.2f}{b['model_states'] / params:>8.2f}"
              f"{b['buffers'] / MB:>9.1f}{_mb(r[f'{kind}_setup_peak'], 8)}{_mb(r[f'{kind}_train_peak'], 8)}"
              f"{_mb(r[f'{kind}_held'], 8)}")
    by_stage = {s: [r for r in records if r["stage"] == s] for s in sorted({r["stage"] for r in records})}
    if 0 in by_stage:
        base = max(r["bytes"]["model_states"] for r in by_stage[0])
        parts = [f"ZeRO-{s} {base / max(r['bytes']['model_states'] for r in rs):.2f}x"
                 for s, rs in by_stage.items() if s]
        print("model states per rank, stage 0 / stage s: " + ", ".join(parts))
    print("grads: when autograd has produced all of them (before DeepSpeed's end-of-backward reduction); kept: after\n"
          "engine.backward returns. total = params + grads + master + optim at the larger of the two moments.\n"
          "DS: the paper's count plus the fp32 master partition DeepSpeed keeps in fp32 (stages 1-3).\n"
          "buffers: reserved reduction buckets and other engine tensors (on a CPU mostly untouched pages).\n"
          "set-up / train: peak growth while building the model and engine / over the training steps;\n"
          "held: growth still there after the last step, with the engine alive.")
    bucket = records[0].get("bucket", 0)
    if bucket >= params:
        print(f"note: engine.reduce_bucket_size ({bucket:,} elements) >= the parameter count, so ZeRO-2/3 reduce "
              f"every gradient only at the end of\nbackward and each rank briefly holds all of them, as under "
              f"ZeRO-1; --bucket with a smaller size shows the partitioned peak.")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput comparison")
    parser.add_argument("--memory", action="store_true", help="also measure memory per rank by ZeRO stage")
    parser.add_argument("--ranks", type=int, default=2,
                        help="ranks of the memory launch, deepspeed --num_gpus (default: %(default)s)")
    parser.add_argument("--stages", type=int, nargs="+", choices=STAGES, default=list(STAGES),
                        help="stages of the memory run (default: all)")
    parser.add_argument("--memory-batch", type=int, default=16,
                        help="micro batch of the memory run (default: %(default)s)")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps per stage in the memory run, >= 2 (default: %(default)s)")
    parser.add_argument("--memory-timeout", type=float, default=600,
                        help="seconds before the memory launch is killed (default: %(default)s)")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    parser.add_argument("--worker-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the launcher
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if args.threads is None:
        # On a shared CPU, multi-threaded kernels slow down many times over once the cores are
        # oversubscribed (measured 5-15x on 2 busy cores), which swamps the comparison.
        args.threads = 0 if torch.cuda.is_available() else 1
    if args.memory_steps < 2:
        parser.error("--memory-steps must be >= 2 (Adam's states appear at the first step)")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if args.worker_memory:
        memory_worker(args)
        return

    from promoter_dist import distributed as dist

    import deepspeed

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker") and k != "local_rank"},
    }
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}, GPU: {report['machine']['gpu'] or 'none'}")
    if not args.no_speed:
        # One process, no launcher: resolve_environment sets the single-rank variables DeepSpeed needs.
        dist.init_distributed(dist.resolve_environment())
        set_threads(args.threads)  # after init_distributed, which picks a count of its own on a CPU
        quiet_deepspeed()
        device = compute_device()
        models = MODELS if args.model == "all" else (args.model,)
        report["throughput"] = [measure_throughput(name, args, device) for name in models]
        print_throughput(report["throughput"])
    if args.memory:
        report["memory"] = measure_memory(args)
        print_memory(report["memory"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
