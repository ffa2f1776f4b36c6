"""The ``promoter-dist`` command: one entry, a subcommand per stage.

    promoter-dist synth   --rows N --seed S --out train.txt   synthetic DREAM-format data
    promoter-dist check   FILE                                 validate a DREAM file, report bad rows
    promoter-dist shards build FILE --out DIR                  tokenized WebDataset shards + manifest
    promoter-dist shards verify DIR                            check shards against the manifest
    promoter-dist shards info DIR                              counts per split
    promoter-dist glove   DIR --out DIR                        GloVe vectors over NAD words of the shards
    promoter-dist demo    --out DIR                            the whole chain on synthetic data

Errors the user can fix are printed as one line (``file:line [field]: why``) with
exit status 2; no traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import UserError


def _add_read_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input validation")
    g.add_argument("--labels", choices=["required", "optional"], default="required",
                   help="'optional' for test files whose expression column may be absent (default: required)")
    g.add_argument("--strict", action="store_true", help="stop at the first bad row instead of counting it")
    g.add_argument("--max-length", type=int, default=300, help="longest accepted sequence in bp (default: 300)")
    g.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="refuse the whole file above this fraction of bad rows (default: 0.05)")


def _read_options(args: argparse.Namespace):
    from .data.dream import ReadOptions

    return ReadOptions(labels=args.labels, strict=args.strict, max_length=args.max_length,
                       max_bad_fraction=args.max_bad_fraction, workers=getattr(args, "workers", None))


# --------------------------------------------------------------------------- subcommands


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import synthesize

    report = synthesize(args.out, rows=args.rows, seed=args.seed, kind=args.kind, workers=args.workers,
                        progress=not args.no_progress)
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
    from .data.shards import ShardOptions, build_shards

    options = ShardOptions(splits=ShardOptions.parse_splits(args.splits), split_seed=args.split_seed,
                           rows_per_block=args.rows_per_block, blocks_per_shard=args.blocks_per_shard,
                           top_fraction=args.top_fraction)
    result = build_shards(args.source, args.out, options, _read_options(args), workers=args.workers,
                          overwrite=args.overwrite, progress=not args.no_progress)
    _print_build(result)
    return 0


def _print_build(result) -> None:
    m = result.manifest
    print(result.report.summary() if result.report.rows_in else f"source: {m['source']['path']}")
    for split, info in m["splits"].items():
        print(f"  {split}: {info['rows']} rows ({info['rows_nad']} NAD-eligible, {info['rows_top']} top-expression) "
              f"in {len(info['shards'])} shards")
    total_bytes = sum(s["bytes"] for info in m["splits"].values() for s in info["shards"])
    rows = max(m["rows"], 1)
    print(f"  top-expression threshold {m['labels']['top_threshold']:.4g} ({m['labels']['rows_top']} rows)")
    print(f"wrote {result.shards_written} shards, reused {result.shards_reused}, in {result.seconds:.1f} s "
          f"({rows / max(result.seconds, 1e-9):,.0f} rows/s, {total_bytes / rows:.1f} B/row) -> {result.out_dir}")


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


def nad_word_batches(shard_dir: str, split: str = "train", batch_size: int = 65536):
    """Word arrays (n, 80) of every NAD-eligible row of a split, once each, in shard order."""
    from .data.loader import LoaderConfig, ShardLoader

    config = LoaderConfig(split=split, view="nad", tokens="nad", batch_size=batch_size, shuffle=False, drop_last=False)
    loader = ShardLoader(shard_dir, config, rank=0, world_size=1)
    for batch in loader:
        yield batch["words"].numpy().astype("int16")


def cmd_glove(args: argparse.Namespace) -> int:
    from .data.glove import GloveConfig, train_glove

    config = GloveConfig(dim=args.dim, window=args.window, min_count=args.min_count, x_max=args.x_max,
                         alpha=args.alpha, iterations=args.iterations, seed=args.seed, workers=args.workers)
    info = train_glove(nad_word_batches(args.shards, args.split), args.out, config, progress=not args.no_progress)
    print(json.dumps(info, indent=1, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> shards -> verify -> GloVe, with the figures a user checks."""
    from .data.glove import GloveConfig, train_glove
    from .data.shards import ShardOptions, build_shards, verify_shards
    from .data.synthetic import synthesize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/4] synthetic data: {args.rows} rows, seed {args.seed}")
    synth = synthesize(out / "train.txt", rows=args.rows, seed=args.seed, kind="train", progress=not args.no_progress)
    test = synthesize(out / "test.txt", rows=max(args.rows // 20, 1000), seed=args.seed + 1, kind="test",
                      progress=False)
    print(f"      {synth.path} ({synth.seconds:.1f} s), test set {test.path}; oracle Pearson {synth.oracle_pearson:.4f}")
    print("[2/4] shards")
    build = build_shards(synth.path, out / "shards", ShardOptions(), progress=not args.no_progress)
    _print_build(build)
    print("[3/4] verify")
    check = verify_shards(out / "shards")
    print(f"      {'OK' if check.ok else 'FAILED'}: {check.shards_checked} shards, {check.rows_checked} rows")
    if not check.ok:
        for problem in check.problems:
            print(f"BAD {problem}")
        return 1
    print("[4/4] GloVe")
    info = train_glove(nad_word_batches(str(out / "shards")), out / "glove",
                       GloveConfig(iterations=args.glove_iterations), progress=not args.no_progress)
    print(f"      {json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict))})}")
    print(f"done in {time.perf_counter() - t0:.1f} s; oracle Pearson of the synthetic labels: {synth.oracle_pearson:.4f}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Official DREAM 2022 score of a submission: per-subset table and the two weighted scores."""
    from .io import write_json_atomic
    from .scoring import load_predictions, load_truth, score

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
    p.add_argument("--splits", default="train=0.9,val=0.1", help="name=fraction,... by sequence hash (default: 90/10)")
    p.add_argument("--split-seed", type=int, default=1, help="salt of the split hash (default: 1)")
    p.add_argument("--rows-per-block", type=int, default=1024, help="rows per WebDataset sample (default: 1024)")
    p.add_argument("--blocks-per-shard", type=int, default=32, help="blocks per tar file (default: 32)")
    p.add_argument("--top-fraction", type=float, default=0.2, help="top-expression subset for BERT pretraining (default: 0.2)")
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
    p.add_argument("--out", required=True, help="output folder for vectors.kv, vectors.w2v.txt, glove.json")
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

    p = add("demo", cmd_demo, "run synthetic data -> shards -> verify -> GloVe end to end")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic training rows (default: 200000)")
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
