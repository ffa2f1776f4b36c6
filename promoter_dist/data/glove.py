"""GloVe vectors for Team NAD's 5-mer words: counting, fitting, saving, loading.

Recipe (Team NAD's DREAM 2022 report and code, GitHub
de-Boer-Lab/random-promoter-dream-challenge-2022): each row of 80 word ids
(:mod:`promoter_dist.data.nad_words`) is one sentence; co-occurrences are counted
with a window of 10 words of LEFT context only (GloVe's ``-symmetric 0``), each pair
weighted 1/distance; words seen fewer than ``min_count`` times are dropped; the
128-d vectors are fitted with GloVe's weighted least-squares objective

    sum over X_ij > 0 of  f(X_ij) * (w_i . w~_j + b_i + b~_j - log X_ij)^2,
    f(x) = min(1, (x / x_max) ** alpha),

by AdaGrad with GloVe's own update rule for 50 passes, and the saved vector of a
word is ``w + w~`` (GloVe's default output).

Conventions:

* ``Cooccurrence.matrix[c, x]`` sums 1/d over every occurrence of word ``c`` at
  position j of a sentence with word ``x`` at position j - d, 1 <= d <= window.
  Rows (the centre words) are fitted by ``w`` and ``b``, columns (the left
  context) by ``w~`` and ``b~``. Pairs never cross sentence boundaries.
* ``min_count`` is applied after counting: pairs involving a dropped word are
  discarded and distances are left as they were. GloVe instead deletes rare
  tokens from the stream before counting, which pulls their neighbours closer;
  counting first keeps a single pass over a one-shot iterable. On NAD's corpus
  (hundreds of millions of tokens over 1,024 words) no word is rare, so the two
  agree.
* Counting is exact: each worker keeps integer pair counts per distance, and the
  1/d weights are applied once after the workers' counts are summed, so the
  result does not depend on how the sentences were chunked or spread over
  workers.
* Mini-batch AdaGrad follows GloVe's per-entry rule: the gradient of
  ``0.5 f diff^2`` is scaled by the learning rate before it is squared into the
  accumulator (which starts at 1), and a parameter moves by the scaled gradient
  over the square root of the accumulator as it stood before the step. A batch
  sums its entries' steps and squared steps per word.

Vector files:

* ``vectors.w2v.txt``: word2vec text with a ``count dim`` header, values written
  with 9 significant digits so float32 vectors read back exactly. It is the only
  vector file written, and what training reads (``data.glove``). Text, not a
  pickle: a vector file may come from another user, and text cannot carry code.
  Why text rather than ``.npy`` + a JSON vocabulary: one self-describing file that
  gensim and other tools read as it is, parsed by the same code as NAD's file, and
  the 1,024 x 128 table loads in 50-70 ms (2 CPU cores), nothing beside a
  run's start-up.
* :func:`load_vectors` also reads GloVe text without a header, such as NAD's
  published ``vectors.txt``. GloVe appends an ``<unk>`` vector (the mean of its
  rarest words' vectors); it is not a 5-mer and no word id maps to it, so the
  loader skips it. Keys are upper-case 5-mers; any other key is an error.
* A pickle (gensim's own ``KeyedVectors.save`` format, the ``vectors.kv`` this
  module wrote before) is recognised by its content, whatever its name, and
  refused: unpickling runs whatever code the file carries. ``trust_pickle=True``
  (``data.trust_pickled_vectors``) loads one, for a user's own legacy files only.

Cost on 2 CPU cores for 6.7M sentences of 80 words: counting about 20 s (two
worker processes), fitting about 30 s (1,048,576 entries, 50 passes).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickletools
import queue
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..errors import InputError, UserError
from ..io import atomic_open, read_input, write_json_atomic
from .nad_words import NUM_WORDS, VOCABULARY, word_id

if TYPE_CHECKING:  # gensim and torch are imported where used: counting needs neither.
    import torch
    from gensim.models import KeyedVectors

W2V_FILE = "vectors.w2v.txt"
LEGACY_KV_FILE = "vectors.kv"
"""The pickled gensim file earlier versions wrote; read only with ``trust_pickle``."""
INFO_FILE = "glove.json"
UNK = "<unk>"

# Rows handed to a counting worker at a time: large enough to amortise the
# per-call cost of a 1M-bin bincount, small enough to keep a worker near 300 MB.
_CHUNK_ROWS = 1 << 17
# A pass is split into at least this many AdaGrad steps. With GloVe's rule a batch
# in which a word has many entries overshoots (sums of steps taken without
# feedback), so small co-occurrence matrices get proportionally small batches.
# On NAD-like data (all 1,048,576 pairs non-zero) the default 16,384 entries per
# step reaches the loss of per-entry GloVe after 50 passes; 65,536 diverges.
_MIN_STEPS_PER_PASS = 64
# Entries per chunk when evaluating the loss over the whole matrix.
_EVAL_ROWS = 1 << 16


@dataclass(frozen=True)
class GloveConfig:
    """Hyper-parameters of counting and fitting (defaults: NAD's recipe)."""

    dim: int = 128
    """Vector dimension."""
    window: int = 10
    """Left-context window in words (distances 1..window)."""
    min_count: int = 5
    """Words occurring fewer times than this get no vector."""
    x_max: float = 10.0
    """Co-occurrence value at which the weight f(x) reaches 1."""
    alpha: float = 0.75
    """Exponent of the weight f(x) = (x / x_max) ** alpha below x_max."""
    iterations: int = 50
    """Passes over the non-zero co-occurrence entries."""
    learning_rate: float = 0.05
    """AdaGrad initial learning rate (GloVe's eta)."""
    batch_size: int = 16384
    """Entries per AdaGrad step (capped at 1/64 of the non-zero entries)."""
    seed: int = 1
    """Seed of the initial vectors and the per-pass shuffles."""
    workers: int | None = None
    """Counting processes; None uses every CPU this process may run on."""

    def __post_init__(self) -> None:
        checks = [
            (self.dim >= 1, "dim must be >= 1"),
            (self.window >= 1, "window must be >= 1"),
            (self.min_count >= 0, "min_count must be >= 0"),
            (self.x_max > 0, "x_max must be > 0"),
            (self.alpha >= 0, "alpha must be >= 0"),
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.workers is None or self.workers >= 1, "workers must be >= 1 or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"GloVe config: {message}")

    def resolved_workers(self) -> int:
        """The number of counting processes to use."""
        if self.workers is not None:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)


@dataclass
class Cooccurrence:
    """Weighted left-context co-occurrence counts over the 1,024 words."""

    matrix: np.ndarray
    """(1024, 1024) float64; ``matrix[centre, context]`` sums 1/distance."""
    word_counts: np.ndarray
    """(1024,) int64 occurrences of each word id."""
    sentences: int
    """Number of sentences (rows) counted."""


# ---------------------------------------------------------------- counting


class _Counter:
    """Integer pair counts per distance for a stream of word-id rows."""

    def __init__(self, window: int):
        self.window = window
        self.pairs = np.zeros((window, NUM_WORDS * NUM_WORDS), dtype=np.int64)
        self.words = np.zeros(NUM_WORDS, dtype=np.int64)
        self.sentences = 0

    def add(self, rows: np.ndarray) -> None:
        """Count one (n, length) block of word ids (already validated)."""
        n, length = rows.shape
        self.sentences += n
        if n == 0 or length == 0:
            return
        self.words += np.bincount(rows.ravel(), minlength=NUM_WORDS)
        # Position-major layout makes every shifted slice below one contiguous block.
        ids = np.ascontiguousarray(rows.T, dtype=np.int64)
        centres = ids * NUM_WORDS
        keys = np.empty(max(length - 1, 0) * n, dtype=np.int64)
        for d in range(1, min(self.window, length - 1) + 1):
            size = (length - d) * n
            np.add(centres[d:], ids[:-d], out=keys[:size].reshape(length - d, n))
            self.pairs[d - 1] += np.bincount(keys[:size], minlength=NUM_WORDS * NUM_WORDS)

    def add_all(self, rows: np.ndarray) -> None:
        """Count a block of any size, in pieces of at most ``_CHUNK_ROWS`` rows."""
        for start in range(0, len(rows), _CHUNK_ROWS):
            self.add(rows[start : start + _CHUNK_ROWS])


def _count_worker(tasks: Any, results: Any, window: int) -> None:
    """Worker process: count blocks from ``tasks`` until ``None``, then report totals."""
    try:
        counter = _Counter(window)
        while (rows := tasks.get()) is not None:
            counter.add_all(rows)
        results.put(("ok", counter.pairs, counter.words, counter.sentences))
    except BaseException as exc:  # reported to the parent, which raises it
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _checked_batch(batch: Any, index: int) -> np.ndarray:
    """A batch as a 2-D integer array of valid word ids, else UserError."""
    rows = np.asarray(batch)
    if rows.ndim != 2:
        raise UserError(f"GloVe input batch {index}: expected a 2-D (sentences, words) array, got shape {rows.shape}")
    if rows.size == 0:
        return rows.astype(np.int16)
    if not np.issubdtype(rows.dtype, np.integer):
        raise UserError(f"GloVe input batch {index}: word ids must be integers, got {rows.dtype}")
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= NUM_WORDS:
        bad = low if low < 0 else high
        raise UserError(f"GloVe input batch {index}: word id {bad} outside 0..{NUM_WORDS - 1}")
    return rows


def _start_method() -> str:
    # Fork: the workers only run numpy on data they are sent, and fork neither needs
    # the caller's script to be importable nor guarded by `if __name__ == "__main__"`.
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _put(tasks: Any, item: Any, procs: list) -> None:
    """Put on the bounded task queue, failing instead of hanging if a worker died."""
    while True:
        try:
            tasks.put(item, timeout=1.0)
            return
        except queue.Full:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"GloVe counting worker exited with status {dead[0].exitcode}") from None


def count_cooccurrence(word_batches: Iterable[np.ndarray], config: GloveConfig = GloveConfig()) -> Cooccurrence:
    """Count weighted left-context co-occurrences of word-id rows, in parallel.

    ``word_batches`` yields integer arrays (n, words) of word ids 0..1023; each row
    is a sentence. Batches are cut into blocks and counted by
    ``config.resolved_workers()`` processes (in this process when that is 1); the
    result is identical for any number of workers and any batching.
    """
    workers = config.resolved_workers()
    if workers == 1:
        counter = _Counter(config.window)
        for index, batch in enumerate(word_batches):
            counter.add_all(_checked_batch(batch, index))
        return _finish_count(counter.pairs, counter.words, counter.sentences)

    ctx = mp.get_context(_start_method())
    tasks = ctx.Queue(maxsize=2 * workers)  # bounded: the reader cannot run far ahead
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_count_worker, args=(tasks, results, config.window), daemon=True)
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        for index, batch in enumerate(word_batches):
            rows = _checked_batch(batch, index)
            for start in range(0, max(len(rows), 1), _CHUNK_ROWS):
                _put(tasks, rows[start : start + _CHUNK_ROWS], procs)
        for _ in procs:
            _put(tasks, None, procs)
        pairs = np.zeros((config.window, NUM_WORDS * NUM_WORDS), dtype=np.int64)
        words = np.zeros(NUM_WORDS, dtype=np.int64)
        sentences = 0
        # Read every result before joining: a worker cannot exit while its large
        # result is still in the pipe.
        for _ in procs:
            while True:
                try:
                    reply = results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"GloVe counting worker exited with status {dead[0].exitcode}") from None
            if reply[0] != "ok":
                raise RuntimeError(f"GloVe counting worker failed: {reply[1]}")
            pairs += reply[1]
            words += reply[2]
            sentences += reply[3]
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        # Blocks still buffered for dead or stopped workers must not hold up exit.
        tasks.cancel_join_thread()
        tasks.close()
        results.close()
    return _finish_count(pairs, words, sentences)


def _finish_count(pairs: np.ndarray, words: np.ndarray, sentences: int) -> Cooccurrence:
    """Apply the 1/distance weights to integer pair counts."""
    matrix = np.zeros(NUM_WORDS * NUM_WORDS, dtype=np.float64)
    for d in range(1, len(pairs) + 1):
        matrix += pairs[d - 1] / d
    return Cooccurrence(matrix=matrix.reshape(NUM_WORDS, NUM_WORDS), word_counts=words, sentences=int(sentences))


# ---------------------------------------------------------------- fitting


@dataclass
class _Parameters:
    """Fitted GloVe parameters over the kept words (in kept-id order)."""

    w: np.ndarray
    w_context: np.ndarray
    b: np.ndarray
    b_context: np.ndarray
    word_ids: list[int] = field(default_factory=list)


def kept_words(cooc: Cooccurrence, config: GloveConfig = GloveConfig()) -> list[int]:
    """Word ids occurring at least ``config.min_count`` times, ascending."""
    return [int(i) for i in np.flatnonzero(np.asarray(cooc.word_counts) >= max(config.min_count, 1))]


def _fit(cooc: Cooccurrence, config: GloveConfig, progress: bool) -> tuple[_Parameters, dict]:
    """Fit w, w~, b, b~ to ``cooc``; returns them and the fit statistics."""
    import torch

    start_time = time.perf_counter()
    ids = kept_words(cooc, config)
    if not ids:
        raise UserError(f"GloVe: no word occurs at least min_count={config.min_count} times")
    sub = np.asarray(cooc.matrix, dtype=np.float64)[np.ix_(ids, ids)]
    rows, cols = np.nonzero(sub)
    if len(rows) == 0:
        raise UserError("GloVe: no co-occurrences among the kept words (sentences too short or too few)")
    x = sub[rows, cols]
    n_words, n_entries, dim = len(ids), len(rows), config.dim

    row_t = torch.from_numpy(rows.astype(np.int64))
    col_t = torch.from_numpy(cols.astype(np.int64))
    log_x = torch.from_numpy(np.log(x).astype(np.float32))
    weight = torch.from_numpy(np.minimum(1.0, (x / config.x_max) ** config.alpha).astype(np.float32))

    gen = torch.Generator().manual_seed(config.seed)
    # GloVe's initialisation: uniform in [-0.5, 0.5) / dim, accumulators at 1.
    w = (torch.rand(n_words, dim, generator=gen) - 0.5) / dim
    wc = (torch.rand(n_words, dim, generator=gen) - 0.5) / dim
    b = (torch.rand(n_words, generator=gen) - 0.5) / dim
    bc = (torch.rand(n_words, generator=gen) - 0.5) / dim
    gw, gwc = torch.ones(n_words, dim), torch.ones(n_words, dim)
    gb, gbc = torch.ones(n_words), torch.ones(n_words)
    step_w, step_wc = torch.zeros(n_words, dim), torch.zeros(n_words, dim)
    sq_w, sq_wc = torch.zeros(n_words, dim), torch.zeros(n_words, dim)
    step_b, step_bc = torch.zeros(n_words), torch.zeros(n_words)

    def loss_and_r() -> tuple[float, float]:
        """Exact mean of 0.5 f diff^2 over all entries, and Pearson r(model, log X)."""
        total, preds = 0.0, []
        with torch.no_grad():
            for s in range(0, n_entries, _EVAL_ROWS):
                i, j = row_t[s : s + _EVAL_ROWS], col_t[s : s + _EVAL_ROWS]
                pred = (w.index_select(0, i) * wc.index_select(0, j)).sum(1) + b[i] + bc[j]
                diff = pred - log_x[s : s + _EVAL_ROWS]
                total += 0.5 * float((weight[s : s + _EVAL_ROWS] * diff * diff).double().sum())
                preds.append(pred)
        pred_all = torch.cat(preds).double().numpy()
        target = log_x.double().numpy()
        r = float(np.corrcoef(pred_all, target)[0, 1]) if pred_all.std() > 0 and target.std() > 0 else float("nan")
        return total / n_entries, r

    initial_loss, _ = loss_and_r()
    batch = max(1, min(config.batch_size, math.ceil(n_entries / _MIN_STEPS_PER_PASS)))
    lr = config.learning_rate
    losses: list[float] = []
    with torch.no_grad():
        for iteration in range(1, config.iterations + 1):
            order = torch.randperm(n_entries, generator=gen)
            cost = 0.0
            for s in range(0, n_entries, batch):
                pick = order[s : s + batch]
                i, j = row_t[pick], col_t[pick]
                wi, wj = w.index_select(0, i), wc.index_select(0, j)
                diff = (wi * wj).sum(1) + b.index_select(0, i) + bc.index_select(0, j) - log_x[pick]
                fdiff = weight[pick] * diff
                cost += 0.5 * float(torch.dot(fdiff, diff))
                scaled = fdiff * lr  # GloVe scales by eta before squaring into the accumulator
                grad_w = wj.mul_(scaled[:, None])  # in place: wj / wi are not needed again
                grad_wc = wi.mul_(scaled[:, None])
                step_w.zero_().index_add_(0, i, grad_w)
                step_wc.zero_().index_add_(0, j, grad_wc)
                sq_w.zero_().index_add_(0, i, grad_w.square_())
                sq_wc.zero_().index_add_(0, j, grad_wc.square_())
                step_b.zero_().index_add_(0, i, scaled)
                step_bc.zero_().index_add_(0, j, scaled)
                w.addcdiv_(step_w, gw.sqrt(), value=-1.0)
                wc.addcdiv_(step_wc, gwc.sqrt(), value=-1.0)
                b.addcdiv_(step_b, gb.sqrt(), value=-1.0)
                bc.addcdiv_(step_bc, gbc.sqrt(), value=-1.0)
                gw += sq_w
                gwc += sq_wc
                scaled.square_()
                gb.index_add_(0, i, scaled)
                gbc.index_add_(0, j, scaled)
            cost /= n_entries
            losses.append(cost)
            if progress:
                print(
                    f"glove: iteration {iteration}/{config.iterations} loss {cost:.6f}"
                    f" ({time.perf_counter() - start_time:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
            if not math.isfinite(cost):
                raise UserError(
                    f"GloVe fit diverged at iteration {iteration} (loss {cost}); "
                    "lower learning_rate or batch_size"
                )
    final_loss, r = loss_and_r()
    params = _Parameters(w=w.numpy(), w_context=wc.numpy(), b=b.numpy(), b_context=bc.numpy(), word_ids=ids)
    stats = {
        "vocab_size": n_words,
        "entries": n_entries,
        "batch_size": batch,
        "steps_per_iteration": math.ceil(n_entries / batch),
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "loss_per_iteration": losses,
        "pearson_log_x": r if math.isfinite(r) else None,  # None: log X or the model is constant
        "seconds": time.perf_counter() - start_time,
    }
    return params, stats


def fit_glove(
    cooc: Cooccurrence, config: GloveConfig = GloveConfig(), progress: bool = True
) -> tuple[np.ndarray, list[int], dict]:
    """Fit GloVe vectors to a co-occurrence count.

    Returns ``(vectors, word_ids, stats)``: ``vectors`` is (n_kept, dim) float32,
    ``w + w~`` for each kept word, row k belonging to word id ``word_ids[k]``
    (ascending; words rarer than ``min_count`` are left out). ``stats`` holds
    ``loss_per_iteration`` (GloVe's running mean of 0.5 f diff^2 during each pass),
    ``initial_loss`` and ``final_loss`` (the same mean evaluated exactly before and
    after fitting), ``pearson_log_x`` (correlation of w.w~ + b + b~ with log X over
    the non-zero entries), ``vocab_size``, ``entries``, ``batch_size`` (as used),
    ``steps_per_iteration`` and ``seconds``. ``progress`` prints one line per pass to
    stderr.
    """
    params, stats = _fit(cooc, config, progress)
    return (params.w + params.w_context).astype(np.float32), list(params.word_ids), stats


# ---------------------------------------------------------------- files


def _keyed_vectors(keys: list[str], vectors: np.ndarray) -> KeyedVectors:
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=np.float32)
    if keys:
        kv.add_vectors(keys, vectors.astype(np.float32, copy=False))
    return kv


def save_vectors(vectors: np.ndarray, word_ids: list[int], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``vectors.w2v.txt`` (word2vec text) into ``out_dir``, atomically.

    Row k of ``vectors`` is the vector of word id ``word_ids[k]``; keys are the
    5-mers. Returns the file's path as ``{"word2vec": ...}``.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = [int(i) for i in word_ids]
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise UserError(f"save_vectors: {len(ids)} word ids for vectors of shape {vectors.shape}")
    if any(not 0 <= i < NUM_WORDS for i in ids) or len(set(ids)) != len(ids):
        raise UserError("save_vectors: word ids must be distinct and within 0..1023")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = [VOCABULARY[i] for i in ids]
    w2v_path = out / W2V_FILE
    with atomic_open(w2v_path, "w") as handle:
        handle.write(f"{len(keys)} {vectors.shape[1]}\n")
        for key, row in zip(keys, vectors):
            # 9 significant digits read back to the same float32.
            handle.write(key + " " + " ".join(f"{v:.9g}" for v in row.tolist()) + "\n")
    return {"word2vec": str(w2v_path)}


def _five_mer(key: str, path: str, line: int | None) -> str:
    """The upper-case 5-mer ``key``, else InputError."""
    try:
        word_id(key)
    except ValueError:
        raise InputError(path, f"key {key!r} is not a 5-mer over ACGT", line) from None
    return key.upper()


def _load_kv_pickle(path: str) -> KeyedVectors:
    """Unpickle a gensim ``KeyedVectors`` file (only when the user trusts it) and check its keys and values."""
    from gensim.models import KeyedVectors

    try:
        kv = KeyedVectors.load(path)
    except Exception as exc:
        raise InputError(path, f"not a readable gensim KeyedVectors file ({type(exc).__name__}: {exc})") from None
    if not isinstance(kv, KeyedVectors):
        raise InputError(path, f"holds a {type(kv).__name__}, not gensim KeyedVectors")
    for index, key in enumerate(kv.index_to_key):
        if not isinstance(key, str):
            raise InputError(path, f"key {key!r} is not a 5-mer over ACGT", field=f"key {index}")
        _five_mer(key, path, None)
    if kv.vectors.size and not np.isfinite(kv.vectors).all():
        raise InputError(path, "holds non-finite values")
    return kv


def is_pickle(data: bytes) -> bool:
    """True when ``data`` is a pickle stream, told by its content alone (nothing is unpickled).

    Protocols 2 and up start with the PROTO opcode (0x80); protocols 0 and 1 have no
    marker, so their opcodes are parsed (``pickletools.genops`` only reads them): a
    stream that parses up to STOP is a pickle. Text vector files fail within a few bytes.
    """
    if data[:1] == b"\x80":
        return True
    last = None
    try:
        for last in pickletools.genops(data):
            pass
    except Exception:  # not a complete pickle: genops raises ValueError and others on other bytes
        return False
    return last is not None and last[0].name == "STOP"


#: Binary files that are not vector files, by their first bytes: named instead of "not UTF-8 text".
_BINARY_KINDS = ((b"\x93NUMPY", "a NumPy .npy array"), (b"PK\x03\x04", "a zip archive (torch.save or .npz)"))


def _load_text(path: str, data: bytes) -> KeyedVectors:
    """Parse word2vec text (with header) or GloVe text (without)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, "not UTF-8 text", data[: exc.start].count(b"\n") + 1) from None
    header: tuple[int, int] | None = None
    dim: int | None = None
    keys: list[str] = []
    rows: list[list[float]] = []
    seen: dict[str, int] = {}
    entries = 0
    for number, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens:
            continue  # blank lines (e.g. a trailing one) carry nothing
        if dim is None and header is None and not keys and entries == 0:
            if len(tokens) == 2 and all(t.isdigit() for t in tokens):
                header = (int(tokens[0]), int(tokens[1]))
                if header[1] < 1:
                    raise InputError(path, f"header gives dimension {header[1]}", number)
                dim = header[1]
                continue
            if len(tokens) < 2:
                raise InputError(path, "expected a word followed by its vector values", number)
            dim = len(tokens) - 1
        if len(tokens) - 1 != dim:
            raise InputError(path, f"expected {dim} values after the word, found {len(tokens) - 1}", number)
        entries += 1
        if tokens[0] == UNK:
            continue  # GloVe's mean of rare words, not a word (module docstring)
        key = _five_mer(tokens[0], path, number)
        if key in seen:
            raise InputError(path, f"word {key} repeats line {seen[key]}", number)
        values = []
        for k, token in enumerate(tokens[1:], start=1):
            try:
                value = float(token)
            except ValueError:
                raise InputError(path, f"value {token!r} is not a number", number, field=f"value {k}") from None
            if not math.isfinite(value):
                raise InputError(path, f"value {token!r} is not finite", number, field=f"value {k}")
            values.append(value)
        seen[key] = number
        keys.append(key)
        rows.append(values)
    if dim is None or entries == 0:
        raise InputError(path, "no vectors in file (empty)", 1)
    if header is not None and header[0] != entries:
        raise InputError(path, f"header announces {header[0]} vectors, file has {entries}", 1)
    return _keyed_vectors(keys, np.array(rows, dtype=np.float32).reshape(len(rows), dim))


def load_vectors(path: str | os.PathLike, trust_pickle: bool = False) -> KeyedVectors:
    """Load 5-mer vectors: word2vec text (``vectors.w2v.txt``) or GloVe text (NAD's file).

    The format is read from the content: a first line of two integers is a word2vec
    header; otherwise each line is a word and its values. A directory means its
    ``vectors.w2v.txt`` (else a legacy ``vectors.kv`` there). GloVe's ``<unk>`` line is
    skipped. Keys are upper-case 5-mers. A pickle (gensim's ``.kv``), whatever its name,
    is refused unless ``trust_pickle`` (the user's own legacy file): unpickling runs code.
    Any refused or malformed file raises :class:`UserError` naming the file (and line, for text).
    """
    path = Path(path)
    if path.is_dir():
        legacy = path / LEGACY_KV_FILE
        path = legacy if not (path / W2V_FILE).exists() and legacy.exists() else path / W2V_FILE
    name = str(path)
    if not path.exists():
        raise UserError(f"{name}: no such vector file")
    data = read_input(path, "a vector file (word2vec or GloVe text)")
    if is_pickle(data):
        if trust_pickle:
            return _load_kv_pickle(name)
        raise UserError(
            f"{name}: a pickle (gensim .kv?), not loaded: unpickling runs any code the file holds; "
            f"write word2vec text with `promoter-dist glove SHARDS --out DIR` (data.glove=DIR/{W2V_FILE}), "
            "or set data.trust_pickled_vectors=true if the file is your own"
        )
    for magic, kind in _BINARY_KINDS:
        if data.startswith(magic):
            raise UserError(f"{name}: {kind}, not a vector file (word2vec or GloVe text)")
    return _load_text(name, data)


def embedding_matrix(kv: KeyedVectors, *, allow_missing: bool = False) -> np.ndarray:
    """(1024, dim) float32 vectors in word-id order (``nad_words.VOCABULARY``).

    Every 5-mer is expected to have a vector: a missing one (dropped by
    ``min_count``, or a partial file) raises :class:`UserError` listing the
    missing words, since a silently zero row would hide it. With
    ``allow_missing=True`` missing words get zero rows instead. Keys of ``kv``
    that are not 5-mers are ignored.
    """
    out = np.zeros((NUM_WORDS, kv.vector_size), dtype=np.float32)
    missing = []
    for index, word in enumerate(VOCABULARY):
        position = kv.key_to_index.get(word)
        if position is None:
            missing.append(word)
        else:
            out[index] = kv.vectors[position]
    if missing and not allow_missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise UserError(
            f"{len(missing)} of {NUM_WORDS} words have no vector ({shown}); "
            "pass allow_missing=True to give them zero vectors"
        )
    return out


def train_glove(
    word_batches: Iterable[np.ndarray],
    out_dir: str | os.PathLike,
    config: GloveConfig = GloveConfig(),
    progress: bool = True,
) -> dict:
    """Count, fit and save GloVe vectors; also write ``glove.json`` and return its content.

    ``glove.json`` records the config, workers used, sentences, tokens, vocabulary
    size and dropped words, entries, timings in seconds, initial and final loss,
    the loss per iteration, the fit's Pearson r with log X, and the file names
    (relative to ``out_dir``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cooc = count_cooccurrence(word_batches, config)
    t1 = time.perf_counter()
    if progress:
        print(f"glove: counted {cooc.sentences:,} sentences in {t1 - t0:.1f}s", file=sys.stderr, flush=True)
    vectors, ids, stats = fit_glove(cooc, config, progress)
    t2 = time.perf_counter()
    save_vectors(vectors, ids, out)
    t3 = time.perf_counter()
    kept = set(ids)
    info = {
        "config": asdict(config),
        "workers_used": config.resolved_workers(),
        "sentences": cooc.sentences,
        "tokens": int(cooc.word_counts.sum()),
        "vocab_size": len(ids),
        "dropped_words": [VOCABULARY[i] for i in range(NUM_WORDS) if i not in kept],
        "entries": stats["entries"],
        "batch_size_used": stats["batch_size"],
        "timings_s": {"count": t1 - t0, "fit": t2 - t1, "save": t3 - t2, "total": t3 - t0},
        "initial_loss": stats["initial_loss"],
        "final_loss": stats["final_loss"],
        "loss_per_iteration": stats["loss_per_iteration"],
        "pearson_log_x": stats["pearson_log_x"],
        "files": {"word2vec": W2V_FILE},
    }
    write_json_atomic(out / INFO_FILE, info)
    return info


def load_embedding_tensor(path: str | os.PathLike, trust_pickle: bool = False) -> torch.Tensor:
    """The (1024, dim) float32 embedding table of a vector file as a tensor, in word-id order.

    Reads any format :func:`load_vectors` reads (NAD's ``vectors.txt`` included; a pickle
    only with ``trust_pickle``); every 5-mer must have a vector (else :class:`UserError`,
    see :func:`embedding_matrix`).
    """
    import torch

    return torch.from_numpy(embedding_matrix(load_vectors(path, trust_pickle=trust_pickle)))


def nad_word_batches(
    shard_dir: str | os.PathLike, split: str = "train", batch_size: int = 65536
) -> Iterable[np.ndarray]:
    """Word arrays (n, 80) int16 of every NAD-eligible row of a shard split, once each, in shard order.

    The sentences :func:`train_glove` counts, read by the shard loader.
    """
    from .loader import LoaderConfig, ShardLoader  # the loader needs torch; counting does not

    config = LoaderConfig(split=split, view="nad", tokens="nad", batch_size=batch_size, shuffle=False, drop_last=False)
    loader = ShardLoader(shard_dir, config, rank=0, world_size=1)
    for batch in loader:
        yield batch["words"].numpy().astype("int16")
