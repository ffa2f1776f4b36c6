"""One GPU check of the whole toolkit, printed as one table; ``--device cpu --quick`` runs it on a CPU.

    python benchmarks/gpu_check.py --json out.json               # one GPU: published sizes, bf16, NCCL
    python benchmarks/gpu_check.py --device cpu --quick          # debug sizes, fp32, gloo (the test suite)
    bash benchmarks/gpu/run_on_gpu.sh                            # the bare GPU machine: install, then this

Parts, in order; a part that fails is a FAIL row with its reason, the later parts still run, and
the script exits 1 at the end:

1. *environment*: imports the whole package and its training stack in a fresh process (versions,
   GPU name, bf16, NCCL); FAIL when ``gensim`` gets imported (the GPU machine has none).
2. *synthetic data*: ``promoter-dist synth`` (train and test files) and ``promoter-dist shards build``.
3. For every run config of the size (published: every ``configs/*/*.yaml`` but ``debug.yaml`` and
   ``*_debug.yaml``; ``--quick``: those), in dependency order (a fine-tuning whose
   ``model.bert.pretrained`` is another config's export starts from this check's export of it):
   two launches of ``deepspeed --num_gpus 1`` (``benchmarks/gpu/train_recording_memory.py``, which
   is ``train.py`` writing the rank's peak memory at the end), the first to step k, the second
   (same command, same run folder) to step 2k. Rows: *train* (median ``samples_per_s`` of the
   run's ``metrics.jsonl`` windows, first window of each launch left out; peak memory; model FLOPs
   utilisation for BERT), *validation* (a validation record at k and 2k), *resume* (checkpoint of
   step k saved, the rerun logs ``resumed from`` it and reaches 2k), and for every task but
   masked-LM pretraining *predict* (``promoter-dist predict`` rows/s on the synthetic test file).
4. *fp16*: the first BERT config for k steps with ``engine.precision=fp16`` (DeepSpeed's fp16 with
   dynamic loss scaling): finite losses and samples/s. On a CPU, where DeepSpeed has no fp16, the
   launch must end with the toolkit's one-line refusal instead.
5. *GSAM ZeRO 0 vs 3*: the trainer with GSAM on the NAD config (or the first config that enables
   GSAM) at ZeRO stages 0 and 3, same seed and data, fp32 with TF32 off; the per-step losses must
   agree within :data:`GSAM_TOLERANCE` (relative). bf16 rounding would hide a small disagreement
   behind a loose tolerance, and the code paths that could disagree (GSAM's perturbation of the
   weight partitions against ZeRO-3's gathers) are the same in both precisions.
6. *shard build*: ``promoter-dist synth`` and ``shards build`` of 6,739,258 rows (the size of the
   DREAM training file) with ``--workers`` = every core; rows/s.

Model FLOPs utilisation = 6 x trainable parameters x tokens per second / the GPU's dense bf16
peak (:data:`PEAK_BF16_TFLOPS`, by device name); tokens per row are measured on one training batch
of the loader (padding included). The 6N rule leaves out the attention scores (about T / 6H of the
linear layers' FLOPs: 4% at 128 tokens and hidden 512).

Every part has a planned time (:class:`Plan`), printed first; the whole check has a limit
(8 minutes on a GPU). A launch may overrun its plan, but never into the time the later parts
are guaranteed, and a part that cannot start any more is a FAIL naming the time left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _runs import RunRecordMissing, read_metrics, trainable_parameters

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN_SCRIPT = REPO / "benchmarks" / "gpu" / "train_recording_memory.py"
WORK_MARKER = ".gpu-check"
"""File that marks a work folder as this script's, so that only such a folder is emptied."""

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peak by GPU name (datasheets; H100 and H200 SXM), for model FLOPs utilisation."""
GSAM_TOLERANCE = 1e-3
"""Largest relative difference of a step's loss between GSAM at ZeRO 0 and ZeRO 3 (fp32, TF32 off)."""
LEGNET_PUBLISHED_STEPS = 80_000
"""LegNet's published run: 80 epochs x 1,000 batches (../shared/reference/models.md, "The winner: LegNet")."""
LEGNET_PUBLISHED_ROWS_PER_STEP = 512
"""Rows of one published step: batch 1,024 samples, each row once forward and once reverse-complemented."""
LEGNET_PUBLISHED_HOURS = 8.0
"""The published cost of those steps: about 8 h on one RTX A5000 (about 2,800 samples/s)."""
DREAM_TRAIN_ROWS = 6_739_258
"""Rows of the DREAM 2022 training file: the size of the shard-build part on a GPU machine."""
OPTIONAL_MODULES = ("gensim", "scipy", "matplotlib", "tensorboard")
"""Big libraries the check's path should not need; gensim is not on the GPU machine at all."""
ABSENT_ON_GPU_MACHINE = ("gensim",)
"""Of those, the ones whose import is a failure (the GPU machine lacks them)."""
START_ALLOWANCE = 90.0
"""Seconds every subprocess may take beyond its plan: the first DeepSpeed launch of a fresh environment
compiles DeepSpeed's CPU communication op (about a minute on 2 cores) and every module's bytecode. A
launch stopped while it compiles leaves a lock in ~/.cache/torch_extensions that stalls the next ones."""


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Sizes, step counts and planned seconds of one mode of the check."""

    size: str
    """Config size: 'full' (published) or 'debug'."""
    train_rows: int
    """Synthetic rows for the training shards (train and validation splits)."""
    test_rows: int
    """Synthetic test rows that ``predict`` reads."""
    resume_step: int
    """k: the first launch stops at step k, the rerun goes on to 2k."""
    log_every: int
    """Steps per ``samples_per_s`` window."""
    batch_size: int
    """Micro batch of every training launch (0: the config's own)."""
    gsam_steps: int
    """Steps of each GSAM run."""
    build_rows: int
    """Rows of the shard-build part."""
    limit_s: float
    """The whole check's time limit."""
    seconds: dict[str, float]
    """Planned seconds per part: environment, data, train (per config, both launches), gsam,
    predict (per config that predicts), shards."""
    note: str
    """Where the planned seconds come from."""


GPU_PLAN = Plan(
    size="full", train_rows=300_000, test_rows=50_000, resume_step=100, log_every=20, batch_size=0, gsam_steps=10,
    build_rows=DREAM_TRAIN_ROWS, limit_s=480.0,
    seconds={"environment": 10, "data": 15, "train": 45, "fp16": 25, "gsam": 40, "predict": 10, "shards": 50},
    note="estimates for one H200 and 16 cores, not yet measured there: a DeepSpeed launch starting in about "
         "15 s, 200 steps in 5-10 s, 6.7M rows synthesised and built at over 1M rows/s",
)
QUICK_PLAN = Plan(
    size="debug", train_rows=3_000, test_rows=500, resume_step=2, log_every=1, batch_size=16, gsam_steps=3,
    build_rows=20_000, limit_s=420.0,
    seconds={"environment": 10, "data": 5, "train": 35, "fp16": 20, "gsam": 35, "predict": 8, "shards": 5},
    note="measured on the 2-core development machine: a DeepSpeed launch on a CPU takes about 15 s",
)


@dataclass
class Row:
    """One line of the table."""

    part: str
    """What was checked, e.g. 'train nad/full'."""
    status: str = "OK"
    """'OK', 'FAIL' or 'SKIP'."""
    summary: str = ""
    """The figures as printed, or the reason of a FAIL."""
    figures: dict[str, Any] = field(default_factory=dict)
    """The figures as numbers (``--json``)."""
    seconds: float = 0.0
    """Wall time spent on it."""
    budget: float = 0.0
    """Planned seconds."""


class CheckFailed(Exception):
    """A part failed; the message is the reason shown in its row (as is a missing run record's)."""


class Clock:
    """The check's time limit, and what each subprocess may take of it.

    A subprocess may run past its own plan (``overrun`` times it, plus :data:`START_ALLOWANCE`) but
    never into the time reserved for the parts after it: half of their planned seconds.
    """

    def __init__(self, limit_s: float, overrun: float = 4.0):
        self.start = time.perf_counter()
        self.limit_s = limit_s
        self.overrun = overrun
        self.reserved = 0.0

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self.start

    def timeout(self, planned: float) -> float:
        """Seconds the next subprocess may run; raises :class:`CheckFailed` when too few are left."""
        left = self.limit_s - self.elapsed() - self.reserved
        if left < 5:
            raise CheckFailed(f"not started: {max(self.limit_s - self.elapsed(), 0):.0f} s left of the check's "
                              f"{self.limit_s:.0f} s limit")
        return min(self.overrun * planned + START_ALLOWANCE, left)


# --------------------------------------------------------------------------- subprocesses


def tool(name: str) -> str:
    """The console script ``name`` of this environment (beside the interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise CheckFailed(f"no `{name}` command beside {sys.executable} or on PATH; install the package and its "
                          "dependencies")
    return found


def child_environment(device: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every subprocess: the device forced, no launcher variables inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env["PYTHONUNBUFFERED"] = "1"
    env["DS_ACCELERATOR"] = device
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        # One thread per rank: on a shared CPU, kernels whose threads wait for a busy core run many
        # times slower (see benchmarks/README.md, "Threads"), which would swamp a check sized in seconds.
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_logged(command: list[str], log_path: Path, timeout: float, env: dict[str, str]) -> str:
    """Run ``command`` with its output in ``log_path``; returns the output; raises :class:`CheckFailed`.

    The command runs in a process group of its own, so that a timeout ends the launcher and every
    rank it started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(process)
            raise CheckFailed(f"timed out after {timeout:.0f} s; log {log_path}") from None
    output = log_path.read_text(errors="replace")
    if status != 0:
        raise CheckFailed(f"{failure_reason(output)} (exit status {status}; log {log_path})")
    return output


def stop_group(process: subprocess.Popen) -> None:
    """End ``process`` and the processes it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def failure_reason(output: str) -> str:
    """The line of a failed command's output that says why: a one-line error, else a traceback's last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[\w.]*(Error|Exception)\b.*:", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


# --------------------------------------------------------------------------- configs


@dataclass
class RunConfig:
    """One config file to train, with what the check needs to know of it."""

    name: str
    """Path under configs/ without .yaml, e.g. 'nad/full'."""
    path: Path
    """The YAML file."""
    model: str = ""
    """model.name."""
    task: str = ""
    """task.name."""
    gsam: bool = False
    """Whether the config enables GSAM."""
    out_dir: str = ""
    """The config's own run.out_dir (what another config's pretrained path may name)."""
    pretrained: str = ""
    """model.bert.pretrained, when the model is BERT."""
    error: str = ""
    """Why the config does not load ('' when it does)."""

    @property
    def predicts(self) -> bool:
        """Whether its runs predict expression (every task but masked-LM pretraining)."""
        return bool(self.task) and self.task != "mlm"

    @property
    def run_name(self) -> str:
        """A folder name for its run in the work folder."""
        return self.name.replace("/", "-")


def discover_configs(size: str, pattern: str = "") -> list[RunConfig]:
    """The run configs of ``size`` under configs/, in dependency order; ``pattern`` keeps names containing it.

    'debug' is ``debug.yaml`` and ``*_debug.yaml`` of every folder; 'full' is every other YAML file.
    A config whose ``model.bert.pretrained`` is another one's export comes after it.
    """
    from promoter_dist.config import load_config

    found = []
    for path in sorted(CONFIGS.glob("*/*.yaml")):
        debug = path.stem == "debug" or path.stem.endswith("_debug")
        name = f"{path.parent.name}/{path.stem}"
        if debug != (size == "debug") or pattern not in name:
            continue
        config = RunConfig(name, path)
        try:
            loaded = load_config(path)
            config.model, config.task = loaded.model.name, loaded.task.name
            config.gsam, config.out_dir = loaded.optim.gsam.enabled, loaded.run.out_dir
            config.pretrained = loaded.model.bert.pretrained if loaded.model.name == "bert" else ""
        except Exception as error:  # a config another change broke: its rows say why, the rest still run
            config.error = f"{type(error).__name__}: {error}"
        found.append(config)
    return dependency_order(found)


def dependency_order(configs: list[RunConfig]) -> list[RunConfig]:
    """``configs`` with each one after the config whose export it starts from."""
    ordered: list[RunConfig] = []
    pending = list(configs)
    while pending:
        ready = [c for c in pending if not any(c is not p and starts_from(c, p) for p in pending)]
        ready = ready or pending[:1]  # a cycle cannot happen in files; do not loop if it does
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered


def starts_from(config: RunConfig, other: RunConfig) -> bool:
    """True when ``config`` fine-tunes ``other``'s export (its pretrained path is ``<other's out_dir>/export``)."""
    return bool(config.pretrained and other.out_dir) and \
        Path(config.pretrained).as_posix().rstrip("/") == (Path(other.out_dir) / "export").as_posix()


# --------------------------------------------------------------------------- the check


class GPUCheck:
    """Runs the parts in order and collects one :class:`Row` per result."""

    def __init__(self, args: argparse.Namespace, plan: Plan, work: Path):
        self.args, self.plan, self.work = args, plan, work
        self.device = args.device
        self.precision = "bf16" if self.device == "cuda" else "fp32"
        self.clock = Clock(args.time_limit or plan.limit_s)
        self.rows: list[Row] = []
        self.environment: dict[str, Any] = {}
        self.shards: Path | None = None
        self.test_file: Path | None = None
        self.configs: list[RunConfig] = []
        self.exports: dict[str, Path] = {}
        """Export folder of each config trained here, by name (for the fine-tunings that start from it)."""
        self.trained: dict[str, Path] = {}
        """Run folder of each config whose two launches succeeded, by name."""

    # -- bookkeeping ----------------------------------------------------------------------

    def progress(self, message: str) -> None:
        """One progress line on stderr (the table goes to stdout)."""
        print(f"[{self.clock.elapsed():5.0f} s] {message}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> Row:
        """Keep ``row`` and show it as it comes."""
        self.rows.append(row)
        self.progress(f"{row.status} {row.part}: {row.summary}")
        return row

    def attempt(self, part: str, planned: float, body: Callable[[], tuple[str, dict[str, Any]]]) -> Row:
        """Run ``body`` (returns the summary and figures) as one row; an exception is a FAIL with its reason."""
        t0 = time.perf_counter()
        try:
            summary, figures = body()
            row = Row(part, "OK", summary, figures)
        except (CheckFailed, RunRecordMissing) as failure:
            row = Row(part, "FAIL", str(failure))
        except Exception as error:  # an unexpected error in the check itself: still a row, still a table
            row = Row(part, "FAIL", f"{type(error).__name__}: {error}")
        row.seconds, row.budget = time.perf_counter() - t0, planned
        return self.add(row)

    def fail(self, part: str, reason: str, planned: float = 0.0) -> Row:
        """A FAIL row for a part that could not run."""
        return self.add(Row(part, "FAIL", reason, budget=planned))

    def skipped(self, kind: str) -> bool:
        """True when ``--skip`` names this kind of part."""
        return kind in self.args.skip

    # -- planning -------------------------------------------------------------------------

    def planned_parts(self, configs: list[RunConfig], gsam: bool) -> list[tuple[str, float]]:
        """(part, planned seconds) of every part that will run, in order."""
        s = self.plan.seconds
        parts = [("environment", s["environment"]), ("data", s["data"])]
        parts += [(f"train {c.name}", s["train"]) for c in configs]
        if self.fp16_config(configs) is not None and not self.skipped("fp16"):
            parts.append(("fp16", s["fp16"]))
        if gsam:
            parts.append(("gsam", s["gsam"]))
        if not self.skipped("predict"):
            parts += [(f"predict {c.name}", s["predict"]) for c in configs if c.predicts]
        if not self.skipped("shards"):
            parts.append(("shards", s["shards"]))
        return parts

    def print_budget(self, parts: list[tuple[str, float]]) -> None:
        """The time plan, before anything runs."""
        total = sum(seconds for _, seconds in parts)
        print(f"time budget: {total:.0f} s planned of the {self.clock.limit_s:.0f} s limit "
              f"({self.plan.note})", flush=True)
        print("  " + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in parts), flush=True)
        if total > self.clock.limit_s:
            print(f"  the plan is {total - self.clock.limit_s:.0f} s over the limit: the last parts may FAIL "
                  "for time (--configs / --skip run fewer)", flush=True)

    def reserve_after(self, parts: list[tuple[str, float]], current: str) -> None:
        """Keep half the planned time of the parts after ``current`` out of its subprocesses' reach."""
        names = [name for name, _ in parts]
        later = parts[names.index(current) + 1:] if current in names else []
        self.clock.reserved = 0.5 * sum(seconds for _, seconds in later)

    # -- running --------------------------------------------------------------------------

    def run(self) -> int:
        """Every part; prints the table; returns the exit status (1 when a row failed)."""
        configs = self.configs = discover_configs(self.plan.size, self.args.configs)
        gsam_config = self.gsam_config(configs)
        parts = self.planned_parts(configs, gsam_config is not None and not self.skipped("gsam"))
        self.print_budget(parts)

        self.reserve_after(parts, "environment")
        self.attempt("environment", self.plan.seconds["environment"], self.check_environment)
        self.reserve_after(parts, "data")
        data = self.attempt("synthetic data", self.plan.seconds["data"], self.make_data)
        # A package module that fails to import fails the environment row, but training may not need it.
        usable = bool(self.environment) and not self.environment["problem"]
        ready = usable and data.status == "OK"
        why_not = "not run: " + ("the environment check failed" if not usable else "no synthetic data")
        if not configs:
            self.fail("train", f"no {self.plan.size} configs under {CONFIGS}"
                      + (f" matching {self.args.configs!r}" if self.args.configs else ""))
        for config in configs:
            self.reserve_after(parts, f"train {config.name}")
            if not ready:
                self.fail(f"train {config.name}", why_not, self.plan.seconds["train"])
                continue
            self.train_config(config)
        fp16_config = self.fp16_config(configs)
        if fp16_config is not None and not self.skipped("fp16"):
            self.reserve_after(parts, "fp16")
            if not ready:
                self.fail(f"fp16 {fp16_config.name}", why_not, self.plan.seconds["fp16"])
            else:
                self.attempt(f"fp16 {fp16_config.name}", self.plan.seconds["fp16"],
                             lambda: self.check_fp16(fp16_config))
        if not self.skipped("gsam"):
            self.reserve_after(parts, "gsam")
            if gsam_config is None:
                self.fail("GSAM ZeRO 0 vs 3", f"no {self.plan.size} NAD config and none that enables GSAM")
            elif not ready:
                self.fail(f"GSAM ZeRO 0 vs 3 ({gsam_config.name})", why_not, self.plan.seconds["gsam"])
            else:
                self.attempt(f"GSAM ZeRO 0 vs 3 ({gsam_config.name})", self.plan.seconds["gsam"],
                             lambda: self.check_gsam(gsam_config))
        if not self.skipped("predict"):
            for config in configs:
                if not config.predicts:
                    continue
                self.reserve_after(parts, f"predict {config.name}")
                if config.name not in self.trained:
                    self.fail(f"predict {config.name}", "not run: its training failed", self.plan.seconds["predict"])
                    continue
                self.attempt(f"predict {config.name}", self.plan.seconds["predict"], lambda config=config: self.predict(config))
        if not self.skipped("shards"):
            self.reserve_after(parts, "shards")
            self.attempt(f"shard build ({self.plan.build_rows:,} rows)", self.plan.seconds["shards"],
                         self.shard_build)
        self.print_table()
        return 1 if any(row.status == "FAIL" for row in self.rows) else 0

    @staticmethod
    def fp16_config(configs: list[RunConfig]) -> RunConfig | None:
        """The config fp16 is checked on: the first BERT regression (fp16 suits transformers; NAD refuses it)."""
        usable = [c for c in configs if not c.error and c.model == "bert"]
        return next((c for c in usable if c.predicts), None) or next(iter(usable), None)

    def gsam_config(self, configs: list[RunConfig]) -> RunConfig | None:
        """The config GSAM is checked on: the first that enables it, else the first NAD config."""
        usable = [c for c in configs if not c.error]
        return next((c for c in usable if c.gsam), None) or next((c for c in usable if c.model == "nad"), None)

    # -- parts ----------------------------------------------------------------------------

    def check_environment(self) -> tuple[str, dict[str, Any]]:
        """Versions, the GPU, and that the package's modules import without gensim, in a fresh process."""
        result = self.work / "environment.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--probe", str(result), "--device", self.device]
        run_logged(command, self.work / "logs" / "environment.log",
                   self.clock.timeout(self.plan.seconds["environment"]), child_environment(self.device))
        probe = self.environment = json.loads(result.read_text())
        if probe["problem"]:
            raise CheckFailed(probe["problem"])
        if probe["module_errors"]:
            raise CheckFailed("; ".join(probe["module_errors"]))
        versions = ", ".join(f"{name} {probe[name]}" for name in ("python", "torch", "deepspeed", "transformers"))
        where = (f"{probe['gpu']} (bf16 {'yes' if probe['bf16'] else 'NO'}, NCCL {probe['nccl']})"
                 if self.device == "cuda" else f"CPU, {probe['cpus']} cores")
        loaded = probe["optional_loaded"]
        return (f"{versions}; {where}; {probe['modules']} modules import"
                + (f"; also loads {', '.join(loaded)}" if loaded else "; none of " + ", ".join(OPTIONAL_MODULES)),
                probe)

    def make_data(self) -> tuple[str, dict[str, Any]]:
        """Synthetic train and test files and the training shards."""
        cli, env, workers = tool("promoter-dist"), child_environment(self.device), str(os.cpu_count() or 1)
        data = self.work / "data"
        train, test, shards = data / "train.txt", data / "test.txt", data / "shards"
        data.mkdir(parents=True, exist_ok=True)
        planned = self.plan.seconds["data"]
        t0 = time.perf_counter()
        run_logged([cli, "synth", "--rows", str(self.plan.train_rows), "--seed", "0", "--out", str(train),
                    "--workers", workers, "--no-progress"], self.work / "logs" / "synth-train.log",
                   self.clock.timeout(planned), env)
        run_logged([cli, "synth", "--rows", str(self.plan.test_rows), "--seed", "1", "--kind", "test",
                    "--out", str(test), "--workers", workers, "--no-progress"], self.work / "logs" / "synth-test.log",
                   self.clock.timeout(planned), env)
        build = run_logged([cli, "shards", "build", str(train), "--out", str(shards), "--workers", workers,
                            "--no-progress"], self.work / "logs" / "shards-train.log", self.clock.timeout(planned), env)
        self.shards, self.test_file = shards, test
        seconds = time.perf_counter() - t0
        return (f"{self.plan.train_rows:,} train rows -> shards, {self.plan.test_rows:,} test rows ({seconds:.1f} s); "
                + build.strip().splitlines()[-1].split(" -> ")[0],
                {"train_rows": self.plan.train_rows, "test_rows": self.plan.test_rows, "seconds": seconds})

    def overrides(self, run_dir: Path, steps: int) -> list[str]:
        """What every training launch of the check sets on top of a config."""
        batch = [f"data.batch_size={self.plan.batch_size}"] if self.plan.batch_size else []
        return [f"data.shards={self.shards}", "data.glove=", f"run.out_dir={run_dir}", "run.epochs=1000",
                f"run.max_steps={steps}", "run.eval_every=0", "run.checkpoint_every=0", "run.plots=false",
                "engine.tensorboard=false", "engine.csv=false", *batch]

    def launch(self, config: RunConfig, overrides: list[str], label: str, planned: float) -> str:
        """``deepspeed --num_gpus 1`` on the config; returns its output; the peak memory lands in memory/."""
        from promoter_dist.launch.environment import free_port

        command = [tool("deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()), str(TRAIN_SCRIPT),
                   "--config", str(config.path), *overrides]
        memory = self.work / "memory" / f"{label}-rank{{rank}}.json"
        env = child_environment(self.device, {"PEAK_MEMORY_FILE": str(memory)})
        self.progress(f"launch {label}")
        return run_logged(command, self.work / "logs" / f"{label}.log", self.clock.timeout(planned), env)

    def train_config(self, config: RunConfig) -> None:
        """Two launches of one config (to k, then resumed to 2k) and the rows they make."""
        planned = self.plan.seconds["train"]
        rows = [f"train {config.name}", f"validation {config.name}", f"resume {config.name}"]
        if config.error:
            for part in rows:
                self.fail(part, f"config does not load: {config.error}", planned if part == rows[0] else 0)
            return
        k = self.plan.resume_step
        run_dir = self.work / "runs" / config.run_name
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [*self.pretrained_override(config), f"engine.precision={self.precision}",
                     f"run.log_every={self.plan.log_every}"]
        t0 = time.perf_counter()
        outputs = []
        try:
            for launch, steps in ((1, k), (2, 2 * k)):
                outputs.append(self.launch(config, [*self.overrides(run_dir, steps), *overrides],
                                           f"{config.run_name}-{launch}", planned / 2))
                if launch == 1:
                    tag = read_pointer(run_dir / "checkpoints" / "latest")
        except CheckFailed as failure:
            which = "first" if not outputs else "second"
            reason = f"{which} launch: {failure}"
            self.add(Row(rows[0], "FAIL", reason, seconds=time.perf_counter() - t0, budget=planned))
            self.fail(rows[1], "not run: training failed")
            self.fail(rows[2], "not run: training failed" if not outputs else reason)
            return
        seconds = time.perf_counter() - t0
        records = read_metrics(run_dir / "metrics.jsonl")
        self.add(self.result(rows[0], lambda: self.throughput(config, run_dir, records), seconds, planned))
        self.add(self.result(rows[1], lambda: validation_figures(records, k)))
        self.add(self.result(rows[2], lambda: resume_figures(records, tag, k, outputs[1])))
        self.trained[config.name] = run_dir
        if (run_dir / "export").is_dir():
            self.exports[config.name] = run_dir / "export"

    def result(self, part: str, body: Callable[[], tuple[str, dict[str, Any]]], seconds: float = 0.0,
               planned: float = 0.0) -> Row:
        """A row from ``body``'s figures, or a FAIL with its reason (no subprocess: nothing to time)."""
        try:
            summary, figures = body()
            return Row(part, "OK", summary, figures, seconds, planned)
        except (CheckFailed, RunRecordMissing) as failure:
            return Row(part, "FAIL", str(failure), seconds=seconds, budget=planned)
        except Exception as error:
            return Row(part, "FAIL", f"{type(error).__name__}: {error}", seconds=seconds, budget=planned)

    def pretrained_override(self, config: RunConfig) -> list[str]:
        """A fine-tuning starts from the export of the config it names, trained here; else from scratch."""
        if not config.pretrained:
            return []
        source = next((c for c in self.configs if starts_from(config, c) and c.name in self.exports), None)
        if source is None:
            self.progress(f"{config.name}: no export of the config it fine-tunes was made here; starts from scratch")
            return ["model.bert.pretrained="]
        return [f"model.bert.pretrained={self.exports[source.name]}"]

    def throughput(self, config: RunConfig, run_dir: Path, records: list[dict]) -> tuple[str, dict[str, Any]]:
        """samples/s, peak memory and, for BERT on a GPU of known peak, model FLOPs utilisation."""
        k, every = self.plan.resume_step, self.plan.log_every
        train = [r for r in records if r.get("kind") == "train" and r.get("samples_per_s")]
        # The first window of each launch holds its warm-up (allocator, cuDNN choices, loader workers).
        steady = [r["samples_per_s"] for r in train if r["step"] not in (every, k + every)] or \
                 [r["samples_per_s"] for r in train]
        if not steady:
            raise CheckFailed(f"no train record with samples_per_s in {run_dir / 'metrics.jsonl'}")
        samples = statistics.median(steady)
        peaks = [json.loads(p.read_text()) for launch in (1, 2)
                 for p in sorted((self.work / "memory").glob(f"{config.run_name}-{launch}-rank*.json"))]
        if len(peaks) < 2:
            raise CheckFailed(f"peak memory missing: {len(peaks)} of 2 launches wrote it to {self.work / 'memory'}")
        peak = max(p["peak_bytes"] for p in peaks)
        parameters = trainable_parameters(run_dir)
        figures: dict[str, Any] = {"samples_per_s": samples, "windows": len(steady), "peak_memory_bytes": peak,
                                   "peak_memory_measure": peaks[0]["measure"], "parameters": parameters,
                                   "steps": 2 * k, "precision": self.precision}
        summary = (f"{samples:,.0f} samples/s (median of {len(steady)} windows of {every} "
                   f"step{'s' if every > 1 else ''}); "
                   f"peak {peak / 2**30:.2f} GiB ({'GPU' if self.device == 'cuda' else 'RSS'}); "
                   f"{parameters:,} params")
        if config.model == "legnet":
            # samples_per_s counts rows (data.batch_size per micro batch); the model sees each row on both strands.
            hours = LEGNET_PUBLISHED_STEPS * LEGNET_PUBLISHED_ROWS_PER_STEP / samples / 3600
            figures["published_steps_hours"] = hours
            summary += (f"; the published {LEGNET_PUBLISHED_STEPS:,} steps of {LEGNET_PUBLISHED_ROWS_PER_STEP} rows: "
                        f"{hours:.1f} h at this rate (published: about {LEGNET_PUBLISHED_HOURS:g} h on one RTX A5000)")
        if config.model == "bert":
            tokens = tokens_per_row(config, self.shards)
            figures["tokens_per_s"] = samples * tokens
            summary += f"; {samples * tokens:,.0f} tokens/s ({tokens:g}/row)"
            peak_tflops = self.peak_tflops()
            if peak_tflops:
                figures["mfu"] = 6 * parameters * samples * tokens / (peak_tflops * 1e12)
                summary += f"; MFU {figures['mfu']:.1%}"
            else:
                summary += f"; MFU n/a ({self.mfu_basis()})"
        return summary, figures

    def peak_tflops(self) -> float | None:
        """The dense bf16 peak of this GPU from :data:`PEAK_BF16_TFLOPS`, None when unknown or on a CPU."""
        name = self.environment.get("gpu") or ""
        return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)

    def mfu_basis(self) -> str:
        """Which peak model FLOPs utilisation is measured against, in words."""
        if self.device != "cuda":
            return "no peak for a CPU"
        name = self.environment.get("gpu") or "unknown GPU"
        tflops = self.peak_tflops()
        if tflops is None:
            return f"no peak in the table for {name}"
        return f"6 x params x tokens/s over {tflops:g} TFLOP/s, the dense bf16 peak of {name}"

    def check_gsam(self, config: RunConfig) -> tuple[str, dict[str, Any]]:
        """GSAM at ZeRO 0 and 3 on the same seed and data: per-step losses within the tolerance."""
        planned = self.plan.seconds["gsam"] / 2
        losses = {}
        for stage in (0, 3):
            run_dir = self.work / "runs" / f"gsam-zero{stage}"
            shutil.rmtree(run_dir, ignore_errors=True)
            overrides = [*self.overrides(run_dir, self.plan.gsam_steps), "run.log_every=1", "data.val_split=",
                         "optim.gsam.enabled=true", f"engine.zero_stage={stage}", "engine.precision=fp32",
                         "engine.tf32=false", *(["model.bert.pretrained="] if config.pretrained else [])]
            self.launch(config, overrides, f"gsam-zero{stage}", planned)
            records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
            losses[stage] = [r["loss"] for r in sorted(records, key=lambda r: r["step"])]
        if len(losses[0]) != self.plan.gsam_steps or len(losses[3]) != self.plan.gsam_steps:
            raise CheckFailed(f"expected {self.plan.gsam_steps} losses per stage, got {len(losses[0])} and "
                              f"{len(losses[3])}")
        if not all(isinstance(v, float) and math.isfinite(v) for v in losses[0] + losses[3]):
            raise CheckFailed(f"non-finite losses: ZeRO 0 {losses[0]}, ZeRO 3 {losses[3]}")
        differences = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses[0], losses[3])]
        worst = max(differences)
        figures = {"steps": self.plan.gsam_steps, "max_relative_difference": worst, "tolerance": GSAM_TOLERANCE,
                   "losses_zero0": losses[0], "losses_zero3": losses[3]}
        summary = (f"{self.plan.gsam_steps} steps, fp32 TF32 off: largest relative loss difference {worst:.2e} "
                   f"(step {differences.index(worst) + 1}; tolerance {GSAM_TOLERANCE:g})")
        if worst > GSAM_TOLERANCE:
            raise CheckFailed(f"disagree: {summary}; ZeRO 0 {losses[0]}, ZeRO 3 {losses[3]}")
        return summary, figures

    def check_fp16(self, config: RunConfig) -> tuple[str, dict[str, Any]]:
        """DeepSpeed fp16 with dynamic loss scaling for k steps on a GPU: finite losses, samples/s.

        On a CPU, DeepSpeed has no fp16: the launch must end with the toolkit's one-line refusal.
        """
        k = self.plan.resume_step
        run_dir = self.work / "runs" / f"fp16-{config.run_name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [*self.overrides(run_dir, k), "engine.precision=fp16", f"run.log_every={self.plan.log_every}",
                     *(["model.bert.pretrained="] if config.pretrained else [])]
        if self.device != "cuda":
            try:
                self.launch(config, overrides, f"fp16-{config.run_name}", self.plan.seconds["fp16"])
            except CheckFailed as failure:
                log = (self.work / "logs" / f"fp16-{config.run_name}.log").read_text()
                refusal = next((line for line in log.splitlines() if "error: engine.precision=fp16" in line), None)
                if refusal is None:
                    raise CheckFailed(f"the fp16 launch failed without the one-line refusal: {failure}") from None
                return f"refused on a CPU, as it must be: {refusal.strip()}", {"refused": True}
            raise CheckFailed("an fp16 run on a CPU was expected to be refused, and it trained")
        self.launch(config, overrides, f"fp16-{config.run_name}", self.plan.seconds["fp16"])
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
        losses = [r["loss"] for r in records]
        if not losses or not all(isinstance(v, float) and math.isfinite(v) for v in losses):
            raise CheckFailed(f"fp16 losses {losses}")
        rates = [r["samples_per_s"] for r in records[1:]] or [r["samples_per_s"] for r in records]
        rate = statistics.median(rates)
        return (f"{k} steps, dynamic loss scaling: losses finite ({losses[0]:.4g} -> {losses[-1]:.4g}), "
                f"{rate:,.0f} samples/s"), {"steps": k, "losses": losses, "samples_per_s": rate}

    def predict(self, config: RunConfig) -> tuple[str, dict[str, Any]]:
        """``promoter-dist predict`` of the run's latest checkpoint over the synthetic test file."""
        out = self.work / "predictions" / f"{config.run_name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        command = [tool("promoter-dist"), "predict", "--checkpoint", str(self.trained[config.name]), "--which",
                   "latest", "--input", str(self.test_file), "--out", str(out), "--device", self.device,
                   "--precision", self.precision, "--no-progress"]
        t0 = time.perf_counter()
        output = run_logged(command, self.work / "logs" / f"predict-{config.run_name}.log",
                            self.clock.timeout(self.plan.seconds["predict"]), child_environment(self.device))
        seconds = time.perf_counter() - t0
        match = re.search(r"wrote (\d+) predictions .*?\(([\d,.]+) rows/s\)", output)
        if match is None:
            raise CheckFailed(f"no 'wrote N predictions ... rows/s' line in {self.work / 'logs'}")
        rows, rate = int(match.group(1)), float(match.group(2).replace(",", ""))
        if rows != self.plan.test_rows:
            raise CheckFailed(f"{rows} predictions for {self.plan.test_rows} test rows")
        return ((f"{rows:,} rows: {rate:,.0f} rows/s predicting, {rows / seconds:,.0f} rows/s with start-up "
                 f"({seconds:.1f} s)"), {"rows": rows, "rows_per_s": rate, "rows_per_s_all_in": rows / seconds})

    def shard_build(self) -> tuple[str, dict[str, Any]]:
        """Synthesise and build ``build_rows`` rows with every core; rows/s of each. The files are removed after."""
        cli, env = tool("promoter-dist"), child_environment(self.device)
        workers = os.cpu_count() or 1
        folder = self.work / "build"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        planned = self.plan.seconds["shards"]
        try:
            synth = run_logged([cli, "synth", "--rows", str(self.plan.build_rows), "--seed", "2", "--out",
                                str(folder / "train.txt"), "--workers", str(workers), "--no-progress"],
                               self.work / "logs" / "build-synth.log", self.clock.timeout(planned / 3), env)
            t0 = time.perf_counter()
            build = run_logged([cli, "shards", "build", str(folder / "train.txt"), "--out", str(folder / "shards"),
                                "--workers", str(workers), "--no-progress"], self.work / "logs" / "build-shards.log",
                               self.clock.timeout(2 * planned / 3), env)
            seconds = time.perf_counter() - t0
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # about 2 GB at the full size
        synth_rate = re.search(r"\(([\d,]+) rows/s\)", synth)
        match = re.search(r"in ([\d.]+) s \(([\d,]+) rows/s, ([\d.]+) B/row\)", build)
        if match is None:
            raise CheckFailed("no 'in S s (N rows/s, B B/row)' line in the build's output")
        rate, per_row = float(match.group(2).replace(",", "")), float(match.group(3))
        figures = {"rows": self.plan.build_rows, "workers": workers, "build_rows_per_s": rate,
                   "bytes_per_row": per_row, "build_seconds": float(match.group(1)), "command_seconds": seconds,
                   "synth_rows_per_s": float(synth_rate.group(1).replace(",", "")) if synth_rate else None}
        return ((f"{workers} workers: build {rate:,.0f} rows/s ({float(match.group(1)):.1f} s, {per_row:.1f} B/row; "
                 f"{seconds:.1f} s with start-up); synth {figures['synth_rows_per_s'] or 0:,.0f} rows/s"), figures)

    # -- output ---------------------------------------------------------------------------

    def print_table(self) -> None:
        """The one table: part, result, figures or reason, seconds against the plan."""
        print()
        print(f"GPU check: --device {self.device}{' --quick' if self.plan.size == 'debug' else ''}, "
              f"{self.precision}, {self.clock.elapsed():.0f} s of the {self.clock.limit_s:.0f} s limit; "
              f"MFU: {self.mfu_basis()}")
        print()
        print("| part | result | figures | s (plan) |")
        print("|---|---|---|---|")
        for row in self.rows:
            plan = f" ({row.budget:.0f})" if row.budget else ""
            print(f"| {row.part} | {row.status} | {row.summary.replace('|', '/')} | {row.seconds:.0f}{plan} |")
        failed = sum(row.status == "FAIL" for row in self.rows)
        print()
        print(f"{len(self.rows) - failed} OK, {failed} FAIL; logs and runs in {self.work}")

    def report(self) -> dict[str, Any]:
        """Everything of the run for ``--json``."""
        return {"device": self.device, "quick": self.plan.size == "debug", "precision": self.precision,
                "limit_s": self.clock.limit_s, "elapsed_s": self.clock.elapsed(),
                "planned_s": self.plan.seconds, "environment": self.environment, "mfu_basis": self.mfu_basis(),
                "ok": not any(row.status == "FAIL" for row in self.rows), "work": str(self.work),
                "rows": [row.__dict__ for row in self.rows]}


# --------------------------------------------------------------------------- figures of a run


def read_pointer(path: Path) -> str:
    """The tag a checkpoint pointer file names."""
    if not path.exists():
        raise CheckFailed(f"no checkpoint pointer {path} after the first launch")
    return path.read_text().strip()


def validation_figures(records: list[dict], k: int) -> tuple[str, dict[str, Any]]:
    """Validation records at steps k and 2k with a finite loss."""
    val = {r["step"]: r for r in records if r.get("kind") == "val"}
    missing = [step for step in (k, 2 * k) if step not in val]
    if missing:
        raise CheckFailed(f"no validation record at step {missing[0]} (records at {sorted(val) or 'none'})")
    last = val[2 * k]
    if not isinstance(last.get("loss"), float) or not math.isfinite(last["loss"]):
        raise CheckFailed(f"validation loss at step {2 * k} is {last.get('loss')}")
    metrics = {key: value for key, value in last.items() if key not in ("kind", "step", "epoch", "lr_scale")
               and isinstance(value, (int, float))}
    shown = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())
    return f"records at steps {k} and {2 * k}; step {2 * k}: {shown}", {"step": 2 * k, **metrics}


def resume_figures(records: list[dict], tag: str, k: int, rerun_output: str) -> tuple[str, dict[str, Any]]:
    """The first launch's checkpoint is step k, the rerun resumed from it and reached 2k."""
    expected = f"step{k:08d}"
    if tag != expected:
        raise CheckFailed(f"the first launch's latest checkpoint is {tag!r}, not {expected}")
    if f"resumed from {tag}" not in rerun_output:
        raise CheckFailed(f"the rerun's output has no 'resumed from {tag}'")
    last = max((r["step"] for r in records if r.get("kind") == "train"), default=0)
    if last != 2 * k:
        raise CheckFailed(f"the rerun's last train record is step {last}, not {2 * k}")
    return f"checkpoint {tag} saved; the rerun resumed from it and reached step {2 * k}", \
        {"checkpoint": tag, "final_step": last}


def tokens_per_row(config: RunConfig, shards: Path | None) -> float:
    """Tokens per row of the config's training batches (padding included), from one loader batch."""
    import dataclasses

    from promoter_dist.config import load_config
    from promoter_dist.data.loader import ShardLoader

    loaded = load_config(config.path, [f"data.shards={shards}", "model.bert.pretrained="])
    loader_config = dataclasses.replace(loaded.loader_config(loaded.data.train_split, True), num_workers=0)
    batch = next(iter(ShardLoader(str(shards), loader_config, 0, 1)))
    ids = batch["input_ids"]
    return ids.numel() / ids.shape[0]


# --------------------------------------------------------------------------- the environment probe


def probe_environment(device: str) -> dict[str, Any]:
    """What the check's subprocesses will find: versions, the GPU, every package module importable.

    Run in a fresh process (``--probe FILE``). ``problem`` names what makes the rest pointless (a missing
    dependency, no GPU); ``module_errors`` the package modules that fail to import, or that import a
    library the GPU machine lacks.
    """
    import importlib
    import pkgutil

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                            "problem": "", "module_errors": []}
    for name in ("deepspeed", "transformers", "tokenizers", "safetensors", "webdataset", "submitit", "pydantic",
                 "yaml", "xxhash"):
        try:
            module = importlib.import_module(name)
            info[name] = getattr(module, "__version__", getattr(module, "VERSION", "?"))
        except Exception as error:
            info[name] = None
            info["problem"] = info["problem"] or f"cannot import {name}: {type(error).__name__}: {error}"
    import promoter_dist

    info["promoter_dist"] = f"{promoter_dist.__version__} at {Path(promoter_dist.__file__).parent}"
    modules = sorted(m.name for m in pkgutil.walk_packages(promoter_dist.__path__, "promoter_dist."))
    for name in modules:
        before = set(sys.modules)
        try:
            importlib.import_module(name)
        except Exception as error:
            info["module_errors"].append(f"cannot import {name}: {type(error).__name__}: {error}")
            continue
        absent = [m for m in ABSENT_ON_GPU_MACHINE if m in sys.modules and m not in before]
        if absent:
            info["module_errors"].append(f"importing {name} imports {absent[0]} at module level (the GPU machine "
                                         "has none)")
    info["modules"] = len(modules)
    info["optional_loaded"] = [m for m in OPTIONAL_MODULES if m in sys.modules]
    if device == "cuda":
        if not torch.cuda.is_available():
            info["problem"] = info["problem"] or "--device cuda: torch sees no GPU"
        else:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["bf16"] = torch.cuda.is_bf16_supported()
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- entry


def prepare_work(work: Path) -> Path:
    """An empty work folder: created, or emptied when this script made it; any other folder is refused."""
    if work.exists() and any(work.iterdir()):
        if not (work / WORK_MARKER).exists():
            raise SystemExit(f"error: --work {work}: not empty and not a folder of this check; choose another")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("made by benchmarks/gpu_check.py; emptied by its next run\n")
    return work


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--skip`` becomes a set of part names."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: bf16 over NCCL; cpu: fp32 over gloo (default: cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="debug-size configs, tiny data and step counts (about 3 minutes on 2 CPU cores)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--work", help="folder for data, runs and logs (default: a new temporary folder)")
    parser.add_argument("--configs", default="", help="only configs whose name (e.g. nad/full) contains this")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: fp16, gsam, predict, shards")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds for the whole check (default: 480 on a GPU, 420 with --quick)")
    parser.add_argument("--probe", metavar="FILE", help=argparse.SUPPRESS)  # the environment part's process
    args = parser.parse_args(argv)
    args.skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    unknown = args.skip - {"fp16", "gsam", "predict", "shards"}
    if unknown:
        parser.error(f"--skip: unknown part {min(unknown)!r} (fp16, gsam, predict, shards)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every row is OK, 1 otherwise."""
    args = parse_args(argv)
    if args.probe:
        Path(args.probe).write_text(json.dumps(probe_environment(args.device)) + "\n")
        return 0
    work = prepare_work(Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-")))
    check = GPUCheck(args, QUICK_PLAN if args.quick else GPU_PLAN, work)
    status = check.run()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(check.report(), indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
