"""Memory per rank of the DeepSpeed engine by ZeRO stage, against the ZeRO paper's count.

    python benchmarks/zero_memory.py                         # NAD debug size, 2 ranks, stages 0-3
    python benchmarks/zero_memory.py --size full --bucket 1000000 --json out.json

The real ``deepspeed --num_gpus N`` launcher starts N ranks of this script in ``--worker-memory``
mode. Each rank builds the NAD model (``promoter_dist.tasks.build_task``) and a fresh engine
(``promoter_dist.engine.build_engine``) for ZeRO stages 0, 1, 2 and 3 in turn (one launch;
``deepspeed.initialize`` again in the same process group), trains a few steps, and reports,
during the last backward (when gradients are held):

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

Training-step throughput is ``benchmarks/train_step.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from promoter_dist import distributed as dist
from promoter_dist.engine import build_engine
from promoter_dist.models.common import count_parameters
from promoter_dist.tasks import build_task

from _common import (REPO, STAGES, bench_config, default_precision, default_threads, machine_report, make_batches,
                     start_process, synchronize)

MB = 1024.0**2


# --------------------------------------------------------------------------- bytes held by an engine


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


# --------------------------------------------------------------------------- worker (one rank)


def _memory_stage(stage: int, args: argparse.Namespace, world_size: int, rank: int, device: torch.device,
                  out_dir: str) -> dict[str, Any]:
    """Build the NAD engine for one stage, train ``args.memory_steps`` steps, and measure."""
    _release_freed_heap()
    dist.barrier()
    memory = _Memory(device)
    config = bench_config("nad", args.size, args.precision, stage, args.memory_batch, args.bucket, out_dir)
    task = build_task(config)
    torch.manual_seed(config.run.seed)
    model = task.build_model()
    params = count_parameters(model, trainable_only=True)
    engine = build_engine(model, config, world_size, device=device)
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
    dist.barrier()
    return record


def memory_worker(args: argparse.Namespace) -> None:
    """One rank of the memory launch: ZeRO stages in turn, figures gathered to rank 0's JSON file."""
    env, device = start_process(args.threads, args.local_rank)
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


# --------------------------------------------------------------------------- launch (parent)


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
    """The memory table per stage and rank, with the stage-0 ratios and the column notes."""
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
    """The command line; unset precision and threads get their device-dependent defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", choices=["debug", "full"], default="debug",
                        help="debug or full (published sizes): NAD's config file under configs/nad/")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="fp32 or bf16 (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 without a GPU, else torch's default; 0: torch's default)")
    parser.add_argument("--bucket", type=int, default=0,
                        help="engine.reduce_bucket_size in elements (0: the config default, 5e6)")
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
    args.precision = default_precision(args.precision)
    args.threads = default_threads(args.threads)
    if args.memory_steps < 2:
        parser.error("--memory-steps must be >= 2 (Adam's states appear at the first step)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Launch the ranks (or be one of them) and print the memory table."""
    args = parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if args.worker_memory:
        memory_worker(args)
        return
    report: dict[str, Any] = {
        "machine": machine_report(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker") and k != "local_rank"},
    }
    report["memory"] = measure_memory(args)
    print_memory(report["memory"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
