"""The ``promoter-dist`` command: one entry, a subcommand per stage.

    promoter-dist synth   --rows N --seed S --out train.txt   synthetic DREAM-format data
    promoter-dist check   FILE                                 validate a DREAM file, report bad rows
    promoter-dist shards build FILE --out DIR                  tokenized WebDataset shards + manifest
    promoter-dist shards verify DIR                            check shards against the manifest
    promoter-dist shards info DIR                              counts per split
    promoter-dist glove   DIR --out DIR                        GloVe vectors over NAD words of the shards
    promoter-dist demo    --out DIR                            the whole chain on synthetic data
    promoter-dist score   --predictions FILE --truth-dir DIR   official DREAM 2022 score of a submission JSON
    promoter-dist predict --checkpoint RUN --input FILE --out submission.json   DREAM submission of a trained run
    promoter-dist export  --checkpoint RUN --out model.safetensors   fp32 weights + the run's config (safetensors)
    promoter-dist submit train --config FILE [KEY=VALUE ...]   training as a SLURM job (submitit; or --cluster local)
    promoter-dist submit shards FILE --out DIR                 the shard build as a SLURM CPU job

Errors the user can fix are printed as one line (``file:line [field]: why``) with
exit status 2; no traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UserError

if TYPE_CHECKING:  # the data modules are imported where used: --help and the job commands need none
    from .data.dream import ReadOptions
    from .data.shards import ShardOptions


def _add_read_options(p: argparse.ArgumentParser) -> None:
    """The input-validation options of every command that reads a DREAM file; defaults: ``ReadOptions``'."""
    from .data.dream import ReadOptions

    defaults = ReadOptions()
    g = p.add_argument_group("input validation")
    g.add_argument("--labels", choices=["required", "optional"], default=defaults.labels,
                   help=f"'optional' for test files whose expression column may be absent (default: {defaults.labels})")
    g.add_argument("--strict", action="store_true", help="stop at the first bad row instead of counting it")
    g.add_argument("--max-length", type=int, default=defaults.max_length,
                   help=f"longest accepted sequence in bp (default: {defaults.max_length})")
    g.add_argument("--max-bad-fraction", type=float, default=defaults.max_bad_fraction,
                   help=f"refuse the whole file above this fraction of bad rows (default: {defaults.max_bad_fraction})")


def _read_options(args: argparse.Namespace) -> ReadOptions:
    """The ``ReadOptions`` of a command's input-validation options (and its --workers, if it has one)."""
    from .data.dream import ReadOptions

    return ReadOptions(labels=args.labels, strict=args.strict, max_length=args.max_length,
                       max_bad_fraction=args.max_bad_fraction, workers=getattr(args, "workers", None))


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ShardOptions`` (split, block and shard sizes, top fraction), with its defaults."""
    from .data.shards import ShardOptions

    defaults = ShardOptions()
    splits = ",".join(f"{name}={fraction:g}" for name, fraction in defaults.splits)
    percents = "/".join(f"{fraction * 100:g}" for _, fraction in defaults.splits)
    p.add_argument("--splits", default=splits, help=f"name=fraction,... by sequence hash (default: {percents})")
    p.add_argument("--split-seed", type=int, default=defaults.split_seed,
                   help=f"salt of the split hash (default: {defaults.split_seed})")
    p.add_argument("--rows-per-block", type=int, default=defaults.rows_per_block,
                   help=f"rows per WebDataset sample (default: {defaults.rows_per_block})")
    p.add_argument("--blocks-per-shard", type=int, default=defaults.blocks_per_shard,
                   help=f"blocks per tar file (default: {defaults.blocks_per_shard})")
    p.add_argument("--top-fraction", type=float, default=defaults.top_fraction,
                   help=f"top-expression subset for BERT pretraining (default: {defaults.top_fraction})")
    p.add_argument("--segment-bytes", type=int, default=defaults.segment_bytes,
                   help="input bytes one worker parses and writes at a time; the shards depend on it, not on "
                        f"--workers (default: {defaults.segment_bytes})")


def shard_options_from_args(args: argparse.Namespace) -> ShardOptions:
    """The ``ShardOptions`` of the options :func:`add_shard_arguments` added."""
    from .data.shards import ShardOptions

    return ShardOptions(splits=ShardOptions.parse_splits(args.splits), split_seed=args.split_seed,
                        rows_per_block=args.rows_per_block, blocks_per_shard=args.blocks_per_shard,
                        top_fraction=args.top_fraction, segment_bytes=args.segment_bytes)


# --------------------------------------------------------------------------- subcommands


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import synthesize
    from .io import check_output_file

    check_output_file(args.out, "--out")
    report = synthesize(args.out, rows=args.rows, seed=args.seed, kind=args.kind, workers=args.workers,
                        progress=not args.no_progress, grammar=args.grammar, grammar_seed=args.grammar_seed)
    if report.grammar != "default":
        print(f"grammar: {report.grammar}, grammar seed {report.grammar_seed} (drawn parameters in the info file)")
    print(f"wrote {report.rows} rows to {report.path} in {report.seconds:.1f} s "
          f"({report.rows / max(report.seconds, 1e-9):,.0f} rows/s)")
    print(f"noise-free values: {report.noise_free_path}; parameters: {report.info_path}")
    print(f"oracle Pearson (noise-free vs written labels): {report.oracle_pearson:.4f}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .data.dream import read_dream

    t0 = time.perf_counter()
    rows, report = read_dream(args.file, _read_options(args), progress=not args.no_progress)
    print(report.summary(examples=args.examples))
    print(f"{len(rows)} valid rows in {time.perf_counter() - t0:.1f} s")
    return 0 if report.rows_rejected == 0 else 1


def cmd_shards_build(args: argparse.Namespace) -> int:
    from .data.shards import build_shards
    from .io import check_output_folder, require_regular_file

    require_regular_file(args.source, "a DREAM text file")  # the input's error first, then the output's
    check_output_folder(args.out, "--out")
    result = build_shards(args.source, args.out, shard_options_from_args(args), _read_options(args),
                          workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    print(result.summary())
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from .data.shards import verify_shards

    result = verify_shards(args.dir, deep=not args.quick)
    for problem in result.problems:
        print(f"BAD {problem}")
    status = "OK" if result.ok else "FAILED"
    print(f"{status}: {result.shards_checked} shards checked, {result.rows_checked} rows decoded")
    return 0 if result.ok else 1


def cmd_shards_info(args: argparse.Namespace) -> int:
    from .data.shards import load_manifest

    m = load_manifest(args.dir)
    summary = {
        "source": m["source"], "rows": m["rows"], "read": m["read"], "labels": m["labels"],
        "splits": {k: {kk: vv for kk, vv in v.items() if kk != "shards"} | {"shards": len(v["shards"])}
                   for k, v in m["splits"].items()},
    }
    print(json.dumps(summary, indent=1))
    return 0


def cmd_glove(args: argparse.Namespace) -> int:
    from .data.glove import GloveConfig, nad_word_batches, train_glove
    from .io import check_output_folder

    check_output_folder(args.out, "--out")
    config = GloveConfig(dim=args.dim, window=args.window, min_count=args.min_count, x_max=args.x_max,
                         alpha=args.alpha, iterations=args.iterations, seed=args.seed, workers=args.workers)
    info = train_glove(nad_word_batches(args.shards, args.split), args.out, config, progress=not args.no_progress)
    print(json.dumps(info, indent=1, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> shards -> verify -> GloVe -> NAD, LegNet and BERT training, with the figures a user checks."""
    from .demo import DemoOptions, run_demo
    from .io import check_output_folder

    check_output_folder(args.out, "--out")
    options = DemoOptions(out=Path(args.out), rows=args.rows, seed=args.seed, procs=args.procs,
                          models=tuple(m for m in args.models.split(",") if m), overrides=tuple(args.overrides),
                          glove_iterations=args.glove_iterations, progress=not args.no_progress)
    return run_demo(options)


def cmd_score(args: argparse.Namespace) -> int:
    """Official DREAM 2022 score of a submission: per-subset table and the two weighted scores."""
    from .io import check_output_file, write_json_atomic
    from .scoring import load_predictions, load_truth, score

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:  # checked before the work, not after it
            check_output_file(path, option)
    truth = load_truth(args.truth_dir, test_file=args.test_file, subsets_dir=args.subsets_dir, final=args.final)
    predictions = load_predictions(args.predictions)
    report = score(predictions, truth, source=args.predictions)
    print(report.table())
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.json, report.to_dict())
        except OSError as exc:
            raise UserError(f"{args.json}: cannot write the report ({exc.strerror or exc})") from None
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_subsets

        plot_subsets(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predictions of a trained run for every line of a DREAM file, written as a submission JSON."""
    from .io import check_output_file, require_regular_file
    from .predict import load_model, predict_with_model, resolve_device
    from .scoring import write_submission

    # Input and output are checked before the model is loaded: a wrong path fails at once.
    require_regular_file(args.input, "a DREAM text file")
    check_output_file(args.out, "--out")
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    trained = load_model(args.checkpoint, args.which, device, trust_pickle=args.trust_pickle)
    print(f"{trained.source} ({trained.config.model.name}) on {device}, {args.precision}", flush=True)
    t_predict = time.perf_counter()
    values = predict_with_model(trained.task, trained.model, trained.config, args.input, batch_size=args.batch_size, pad=args.pad,
                                precision=args.precision, progress=not args.no_progress)
    seconds = time.perf_counter() - t_predict
    mode = "rank" if args.rank else "raw"
    path = write_submission(args.out, values, mode=mode)
    print(f"wrote {len(values)} predictions ({mode}) to {path}: {seconds:.1f} s for the rows "
          f"({len(values) / max(seconds, 1e-9):,.0f} rows/s), {time.perf_counter() - t0:.1f} s in all")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint's consolidated fp32 weights and the run's config as one safetensors file."""
    import contextlib

    from .checkpointing import checkpoint_tag, export_model
    from .io import check_output_file
    from .predict import run_folder

    check_output_file(args.out, "--out")
    folder = run_folder(args.checkpoint)
    tag = checkpoint_tag(folder, args.which)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation prints on stdout
            export_model(folder, out, tag, trust_pickle=args.trust_pickle)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the weights ({exc.strerror or exc})") from None
    print(f"wrote the fp32 weights of checkpoint {tag} of {folder} to {out} ({out.stat().st_size:,} bytes, "
          f"safetensors with the run's config); predict with --checkpoint {out}, or load with "
          f"model.load_state_dict(safetensors.torch.load_file(path))")
    return 0


def cmd_submit_train(args: argparse.Namespace) -> int:
    from .launch.options import cluster_options_from_args
    from .launch.submit import submit_training, training_options

    options = cluster_options_from_args(args)
    job = submit_training(args.config, args.overrides, options, log_dir=args.log_dir, entry=args.entry)
    # Described with the GPUs, tasks and cores the submission filled in.
    return _follow_job(job, training_options(options, args.config, args.overrides), args.wait)


def cmd_submit_shards(args: argparse.Namespace) -> int:
    from .launch.options import cluster_options_from_args
    from .launch.submit import submit_shards

    options = cluster_options_from_args(args)
    shard_options = shard_options_from_args(args)
    job = submit_shards(args.source, args.out, options, shard_options, _read_options(args), workers=args.workers,
                        overwrite=args.overwrite, log_dir=args.log_dir)
    return _follow_job(job, options, args.wait)


def _follow_job(job, options, wait: bool) -> int:
    """Print where the job is; with --wait (always for local/debug) wait and print each task's result."""
    from .launch import monitor

    print(monitor.describe(job, options), flush=True)
    if options.cluster == "slurm" and not wait:
        print(f"follow it with: squeue -j {job.job_id}; tail -f {job.paths.folder}/{job.job_id}_0_log.out")
        return 0
    try:
        results = monitor.wait(job)
    except KeyboardInterrupt:
        if options.cluster == "slurm":
            print(f"promoter-dist: stopped waiting; job {job.job_id} keeps running (scancel {job.job_id} stops it)",
                  file=sys.stderr)
        else:
            monitor.cancel(job)  # local tasks are children of this command: stop them with it
        return 130
    for result in results:
        print(json.dumps(result, default=str))
    print(f"job {job.job_id} completed ({len(results)} task(s))")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promoter-dist", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("synth", cmd_synth, "write synthetic data in DREAM train/test format with a planted signal")
    p.add_argument("--rows", type=int, required=True, help="rows to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is identical for a seed)")
    p.add_argument("--out", required=True, help="output file, e.g. train.txt")
    p.add_argument("--kind", choices=["train", "test"], default="train", help="train_sequences or test_sequences style")
    p.add_argument("--grammar", choices=["default", "random"], default="default",
                   help="planted grammar: the default yeast-like motifs, or one drawn from --grammar-seed")
    p.add_argument("--grammar-seed", type=int, default=0, help="seed of a random grammar (same seed, same grammar)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add("check", cmd_check, "validate a DREAM text file and report bad rows by reason (exit 1 if any)")
    p.add_argument("file", help="train_sequences.txt-style file, plain or .gz")
    p.add_argument("--examples", type=int, default=5, help="example locations shown per reason")
    p.add_argument("--workers", type=int, default=None, help="parse processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_read_options(p)

    shards = sub.add_parser("shards", help="build, verify and inspect tokenized WebDataset shards",
                            description="build, verify and inspect tokenized WebDataset shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    p = add("build", cmd_shards_build, "validate, split and write block shards with a manifest", shards_sub)
    p.add_argument("source", help="train_sequences.txt-style file, plain or .gz")
    p.add_argument("--out", default="out/shards", help="output folder (default: out/shards, git-ignored)")
    add_shard_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace shards built from another source/options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_read_options(p)
    p = add("verify", cmd_shards_verify, "check shards against manifest.json; names any corrupted or truncated shard", shards_sub)
    p.add_argument("dir", help="shard folder")
    p.add_argument("--quick", action="store_true", help="sizes and checksums only, do not decode blocks")
    p = add("info", cmd_shards_info, "print the manifest's counts", shards_sub)
    p.add_argument("dir", help="shard folder")

    p = add("glove", cmd_glove, "train GloVe vectors over the NAD words of a shard split")
    p.add_argument("shards", help="shard folder")
    p.add_argument("--out", required=True, help="output folder for vectors.w2v.txt, glove.json")
    p.add_argument("--split", default="train", help="split to count (default: train)")
    p.add_argument("--dim", type=int, default=128, help="vector size (default: 128)")
    p.add_argument("--window", type=int, default=10, help="left-context window (default: 10)")
    p.add_argument("--min-count", type=int, default=5, help="drop words seen fewer times (default: 5)")
    p.add_argument("--x-max", type=float, default=10.0, help="weighting cut-off (default: 10)")
    p.add_argument("--alpha", type=float, default=0.75, help="weighting exponent (default: 0.75)")
    p.add_argument("--iterations", type=int, default=50, help="passes over the co-occurrences (default: 50)")
    p.add_argument("--seed", type=int, default=1, help="seed (default: 1)")
    p.add_argument("--workers", type=int, default=None, help="counting processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add("demo", cmd_demo,
            "run synthetic data -> shards -> verify -> GloVe -> NAD, LegNet and BERT pretraining/fine-tuning end to end")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--rows", type=int, default=100_000, help="synthetic training rows (default: 100000)")
    p.add_argument("--procs", type=int, default=2,
                   help="DeepSpeed processes for training (CPU: gloo ranks; GPU: GPUs); 0 skips training (default: 2)")
    p.add_argument("--models", default="nad,legnet,bert",
                   help="models to train, comma-separated: nad, legnet, bert (pretraining then fine-tuning) "
                        "(default: nad,legnet,bert)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every training run, e.g. run.epochs=2")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--glove-iterations", type=int, default=50, help="GloVe passes (default: 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = add("score", cmd_score,
            "official DREAM 2022 score of a submission JSON: per-subset table, weighted Pearson and Spearman scores")
    p.add_argument("--predictions", required=True, help='submission JSON {"<row index>": prediction}')
    p.add_argument("--truth-dir", help="public-leaderboard folder (ground.json + *_exp_indices.json), "
                                       "e.g. data/dream2022/public_leaderboard")
    p.add_argument("--test-file", help="labelled test file (sequence<TAB>expression, row i = test index i): "
                                       "score the whole test set instead")
    p.add_argument("--subsets-dir", help="test-subset CSVs for --test-file, e.g. data/dream2022/test_subsets")
    p.add_argument("--final", action="store_true",
                   help="final leaderboard: with --test-file, drop the public-leaderboard items read from --truth-dir")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--plot", help="also write a PNG with predicted vs measured per subset here")

    p = add("predict", cmd_predict,
            "predict expression for every line of a DREAM file with a trained run; writes the submission JSON "
            '{"<row index>": value} (row index = 0-based line of the input)')
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="run folder of a training run (its run.out_dir), or a model file written by promoter-dist export")
    p.add_argument("--which", default="best",
                   help="checkpoint: 'best' (best validation), 'latest' or a tag such as step00001200 (default: best)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read checkpoint files that need a full pickle load (your own legacy files only: unpickling "
                        "runs code stored in the file)")
    p.add_argument("--input", required=True, help="test_sequences.txt-style file, plain or .gz; every line is predicted")
    p.add_argument("--out", required=True, help="submission JSON to write (atomically)")
    p.add_argument("--rank", action="store_true",
                   help="write average rank / N in (0, 1] instead of raw values (as team NAD submitted)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per forward pass (default: 1024)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32, or bf16 autocast (faster on a GPU) (default: fp32)")
    p.add_argument("--pad", action="store_true",
                   help="NAD: fit rows that are not 110 bp to 110 bp with vector sequence, keeping their 3' end "
                        "(default: such a row is an error naming its line)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add("export", cmd_export, "write a checkpoint's consolidated fp32 weights (any ZeRO stage) and the run's "
            "config as one safetensors file, which predict runs from")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run folder of a training run (its run.out_dir)")
    p.add_argument("--which", default="best", help="checkpoint: 'best', 'latest' or a tag (default: best)")
    p.add_argument("--out", required=True, help="file to write, e.g. model.safetensors")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read checkpoint files that need a full pickle load (your own legacy files only)")

    submit = sub.add_parser("submit", help="run training or the shard build as a SLURM job (or locally) with submitit",
                            description="run training or the shard build as a SLURM job (or locally) with submitit")
    submit_sub = submit.add_subparsers(dest="submit_command", required=True, metavar="SUBCOMMAND")
    from .launch.jobs import DEFAULT_ENTRY
    from .launch.options import add_cluster_arguments

    p = add("train", cmd_submit_train, "one job of N nodes x G GPUs running the trainer on a config; requeued and "
            "resumed from the latest checkpoint on preemption or time limit", submit_sub)
    p.add_argument("--config", required=True, help="run configuration (YAML), as for `deepspeed train.py --config`")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run.out_dir=runs/x")
    p.add_argument("--entry", default=DEFAULT_ENTRY,
                   help=f"trainer entry point module:function, called in each task with the argv and the stop request "
                        f"(default: {DEFAULT_ENTRY})")
    add_cluster_arguments(p, time="24:00:00", job_name="promoter-dist-train")
    p = add("shards", cmd_submit_shards, "build and verify shards as one CPU job using every core of a node; "
            "a requeued or rerun build resumes", submit_sub)
    p.add_argument("source", help="train_sequences.txt-style file, plain or .gz")
    p.add_argument("--out", default="out/shards", help="output folder (default: out/shards, git-ignored)")
    add_shard_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="build processes (default: every core of the job)")
    p.add_argument("--overwrite", action="store_true", help="replace shards built from another source/options")
    _add_read_options(p)
    add_cluster_arguments(p, time="4:00:00", job_name="promoter-dist-shards", training=False)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"promoter-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promoter-dist: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
