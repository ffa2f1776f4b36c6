"""The model leaderboard: every model's debug recipe on several synthetic grammars, one table.

    python benchmarks/models.py                                   # default grammar + random grammars 1 and 2
    python benchmarks/models.py --grammars default,random:7 --models legnet,dream_cnn --rows 50000

Every recipe under ``configs/*/debug.yaml`` was tuned on the grammar ``promoter-dist synth``
plants by default, so a ratio to that grammar's oracle says as much about the tuning as about
the model. Here each grammar (``default``, or ``random:K``: the grammar drawn from seed K) gets
its own synthetic training file (``--rows`` rows, seed 0) and a held-out test file (``--test-rows``
rows of the test kind, seed 1, from the same grammar), shards and GloVe vectors; then every model
trains its debug recipe with the ``deepspeed`` launcher on ``--procs`` CPU processes, and
``promoter-dist predict`` scores the test file from the run's best checkpoint.

Per model and grammar: test Pearson of the predictions against the test labels, over the oracle
Pearson (the noise-free values against the same labels); the table gives parameters, training
samples/s (median of the run's logged windows), each grammar's ratio, the mean and the worst.
BERT is pretrained (masked LM) and fine-tuned on each grammar's own rows; its samples/s and
parameters are the fine-tuning's. A reference row with no training run comes first: a ridge
regression on the counts of each row's overlapping 4-mers (:func:`kmer_ridge_pearson`), what a
model gets from sequence composition alone, without motif positions or their combinations.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _runs import read_metrics, trainable_parameters
from promoter_dist.data.dream import ReadOptions, Rows, read_dream
from promoter_dist.data.glove import W2V_FILE, GloveConfig, nad_word_batches, train_glove
from promoter_dist.data.shards import ShardOptions, build_shards
from promoter_dist.data.synthetic import synthesize
from promoter_dist.demo import launch_training
from promoter_dist.metrics import pearson

REPO = Path(__file__).resolve().parents[1]
KMER_RIDGE_K = 4
"""k of the composition-only reference row (4**4 = 256 counts per row)."""
CONFIGS = REPO / "configs"


@dataclass(frozen=True)
class Recipe:
    """One model of the leaderboard: its debug config (and, for BERT, the pretraining before it)."""

    name: str
    """As printed."""
    config: str
    """Under configs/."""
    pretrain: str = ""
    """A masked-LM config whose export the run starts from ('' for none)."""
    glove: bool = False
    """Needs the grammar's GloVe vectors (NAD)."""


RECIPES = {
    "legnet": Recipe("LegNet", "legnet/debug.yaml"),
    "dream_cnn": Recipe("DREAM-CNN", "dream_cnn/debug.yaml"),
    "dream_rnn": Recipe("DREAM-RNN", "dream_rnn/debug.yaml"),
    "nad": Recipe("NAD", "nad/debug.yaml", glove=True),
    "bert": Recipe("BERT (pretrained + fine-tuned)", "bert/finetune_debug.yaml", pretrain="bert/pretrain_debug.yaml"),
}


@dataclass
class Grammar:
    """One synthetic grammar and the files made from it."""

    label: str
    """'default' or 'random:K'."""
    folder: Path
    train: Path = Path()
    test: Path = Path()
    shards: Path = Path()
    vectors: Path = Path()
    oracle_test: float = math.nan
    """Pearson of the test file's noise-free values with its labels."""
    kmer_ridge: float = math.nan
    """Test Pearson of :func:`kmer_ridge_pearson` fitted on the training file."""
    test_labels: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def synth_args(self) -> dict:
        if self.label == "default":
            return {"grammar": "default"}
        return {"grammar": "random", "grammar_seed": int(self.label.split(":", 1)[1])}


@dataclass
class Result:
    """One model on one grammar."""

    ratio: float = math.nan
    pearson: float = math.nan
    parameters: int = 0
    samples_per_s: float = math.nan
    seconds: float = 0.0
    error: str = ""


def make_grammar_data(grammar: Grammar, rows: int, test_rows: int, glove_iterations: int) -> None:
    """Training and test files, shards and GloVe vectors of one grammar."""
    grammar.folder.mkdir(parents=True, exist_ok=True)
    grammar.train, grammar.test = grammar.folder / "train.txt", grammar.folder / "test.txt"
    synthesize(grammar.train, rows=rows, seed=0, kind="train", progress=False, **grammar.synth_args)
    test = synthesize(grammar.test, rows=test_rows, seed=1, kind="test", progress=False, **grammar.synth_args)
    grammar.oracle_test = test.oracle_pearson
    test_file = read_dream(grammar.test, ReadOptions(), progress=False)[0]
    grammar.test_labels = test_file.labels.astype(np.float64)
    grammar.shards = grammar.folder / "shards"
    build_shards(grammar.train, grammar.shards, ShardOptions(), progress=False, log=lambda *_: None)
    glove_dir = grammar.folder / "glove"
    train_glove(nad_word_batches(str(grammar.shards)), glove_dir, GloveConfig(iterations=glove_iterations), progress=False)
    grammar.vectors = glove_dir / W2V_FILE
    measure_reference(grammar, test_file)


def measure_reference(grammar: Grammar, test_file: Rows | None = None) -> None:
    """The composition-only reference of one grammar: :func:`kmer_ridge_pearson` from its files
    (``test_file``: the test file's rows when the caller has read them already)."""
    train_file = read_dream(grammar.folder / "train.txt", ReadOptions(), progress=False)[0]
    if test_file is None:
        test_file = read_dream(grammar.folder / "test.txt", ReadOptions(), progress=False)[0]
    grammar.kmer_ridge = kmer_ridge_pearson(train_file.codes, train_file.labels, test_file.codes, test_file.labels)


def kmer_counts(codes: np.ndarray, k: int = KMER_RIDGE_K) -> np.ndarray:
    """(rows, 4**k) float64 counts of each row's overlapping k-mers of A C G T (windows with N or padding skipped)."""
    rows, width = codes.shape
    if width < k:
        return np.zeros((rows, 4**k))
    index = np.zeros((rows, width - k + 1), dtype=np.int64)
    valid = np.ones((rows, width - k + 1), dtype=bool)
    for j in range(k):
        window = codes[:, j : width - k + 1 + j].astype(np.int64)
        valid &= window < 4  # codes 0..3 are A C G T; N is 4, padding 5
        index = index * 4 + np.minimum(window, 3)
    row_of = np.broadcast_to(np.arange(rows)[:, None], index.shape)
    flat = row_of[valid] * 4**k + index[valid]
    return np.bincount(flat, minlength=rows * 4**k).reshape(rows, 4**k).astype(np.float64)


def kmer_ridge_pearson(train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray,
                       test_labels: np.ndarray, k: int = KMER_RIDGE_K, alpha: float = 10.0) -> float:
    """Test Pearson of a ridge regression (penalty ``alpha``, free intercept) on overlapping k-mer counts."""
    x, x_test = kmer_counts(train_codes, k), kmer_counts(test_codes, k)
    mean_x, mean_y = x.mean(axis=0), float(np.mean(train_labels))
    centred = x - mean_x
    weights = np.linalg.solve(centred.T @ centred + alpha * np.eye(x.shape[1]),
                              centred.T @ (np.asarray(train_labels, np.float64) - mean_y))
    return pearson((x_test - mean_x) @ weights + mean_y, np.asarray(test_labels, np.float64))


def train(config: Path, overrides: list[str], run_dir: Path, procs: int, log: Path) -> None:
    """One DeepSpeed launch of a config, as a user runs it; raises with the log's tail when it fails."""
    shutil.rmtree(run_dir, ignore_errors=True)
    status = launch_training(config, [*overrides, f"run.out_dir={run_dir}", "run.plots=false"], procs, log)
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{config} failed (exit {status}); {log}:\n{tail}")


def predict(run_dir: Path, test: Path, out: Path, log: Path) -> np.ndarray:
    """``promoter-dist predict`` of the run's best checkpoint over the test file; values in row order."""
    cli = Path(sys.executable).parent / "promoter-dist"
    with open(log, "w") as sink:
        status = subprocess.run([str(cli), "predict", "--checkpoint", str(run_dir), "--input", str(test),
                                 "--out", str(out), "--no-progress"], stdout=sink, stderr=subprocess.STDOUT,
                                check=False).returncode
    if status != 0:
        raise RuntimeError(f"predict failed (exit {status}); {log}")
    values = json.loads(out.read_text())
    return np.array([values[str(i)] for i in range(len(values))], dtype=np.float64)


def run_recipe(recipe: Recipe, grammar: Grammar, procs: int) -> Result:
    """Train one recipe on one grammar's shards and score the held-out file."""
    t0 = time.perf_counter()
    runs = grammar.folder / "runs"
    runs.mkdir(exist_ok=True)
    key = Path(recipe.config).parent.name
    data = [f"data.shards={grammar.shards}"]
    overrides = [*data, *([f"data.glove={grammar.vectors}"] if recipe.glove else [])]
    if recipe.pretrain:
        pretrain_dir = runs / f"{key}-pretrain"
        train(CONFIGS / recipe.pretrain, data, pretrain_dir, procs, runs / f"{key}-pretrain.log")
        overrides.append(f"model.bert.pretrained={pretrain_dir / 'export'}")
    run_dir = runs / key
    train(CONFIGS / recipe.config, overrides, run_dir, procs, runs / f"{key}.log")
    predictions = predict(run_dir, grammar.test, runs / f"{key}-test.json", runs / f"{key}-predict.log")
    if len(predictions) != len(grammar.test_labels):
        raise RuntimeError(f"{len(predictions)} predictions for {len(grammar.test_labels)} test rows")
    r = pearson(predictions, grammar.test_labels)
    windows = [rec["samples_per_s"] for rec in read_metrics(run_dir / "metrics.jsonl")
               if rec.get("kind") == "train" and rec.get("samples_per_s")]
    return Result(ratio=r / grammar.oracle_test, pearson=r, parameters=trainable_parameters(run_dir),
                  samples_per_s=statistics.median(windows[1:] or windows) if windows else math.nan,
                  seconds=time.perf_counter() - t0)


def table(results: dict[str, dict[str, Result]], grammars: list[Grammar]) -> str:
    """Markdown: model, parameters, samples/s, ratio per grammar, mean, worst (sorted by mean)."""
    head = ["model", "parameters", "samples/s"] + [f"{g.label} (oracle {g.oracle_test:.3f})" for g in grammars]
    lines = ["| " + " | ".join(head + ["mean", "worst"]) + " |", "|" + "---|" * (len(head) + 2)]

    def mean_ratio(name: str) -> float:
        ratios = [results[name][g.label].ratio for g in grammars]
        return statistics.fmean(ratios) if all(math.isfinite(x) for x in ratios) else -1.0

    reference = [g.kmer_ridge / g.oracle_test for g in grammars]
    if all(math.isfinite(x) for x in reference):
        lines.append("| " + " | ".join([f"overlapping {KMER_RIDGE_K}-mer counts + ridge (reference)", f"{4**KMER_RIDGE_K + 1:,}", "-"]
                                       + [f"{x:.3f} ({g.kmer_ridge:.3f})" for x, g in zip(reference, grammars)]
                                       + [f"{statistics.fmean(reference):.3f}", f"{min(reference):.3f}"]) + " |")
    for name in sorted(results, key=mean_ratio, reverse=True):
        row = results[name]
        first = next((r for r in row.values() if r.parameters), Result())
        cells = [RECIPES[name].name, f"{first.parameters:,}",
                 f"{statistics.median([r.samples_per_s for r in row.values() if math.isfinite(r.samples_per_s)] or [math.nan]):,.0f}"]
        for g in grammars:
            r = row[g.label]
            cells.append(f"{r.ratio:.3f} ({r.pearson:.3f})" if not r.error else "FAIL")
        ratios = [row[g.label].ratio for g in grammars]
        finite = all(math.isfinite(x) for x in ratios)
        cells += [f"**{statistics.fmean(ratios):.3f}**" if finite else "-", f"{min(ratios):.3f}" if finite else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grammars", default="default,random:1,random:2",
                        help="comma-separated: default, random:K (default: default,random:1,random:2)")
    parser.add_argument("--models", default=",".join(RECIPES), help=f"comma-separated, among {', '.join(RECIPES)}")
    parser.add_argument("--rows", type=int, default=100_000, help="training rows per grammar (the main job's)")
    parser.add_argument("--test-rows", type=int, default=5_000, help="held-out test rows per grammar")
    parser.add_argument("--procs", type=int, default=2, help="DeepSpeed processes per training run")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="write every figure here, after each model; cells it already holds "
                        "(same --rows, --test-rows, --procs) are not trained again")
    args = parser.parse_args(argv)
    args.grammars = [g.strip() for g in args.grammars.split(",") if g.strip()]
    for g in args.grammars:
        if g != "default" and not (g.startswith("random:") and g[7:].isdigit()):
            parser.error(f"--grammars: {g!r} is neither 'default' nor 'random:K'")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(RECIPES))
    if unknown:
        parser.error(f"--models: unknown {unknown[0]!r} (choose from {', '.join(RECIPES)})")
    return args


def load_earlier(path: Path | None, args: argparse.Namespace) -> dict[str, dict[str, Result]]:
    """Cells an earlier run of the same sizes recorded in ``--json``: they are not trained again."""
    if path is None or not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
        same = all(earlier.get(k) == getattr(args, k) for k in ("rows", "test_rows", "procs"))
        cells = {m: {g: Result(**r) for g, r in row.items() if not r.get("error")}
                 for m, row in earlier.get("results", {}).items()} if same else {}
    except (ValueError, TypeError, AttributeError) as error:
        raise SystemExit(f"{path}: not a leaderboard record this script can continue ({error})") from None
    return cells


def write_record(path: Path, args: argparse.Namespace, grammar_figures: dict[str, dict[str, float]],
                 results: dict[str, dict[str, Result]]) -> None:
    """Every figure so far, rewritten atomically after each cell so that a stopped run continues."""
    record = {"grammars": grammar_figures,
              "results": {m: {g: vars(r) for g, r in row.items()} for m, row in results.items()},
              "rows": args.rows, "test_rows": args.test_rows, "procs": args.procs}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="leaderboard-"))
    record = Path(args.json) if args.json else None
    t0 = time.perf_counter()
    grammars = [Grammar(label, work / label.replace(":", "-")) for label in args.grammars]
    earlier = load_earlier(record, args)
    results = {m: dict(earlier.get(m, {})) for m in [*args.models, *(set(earlier) - set(args.models))]}
    # Per grammar: oracle_test and kmer_ridge (test Pearson), as make_grammar_data measured them.
    grammar_figures = json.loads(record.read_text()).get("grammars", {}) if earlier else {}
    try:
        for grammar in grammars:
            todo = [name for name in args.models if grammar.label not in results[name]]
            if not todo:
                figures = grammar_figures.get(grammar.label, {})
                grammar.oracle_test = figures.get("oracle_test", math.nan)
                grammar.kmer_ridge = figures.get("kmer_ridge", math.nan)
                if not math.isfinite(grammar.kmer_ridge) and (grammar.folder / "test.txt").is_file():
                    measure_reference(grammar)  # a record written before the reference row existed
                    figures["kmer_ridge"] = grammar.kmer_ridge
                print(f"{grammar.label}: every model recorded in {record}", flush=True)
                continue
            t_data = time.perf_counter()
            make_grammar_data(grammar, args.rows, args.test_rows, 50)
            print(f"{grammar.label}: {args.rows:,} train + {args.test_rows:,} test rows, shards, GloVe in "
                  f"{time.perf_counter() - t_data:.0f} s; test oracle Pearson {grammar.oracle_test:.4f}; "
                  f"{KMER_RIDGE_K}-mer ridge {grammar.kmer_ridge:.4f} (ratio {grammar.kmer_ridge / grammar.oracle_test:.3f})", flush=True)
            grammar_figures[grammar.label] = {"oracle_test": grammar.oracle_test, "kmer_ridge": grammar.kmer_ridge}
            for name in todo:
                try:
                    result = run_recipe(RECIPES[name], grammar, args.procs)
                except RuntimeError as error:
                    result = Result(error=str(error))
                    print(f"  {RECIPES[name].name}: FAIL {error}", flush=True)
                else:
                    print(f"  {RECIPES[name].name}: test Pearson {result.pearson:.4f}, ratio {result.ratio:.3f}, "
                          f"{result.samples_per_s:,.0f} samples/s, {result.seconds:.0f} s", flush=True)
                results[name][grammar.label] = result
                if record:
                    write_record(record, args, grammar_figures, results)
        print(f"\n{len(args.models)} models x {len(grammars)} grammars in {(time.perf_counter() - t0) / 60:.1f} min; "
              f"ratio = test Pearson / oracle Pearson (test Pearson in brackets)\n")
        print(table({m: results[m] for m in args.models}, grammars))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.error for row in results.values() for r in row.values()) else 0

if __name__ == "__main__":
    sys.exit(main())
