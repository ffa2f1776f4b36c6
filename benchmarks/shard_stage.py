"""Shard stage figures, measured side by side in one run.

    python benchmarks/shard_stage.py                 # full size: 6,739,258 synthetic rows
    python benchmarks/shard_stage.py --rows 500000   # quicker
    python benchmarks/shard_stage.py --workdir W --keep --parts build,memory,naive,verify,loader
    python benchmarks/shard_stage.py --workdir W --parts glove      # the rest, on the shards of W

Prints: synthetic write rows/s; the shard build's scaling table (workers 1..N, N the
cores: rows/s end to end (read + validate + split + write + fsync), efficiency against W x
the one-worker rate, peak memory of the build's processes together and bytes/row); the
build with every core (the end-to-end figure) and its bytes/row on disk, against a naive
one-sample-per-sequence ``webdataset.ShardWriter`` on a subset; the build's peak memory
at 1M, 3M and all rows, its bytes/row (slope of a line fit) and the fit's figure for 100M
rows; loader samples/s in one process for each
kind of model input; the cost of the per-block checks (xxh3 checksum and schema) as the
median ratio of --pairs pairs of loader runs with and without them (each a whole epoch by
default), in alternating order, timed by the process's CPU clock (other processes on a shared machine shift each pair
alike); GloVe count + fit time over the NAD words of the train split. Targets on a
2-core machine: build >= 1M rows/s (floor 500k) and <= 150 B/row, W workers >= 0.9 x W x
one worker, peak memory a constant plus a few bytes/row (100M rows < 4 GB), loader >= 1M
samples/s per process, block checks <= 5% of it, GloVe <= 2 min.

Peak memory (from a build of its own: sampling takes CPU from the build) is the largest sum, sampled every
20 ms, of the proportional set size (Pss,
``/proc/<pid>/smaps_rollup``: shared pages split between the processes that map them) of the
build process and all its workers: what the build takes from the node.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from promoter_dist.data.dream import ReadOptions, read_dream
from promoter_dist.data.glove import GloveConfig, nad_word_batches, train_glove
from promoter_dist.data.loader import LoaderConfig, ShardLoader
from promoter_dist.data.shards import build_shards, load_manifest, verify_shards
from promoter_dist.data.synthetic import synthesize

FULL_ROWS = 6_739_258  # rows of the real train_sequences.txt
PARTS = ("build", "memory", "naive", "verify", "loader", "glove")
"""The benchmark's parts, in the order they run; 'build' makes the synthetic file and the shards the later ones read."""


def naive_per_sequence(source: Path, out: Path, rows: int) -> tuple[float, float]:
    """rows/s and bytes/row of one tar sample per sequence (the usual WebDataset layout)."""
    import webdataset as wds

    t0 = time.perf_counter()
    data, _ = read_dream(source, ReadOptions(workers=0), progress=False) if rows else (None, None)
    parsed = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with wds.ShardWriter(str(out / "naive-%06d.tar"), maxcount=100_000, verbose=0) as sink:
        for i in range(min(rows, len(data))):
            sink.write({
                "__key__": f"{i:09d}",
                "seq.npy": data.codes[i, : data.lengths[i]],
                "y.npy": data.labels[i : i + 1],
            })
    seconds = time.perf_counter() - t0 + parsed * min(rows, len(data)) / len(data)
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    return min(rows, len(data)) / seconds, size / min(rows, len(data))


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except OSError:  # the process ended meanwhile
            continue
    return found


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _build_in_child(source: str, out: str, workers: int, reply) -> None:
    import resource

    result = build_shards(source, out, workers=workers, overwrite=True, progress=False)
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    reply.send((result.seconds, result.manifest, sum(u.ru_utime + u.ru_stime for u in used)))


def measured_build(source: Path, out: Path, workers: int, sample: bool = True) -> tuple[float, dict, int, float]:
    """(seconds, manifest, peak bytes, CPU seconds of the build and its workers) of one shard build in a fresh
    process, its memory sampled from outside (``sample``; else the peak is 0).

    Sampling costs: reading ``smaps_rollup`` walks a process's pages, ~3 ms per 300 MB process,
    about a third of a core at one sample every 20 ms (measured). With every core building, that
    is taken from the build; so the timed builds are not sampled, and the memory is measured by
    separate builds.
    """
    context = mp.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_build_in_child, args=(str(source), str(out), workers, send))
    child.start()
    peak = 0
    while child.is_alive() and not receive.poll(0.02):
        if sample:
            peak = max(peak, sum(_pss_bytes(pid) for pid in _descendants(child.pid)))
    seconds, manifest, cpu = receive.recv()
    child.join()
    if child.exitcode:
        raise SystemExit(f"shard build with {workers} workers failed (exit {child.exitcode})")
    return seconds, manifest, peak, cpu


def first_rows(source: Path, rows: int, out: Path) -> Path:
    """The first ``rows`` lines of ``source`` as a file of their own."""
    with open(source, "rb") as src, open(out, "wb") as dst:
        dst.writelines(itertools.islice(src, rows))
    return out


def loader_rate(shards: Path, config: LoaderConfig, max_rows: int, verify: bool = True,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Samples/s of one loader process over ``max_rows`` rows by ``clock``; ``verify=False``: without block checks."""
    loader = ShardLoader(shards, config, rank=0, world_size=1, verify=verify)
    n = 0
    t0 = clock()
    for batch in loader:
        n += len(batch["y"])
        if n >= max_rows:
            break
    return n / (clock() - t0)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: the order statistics x_(j) and x_(n+1-j)
    (1-based), with j the largest rank whose Binomial(n, 1/2) tail P(B < j) stays within (1 - confidence) / 2.
    The smallest and largest value when there are too few values for that confidence."""
    ordered = sorted(values)
    n, tail, j = len(ordered), 0.0, 0
    while j < n and tail + math.comb(n, j) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, j) / 2**n
        j += 1
    return (ordered[j - 1], ordered[n - j]) if j else (ordered[0], ordered[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help="synthetic rows (default: the real file's 6,739,258)")
    parser.add_argument("--naive-rows", type=int, default=100_000, help="subset for the per-sequence writer")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--pairs", type=int, default=21,
                        help="pairs of loader runs with and without block checks, alternating order (default 21)")
    parser.add_argument("--pair-rows", type=int, default=0,
                        help="rows per loader run of a pair (default 0: a whole epoch of the train split, at most "
                             "2M rows: what training sees; a short run reads more blocks per row delivered, because "
                             "every lane's shuffle buffer starts inside a block)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)}); a part that needs "
                             "the synthetic file or the shards reuses those of --workdir when the parts making them "
                             "are left out (e.g. a second run with --parts glove)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="promoter-dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count()
    print(f"machine: {cores} cores; rows: {args.rows:,}; scratch: {work}")
    try:
        source = work / "train.txt"
        if "build" in parts or (parts & {"memory", "naive"} and not source.exists()):
            synth = synthesize(source, rows=args.rows, seed=0, progress=False)
            print(f"synth           {synth.seconds:7.1f} s  {args.rows / synth.seconds:12,.0f} rows/s  "
                  f"oracle Pearson {synth.oracle_pearson:.4f}")

        full = None  # (rows, seconds, peak, manifest) of the build with every core
        if "build" in parts:
            print(f"shards build scaling ({args.rows:,} rows; peak memory: build + workers, Pss, from a second "
                  "build sampled every 20 ms; the timed one is not sampled)")
            print(f"  {'workers':>7} {'seconds':>8} {'rows/s':>12} {'efficiency':>10} {'peak MB':>8} {'B/row':>6} "
                  f"{'CPU s':>6} {'rows/CPU s':>11}")
            one_worker = None
            for workers in range(1, (cores or 1) + 1):
                shutil.rmtree(work / "shards", ignore_errors=True)
                _, _, peak, _ = measured_build(source, work / "shards", workers)
                shutil.rmtree(work / "shards", ignore_errors=True)
                seconds, manifest, _, cpu = measured_build(source, work / "shards", workers, sample=False)
                rows = manifest["rows"]
                rate = rows / seconds
                one_worker = one_worker or rate
                print(f"  {workers:>7} {seconds:8.2f} {rate:12,.0f} {rate / (workers * one_worker):10.2f} "
                      f"{peak / 2**20:8.0f} {peak / rows:6.1f} {cpu:6.1f} {rows / cpu:11,.0f}")
            print("  (target: efficiency >= 0.90; CPU s: build and workers together, what other load on the machine "
                  "inflates least)")
            full = (rows, seconds, peak, manifest)
            shard_bytes = sum(s["bytes"] for v in manifest["splits"].values() for s in v["shards"])
            build_rate, build_bpr = rows / seconds, shard_bytes / rows
            print(f"shards build    {seconds:7.1f} s  {build_rate:12,.0f} rows/s  {build_bpr:7.1f} B/row  "
                  f"({cores} workers; target >= 1,000,000 rows/s, floor 500,000; <= 150 B/row)")

        if "memory" in parts:
            sizes = sorted({min(n, args.rows) for n in (1_000_000, 3_000_000)} | {args.rows})
            if len(sizes) < 3:
                sizes = sorted({max(args.rows // 4, 1), max(args.rows // 2, 1), args.rows})
            print(f"shards build memory ({cores} workers): peak of the build and its workers by rows")
            points = []
            for n in sizes:
                if n == args.rows and full is not None:
                    n_rows, n_peak = full[0], full[2]
                else:
                    part = first_rows(source, n, work / f"first{n}.txt") if n != args.rows else source
                    _, part_manifest, n_peak, _ = measured_build(part, work / "memory", cores or 1)
                    n_rows = part_manifest["read"]["rows_in"]
                    shutil.rmtree(work / "memory", ignore_errors=True)
                    if part != source:
                        part.unlink()
                points.append((n_rows, n_peak))
                print(f"  {n_rows:>12,} rows  peak {n_peak / 2**20:8.0f} MB  {n_peak / n_rows:7.1f} B/row")
            slope, constant = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
            print(f"  fit: {constant / 2**20:,.0f} MB + {slope:.1f} B/row -> 100M rows: "
                  f"{(constant + slope * 100e6) / 2**30:.2f} GB (target < 4 GB)")

        if "naive" in parts:
            subset = work / "subset.txt"
            with open(source) as src, open(subset, "w") as dst:
                for i, line in enumerate(src):
                    if i >= args.naive_rows:
                        break
                    dst.write(line)
            naive_rate, naive_bpr = naive_per_sequence(subset, work / "naive", args.naive_rows)
            print(f"naive per-seq   {'':7}    {naive_rate:12,.0f} rows/s  {naive_bpr:7.1f} B/row  "
                  f"(on {args.naive_rows:,} rows)")
            if full is not None:
                print(f"ratio           block shards are {build_rate / naive_rate:.1f}x faster and "
                      f"{naive_bpr / build_bpr:.1f}x smaller")

        if "verify" in parts:
            t0 = time.perf_counter()
            check = verify_shards(work / "shards")
            print(f"shards verify   {time.perf_counter() - t0:7.1f} s  ok={check.ok}  {check.rows_checked:,} rows "
                  "decoded")

        if "loader" in parts:
            manifest = load_manifest(work / "shards")
            sample = min(2_000_000, manifest["splits"]["train"]["rows"])
            for label, config in (
                ("bases", LoaderConfig(batch_size=1024)),
                ("nad words", LoaderConfig(view="nad", tokens="nad", batch_size=1024)),
                ("kmer ids", LoaderConfig(tokens="kmer", batch_size=1024)),
                ("onehot", LoaderConfig(tokens="onehot", batch_size=1024)),  # LegNet's windows (expanded on the device)
            ):
                rate = loader_rate(work / "shards", config, sample)
                print(f"loader {label:9}        {rate:12,.0f} samples/s per process (target >= 1,000,000)")
                rates: dict[bool, list[float]] = {True: [], False: []}
                for pair in range(max(args.pairs, 1)):
                    for verify in ((True, False) if pair % 2 == 0 else (False, True)):
                        rates[verify].append(loader_rate(work / "shards", config, min(sample, args.pair_rows or sample),
                                                         verify, clock=time.process_time))
                ratios = [a / b for a, b in zip(rates[True], rates[False])]
                low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                least, most = median_interval(ratios)
                print(f"  with / without block checks: median ratio {statistics.median(ratios):.3f} (quartiles "
                      f"{low:.3f}-{high:.3f}, {len(ratios)} pairs, CPU clock): checks cost "
                      f"{1 - statistics.median(ratios):.1%}, 95% interval {1 - most:.1%}-{1 - least:.1%} "
                      f"(target <= 5%)")

        if "glove" in parts:
            t0 = time.perf_counter()
            info = train_glove(nad_word_batches(str(work / "shards")), work / "glove", GloveConfig(), progress=False)
            glove_seconds = time.perf_counter() - t0
            sentences = load_manifest(work / "shards")["splits"]["train"]["rows_nad"]
            print(f"glove           {glove_seconds:7.1f} s  ({sentences:,} sentences, count + fit + save; target "
                  "<= 120 s)")
            detail = {k: v for k, v in info.items() if "second" in k or k.endswith("_s")}
            if detail:
                print(f"                {detail}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
