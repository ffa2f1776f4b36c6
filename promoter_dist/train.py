"""Training entry: ``deepspeed train.py --config configs/<run>.yaml [key.sub=value ...]``.

The same command runs under ``torchrun``, inside a SLURM job (promoter_dist.launch) and
as plain ``python train.py`` (one process, no launcher environment needed).
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


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


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (2 for a problem the user can fix)."""
    args = parse_args(argv)
    try:
        from .config import dump_yaml, load_config

        config = load_config(args.config, args.overrides)
        if args.dump_config:
            print(dump_yaml(config), end="")
            return 0
        from . import distributed as dist
        from .trainer import Trainer

        env = dist.resolve_environment(args.local_rank)
        dist.init_distributed(env)
        result = Trainer(config, env).train()
        if result.get("stopped_early"):
            if env.is_main:
                print(f"stopped at step {result['steps']} on request; rerun the same command to resume", flush=True)
            return 0
        if env.is_main:
            best = result["best"] or {}
            metrics = " ".join(f"{k}={v:.4f}" for k, v in best.items() if isinstance(v, float))
            print(f"finished: {result['steps']} steps; best validation {metrics}", flush=True)
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":  # `deepspeed --module promoter_dist.train ...`
    sys.exit(main())
