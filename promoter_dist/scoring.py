"""The official DREAM Challenge 2022 score of a test-set submission.

Formula of the challenge's evaluation (Rafi et al., Nature Biotechnology 2024,
doi:10.1038/s41587-024-02414-w; the organisers' repository
de-Boer-Lab/random-promoter-dream-challenge-2022)::

    Pearson score  = (r2_all + 0.3 r2_high + 0.3 r2_low + 0.3 r2_yeast + 0.3 r2_random
                      + 0.5 r2_challenging + 1.25 r2_SNV + 0.3 r2_motif_perturbation
                      + 0.4 r2_motif_tiling) / 4.65          r2 = squared Pearson r
    Spearman score = the same weights on Spearman rho (not squared)

Single subsets correlate predictions with measurements row by row. The three pair
subsets (SNV, motif perturbation, motif tiling) correlate the measured alt-minus-ref
differences with the predicted ones, so a model is judged on the effect of a change,
not on the level of the reference.

Two layouts of the truth are read:

- **Public leaderboard** (``data/dream2022/public_leaderboard/``): ``ground.json`` =
  ``{"<row>": measured}`` for the 9,045 public rows ("all"), and one
  ``<subset>_exp_indices.json`` per subset: ``{"<row>": measured}`` for single subsets,
  ``{"<alt>,<ref>": [measured_alt, measured_ref]}`` for pair subsets (the second row of
  a key is the reference: it is the ``ref_pos`` of the matching rows in the test-subset
  CSVs, and many alternatives share one reference).
- **Full test set**: the labelled test file (DREAM text, ``sequence<TAB>expression``,
  row i = 0-based line i; 71,103 rows) plus the test-subset CSVs
  (``data/dream2022/test_subsets/``: a ``pos`` column for single subsets, ``alt_pos``
  and ``ref_pos`` for pair subsets; duplicate rows/pairs count once, as in the official
  evaluation). With ``final=True`` the public-leaderboard rows are dropped from "all"
  and the single subsets, and the public pairs from the pair subsets, as the final
  leaderboard did.

**Subsets that cannot be scored** are never counted as zero. Each subset row carries a
status: ``ok``; ``missing`` (no subset file: e.g. the SNV pair CSV, which the repository lacks);
``too_few`` (fewer than 2 usable items, e.g. when a sample test file holds none of its
rows); ``constant_truth`` (the measurements do not vary). The weighted scores are then
computed over the subsets that are ``ok`` and divided by *their* total weight instead of
4.65, so that a perfect submission still scores 1.0; the report says so explicitly
(``complete`` False, ``weight_used`` < 4.65, and the subsets not scored). Only a
submission that is constant over a subset (``constant_prediction``) makes the weighted
scores ``nan``: that is the submission's fault, and the official evaluation would give
``nan`` as well.

Predictions are a submission JSON ``{"<row index>": value}``. Every scored row must
have a finite number; keys that the truth does not score are counted, reported as a
warning and ignored.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError, UserError
from .io import atomic_open, open_input, read_input
from .metrics import pearson, rankdata, spearman

__all__ = [
    "SUBSETS",
    "TOTAL_WEIGHT",
    "MIN_ITEMS",
    "SubsetSpec",
    "TruthSubset",
    "Truth",
    "SubsetScore",
    "ScoreReport",
    "load_predictions",
    "load_truth",
    "load_public_leaderboard",
    "load_test_truth",
    "score",
    "write_submission",
]


@dataclass(frozen=True)
class SubsetSpec:
    """One term of the official score and where its items are listed."""

    name: str
    kind: str
    """"single" (rows) or "pair" (alt, ref rows: the difference is scored)."""
    weight: float
    public_file: str | None
    """File in the public-leaderboard folder (None: "all" is ground.json itself)."""
    subset_file: str | None
    """CSV in the test-subset folder (None: "all" is every row of the test file)."""


SUBSETS: tuple[SubsetSpec, ...] = (
    SubsetSpec("all", "single", 1.0, None, None),
    SubsetSpec("high", "single", 0.3, "high_exp_indices.json", "high_exp_seqs.csv"),
    SubsetSpec("low", "single", 0.3, "low_exp_indices.json", "low_exp_seqs.csv"),
    SubsetSpec("yeast", "single", 0.3, "yeast_exp_indices.json", "yeast_seqs.csv"),
    SubsetSpec("random", "single", 0.3, "random_exp_indices.json", "all_random_seqs.csv"),
    SubsetSpec("challenging", "single", 0.5, "challenging_exp_indices.json", "challenging_seqs.csv"),
    SubsetSpec("SNV", "pair", 1.25, "SNVs_exp_indices.json", "all_SNVs_seqs.csv"),
    SubsetSpec("motif_perturbation", "pair", 0.3, "motif_perturbation_exp_indices.json", "motif_perturbation_seqs.csv"),
    SubsetSpec("motif_tiling", "pair", 0.4, "motif_tiling_exp_indices.json", "motif_tiling_seqs.csv"),
)
TOTAL_WEIGHT = 4.65
"""Sum of the official weights (the denominator of both scores)."""
MIN_ITEMS = 2
"""A subset with fewer usable items has no correlation and is reported as ``too_few``."""
FEW_ITEMS = 10
"""Below this many items a scored subset gets a note that its correlation is very noisy."""
GROUND_FILE = "ground.json"

assert math.isclose(sum(s.weight for s in SUBSETS), TOTAL_WEIGHT)


# --------------------------------------------------------------------------- JSON with checked keys


def _describe(value: Any) -> str:
    """A short, JSON-like rendering of a bad value for an error message."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return "{...}"  # nested objects arrive as pair lists (object_pairs_hook)
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number (JSON or numpy; bool is not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer literal too large for a float
        return math.inf


def _row_index(key: str) -> int | None:
    """A JSON key as a 0-based row index, or None if it is not a plain non-negative integer."""
    # 18 digits stay inside int64 (index arrays); no DREAM file has 10^18 rows.
    if key.isascii() and key.isdigit() and len(key) <= 18:
        return int(key)
    return None


def _read_json_object(path: Path, what: str) -> list[tuple[str, Any]]:
    """The top-level (key, value) pairs of a JSON object file, in file order, duplicates kept."""
    if not path.exists():
        raise UserError(f"{path}: no such file ({what})")
    raw = read_input(path, what)  # a regular file only: never a device or FIFO
    if not raw.strip():
        raise InputError(str(path), f"the file is empty; expected {what}")
    try:
        text = raw.decode("utf-8-sig")
        top = json.loads(text, object_pairs_hook=lambda pairs: pairs)
    except UnicodeDecodeError as exc:
        raise InputError(str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start}); expected {what}") from None
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"not valid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    except RecursionError:
        raise InputError(str(path), f"JSON nested too deeply; expected {what}") from None
    # With the pairs hook every JSON object, even an empty one, arrives as a list of tuples.
    is_object = isinstance(top, list) and (bool(top) and isinstance(top[0], tuple) or text.lstrip().startswith("{"))
    if not is_object:
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(top), "a number")
        raise InputError(str(path), f"expected {what}, found {kind} at the top level")
    if not top:
        raise InputError(str(path), f"the JSON object is empty; expected {what}")
    return top


class _Problems:
    """Collects bad entries by kind; raises one error naming the first entry and the count."""

    def __init__(self, path: Path):
        self.path = path
        self.found: dict[str, list[tuple[str, str]]] = {}

    def add(self, kind: str, key: str, message: str) -> None:
        self.found.setdefault(kind, []).append((key, message))

    def raise_first(self) -> None:
        for entries in self.found.values():
            key, message = entries[0]
            if len(entries) > 1:
                others = ", ".join(json.dumps(k) for k, _ in entries[1:4])
                more = "" if len(entries) <= 4 else ", ..."
                message += f" ({len(entries)} such keys; also {others}{more})"
            raise InputError(str(self.path), message, field=json.dumps(key))


def _checked_index_map(path: Path, pairs: list[tuple[str, Any]], what: str, pair_keys: bool = False
                       ) -> dict[Any, Any]:
    """Key/value pairs with keys parsed to row indices (or (alt, ref) tuples); raises on bad keys."""
    problems = _Problems(path)
    out: dict[Any, Any] = {}
    first_key: dict[Any, str] = {}
    for key, value in pairs:
        if pair_keys:
            parts = key.split(",")
            rows = [_row_index(p) for p in parts]
            index: Any = tuple(rows) if len(parts) == 2 and None not in rows else None
            if index is None:
                problems.add("key", key, f"key is not a pair of row indices \"<alt>,<ref>\" ({what})")
                continue
        else:
            index = _row_index(key)
            if index is None:
                problems.add("key", key, "key is not a row index (expected a non-negative integer such as \"0\")")
                continue
        if index in out:
            problems.add("duplicate", key, f"row index appears twice (keys {json.dumps(first_key[index])} "
                                           f"and {json.dumps(key)})")
            continue
        out[index] = value
        first_key[index] = key
    problems.raise_first()
    return out


# --------------------------------------------------------------------------- predictions


def load_predictions(path: str | os.PathLike) -> dict[int, float]:
    """Read a submission JSON ``{"<row index>": value}``; every key and value is checked.

    Raises :class:`~promoter_dist.errors.InputError` naming the file and the offending key
    for a key that is not a non-negative integer, a row given twice (e.g. ``"7"`` and
    ``"07"``), or a value that is not a finite number.
    """
    path = Path(path)
    what = 'a submission object {"<row index>": prediction, ...}'
    entries = _checked_index_map(path, _read_json_object(path, what), what)
    problems = _Problems(path)
    predictions: dict[int, float] = {}
    for index, value in entries.items():
        number = _number(value)
        if number is None:
            problems.add("value", str(index), f"value {_describe(value)} is not a number")
        elif not math.isfinite(number):
            problems.add("nonfinite", str(index), f"value {_describe(value)} is not finite")
        else:
            predictions[index] = number
    problems.raise_first()
    return predictions


def write_submission(path: str | os.PathLike, predictions: Sequence[float] | np.ndarray, mode: str = "raw") -> Path:
    """Write predictions for test rows 0..N-1 as a submission JSON, atomically.

    ``mode="raw"`` writes the values as they are; ``mode="rank"`` writes average rank / N
    (in (0, 1]), the form team NAD submitted (models.md). Ranks keep the Spearman score
    and change only the Pearson one. Values must be finite.
    """
    if mode not in ("raw", "rank"):
        raise UserError(f"submission mode must be 'raw' or 'rank', not {mode!r}")
    values = np.asarray(predictions, dtype=np.float64)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or values.size == 0:
        raise UserError(f"predictions must be a non-empty 1-D array, got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise UserError(f"{path}: prediction for row {bad[0]} is {values[bad[0]]} ({bad.size} non-finite "
                        f"values); a submission needs a finite number for every row")
    if mode == "rank":
        values = rankdata(values) / values.size
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as handle:
            # float repr round-trips exactly; one line, as the challenge's sample submission.
            json.dump({str(i): float(v) for i, v in enumerate(values)}, handle)
            handle.write("\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write the submission ({exc.strerror or exc})") from None
    return path


# --------------------------------------------------------------------------- truth


@dataclass
class TruthSubset:
    """The items of one subset that the truth can score."""

    spec: SubsetSpec
    items: np.ndarray | None
    """int64 (n,) rows for a single subset, (n, 2) [alt, ref] rows for a pair subset;
    None when the subset is not available (see ``note``)."""
    source: str | None = None
    unlabelled: int = 0
    """Items dropped because a row has no measurement (e.g. a sample of the test file)."""
    public_dropped: int = 0
    """Items dropped as public-leaderboard items (final mode)."""
    note: str = ""


@dataclass
class Truth:
    """Measured values of the scored rows and the subsets over them."""

    rows: np.ndarray
    """Sorted int64 row indices that have a measurement."""
    values: np.ndarray
    """float64 measurement of each row in ``rows``."""
    subsets: list[TruthSubset]
    mode: str
    """"public_leaderboard", "test" (all test rows) or "final" (public rows dropped)."""
    source: str
    warnings: list[str] = field(default_factory=list)

    def measured(self, rows: np.ndarray) -> np.ndarray:
        """Measurements of the given rows (which must all be in ``self.rows``)."""
        return self.values[np.searchsorted(self.rows, rows)]

    @property
    def required_rows(self) -> np.ndarray:
        """Every row that some available subset scores: each needs a prediction."""
        parts = [s.items.reshape(-1) for s in self.subsets if s.items is not None]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def subset(self, name: str) -> TruthSubset:
        for item in self.subsets:
            if item.spec.name == name:
                return item
        raise KeyError(name)


def _labelled_only(truth_rows: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, int]:
    """Items whose rows all have a measurement, and how many were dropped."""
    pos = np.searchsorted(truth_rows, items)
    pos = np.minimum(pos, max(truth_rows.size - 1, 0))
    known = truth_rows[pos] == items if truth_rows.size else np.zeros(items.shape, bool)
    keep = known if items.ndim == 1 else known.all(axis=1)
    return items[keep], int((~keep).sum())


def _unique_items(items: np.ndarray) -> np.ndarray:
    """Distinct rows / (alt, ref) pairs, sorted; duplicates in the listings count once."""
    if items.ndim == 1:
        return np.unique(items)
    return np.unique(items, axis=0) if items.size else items.reshape(0, 2)


def load_public_leaderboard(truth_dir: str | os.PathLike) -> Truth:
    """Truth of the public leaderboard: ``ground.json`` and the ``*_exp_indices.json`` subsets.

    Each subset's measured values must agree with ``ground.json`` (a mismatch means the
    files are from different releases and is an error). A missing subset file is
    reported as ``missing``; a missing ``ground.json`` is an error.
    """
    folder = Path(truth_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected the public-leaderboard folder with {GROUND_FILE})")
    ground_path = folder / GROUND_FILE
    what = 'the public-leaderboard truth {"<row index>": measured, ...}'
    ground = _checked_index_map(ground_path, _read_json_object(ground_path, what), what)
    problems = _Problems(ground_path)
    for index, value in ground.items():
        number = _number(value)
        if number is None or not math.isfinite(number):
            problems.add("value", str(index), f"measured value {_describe(value)} is not a finite number")
    problems.raise_first()
    rows = np.array(sorted(ground), dtype=np.int64)
    values = np.array([float(ground[i]) for i in rows.tolist()], dtype=np.float64)
    truth = Truth(rows=rows, values=values, subsets=[], mode="public_leaderboard", source=str(folder))
    for spec in SUBSETS:
        if spec.public_file is None:
            truth.subsets.append(TruthSubset(spec, rows.copy(), str(ground_path)))
            continue
        path = folder / spec.public_file
        if not path.exists():  # anything else there is read, and refused unless a regular file
            truth.subsets.append(TruthSubset(spec, None, note=f"no {spec.public_file} in {folder}"))
            continue
        items = _read_public_subset(path, spec, ground)
        truth.subsets.append(TruthSubset(spec, items, str(path)))
    return truth


def _read_public_subset(path: Path, spec: SubsetSpec, ground: Mapping[int, Any]) -> np.ndarray:
    """Items of one public subset file, checked against ground.json."""
    pair = spec.kind == "pair"
    what = ('a pair subset {"<alt>,<ref>": [measured_alt, measured_ref], ...}' if pair
            else 'a subset {"<row index>": measured, ...}')
    entries = _checked_index_map(path, _read_json_object(path, what), what, pair_keys=pair)
    problems = _Problems(path)
    for index, value in entries.items():
        rows = index if pair else (index,)
        measured = value if pair else [value]
        key = ",".join(map(str, rows))
        if not isinstance(measured, list) or len(measured) != len(rows):
            problems.add("shape", key, f"expected [measured_alt, measured_ref], found {_describe(value)}")
            continue
        for row, v in zip(rows, measured):
            number = _number(v)
            if row not in ground:
                problems.add("unknown", key, f"row {row} is not in {GROUND_FILE}")
            elif number is None or not math.isfinite(number):
                problems.add("value", key, f"measured value {_describe(v)} is not a finite number")
            elif not math.isclose(number, float(ground[row]), rel_tol=1e-9, abs_tol=1e-12):
                problems.add("mismatch", key, f"row {row}: {number!r} here but {ground[row]!r} in {GROUND_FILE} "
                                              f"(files from different releases?)")
    problems.raise_first()
    if pair:
        return _unique_items(np.array(list(entries), dtype=np.int64).reshape(-1, 2))
    return _unique_items(np.array(list(entries), dtype=np.int64))


def _read_subset_csv(path: Path, spec: SubsetSpec) -> np.ndarray:
    """Row indices (``pos``) or (alt, ref) pairs (``alt_pos``, ``ref_pos``) of a test-subset CSV."""
    columns = ["alt_pos", "ref_pos"] if spec.kind == "pair" else ["pos"]
    try:
        with io.TextIOWrapper(open_input(path, "a test-subset CSV"), encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise InputError(str(path), "the file is empty; expected a CSV with a header")
            missing = [c for c in columns if c not in header]
            if missing:
                raise InputError(str(path), f"no {', '.join(repr(c) for c in missing)} column "
                                            f"(header: {', '.join(header)[:120]})", line=1)
            where = [header.index(c) for c in columns]
            items: list[list[int]] = []
            for line_no, record in enumerate(reader, start=2):
                if not record:
                    continue
                parsed = []
                for column, at in zip(columns, where):
                    text = record[at].strip() if at < len(record) else ""
                    index = _row_index(text)
                    if index is None:
                        raise InputError(str(path), f"{column} {text!r} is not a row index (a non-negative integer)",
                                         line=line_no, field=column)
                    parsed.append(index)
                items.append(parsed)
    except UnicodeDecodeError as exc:
        raise InputError(str(path), f"not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise InputError(str(path), f"not a readable CSV ({exc})") from None
    array = np.array(items, dtype=np.int64).reshape(-1, len(columns))
    return _unique_items(array[:, 0] if spec.kind == "single" else array)


def _read_test_labels(test_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows and float64 labels of a labelled test file (row i = 0-based line i).

    The DREAM reader validates every row (strictly: a bad row is an error with its
    line); it keeps labels as float32, so the label column is parsed again here in
    float64 to score a submission against the exact published measurements.
    """
    from .data.dream import ReadOptions, read_dream

    parsed, _ = read_dream(test_file, ReadOptions(labels="required", strict=True, workers=0))
    rows = (parsed.lines - 1).astype(np.int64)
    labels = parsed.labels.astype(np.float64)
    with open_input(test_file, "a labelled DREAM test file") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        with io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if gzipped else raw, encoding="utf-8-sig") as handle:
            exact = [float(line.rsplit("\t", 1)[1]) for line in handle if line.strip()]
    if len(exact) == len(labels) and np.allclose(exact, labels, rtol=1e-6, atol=1e-6):
        labels = np.asarray(exact, dtype=np.float64)
    return rows, labels


def load_test_truth(test_file: str | os.PathLike, subsets_dir: str | os.PathLike,
                    public_dir: str | os.PathLike | None = None, final: bool = False) -> Truth:
    """Truth of the whole test set: the labelled test file and the test-subset CSVs.

    Subset rows beyond the test file (when it is a sample) are counted as ``unlabelled``
    and not scored. With ``final=True`` the public-leaderboard items read from
    ``public_dir`` are dropped: rows from "all" and the single subsets, (alt, ref) pairs
    from the pair subsets (the official rule).
    """
    test_file, subsets_folder = Path(test_file), Path(subsets_dir)
    if not subsets_folder.is_dir():
        raise UserError(f"{subsets_folder}: no such folder (expected the test-subset CSVs, e.g. high_exp_seqs.csv)")
    public_rows = np.zeros(0, np.int64)
    public_pairs: set[tuple[int, int]] = set()
    if final:
        if public_dir is None:
            raise UserError("the final-leaderboard score drops the public-leaderboard items: "
                            "give the public-leaderboard folder too (--truth-dir)")
        public = load_public_leaderboard(public_dir)
        missing = [s.spec.public_file for s in public.subsets if s.items is None]
        if missing:
            raise UserError(f"{public_dir}: cannot drop the public-leaderboard items, missing {', '.join(missing)}")
        public_rows = np.unique(np.concatenate([public.rows] + [s.items.reshape(-1) for s in public.subsets]))
        public_pairs = {(int(a), int(b)) for s in public.subsets if s.spec.kind == "pair" for a, b in s.items}

    rows, labels = _read_test_labels(test_file)
    truth = Truth(rows=rows, values=labels, subsets=[], mode="final" if final else "test", source=str(test_file))
    for spec in SUBSETS:
        if spec.subset_file is None:
            items, source = rows.copy(), str(test_file)
        else:
            path = subsets_folder / spec.subset_file
            if not path.exists():  # anything else there is read, and refused unless a regular file
                truth.subsets.append(TruthSubset(spec, None, note=f"no {spec.subset_file} in {subsets_folder}"))
                continue
            items, source = _read_subset_csv(path, spec), str(path)
        dropped = 0
        if final:
            if spec.kind == "single":
                keep = ~np.isin(items, public_rows)
            else:
                keep = np.array([(int(a), int(b)) not in public_pairs for a, b in items], dtype=bool)
            dropped = int((~keep).sum())
            items = items[keep]
        items, unlabelled = _labelled_only(rows, items)
        truth.subsets.append(TruthSubset(spec, items, source, unlabelled=unlabelled, public_dropped=dropped))
    short = [s for s in truth.subsets if s.unlabelled]
    if short:
        truth.warnings.append(
            f"{test_file} has {rows.size} rows; items of {len(short)} subsets refer to rows it does not hold and "
            f"are not scored (a sample of the test file?)")
    return truth


def load_truth(truth_dir: str | os.PathLike | None = None, test_file: str | os.PathLike | None = None,
               subsets_dir: str | os.PathLike | None = None, final: bool = False) -> Truth:
    """The truth to score against, from either layout.

    - ``truth_dir`` alone: the public leaderboard (``ground.json`` + ``*_exp_indices.json``).
    - ``test_file`` and ``subsets_dir``: the whole labelled test set; with ``final=True``
      the public-leaderboard items (read from ``truth_dir``) are dropped.
    """
    if test_file is None:
        if subsets_dir is not None:
            raise UserError("a test-subset folder needs the labelled test file too (--test-file)")
        if final:
            raise UserError("the final-leaderboard score needs the full labelled test file (--test-file) "
                            "and the test-subset folder (--subsets-dir); the public-leaderboard folder alone "
                            "holds only public rows")
        if truth_dir is None:
            raise UserError("no truth given: a public-leaderboard folder (--truth-dir) or a labelled test "
                            "file with its test-subset folder (--test-file, --subsets-dir)")
        return load_public_leaderboard(truth_dir)
    if subsets_dir is None:
        raise UserError("scoring against a test file needs the test-subset folder (--subsets-dir), "
                        "e.g. data/dream2022/test_subsets")
    truth = load_test_truth(test_file, subsets_dir, public_dir=truth_dir, final=final)
    if truth_dir is not None and not final:
        truth.warnings.append(f"{truth_dir} is not used: the public-leaderboard folder only tells --final "
                              f"which items to drop")
    return truth


# --------------------------------------------------------------------------- score


@dataclass
class SubsetScore:
    """One row of the score table."""

    name: str
    kind: str
    weight: float
    n: int
    pearson: float
    r2: float
    spearman: float
    status: str
    """ok, missing, too_few, constant_truth or constant_prediction."""
    note: str = ""
    unlabelled: int = 0
    public_dropped: int = 0

    @property
    def scored(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "weight": self.weight, "n": self.n,
            "pearson": _json_float(self.pearson), "r2": _json_float(self.r2),
            "spearman": _json_float(self.spearman), "status": self.status, "note": self.note,
            "unlabelled": self.unlabelled, "public_dropped": self.public_dropped,
        }


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class ScoreReport:
    """Per-subset correlations and the two weighted scores."""

    subsets: list[SubsetScore]
    pearson_score: float
    """sum(w r^2) / sum(w) over the subsets scored (= the official score when complete)."""
    spearman_score: float
    """sum(w rho) / sum(w) over the subsets scored."""
    weight_used: float
    mode: str
    truth_source: str
    predictions_source: str
    n_predictions: int
    n_ignored: int
    """Prediction keys the truth does not score (warned about, not used)."""
    warnings: list[str] = field(default_factory=list)
    points: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    """Per subset: (predicted, measured), differences for pair subsets; for plots."""

    @property
    def complete(self) -> bool:
        """Every term of the official formula was scored."""
        return all(s.scored for s in self.subsets)

    @property
    def not_scored(self) -> list[SubsetScore]:
        return [s for s in self.subsets if not s.scored]

    def score_rule(self) -> str:
        """How the two weighted scores were formed, in words."""
        if any(s.status == "constant_prediction" for s in self.subsets):
            names = ", ".join(s.name for s in self.subsets if s.status == "constant_prediction")
            return f"undefined: the predictions are constant over {names}"
        if self.complete:
            return f"official: weighted sum over all 9 subsets / {TOTAL_WEIGHT}"
        names = ", ".join(f"{s.name} ({s.status})" for s in self.not_scored)
        return (f"PARTIAL: weighted sum over the subsets scored / their weight {self.weight_used:.2f} "
                f"(official: / {TOTAL_WEIGHT}); not scored: {names}")

    def table(self) -> str:
        """The score table, the two weighted scores and any warnings, for the console."""
        head = f"{'subset':<19} {'kind':<6} {'weight':>6} {'n':>7} {'pearson':>8} {'r2':>7} {'spearman':>8}  status"
        lines = [f"truth: {self.truth_source} ({self.mode.replace('_', ' ')})",
                 f"predictions: {self.predictions_source} ({self.n_predictions} keys, {self.n_ignored} ignored)",
                 "", head, "-" * len(head)]

        def fmt(value: float, width: int) -> str:
            return f"{value:>{width}.4f}" if math.isfinite(value) else f"{'-':>{width}}"

        for s in self.subsets:
            lines.append(f"{s.name:<19} {s.kind:<6} {s.weight:>6.2f} {s.n:>7d} {fmt(s.pearson, 8)} {fmt(s.r2, 7)} "
                         f"{fmt(s.spearman, 8)}  {s.status}")
        lines.append("")
        lines.append(f"Pearson score  (weighted r^2): {fmt(self.pearson_score, 0).strip()}")
        lines.append(f"Spearman score (weighted rho): {fmt(self.spearman_score, 0).strip()}")
        lines.append(f"score rule: {self.score_rule()}")
        notes = [f"  {s.name}: {s.note}" for s in self.subsets if s.note]
        if notes:
            lines.append("notes:")
            lines.extend(notes)
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready summary (``nan`` becomes ``null``)."""
        return {
            "pearson_score": _json_float(self.pearson_score),
            "spearman_score": _json_float(self.spearman_score),
            "complete": self.complete,
            "weight_used": self.weight_used,
            "weight_total": TOTAL_WEIGHT,
            "score_rule": self.score_rule(),
            "not_scored": [{"name": s.name, "status": s.status, "note": s.note} for s in self.not_scored],
            "mode": self.mode,
            "truth": self.truth_source,
            "predictions": self.predictions_source,
            "n_predictions": self.n_predictions,
            "n_ignored": self.n_ignored,
            "subsets": [s.to_dict() for s in self.subsets],
            "warnings": list(self.warnings),
        }


def _prediction_arrays(predictions: Mapping[int, float] | np.ndarray | Sequence[float], source: str
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted rows and their float64 predictions; non-finite values and bad keys are errors."""
    if isinstance(predictions, Mapping):
        bad = [k for k in predictions if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0]
        if bad:
            raise InputError(source, f"key {bad[0]!r} is not a row index (a non-negative int); "
                                     f"use load_predictions() to read a submission file")
        # numpy would quietly turn "1.5" or True into numbers; a submission may not.
        not_number = next((k for k, v in predictions.items() if _number(v) is None), None)
        if not_number is not None:
            raise InputError(source, f"value {predictions[not_number]!r} is not a number", field=str(not_number))
        rows = np.fromiter(predictions.keys(), dtype=np.int64, count=len(predictions))
        values = np.fromiter(predictions.values(), dtype=np.float64, count=len(predictions))
        order = np.argsort(rows)
        rows, values = rows[order], values[order]
    else:
        values = np.asarray(predictions, dtype=np.float64).reshape(-1)
        rows = np.arange(values.size, dtype=np.int64)
    bad_at = np.flatnonzero(~np.isfinite(values))
    if bad_at.size:
        raise InputError(source, f"value {values[bad_at[0]]} is not finite ({bad_at.size} non-finite values)",
                         field=str(rows[bad_at[0]]))
    return rows, values


def score(predictions: Mapping[int, float] | np.ndarray | Sequence[float], truth: Truth,
          source: str = "predictions") -> ScoreReport:
    """Score predictions against the truth: per-subset correlations and the weighted scores.

    ``predictions`` is ``{row: value}`` (as from :func:`load_predictions`) or an array
    whose position is the row. Every row the truth scores must have a prediction:
    otherwise an :class:`~promoter_dist.errors.InputError` says how many are missing and
    shows a few. Keys the truth does not score are counted in a warning and ignored.
    ``source`` names the predictions in messages (e.g. the submission's path).
    """
    pred_rows, pred_values = _prediction_arrays(predictions, source)
    required = truth.required_rows
    pos = np.minimum(np.searchsorted(pred_rows, required), max(pred_rows.size - 1, 0))
    present = (pred_rows[pos] == required) if pred_rows.size else np.zeros(required.size, bool)
    if not present.all():
        absent = required[~present]
        shown = ", ".join(f'"{r}"' for r in absent[:5].tolist()) + (", ..." if absent.size > 5 else "")
        raise InputError(source, f"{absent.size} of the {required.size} rows scored ({truth.mode.replace('_', ' ')}) "
                                 f"have no prediction, e.g. {shown}")
    ignored = pred_rows[~np.isin(pred_rows, required)]
    warnings = list(truth.warnings)
    if ignored.size:
        shown = ", ".join(f'"{r}"' for r in ignored[:5].tolist()) + (", ..." if ignored.size > 5 else "")
        warnings.append(f"{ignored.size} of the {pred_rows.size} prediction keys are not scored against "
                        f"{truth.source} and were ignored, e.g. {shown}")

    def predicted(rows: np.ndarray) -> np.ndarray:
        return pred_values[np.searchsorted(pred_rows, rows)]

    results: list[SubsetScore] = []
    points: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for item in truth.subsets:
        spec = item.spec
        notes = [item.note] if item.note else []
        if item.unlabelled:
            notes.append(f"{item.unlabelled} items need rows that {Path(truth.source).name} does not hold "
                         f"({truth.rows.size} rows); not scored")
        if item.public_dropped:
            notes.append(f"{item.public_dropped} public-leaderboard items dropped")
        row = SubsetScore(spec.name, spec.kind, spec.weight, 0, math.nan, math.nan, math.nan, "missing",
                          unlabelled=item.unlabelled, public_dropped=item.public_dropped)
        if item.items is not None:
            if spec.kind == "pair":  # score the effect of the change: alt minus ref
                alt, ref = item.items[:, 0], item.items[:, 1]
                pred = predicted(alt) - predicted(ref)
                true = truth.measured(alt) - truth.measured(ref)
            else:
                pred, true = predicted(item.items), truth.measured(item.items)
            row.n = int(pred.size)
            points[spec.name] = (pred, true)
            if row.n < MIN_ITEMS:
                row.status = "too_few"
                notes.append(f"{row.n} usable items; a correlation needs at least {MIN_ITEMS}")
            elif np.ptp(true) == 0:
                row.status = "constant_truth"
                notes.append("the measured values do not vary")
            elif np.ptp(pred) == 0:
                row.status = "constant_prediction"
                notes.append("the predictions do not vary, so no correlation exists")
            else:
                if row.n < FEW_ITEMS:
                    notes.append(f"only {row.n} items: the correlation is very noisy")
                row.pearson = pearson(pred, true)
                row.r2 = row.pearson ** 2
                row.spearman = spearman(pred, true)
                row.status = "ok"
        row.note = "; ".join(notes)
        results.append(row)

    scored = [r for r in results if r.scored]
    weight_used = float(sum(r.weight for r in scored))
    if any(r.status == "constant_prediction" for r in results) or weight_used == 0:
        pearson_score = spearman_score = math.nan
    else:
        pearson_score = sum(r.weight * r.r2 for r in scored) / weight_used
        spearman_score = sum(r.weight * r.spearman for r in scored) / weight_used
    return ScoreReport(subsets=results, pearson_score=pearson_score, spearman_score=spearman_score,
                       weight_used=weight_used, mode=truth.mode, truth_source=truth.source,
                       predictions_source=source, n_predictions=int(pred_rows.size), n_ignored=int(ignored.size),
                       warnings=warnings, points=points)
