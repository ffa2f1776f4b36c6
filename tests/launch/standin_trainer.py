"""TEST FIXTURE, not product code: a stand-in for ``promoter_dist.train:run_task``.

It behaves like the trainer as far as launching is concerned: ``main(argv, stop)`` with
``argv = ["--config", PATH, "key=value", ...]`` and the task's stop request (or None),
reads RANK/WORLD_SIZE/... from the environment, writes under ``run.out_dir``, saves a
checkpoint every ``run.checkpoint_every`` steps on every rank and resumes from
``<run.out_dir>/checkpoints/latest`` when it exists. Its "training" is a step counter and a
deterministic running value, so an interrupted and resumed run can be compared with an
uninterrupted one. It returns ``{"status": 0, "stopped_at_step": step}``, the step None
unless it stopped early on request.

Overrides it understands (all optional but ``run.out_dir``):

    run.out_dir=DIR                  where everything goes
    run.checkpoint_every=N     checkpoint period (default 1)
    standin.steps=N                  total steps (default 20)
    standin.step_seconds=S           sleep per step (default 0)
    standin.collective=1             all_reduce the ranks over gloo (checks MASTER_ADDR/PORT)
    standin.fail_at=N                raise at step N on rank 0 (a failing job)
    standin.exit_at=N                os._exit(3) at step N on rank 0 (dies without a result)
    standin.honour_stop=0            ignore stop requests (default 1: like the trainer, checkpoint
                                     and return after the step during which one arrived)
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from promoter_dist.stopping import StopRequest

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES", "SLURM_RESTART_COUNT", "SLURM_JOB_ID", "SLURMD_NODENAME")


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def parse(argv: list[str]) -> dict[str, str]:
    """The config file's keys (dotted) with the ``key=value`` overrides applied."""
    import yaml

    assert argv[0] == "--config", argv
    with open(argv[1]) as handle:
        config = _flatten(yaml.safe_load(handle) or {})
    return config | dict(item.split("=", 1) for item in argv[2:])


def advance(value: int, step: int) -> int:
    """One "training step" of the running value."""
    return (value * 31 + step + 7) % 1_000_003


def expected(steps: int) -> int:
    value = 0
    for step in range(steps):
        value = advance(value, step)
    return value


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(argv: list[str], stop: StopRequest | None) -> dict[str, Any]:
    """Count ``standin.steps`` steps with checkpoints, resuming from the latest; stop early when ``stop`` is set."""
    o = parse(argv)
    out = Path(o["run.out_dir"])
    every = int(o.get("run.checkpoint_every", 1))
    steps = int(o.get("standin.steps", 20))
    sleep = float(o.get("standin.step_seconds", 0))
    fail_at = int(o.get("standin.fail_at", -1))
    exit_at = int(o.get("standin.exit_at", -1))
    honour_stop = o.get("standin.honour_stop", "1") == "1"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    env = {key: os.environ.get(key) for key in ENV_KEYS} | {"hostname": socket.gethostname(), "pid": os.getpid()}
    if o.get("standin.collective") == "1":
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
        total = torch.tensor([rank + 1])
        dist.all_reduce(total)
        env["all_reduce_sum"] = int(total.item())
        dist.destroy_process_group()
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    _write_json(out / "env" / f"rank{rank}-restart{restart}.json", env)

    ckpt = out / "checkpoints" / "latest" / f"rank{rank}.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "value": 0}
    start = state["step"]
    progress = out / f"progress-rank{rank}.log"
    with open(progress, "a") as log:
        log.write(f"start {start} restart {restart}\n")
    step, value = start, state["value"]
    while step < steps:
        if rank == 0 and step == fail_at:
            raise RuntimeError(f"stand-in trainer: planned failure at step {step}")
        if rank == 0 and step == exit_at:
            print(f"stand-in trainer: dying at step {step}", flush=True)
            os._exit(3)
        time.sleep(sleep)
        value = advance(value, step)
        step += 1
        if step % every == 0 or step == steps:
            _write_json(ckpt, {"step": step, "value": value})
        with open(progress, "a") as log:
            log.write(f"step {step}\n")
        if honour_stop and stop is not None and stop.requested and step < steps:
            _write_json(ckpt, {"step": step, "value": value})
            print(f"stand-in trainer: rank {rank} stopped on request at step {step}", flush=True)
            return {"status": 0, "stopped_at_step": step}
    _write_json(out / f"final-rank{rank}.json", {"step": step, "value": value, "resumed_from": start})
    print(f"stand-in trainer: rank {rank} done at step {step}", flush=True)
    return {"status": 0, "stopped_at_step": None}
