"""Training entry: ``deepspeed train.py --config configs/<run>.yaml [key.sub=value ...]``.

The same command runs under ``torchrun`` and as plain ``python train.py`` (one process, no
launcher environment needed). A SLURM task calls :func:`run_task` instead, with the stop
request its preemption handler sets (:mod:`promoter_dist.launch.jobs`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import UserError
from .stopping import StopRequest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a promoter model with DeepSpeed from shards.",
        epilog="Overrides come last, as dotted keys: optim.lr=1e-4 engine.zero_stage=3 run.out_dir=runs/x")
    parser.add_argument("--config", help="YAML file holding the differences from the defaults")
    parser.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, applied last")
    return parser.parse_args(argv)


def run_task(argv: list[str], stop: StopRequest | None = None) -> dict[str, Any]:
    """Train as one rank of a job; returns the trainer's result with ``status`` added.

    ``status`` is 0 when the run finished or stopped on request (``stopped_at_step`` then names
    the step whose checkpoint was written), 2 for a problem the user can fix (printed on
    stderr as one line).
    """
    args = parse_args(argv)
    try:
        from .config import dump_yaml, load_config

        config = load_config(args.config, args.overrides)
        if args.dump_config:
            print(dump_yaml(config), end="")
            return {"status": 0, "stopped_at_step": None}
        from . import distributed as dist
        from .launch.environment import from_launcher
        from .trainer import Trainer

        env = from_launcher(args.local_rank)
        dist.init_distributed(env, config.engine.timeout_s)
        result = Trainer(config, env, stop).train()
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")  # one write: ranks sharing a terminal do not interleave it
        sys.stderr.flush()
        return {"status": 2, "stopped_at_step": None}
    if env.is_main:
        if result["stopped_at_step"] is not None:
            print(f"stopped at step {result['steps']} on request; rerun the same command to resume", flush=True)
        else:
            best = result["best"] or {}
            metrics = " ".join(f"{k}={v:.4f}" for k, v in best.items() if isinstance(v, float))
            print(f"finished: {result['steps']} steps; best validation {metrics}", flush=True)
    return {**result, "status": 0}


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (2 for a problem the user can fix)."""
    return run_task(sys.argv[1:] if argv is None else argv)["status"]


if __name__ == "__main__":  # `deepspeed --module promoter_dist.train ...`
    sys.exit(main())
