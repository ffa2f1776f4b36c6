"""The official DREAM 2022 score on the real public-leaderboard files and test-subset CSVs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promoter_dist.cli import main
from promoter_dist.errors import InputError, UserError
from promoter_dist.metrics import rankdata
from promoter_dist.scoring import (
    SUBSETS,
    TOTAL_WEIGHT,
    Truth,
    load_predictions,
    load_public_leaderboard,
    load_truth,
    score,
    write_submission,
)

REPO = Path(__file__).resolve().parents[1]
PUBLIC = REPO / "data" / "dream2022" / "public_leaderboard"
TEST_SUBSETS = REPO / "data" / "dream2022" / "test_subsets"
TEST_LABELLED = REPO / "data" / "dream2022" / "samples" / "test_labelled_first2999.txt"
WEIGHTS = {s.name: s.weight for s in SUBSETS}
PAIR_SUBSETS = [s.name for s in SUBSETS if s.kind == "pair"]
SINGLE_SUBSETS = [s.name for s in SUBSETS if s.kind == "single"]


@pytest.fixture(scope="module")
def public() -> Truth:
    return load_truth(PUBLIC)


def as_predictions(truth: Truth, values: np.ndarray) -> dict[int, float]:
    return dict(zip(truth.rows.tolist(), np.asarray(values, dtype=float).tolist()))


def by_name(report) -> dict:
    return {s.name: s for s in report.subsets}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------- the real files


def test_public_files_layout(public):
    assert public.rows.size == 9045
    counts = {s.spec.name: len(s.items) for s in public.subsets}
    assert counts == {"all": 9045, "high": 96, "low": 99, "yeast": 208, "random": 733, "challenging": 195,
                      "SNV": 4670, "motif_perturbation": 328, "motif_tiling": 263}
    for name in PAIR_SUBSETS:
        assert public.subset(name).items.shape[1] == 2
    # Many alternatives share one reference: the second row of a key is the reference.
    refs = np.unique(public.subset("motif_perturbation").items[:, 1])
    assert refs.size == 10


def test_perfect_predictions_score_one(public):
    report = score(as_predictions(public, public.values), public)
    assert report.complete and report.weight_used == pytest.approx(TOTAL_WEIGHT)
    assert report.pearson_score == pytest.approx(1.0, abs=1e-12)
    assert report.spearman_score == pytest.approx(1.0, abs=1e-12)
    assert all(s.status == "ok" and s.pearson == pytest.approx(1.0, abs=1e-12) for s in report.subsets)
    assert report.n_ignored == 0 and report.warnings == []


def test_submission_file_of_the_truth_scores_one():
    report = score(load_predictions(PUBLIC / "ground.json"), load_truth(PUBLIC))
    assert report.pearson_score == pytest.approx(1.0, abs=1e-12)


def test_key_order_does_not_matter(tmp_path, public):
    """The same submission with its keys written in another order scores exactly the same."""
    rng = np.random.default_rng(3)
    values = public.values + rng.normal(0.0, 0.3, public.values.size)
    items = list(as_predictions(public, values).items())
    in_order = write_json(tmp_path / "in_order.json", {str(k): v for k, v in items})
    shuffled = [items[i] for i in rng.permutation(len(items))]
    assert [k for k, _ in shuffled] != [k for k, _ in items]
    out_of_order = write_json(tmp_path / "shuffled.json", {str(k): v for k, v in shuffled})
    a, b = score(load_predictions(in_order), public), score(load_predictions(out_of_order), public)
    assert a.pearson_score == b.pearson_score and a.spearman_score == b.spearman_score
    assert 0.1 < a.pearson_score < 0.99  # noisy, so a wrong alignment of keys would show


def expected_noisy_pearson(truth: Truth, name: str, sigma: float) -> float:
    """Pearson r expected for measured + N(0, sigma^2) noise per row, from the data.

    r = s_y / sqrt(s_y^2 + E[s_e^2]) with s_y the spread of the scored values and
    E[s_e^2] the expected sample variance of the noise over the subset's items:
    sigma^2 for single rows; for pairs the noise of a difference is e_alt - e_ref, and
    references shared by many pairs correlate it, so E[s_e^2] = sigma^2 (sum_p |d_p|^2 -
    |sum_p d_p|^2 / n) / (n - 1), with d_p the +1 (alt) / -1 (ref) incidence vector of pair p.
    """
    item = truth.subset(name)
    if item.spec.kind == "single":
        y = truth.measured(item.items)
        noise_var = sigma**2
    else:
        alt, ref = item.items[:, 0], item.items[:, 1]
        y = truth.measured(alt) - truth.measured(ref)
        n = len(y)
        rows, where = np.unique(item.items.reshape(-1), return_inverse=True)
        where = where.reshape(-1, 2)
        net = np.zeros(rows.size)
        np.add.at(net, where[:, 0], 1.0)
        np.add.at(net, where[:, 1], -1.0)
        squared_norms = 2.0 * np.sum(alt != ref)  # a pair with alt == ref has no noise
        noise_var = sigma**2 * (squared_norms - np.sum(net**2) / n) / (n - 1)
    spread = np.var(y, ddof=1)
    return math.sqrt(spread / (spread + noise_var))


def test_gaussian_noise_gives_expected_pearson_per_subset(public):
    sigma, draws = 0.1, 30
    rng = np.random.default_rng(2024)
    observed: dict[str, list[float]] = {}
    for _ in range(draws):
        report = score(as_predictions(public, public.values + rng.normal(0, sigma, public.values.size)), public)
        for s in report.subsets:
            observed.setdefault(s.name, []).append(s.pearson)
        # The weighted score is the official formula over the rows of the table.
        rows = by_name(report)
        official = sum(WEIGHTS[n] * rows[n].pearson ** 2 for n in WEIGHTS) / 4.65
        assert report.pearson_score == pytest.approx(official, abs=1e-12)
    for name, values in observed.items():
        values = np.array(values)
        expected = expected_noisy_pearson(public, name, sigma)
        n = by_name(report)[name].n
        # Mean of 30 independent draws: 4 standard errors, plus the sample correlation's
        # own small-sample bias, at most about rho (1 - rho^2) / (2 n); allow twice that.
        tolerance = 4 * values.std(ddof=1) / math.sqrt(draws) + expected * (1 - expected**2) / n
        assert abs(values.mean() - expected) < tolerance, (name, values.mean(), expected, tolerance)
    # The expectations differ enough between subsets that scoring the wrong items would fail.
    assert expected_noisy_pearson(public, "high", sigma) < 0.75 < expected_noisy_pearson(public, "all", sigma)


def test_pair_subsets_score_differences_not_levels(public):
    # Shift every row by an offset shared within each connected group of pairs (all pair
    # subsets together): every alt - ref difference is unchanged, every level is not.
    parent = {int(r): int(r) for r in public.rows}

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for name in PAIR_SUBSETS:
        for alt, ref in public.subset(name).items.tolist():
            parent[find(alt)] = find(ref)
    groups = {root: i for i, root in enumerate(sorted({find(r) for r in parent}))}
    offsets = np.random.default_rng(5).normal(0, 2.0, len(groups))
    shifted = public.values + offsets[[groups[find(int(r))] for r in public.rows]]
    rows = by_name(score(as_predictions(public, shifted), public))
    for name in PAIR_SUBSETS:
        assert rows[name].pearson == pytest.approx(1.0, abs=1e-9), name
        assert rows[name].spearman == pytest.approx(1.0, abs=1e-12), name
    for name in SINGLE_SUBSETS:
        assert rows[name].pearson < 0.6, name


def test_pair_subsets_see_a_wrong_effect_sign(public):
    # The same levels, but each pair's predicted effect reversed: the level-wise subsets
    # barely move, the difference-wise ones turn negative.
    values = public.values.copy()
    pos = {int(r): i for i, r in enumerate(public.rows)}
    for alt, ref in public.subset("motif_perturbation").items.tolist():
        values[pos[alt]] = 2 * public.values[pos[ref]] - public.values[pos[alt]]
    rows = by_name(score(as_predictions(public, values), public))
    assert rows["motif_perturbation"].pearson == pytest.approx(-1.0, abs=1e-9)
    assert rows["all"].pearson > 0.9


def test_rank_normalised_truth(public):
    ranks = rankdata(public.values) / public.values.size
    report = score(as_predictions(public, ranks), public)
    rows = by_name(report)
    for name in SINGLE_SUBSETS:  # ranks are a monotone map of the truth: rho = 1 exactly
        assert rows[name].spearman == pytest.approx(1.0, abs=1e-12), name
    for name in PAIR_SUBSETS:
        # A difference of ranks is not a monotone map of the difference of values, so
        # the pair subsets keep a slight loss: the Spearman score is just below 1.
        assert 0.99 < rows[name].spearman < 1.0, name
    assert 0.995 < report.spearman_score < 1.0
    assert report.pearson_score < report.spearman_score


def test_shuffled_predictions_score_near_zero(public):
    shuffled = np.random.default_rng(9).permutation(public.values)
    report = score(as_predictions(public, shuffled), public)
    for s in report.subsets:
        assert abs(s.pearson) < 4 / math.sqrt(s.n), (s.name, s.pearson)  # 4 standard errors under no correlation
        assert abs(s.spearman) < 4 / math.sqrt(s.n), (s.name, s.spearman)
    assert report.pearson_score < 0.02
    assert abs(report.spearman_score) < 0.1


def test_sample_submission_is_uninformative(public):
    report = score(load_predictions(PUBLIC / "sample_submission.json"), public)
    assert report.complete and report.pearson_score < 0.02


def test_array_predictions_index_by_position(public):
    values = np.zeros(int(public.rows.max()) + 1)
    values[public.rows] = public.values
    report = score(values, public)
    assert report.pearson_score == pytest.approx(1.0, abs=1e-12)
    assert report.n_ignored == values.size - public.rows.size


# --------------------------------------------------------------------------- missing subsets, undefined terms


def test_missing_subset_file_is_reported_not_zero(tmp_path, public):
    folder = tmp_path / "public"
    shutil.copytree(PUBLIC, folder)
    (folder / "motif_tiling_exp_indices.json").unlink()
    truth = load_truth(folder)
    noisy = public.values + np.random.default_rng(1).normal(0, 0.2, public.values.size)
    report = score(as_predictions(public, noisy), truth)
    rows = by_name(report)
    assert rows["motif_tiling"].status == "missing" and rows["motif_tiling"].n == 0
    assert "no motif_tiling_exp_indices.json" in rows["motif_tiling"].note
    assert not report.complete and report.weight_used == pytest.approx(4.25)
    renormalised = sum(WEIGHTS[n] * rows[n].r2 for n in WEIGHTS if n != "motif_tiling") / 4.25
    assert report.pearson_score == pytest.approx(renormalised, abs=1e-12)
    assert report.pearson_score > renormalised * 4.25 / 4.65 + 0.01  # not a zero term over 4.65
    table = report.table()
    assert "PARTIAL" in table and "motif_tiling (missing)" in table and "4.25" in table
    data = report.to_dict()
    assert data["complete"] is False and data["not_scored"][0]["name"] == "motif_tiling"
    perfect = score(as_predictions(public, public.values), truth)
    assert perfect.pearson_score == pytest.approx(1.0, abs=1e-12)


def test_constant_predictions_make_the_score_undefined(public):
    report = score(as_predictions(public, np.full(public.values.size, 0.5)), public)
    assert math.isnan(report.pearson_score) and math.isnan(report.spearman_score)
    assert {s.status for s in report.subsets} == {"constant_prediction"}
    assert "undefined" in report.table() and report.to_dict()["pearson_score"] is None
    json.dumps(report.to_dict(), allow_nan=False)  # valid strict JSON


def test_constant_over_one_pair_subset(public):
    values = public.values.copy()
    pos = {int(r): i for i, r in enumerate(public.rows)}
    for alt, ref in public.subset("motif_tiling").items.tolist():
        values[pos[alt]] = values[pos[ref]]  # every predicted effect is 0
    report = score(as_predictions(public, values), public)
    assert by_name(report)["motif_tiling"].status == "constant_prediction"
    assert math.isnan(report.pearson_score)
    assert "constant over motif_tiling" in report.score_rule()


# --------------------------------------------------------------------------- full test file layout


@pytest.fixture(scope="module")
def sample_test() -> Truth:
    return load_truth(test_file=TEST_LABELLED, subsets_dir=TEST_SUBSETS)


def test_test_file_truth_matches_public_leaderboard(sample_test, public):
    assert sample_test.rows.tolist() == list(range(2999))
    shared = public.rows[public.rows < 2999]
    # Labels are read in float64: identical to the public leaderboard's values.
    assert np.array_equal(sample_test.measured(shared), public.measured(shared))


def test_test_file_perfect_predictions(sample_test):
    predictions = as_predictions(sample_test, sample_test.values)
    report = score(predictions, sample_test)
    rows = by_name(report)
    assert rows["SNV"].status == "missing" and "all_SNVs_seqs.csv" in rows["SNV"].note
    assert rows["all"].n == 2999 and rows["all"].status == "ok"
    assert rows["high"].unlabelled > 0 and "does not hold" in rows["high"].note
    assert report.pearson_score == pytest.approx(1.0, abs=1e-12)
    assert report.spearman_score == pytest.approx(1.0, abs=1e-12)
    assert not report.complete
    assert any("2999 rows" in w for w in report.warnings)
    # Duplicated CSV lines count once (yeast_seqs.csv lists 964 lines over 578 rows).
    yeast = sample_test.subset("yeast").items
    assert np.unique(yeast).size == yeast.size


def test_test_file_final_drops_public_items(public):
    final = load_truth(PUBLIC, test_file=TEST_LABELLED, subsets_dir=TEST_SUBSETS, final=True)
    assert final.mode == "final"
    all_rows = final.subset("all").items
    assert all_rows.size == 2999 - int((public.rows < 2999).sum())
    assert not np.isin(all_rows, public.rows).any()
    for item in final.subsets:
        if item.items is not None and item.spec.kind == "single":
            assert not np.isin(item.items, public.rows).any(), item.spec.name
    full = load_truth(test_file=TEST_LABELLED, subsets_dir=TEST_SUBSETS)
    report = score(as_predictions(full, full.values), final)
    assert report.n_ignored == int((public.rows < 2999).sum())  # public rows: predicted but not scored
    assert report.pearson_score == pytest.approx(1.0, abs=1e-12)


def test_final_pairs_drop_public_pairs(tmp_path, public):
    # A synthetic test file covering the motif perturbation rows: its public pairs must go.
    items = np.array([[int(a), int(b)] for a, b in
                      (line.split(",")[6:8] for line in (TEST_SUBSETS / "motif_perturbation_seqs.csv")
                       .read_text().splitlines()[1:])])
    n_rows = int(items.max()) + 1
    seq = "A" * 110
    test_file = tmp_path / "test.txt"
    test_file.write_text("".join(f"{seq}\t{(i * 7919) % 1000 / 100}\n" for i in range(n_rows)))
    subsets = tmp_path / "subsets"
    subsets.mkdir()
    shutil.copy(TEST_SUBSETS / "motif_perturbation_seqs.csv", subsets)
    final = load_truth(PUBLIC, test_file=test_file, subsets_dir=subsets, final=True)
    pairs = {tuple(p) for p in final.subset("motif_perturbation").items.tolist()}
    public_pairs = {tuple(p) for p in public.subset("motif_perturbation").items.tolist()}
    assert pairs and not pairs & public_pairs
    assert len(pairs) + final.subset("motif_perturbation").public_dropped == len({tuple(p) for p in items.tolist()})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "no truth given"),
        ({"truth_dir": PUBLIC, "final": True}, "needs the full labelled test file"),
        ({"test_file": TEST_LABELLED}, "needs the test-subset folder"),
        ({"test_file": TEST_LABELLED, "subsets_dir": TEST_SUBSETS, "final": True},
         "give the public-leaderboard folder"),
        ({"truth_dir": PUBLIC / "nope"}, "no such folder"),
    ],
    ids=["nothing", "final_without_test_file", "no_subsets_dir", "final_without_public", "missing_folder"],
)
def test_truth_option_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_truth(**kwargs)


# --------------------------------------------------------------------------- bad truth files


def copy_public(tmp_path: Path) -> Path:
    folder = tmp_path / "public"
    shutil.copytree(PUBLIC, folder)
    return folder


def test_missing_ground_json(tmp_path):
    folder = copy_public(tmp_path)
    (folder / "ground.json").unlink()
    with pytest.raises(UserError, match=r"ground.json: no such file"):
        load_public_leaderboard(folder)


def test_subset_value_disagreeing_with_ground(tmp_path):
    folder = copy_public(tmp_path)
    path = folder / "high_exp_indices.json"
    data = json.loads(path.read_text())
    key = next(iter(data))
    data[key] += 0.5
    write_json(path, data)
    with pytest.raises(InputError, match=rf'high_exp_indices.json \["{key}"\]: row {key}: .* in ground.json'):
        load_public_leaderboard(folder)


def test_malformed_pair_key(tmp_path):
    folder = copy_public(tmp_path)
    path = folder / "SNVs_exp_indices.json"
    data = json.loads(path.read_text())
    data["12;13"] = [0.1, 0.2]
    write_json(path, data)
    with pytest.raises(InputError, match=r'SNVs_exp_indices.json \["12;13"\]: key is not a pair of row indices'):
        load_public_leaderboard(folder)


def test_subset_csv_errors(tmp_path):
    subsets = tmp_path / "subsets"
    subsets.mkdir()
    (subsets / "high_exp_seqs.csv").write_text(",tag,sequence,position\n0,a,ACGT,5\n")
    with pytest.raises(InputError, match=r"high_exp_seqs.csv:1: no 'pos' column"):
        load_truth(test_file=TEST_LABELLED, subsets_dir=subsets)
    (subsets / "high_exp_seqs.csv").write_text(",tag,sequence,pos\n0,a,ACGT,5\n1,b,ACGT,x7\n")
    with pytest.raises(InputError, match=r"high_exp_seqs.csv:3 \[pos\]: pos 'x7' is not a row index"):
        load_truth(test_file=TEST_LABELLED, subsets_dir=subsets)


# --------------------------------------------------------------------------- bad predictions


def ground_submission() -> dict:
    return json.loads((PUBLIC / "ground.json").read_text())


def test_missing_keys_error_counts_and_shows_examples(tmp_path, public):
    data = ground_submission()
    for key in ["2", "3", "7", "65536", "71101", "32775", "32777"]:
        del data[key]
    path = write_json(tmp_path / "sub.json", data)
    with pytest.raises(InputError) as caught:
        score(load_predictions(path), public, source=str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: 7 of the 9045 rows scored (public leaderboard) have no prediction")
    assert '"2", "3", "7"' in message


def test_extra_keys_warn_and_are_ignored(tmp_path, public):
    data = ground_submission() | {"71102": 0.25, "123456": 3.0}
    path = write_json(tmp_path / "sub.json", data)
    report = score(load_predictions(path), public, source=str(path))
    assert report.n_ignored == 2 and report.pearson_score == pytest.approx(1.0, abs=1e-12)
    assert any(w.startswith("2 of the 9047 prediction keys are not scored") and '"71102"' in w
               for w in report.warnings)
    assert "warning: 2 of the 9047" in report.table()


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"0": 1.0, "1.5": 2.0}', r'\["1.5"\]: key is not a row index'),
        ('{"0": 1.0, "abc": 2.0, "x": 1}', r'\["abc"\]: key is not a row index .* \(2 such keys; also "x"\)'),
        ('{"-3": 1.0}', r'\["-3"\]: key is not a row index'),
        ('{"": 1.0}', r'\[""\]: key is not a row index'),
        ('{" 7": 1.0}', r'\[" 7"\]: key is not a row index'),
        ('{"99999999999999999999": 1.0}', r'\["99999999999999999999"\]: key is not a row index'),
        ('{"7": 1.0, "07": 2.0}', r'\["07"\]: row index appears twice \(keys "7" and "07"\)'),
        ('{"7": 1.0, "7": 2.0}', r'\["7"\]: row index appears twice'),
        ('{"0": 1.0, "12": "abc"}', r'\["12"\]: value "abc" is not a number'),
        ('{"12": null}', r'\["12"\]: value null is not a number'),
        ('{"12": true}', r'\["12"\]: value true is not a number'),
        ('{"12": [1.0]}', r'\["12"\]: value \[1.0\] is not a number'),
        ('{"12": {"a": 1}}', r'\["12"\]: value \{\.\.\.\} is not a number'),
        ('{"12": NaN}', r'\["12"\]: value nan is not finite'),
        ('{"0": 1, "12": -Infinity}', r'\["12"\]: value -inf is not finite'),
        ('{"12": 1e999}', r'\["12"\]: value inf is not finite'),
        ('{"0": 1.0,\n "1": 2.0,', r":2: not valid JSON"),
        ("[1.0, 2.0]", r"expected a submission object .* found an array at the top level"),
        ("{}", r"the JSON object is empty"),
        ("", r"the file is empty"),
    ],
    ids=["float_key", "word_keys", "negative_key", "empty_key", "space_key", "huge_key", "same_row_twice", "duplicate_key",
         "string_value", "null_value", "bool_value", "list_value", "object_value", "nan", "minus_infinity",
         "overflow", "truncated_json", "array", "empty_object", "empty_file"],
)
def test_bad_prediction_files(tmp_path, text, expected):
    path = tmp_path / "submission.json"
    path.write_text(text)
    with pytest.raises(InputError, match=expected) as caught:
        load_predictions(path)
    assert str(caught.value).startswith(str(path))


def test_missing_prediction_file(tmp_path):
    with pytest.raises(UserError, match=r"nope.json: no such file"):
        load_predictions(tmp_path / "nope.json")


def test_predictions_mapping_given_directly(public):
    predictions = as_predictions(public, public.values)
    predictions[65536] = float("nan")
    with pytest.raises(InputError, match=r"\[65536\]: value nan is not finite"):
        score(predictions, public)
    with pytest.raises(InputError, match="key '7' is not a row index"):
        score({"7": 1.0}, public)
    predictions[65536] = "1.5"  # numpy would convert it; a submission value must be a number
    with pytest.raises(InputError, match=r"\[65536\]: value '1.5' is not a number"):
        score(predictions, public)
    predictions[65536] = np.float32(0.25)  # numpy scalars are numbers
    assert score(predictions, public).n_predictions == 9045


# --------------------------------------------------------------------------- writing submissions


def test_write_submission_raw_round_trip(tmp_path):
    values = np.random.default_rng(0).normal(size=1000)
    path = write_submission(tmp_path / "out" / "submission.json", values)
    loaded = load_predictions(path)
    assert list(loaded) == list(range(1000)) and np.array_equal(list(loaded.values()), values)
    assert [p.name for p in path.parent.iterdir()] == ["submission.json"]  # no temporary file left


def test_write_submission_rank_mode(tmp_path, public):
    values = np.zeros(int(public.rows.max()) + 1)
    values[public.rows] = public.values
    path = write_submission(tmp_path / "ranks.json", values, mode="rank")
    loaded = load_predictions(path)
    ranks = np.array([loaded[i] for i in range(values.size)])
    assert np.array_equal(ranks, rankdata(values) / values.size)
    assert 0 < ranks.min() and ranks.max() <= 1.0  # (two rows share the top measurement: rank N - 0.5)
    raw = score(values, public)
    ranked = score(loaded, public)
    for a, b in zip(raw.subsets, ranked.subsets):
        if a.kind == "single":
            assert b.spearman == pytest.approx(a.spearman, abs=1e-12)


@pytest.mark.parametrize(
    "values, mode, message",
    [([1.0, float("nan")], "raw", "prediction for row 1 is nan"), ([1.0, 2.0], "rank_by_10", "must be 'raw' or 'rank'"),
     ([], "raw", "non-empty 1-D array"), ([[1.0, 2.0], [3.0, 4.0]], "raw", "non-empty 1-D array")],
    ids=["nan", "bad_mode", "empty", "matrix"],
)
def test_write_submission_rejects(tmp_path, values, mode, message):
    with pytest.raises(UserError, match=message):
        write_submission(tmp_path / "s.json", values, mode=mode)
    assert not (tmp_path / "s.json").exists()


# --------------------------------------------------------------------------- command line


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promoter_dist.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_score_public_leaderboard(tmp_path):
    out_json, out_png = tmp_path / "r" / "report.json", tmp_path / "r" / "subsets.png"
    done = run_cli("score", "--predictions", PUBLIC / "ground.json", "--truth-dir", PUBLIC,
                   "--json", out_json, "--plot", out_png)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "subset" in done.stdout and "motif_perturbation  pair" in done.stdout
    assert "Pearson score  (weighted r^2): 1.0000" in done.stdout
    assert "Spearman score (weighted rho): 1.0000" in done.stdout
    assert "score rule: official" in done.stdout
    report = json.loads(out_json.read_text())
    assert report["complete"] and report["pearson_score"] == pytest.approx(1.0)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_score_bad_submission_exits_2_without_traceback(tmp_path):
    data = ground_submission()
    del data["65536"]
    path = write_json(tmp_path / "sub.json", data)
    done = run_cli("score", "--predictions", path, "--truth-dir", PUBLIC)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip() == (f"promoter-dist: error: {path}: 1 of the 9045 rows scored (public leaderboard) "
                                   f'have no prediction, e.g. "65536"')


@pytest.mark.parametrize(
    "args, message",
    [
        (["--truth-dir", PUBLIC, "--final"], "needs the full labelled test file"),
        (["--test-file", TEST_LABELLED], "needs the test-subset folder"),
        (["--truth-dir", PUBLIC / "missing"], "no such folder"),
        ([], "no truth given"),
    ],
    ids=["final_without_test_file", "no_subsets_dir", "missing_truth_dir", "no_truth"],
)
def test_cli_score_option_errors(capsys, args, message):
    assert main(["score", "--predictions", str(PUBLIC / "ground.json"), *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promoter-dist: error: ") and message in err and err.count("\n") == 1


def test_cli_score_bad_value_names_key(tmp_path, capsys):
    path = tmp_path / "sub.json"
    path.write_text('{"2": 0.5, "3": "high"}')
    assert main(["score", "--predictions", str(path), "--truth-dir", str(PUBLIC)]) == 2
    assert capsys.readouterr().err == f'promoter-dist: error: {path} ["3"]: value "high" is not a number\n'


def test_cli_score_test_file_partial(tmp_path, capsys):
    rows = TEST_LABELLED.read_text().splitlines()
    path = write_submission(tmp_path / "sub.json", [float(r.split("\t")[1]) for r in rows])
    code = main(["score", "--predictions", str(path), "--test-file", str(TEST_LABELLED),
                 "--subsets-dir", str(TEST_SUBSETS), "--truth-dir", str(PUBLIC), "--final"])
    out = capsys.readouterr().out
    assert code == 0
    assert "score rule: PARTIAL" in out and "SNV (missing)" in out
    assert "Pearson score  (weighted r^2): 1.0000" in out


def test_cli_score_unwritable_outputs(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    for option in ["--json", "--plot"]:
        code = main(["score", "--predictions", str(PUBLIC / "ground.json"), "--truth-dir", str(PUBLIC),
                     option, str(tmp_path / "taken")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"promoter-dist: error: {tmp_path / 'taken'}: cannot write"), err


def test_cli_score_help():
    done = run_cli("score", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: promoter-dist score")
