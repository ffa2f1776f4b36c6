"""``promoter-dist demo``: the whole chain on synthetic data, one named step per stage.

:func:`run_demo` runs :func:`make_data` (synthetic train and test files), :func:`make_shards`,
:func:`check_shards`, :func:`make_glove`, and then, unless ``procs`` is 0,
:func:`plan_training`, :func:`train_models` (each run started by the ``deepspeed`` launcher as a
user would) and :func:`report`: each model's best validation figures as the trainer recorded
them, next to the generator's oracle Pearson on the same validation rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.dream import ReadOptions, read_dream
from .data.glove import W2V_FILE, GloveConfig, nad_word_batches, train_glove
from .data.shards import ShardOptions, build_shards, verify_shards
from .data.synthetic import SynthReport, synthesize
from .errors import UserError
from .launch.environment import free_port
from .metrics import pearson

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The run configurations of a source checkout; the demo trains their debug sizes."""
MODELS = ("nad", "legnet", "bert")
"""Models the demo can train."""
DATA_STAGES = 4
"""Stages before training: data, shards, verify, GloVe."""


@dataclass(frozen=True)
class DemoOptions:
    """What one demo runs; the command line (``promoter-dist demo``) holds the defaults."""

    out: Path
    """Folder for the data, shards, vectors and runs."""
    rows: int
    """Synthetic training rows (the test file gets a twentieth, at least 1,000)."""
    seed: int
    """Seed of the training file (the test file uses seed + 1)."""
    procs: int
    """DeepSpeed processes per training run; 0 stops after the data stages."""
    models: tuple[str, ...]
    """Models to train, among :data:`MODELS`; checked only when training."""
    overrides: tuple[str, ...]
    """Dotted config overrides passed to every training run."""
    glove_iterations: int
    """GloVe passes."""
    progress: bool
    """Progress bars on stderr."""


@dataclass(frozen=True)
class TrainingRun:
    """One training launch of the demo."""

    label: str
    """What it trains, as printed."""
    config: Path
    """Run configuration (YAML)."""
    overrides: tuple[str, ...]
    """Config overrides of this run (data, vectors, pretrained weights)."""
    run_dir: Path
    """Its ``run.out_dir``."""


def run_demo(options: DemoOptions) -> int:
    """Synthetic data -> shards -> verify -> GloVe -> NAD, LegNet and BERT training, with the figures a user checks.

    Returns the exit status: 1 when the shards fail verification, else 0. A failed training run
    raises :class:`UserError`.
    """
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the training processes' output
    options.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    synth = make_data(options)
    shard_dir = make_shards(Path(synth.path), options)
    if not check_shards(shard_dir):
        return 1
    vectors = make_glove(shard_dir, options)
    if options.procs == 0:
        print(f"done in {time.perf_counter() - t0:.1f} s (training skipped: --procs 0)")
        return 0
    runs = plan_training(options, shard_dir, vectors)
    train_models(runs, options)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    report(runs, synth)
    return 0


def make_data(options: DemoOptions) -> SynthReport:
    """Stage 1: the synthetic training file (returned) and a test file beside it."""
    print(f"[1/5] synthetic data: {options.rows} rows, seed {options.seed}")
    synth = synthesize(options.out / "train.txt", rows=options.rows, seed=options.seed, kind="train",
                       progress=options.progress)
    test = synthesize(options.out / "test.txt", rows=max(options.rows // 20, 1000), seed=options.seed + 1,
                      kind="test", progress=False)
    print(f"      {synth.path} ({synth.seconds:.1f} s), test set {test.path}; "
          f"oracle Pearson {synth.oracle_pearson:.4f}")
    return synth


def make_shards(source: Path, options: DemoOptions) -> Path:
    """Stage 2: shards of the training file with the default options; returns their folder."""
    print("[2/5] shards")
    shard_dir = options.out / "shards"
    print(build_shards(source, shard_dir, ShardOptions(), progress=options.progress).summary())
    return shard_dir


def check_shards(shard_dir: Path) -> bool:
    """Stage 3: verify every shard against the manifest; prints each problem; True when all are sound."""
    print("[3/5] verify")
    check = verify_shards(shard_dir)
    print(f"      {'OK' if check.ok else 'FAILED'}: {check.shards_checked} shards, {check.rows_checked} rows")
    for problem in check.problems:
        print(f"BAD {problem}")
    return check.ok


def make_glove(shard_dir: Path, options: DemoOptions) -> Path:
    """Stage 4: GloVe vectors over the train split's NAD words; returns the vector file."""
    print("[4/5] GloVe")
    out = options.out / "glove"
    info = train_glove(nad_word_batches(str(shard_dir)), out, GloveConfig(iterations=options.glove_iterations),
                       progress=options.progress)
    print(f"      {json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict))})}")
    return out / W2V_FILE


def plan_training(options: DemoOptions, shard_dir: Path, vectors: Path) -> list[TrainingRun]:
    """The training runs of the chosen models, in launch order: NAD, LegNet, BERT pretraining, BERT fine-tuning."""
    unknown = sorted(set(options.models) - set(MODELS))
    if unknown:
        raise UserError(f"--models: unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    data = (f"data.shards={shard_dir}",)
    runs_dir = options.out / "runs"
    runs = []
    if "nad" in options.models:
        runs.append(TrainingRun("NAD (GloVe + CNN/FPN + transformers)", REPO_CONFIGS / "nad" / "debug.yaml",
                                (*data, f"data.glove={vectors}"), runs_dir / "nad"))
    if "legnet" in options.models:
        runs.append(TrainingRun("LegNet (one-hot CNN, 18 expression bins)", REPO_CONFIGS / "legnet" / "debug.yaml",
                                data, runs_dir / "legnet"))
    if "bert" in options.models:
        pretrain = runs_dir / "bert-pretrain"
        runs.append(TrainingRun("BERT masked-LM pretraining", REPO_CONFIGS / "bert" / "pretrain_debug.yaml",
                                data, pretrain))
        runs.append(TrainingRun("BERT fine-tuning", REPO_CONFIGS / "bert" / "finetune_debug.yaml",
                                (*data, f"model.bert.pretrained={pretrain / 'export'}"), runs_dir / "bert-finetune"))
    return runs


def train_models(runs: list[TrainingRun], options: DemoOptions) -> None:
    """Stages 5 on: each run with DeepSpeed on ``options.procs`` processes, one after the other."""
    for number, run in enumerate(runs, start=DATA_STAGES + 1):
        if not run.config.exists():
            raise UserError(f"{run.config}: missing; run the demo from a source checkout (pip install -e .)")
        print(f"[{number}/{DATA_STAGES + len(runs)}] {run.label} (debug size) with DeepSpeed on {options.procs} "
              f"processes -> {run.run_dir}")
        t_run = time.perf_counter()
        status = launch_training(run.config, [*run.overrides, f"run.out_dir={run.run_dir}", *options.overrides],
                                 options.procs)
        if status != 0:
            raise UserError(f"{run.label} failed (exit status {status}); logs in {run.run_dir / 'logs'}")
        print(f"      {run.label}: {time.perf_counter() - t_run:.0f} s")


def launch_training(config: Path, overrides: list[str], procs: int, output: Path | None = None) -> int:
    """``deepspeed --num_gpus procs -m promoter_dist.train --config ...`` (CPU: procs gloo ranks); its exit status.

    ``output``: a file for the launch's stdout and stderr (default: this process's).
    """
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        raise UserError(f"no deepspeed launcher next to {sys.executable}; install the package with its dependencies")
    command = [str(launcher), "--num_gpus", str(procs), "--master_port", str(free_port()), "--module",
               "promoter_dist.train", "--config", str(config), *overrides]
    # The launcher sets these for its ranks; values inherited from an enclosing job would mislead it.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if output is None:
        return subprocess.run(command, env=env, check=False).returncode
    with open(output, "w") as sink:
        return subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False).returncode


def report(runs: list[TrainingRun], synth: SynthReport) -> None:
    """One line per finished run: the validation record of its best checkpoint, as the trainer kept it."""
    from .checkpointing import read_best_record  # brings the training stack, which the data stages do without

    for run in runs:
        print(describe_best(run.label, read_best_record(run.run_dir), run.run_dir, synth))


def describe_best(label: str, best: dict, run_dir: Path, synth: SynthReport) -> str:
    """A run's best validation figures: masked-token accuracy for masked-LM runs; for regression runs
    Pearson and Spearman beside the oracle Pearson on the same rows (from ``best_val_predictions.npz``)."""
    if "pearson" not in best:
        row = f" ({best['row_accuracy']:.4f} on the rows' own tokens)" if "row_accuracy" in best else ""
        return (f"{label}: validation masked-token accuracy {best.get('accuracy', float('nan')):.4f}{row}, "
                f"loss {best['loss']:.4f}")
    from .records import BEST_PREDICTIONS

    lines = np.load(run_dir / BEST_PREDICTIONS)["line"]
    oracle = oracle_on_rows(Path(synth.path), Path(synth.noise_free_path), lines)
    return (f"{label}: validation Pearson {best['pearson']:.4f} (Spearman {best['spearman']:.4f}) on {len(lines)} "
            f"rows; oracle Pearson on the same rows {oracle:.4f}; ratio {best['pearson'] / oracle:.3f}")


def oracle_on_rows(synth_path: Path, noise_free_path: Path, lines: np.ndarray) -> float:
    """Pearson of the noise-free values with the labels on the given 1-based source lines."""
    rows, _ = read_dream(synth_path, ReadOptions(), progress=False)
    truth = np.loadtxt(noise_free_path, dtype=np.float64)
    index = lines.astype(np.int64) - 1
    return pearson(truth[index], rows.labels[index].astype(np.float64))
