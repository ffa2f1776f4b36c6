"""Does masked-LM pretraining help BERT's regression fine-tuning at the same budget?

Three DeepSpeed runs on the same shards, each started by the ``deepspeed`` launcher exactly as a
user would (``promoter_dist.demo.launch_training``):

1. masked-LM pretraining with ``--pretrain-config`` (skipped with ``--pretrained DIR``, which reuses
   an existing export);
2. regression fine-tuning with ``--finetune-config`` from that export;
3. the same fine-tuning from a random initialisation (``model.bert.pretrained=''``): same config,
   seed, data order, steps and learning-rate schedule; only the encoder's starting weights differ.

Prints the pretraining's best validation masked-token accuracy and loss, both fine-tunings'
best validation Pearson and Spearman side by side, the wall time of every launch (start-up
included), and, for synthetic shards whose generator files sit beside the source
(``<stem>.noise_free.txt``), the oracle Pearson on the same validation rows and each run's ratio
to it. Example (the 100k-row demo: ``promoter-dist demo --out /tmp/bert_demo --procs 0``)::

    python benchmarks/bert_pretraining_effect.py --shards /tmp/bert_demo/shards --out /tmp/bert_effect
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def best_record(run: Path) -> dict[str, Any]:
    """The validation record of the run's best checkpoint, the one that was exported.

    The trainer chose it by ``run.best_metric`` (masked-LM: loss; regression: Pearson).
    """
    from promoter_dist.checkpointing import read_best_record
    from promoter_dist.errors import UserError

    try:
        return read_best_record(run)
    except UserError as error:
        raise SystemExit(str(error)) from None


def launch(config: Path, overrides: list[str], procs: int, out: Path) -> float:
    """One ``deepspeed`` training launch; returns its wall time in seconds (start-up included)."""
    from promoter_dist.demo import launch_training

    start = time.perf_counter()
    status = launch_training(config, [f"run.out_dir={out}", *overrides], procs)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"training failed (exit status {status}); logs in {out / 'logs'}")
    return seconds


def oracle_pearson(shards: Path, run: Path) -> float | None:
    """Pearson(noise-free, label) on the run's best validation rows, when the shards are synthetic."""
    from promoter_dist.demo import oracle_on_rows

    source = Path(json.loads((shards / "manifest.json").read_text())["source"]["path"])
    noise_free = source.with_name(f"{source.stem}.noise_free.txt")
    predictions = run / "best_val_predictions.npz"
    if not (source.is_file() and noise_free.is_file() and predictions.is_file()):
        return None
    return oracle_on_rows(source, noise_free, np.load(predictions)["line"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="out/demo/shards", help="shard folder (default: %(default)s)")
    parser.add_argument("--out", default="runs/bert-pretraining-effect", help="folder for the three runs")
    parser.add_argument("--procs", type=int, default=2, help="DeepSpeed processes per run (default: 2)")
    parser.add_argument("--pretrain-config", type=Path, default=REPO / "configs" / "bert" / "pretrain_debug.yaml")
    parser.add_argument("--finetune-config", type=Path, default=REPO / "configs" / "bert" / "finetune_debug.yaml")
    parser.add_argument("--pretrained", default="", help="reuse this masked-LM export instead of pretraining")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to all three runs (repeatable), e.g. --set engine.zero_stage=1")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep these lines in order with the launches' output

    shards, out = Path(args.shards).resolve(), Path(args.out).resolve()
    data = [f"data.shards={shards}", *args.overrides]
    figures: dict[str, Any] = {"shards": str(shards), "procs": args.procs}

    if args.pretrained:
        export = Path(args.pretrained).resolve()
    else:
        print(f"[1/3] masked-LM pretraining -> {out / 'pretrain'}")
        figures["pretrain_seconds"] = launch(args.pretrain_config, data, args.procs, out / "pretrain")
        best = best_record(out / "pretrain")
        figures.update(pretrain_accuracy=best["accuracy"], pretrain_row_accuracy=best.get("row_accuracy"),
                       pretrain_loss=best["loss"], pretrain_step=best["step"])
        export = out / "pretrain" / "export"

    runs = {"pretrained": [f"model.bert.pretrained={export}"], "scratch": ["model.bert.pretrained="]}
    for i, (name, init) in enumerate(runs.items(), start=2):
        start = f"the export {export}" if name == "pretrained" else "a random initialisation"
        print(f"[{i}/3] fine-tuning from {start} -> {out / name}")
        figures[f"{name}_seconds"] = launch(args.finetune_config, [*data, *init], args.procs, out / name)
        best = best_record(out / name)
        figures.update({f"{name}_pearson": best["pearson"], f"{name}_spearman": best["spearman"],
                        f"{name}_step": best["step"]})
        oracle = oracle_pearson(shards, out / name)
        if oracle is not None:
            figures["oracle_pearson"] = oracle

    print()
    if "pretrain_accuracy" in figures:
        row = figures.get("pretrain_row_accuracy")
        print(f"pretraining: masked-token accuracy {figures['pretrain_accuracy']:.4f}"
              + (f" ({row:.4f} on the rows' own tokens)" if row is not None else "") + ", loss "
              f"{figures['pretrain_loss']:.4f} (step {figures['pretrain_step']}); {figures['pretrain_seconds']:.0f} s")
    oracle = figures.get("oracle_pearson")
    print(f"{'fine-tuning from':<18}{'Pearson':>9}{'Spearman':>10}{'/ oracle':>10}{'wall s':>8}")
    for name in runs:
        ratio = figures[f"{name}_pearson"] / oracle if oracle else math.nan
        print(f"{name:<18}{figures[f'{name}_pearson']:>9.4f}{figures[f'{name}_spearman']:>10.4f}{ratio:>10.3f}"
              f"{figures[f'{name}_seconds']:>8.0f}")
    gain = figures["pretrained_pearson"] - figures["scratch_pearson"]
    print(f"pretraining changes the fine-tuned Pearson by {gain:+.4f}"
          + (f" (oracle Pearson on these validation rows {oracle:.4f})" if oracle else ""))
    if "pretrain_seconds" in figures:
        total = figures["pretrain_seconds"] + figures["pretrained_seconds"]
        print(f"pretraining + fine-tuning: {total:.0f} s wall, start-up of both launches included")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
