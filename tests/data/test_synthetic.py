"""Tests for the synthetic DREAM-format data generator."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from promoter_dist.cli import main as cli_main
from promoter_dist.data import alphabet
from promoter_dist.data import synthetic as synth
from promoter_dist.data.synthetic import (
    DEFAULT_GRAMMAR,
    GeneratorParams,
    MotifSpec,
    SynthReport,
    compile_grammar,
    expression_model,
    make_grammar,
    random_grammar,
    synthesize,
)
from promoter_dist.errors import UserError

LINE = re.compile(rb"^[ACGTN]+\t(?:\d+|\d+\.\d+)$")
STATS_ROWS = 50_000


def read_rows(path: str) -> tuple[list[str], list[str]]:
    seqs, labels = [], []
    with open(path) as handle:
        for line in handle:
            seq, label = line.rstrip("\n").split("\t")
            seqs.append(seq)
            labels.append(label)
    return seqs, labels


def encode_rows(seqs: list[str], extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PAD-filled (n, max length + extra) codes and lengths."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    codes = np.full((len(seqs), int(lengths.max()) + extra), alphabet.PAD, dtype=np.uint8)
    for i, seq in enumerate(seqs):
        codes[i, : len(seq)] = alphabet.encode(seq)
    return codes, lengths


@pytest.fixture(scope="module")
def train50k(tmp_path_factory: pytest.TempPathFactory) -> SynthReport:
    out = tmp_path_factory.mktemp("synth") / "train.txt"
    return synthesize(out, STATS_ROWS, seed=7, kind="train", workers=2, progress=False)


@pytest.fixture(scope="module")
def train50k_rows(train50k: SynthReport) -> tuple[list[str], np.ndarray, list[str]]:
    seqs, labels = read_rows(train50k.path)
    return seqs, np.array([float(x) for x in labels]), labels


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ROWS", 1000)  # several chunks from few rows
    paths = []
    for i, workers in enumerate((1, 2, 3, 2)):
        report = synthesize(tmp_path / f"run{i}.txt", 4500, seed=11, workers=workers, progress=False)
        paths.append(report)
    reference = Path(paths[0].path).read_bytes()
    reference_nf = Path(paths[0].noise_free_path).read_bytes()
    for report in paths[1:]:
        assert Path(report.path).read_bytes() == reference
        assert Path(report.noise_free_path).read_bytes() == reference_nf
    assert len({r.oracle_pearson for r in paths}) == 1


def test_worker_count_independent_at_default_chunk_size(tmp_path: Path) -> None:
    rows = synth.CHUNK_ROWS + 300  # two chunks, the second short
    one = synthesize(tmp_path / "a.txt", rows, seed=3, workers=1, progress=False)
    two = synthesize(tmp_path / "b.txt", rows, seed=3, workers=2, progress=False)
    assert Path(one.path).read_bytes() == Path(two.path).read_bytes()


def test_different_seed_or_kind_gives_different_bytes(tmp_path: Path) -> None:
    a = Path(synthesize(tmp_path / "a.txt", 2000, seed=1, progress=False).path).read_bytes()
    b = Path(synthesize(tmp_path / "b.txt", 2000, seed=2, progress=False).path).read_bytes()
    c = Path(synthesize(tmp_path / "c.txt", 2000, seed=1, kind="test", progress=False).path).read_bytes()
    assert a != b
    assert a != c
    assert a.splitlines()[0] != b.splitlines()[0]


# ---------------------------------------------------------------- format


def test_exact_format(train50k: SynthReport) -> None:
    data = Path(train50k.path).read_bytes()
    assert data.endswith(b"\n") and not data.endswith(b"\n\n")
    lines = data[:-1].split(b"\n")
    assert len(lines) == STATS_ROWS
    ad5, ad3 = alphabet.ADAPTER_5P.encode(), alphabet.ADAPTER_3P.encode()
    for line in lines:
        assert LINE.match(line), line
        seq = line.split(b"\t")[0]
        assert seq.startswith(ad5) and seq.endswith(ad3), seq
    assert not any(b"\r" in line or b" " in line for line in lines[:100])


def test_number_style(train50k_rows: tuple[list[str], np.ndarray, list[str]]) -> None:
    _, values, texts = train50k_rows
    for text, value in zip(texts, values):
        if "." in text:
            assert value != int(value)  # a non-integer label never prints as an integer
            assert not text.endswith("0")  # trailing zeros stripped
        else:
            assert text == str(int(value)) and 0 <= int(text) <= 17
    long_texts = [t for t in texts if "." in t]
    # Averages carry 15 significant digits, like the real 15.1823836007871.
    assert np.mean([len(t.replace(".", "")) >= 14 for t in long_texts]) > 0.95


def test_side_files_and_no_leftovers(train50k: SynthReport) -> None:
    out = Path(train50k.path)
    assert train50k.noise_free_path == str(out.with_name("train.noise_free.txt"))
    assert train50k.info_path == str(out.with_name("train.synth.json"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.noise_free.txt", "train.synth.json", "train.txt"]


# ---------------------------------------------------------------- statistics


def test_length_and_n_statistics(train50k_rows: tuple[list[str], np.ndarray, list[str]]) -> None:
    seqs, _, _ = train50k_rows
    lengths = Counter(len(s) for s in seqs)
    n = len(seqs)
    frac = {k: v / n for k, v in lengths.items()}
    assert frac.get(110, 0) == pytest.approx(0.82, abs=0.015)
    assert frac.get(109, 0) == pytest.approx(0.127, abs=0.01)
    assert frac.get(108, 0) == pytest.approx(0.024, abs=0.005)
    assert frac.get(107, 0) == pytest.approx(0.008, abs=0.003)
    assert frac.get(111, 0) == pytest.approx(0.0046, abs=0.002)
    assert min(lengths) >= 87 and max(lengths) <= 135
    assert min(lengths) <= 100 and max(lengths) >= 115  # rare outliers exist
    outliers = sum(v for k, v in lengths.items() if k < 104 or k > 111) / n
    assert 0.004 < outliers < 0.012
    with_n = [s for s in seqs if "N" in s]
    assert len(with_n) / n == pytest.approx(0.004, abs=0.0015)
    for s in with_n:  # N only inside the random region
        assert "N" not in s[: len(alphabet.ADAPTER_5P)] and "N" not in s[-len(alphabet.ADAPTER_3P) :]


def test_label_statistics(train50k: SynthReport, train50k_rows: tuple[list[str], np.ndarray, list[str]]) -> None:
    _, values, texts = train50k_rows
    integer = np.array(["." not in t for t in texts])
    assert integer.mean() == pytest.approx(0.58, abs=0.03)
    assert values.min() >= 0 and values.max() <= 17
    assert values.mean() == pytest.approx(11.1, abs=0.5)
    assert values.std() == pytest.approx(2.35, abs=0.3)
    assert 0.80 <= train50k.oracle_pearson <= 0.90
    info = json.loads(Path(train50k.info_path).read_text())
    assert info["integer_label_fraction"] == pytest.approx(integer.mean(), abs=1e-12)


# ---------------------------------------------------------------- noise-free file and info


def test_noise_free_aligns_and_oracle_recomputes(
    train50k: SynthReport, train50k_rows: tuple[list[str], np.ndarray, list[str]]
) -> None:
    seqs, values, _ = train50k_rows
    noise_free = np.loadtxt(train50k.noise_free_path, dtype=np.float64)
    assert noise_free.shape == (len(seqs),)
    # Row i of the noise-free file is expression_model of sequence i (to the printed precision).
    codes, lengths = encode_rows(seqs)
    np.testing.assert_allclose(noise_free, expression_model(codes, lengths), rtol=0, atol=1e-12)
    info = json.loads(Path(train50k.info_path).read_text())
    recomputed = float(np.corrcoef(noise_free, values)[0, 1])
    assert info["oracle_pearson"] == pytest.approx(recomputed, abs=1e-9)
    assert train50k.oracle_pearson == pytest.approx(recomputed, abs=1e-9)
    assert info["seed"] == 7 and info["rows"] == STATS_ROWS and info["kind"] == "train"
    assert info["params"] == json.loads(json.dumps(synth.dataclasses.asdict(DEFAULT_GRAMMAR.params)))
    assert info["grammar"] == {"name": "default", "seed": None}
    assert GeneratorParams.from_dict(info["params"]) == DEFAULT_GRAMMAR.params
    histogram = Counter(len(s) for s in seqs)
    assert info["length_histogram"] == {str(k): histogram[k] for k in sorted(histogram)}


def test_test_kind(tmp_path: Path) -> None:
    report = synthesize(tmp_path / "test.txt", 3000, seed=5, kind="test", progress=False)
    seqs, labels = read_rows(report.path)
    assert len(seqs) == 3000
    assert all(len(s) == 110 and "N" not in s for s in seqs)
    assert all("." in x for x in labels)  # precise measurements are floats
    values = np.array([float(x) for x in labels])
    assert values.min() >= 0 and values.max() <= 17
    assert report.oracle_pearson > 0.97  # precise measurement: near the noise-free value
    assert json.loads(Path(report.info_path).read_text())["kind"] == "test"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        synthesize(tmp_path / "x.txt", 10, kind="validation", progress=False)
    with pytest.raises(UserError):
        synthesize(tmp_path / "x.txt", 0, progress=False)
    with pytest.raises(UserError):
        synthesize(tmp_path / "x.txt", 10, seed=-1, progress=False)
    with pytest.raises(UserError):
        synthesize(tmp_path / "missing" / "x.txt", 10, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ROWS", 100)
    real = synth._make_chunk

    def flaky(task: tuple) -> object:
        if task[1] == 2:
            raise RuntimeError("disk on fire")
        return real(task)

    monkeypatch.setattr(synth, "_make_chunk", flaky)
    with pytest.raises(RuntimeError):
        synthesize(tmp_path / "t.txt", 500, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary files


def test_progress_bar_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthesize(tmp_path / "p.txt", 500, seed=0, progress=True)
    assert "500" in capsys.readouterr().err
    synthesize(tmp_path / "q.txt", 500, seed=0, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the planted function

BACKGROUND = "CAGT" * 20  # 80-bp random region without any motif site (checked below)
ROW_LENGTH = alphabet.NOMINAL_LENGTH


def row(*inserts: tuple[str, int], background: str = BACKGROUND) -> str:
    """A 110-bp row with each motif placed so that its 3' end lies ``d`` bp before the row's end."""
    bases = list(alphabet.ADAPTER_5P + background + alphabet.ADAPTER_3P)
    for motif, d in inserts:
        end = ROW_LENGTH - d
        start = end - len(motif)
        assert start >= len(alphabet.ADAPTER_5P) and end <= ROW_LENGTH - len(alphabet.ADAPTER_3P)
        bases[start:end] = motif
    return "".join(bases)


def expr(*seqs: str) -> np.ndarray:
    return expression_model(*encode_rows(list(seqs)))


def logit(*seqs: str) -> np.ndarray:
    f = expr(*seqs)
    return np.log(f / (17.0 - f))


def revcomp(seq: str) -> str:
    return seq.translate(str.maketrans("ACGT", "TGCA"))[::-1]


INSTANCES = {  # one concrete site per planted motif
    "TATA": "TATAAAAG",
    "Reb1": "TTACCCG",
    "Abf1": "ATCATGCAGCACG",
    "Rap1": "ACACCCATACA",
    "Gcn4": "TGACTCA",
    "polyAT": "TTTTTTTTTTTT",
}
PEAK_D = {m.name: int(m.peak) for m in DEFAULT_GRAMMAR.params.motifs}


def test_background_has_no_sites() -> None:
    occupancy = synth.motif_occupancy(*encode_rows([row()]))
    assert occupancy.shape == (1, len(DEFAULT_GRAMMAR.params.motifs))
    assert not occupancy.any()


@pytest.mark.parametrize("name", list(INSTANCES))
def test_each_motif_raises_expression(name: str) -> None:
    base, with_site = expr(row(), row((INSTANCES[name], PEAK_D[name])))
    assert with_site > base + 0.5  # every planted motif is an activator
    occupancy = synth.motif_occupancy(*encode_rows([row((INSTANCES[name], PEAK_D[name]))]))[0]
    hit = [m.name for m, o in zip(DEFAULT_GRAMMAR.params.motifs, occupancy) if o > 0]
    assert hit == [name]


def test_position_matters() -> None:
    near, far = expr(row(("TATAAAAG", 30)), row(("TATAAAAG", 80)))
    assert near > far + 0.5  # TATA acts close to the 3' end


def test_orientation() -> None:
    fwd, rev = expr(row(("TATAAAAG", 30)), row((revcomp("TATAAAAG"), 30)))
    assert fwd > rev + 0.3  # TATA is stronger on the forward strand
    fwd, rev = expr(row(("TTACCCG", 55)), row((revcomp("TTACCCG"), 55)))
    assert fwd == pytest.approx(rev, abs=1e-12)  # Reb1 is orientation-free


def test_copies_saturate() -> None:
    # Copies at equal profile weight (symmetric about the TATA peak at 30 bp).
    zero, one, two, three = logit(
        row(),
        row(("TATAAAAG", 38)),
        row(("TATAAAAG", 38), ("TATAAAAG", 22)),
        row(("TATAAAAG", 38), ("TATAAAAG", 22), ("TATAAAAG", 50)),
    )
    assert one - zero > 0.2
    assert two - one > 0.05  # a second copy still adds
    assert two - one < one - zero  # ... but less than the first
    assert 0 < three - two < two - one


def test_interactions_are_not_additive() -> None:
    tata, poly = ("TATAAAAG", 30), ("TTTTTTTTTTTT", 60)
    none, a, b, ab = logit(row(), row(tata), row(poly), row(tata, poly))
    assert (ab - b) - (a - none) > 0.2  # synergy: TATA next to poly-dA:dT
    reb1, rap1 = ("TTACCCG", 40), ("ACACCCATACA", 70)
    none, a, b, ab = logit(row(), row(reb1), row(rap1), row(reb1, rap1))
    assert (ab - b) - (a - none) < -0.2  # redundancy: Reb1 with Rap1 adds less


def test_gc_effect_is_mild_and_negative() -> None:
    gc_rich = "CAGC" * 20
    assert not synth.motif_occupancy(*encode_rows([row(background=gc_rich)])).any()
    base, rich, tata = expr(row(), row(background=gc_rich), row(("TATAAAAG", 30)))
    assert rich < base
    # 25 points more GC in the random region moves expression far less than one TATA site.
    assert base - rich < 0.5 * (tata - base)


def test_output_saturates_in_range() -> None:
    every = [(INSTANCES[n], d) for n, d in (("TATA", 20), ("Reb1", 55), ("Rap1", 70), ("Gcn4", 44), ("polyAT", 30))]
    strong = row(*every)
    values = expr(row(), strong, "A" * 110, "C" * 90)
    assert np.all((values > 0) & (values < 17))
    assert values[1] > 15  # many sites drive expression close to the ceiling


def test_n_and_length_break_sites() -> None:
    site = row(("TATAAAAG", 30))
    end = ROW_LENGTH - 30
    with_n = site[: end - 3] + "N" + site[end - 2 :]
    base, broken = expr(row(), with_n)
    assert broken < base + 0.2  # the TATA site is gone; the N itself does not act
    # A site that runs past the row's length does not count, even if the bytes after it match.
    codes, lengths = encode_rows(["ACGT" * 5 + "TATAAAAG"])
    full = expression_model(codes, lengths)
    cut = expression_model(codes, lengths - 1)
    assert synth.motif_occupancy(codes, lengths)[0, 0] > 0
    assert synth.motif_occupancy(codes, lengths - 1)[0, 0] == 0
    assert full > cut
    # Bases beyond a row's length are ignored entirely: the same row with PAD there agrees.
    padded = codes.copy()
    padded[0, -1] = alphabet.PAD
    assert expression_model(padded, lengths - 1) == cut


def test_pure_function_of_the_sequence() -> None:
    seqs = [row(("TATAAAAG", 30)), row(("TTACCCG", 55)), alphabet.ADAPTER_5P + "TTACCCG" * 6 + alphabet.ADAPTER_3P]
    alone = np.concatenate([expr(s) for s in seqs])
    codes, lengths = encode_rows(seqs, extra=40)  # wider padding, rows batched together
    np.testing.assert_array_equal(expression_model(codes, lengths), alone)
    np.testing.assert_array_equal(expression_model(codes[::-1], lengths[::-1]), alone[::-1])
    with pytest.raises(ValueError):
        expression_model(np.full((1, 10), 9, dtype=np.uint8), np.array([10]))


# ---------------------------------------------------------------- grammars

# Hashes of the default grammar's output, computed with the generator as it was before grammars
# became objects (one module-level grammar), so the default stays byte-identical:
#   promoter-dist synth --rows 3000 --seed 5 --out train.txt --workers 1 --no-progress
#   promoter-dist synth --rows 1000 --seed 2 --kind test --out test.txt --workers 1 --no-progress
#   sha256sum train.txt train.noise_free.txt test.txt test.noise_free.txt
# and, for several chunks, synthesize(out, 4500, seed=11, workers=2) with CHUNK_ROWS = 1000.
DEFAULT_SHA256 = {
    ("train", 3000, 5): (
        "5ef4a2f1cf787b212b5135b6ca20faebb29480860ce611902ac2c1a01d905866",
        "82dfe1e58bbef5216f1ca729a45b865ade7c879194af7ad0b6550787ab57c5d2",
    ),
    ("test", 1000, 2): (
        "68edf856a4ae02999dbc6ee953ea284ed443f913e6541ee5f85e333fffe83502",
        "479bb2ccae910a5df0661234a83cbc173b76557ef4417700916255949349260a",
    ),
}
CHUNKED_SHA256 = (
    "187b6162f4d8e859bf6cab820cdf1563b2cd32c8dd13f79639606381ba40ee17",
    "0a5cae757578495b3f1eeab8933db07cafed298a26980391c85fca26fac2575e",
)
RANDOM_ROWS = 20_000


def sha256_pair(report: SynthReport) -> tuple[str, str]:
    return (
        hashlib.sha256(Path(report.path).read_bytes()).hexdigest(),
        hashlib.sha256(Path(report.noise_free_path).read_bytes()).hexdigest(),
    )


@pytest.mark.parametrize(("kind", "rows", "seed"), list(DEFAULT_SHA256))
def test_default_grammar_output_unchanged(tmp_path: Path, kind: str, rows: int, seed: int) -> None:
    report = synthesize(tmp_path / f"{kind}.txt", rows, seed=seed, kind=kind, workers=1, progress=False)
    assert sha256_pair(report) == DEFAULT_SHA256[(kind, rows, seed)]
    explicit = synthesize(tmp_path / "again.txt", rows, seed=seed, kind=kind, workers=1, progress=False,
                          grammar="default", grammar_seed=0)
    assert sha256_pair(explicit) == DEFAULT_SHA256[(kind, rows, seed)]


def test_default_grammar_output_unchanged_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ROWS", 1000)
    report = synthesize(tmp_path / "chunked.txt", 4500, seed=11, workers=2, progress=False)
    assert sha256_pair(report) == CHUNKED_SHA256


def test_default_grammar_is_read_only_and_named() -> None:
    assert make_grammar("default") is DEFAULT_GRAMMAR
    assert DEFAULT_GRAMMAR.name == "default" and DEFAULT_GRAMMAR.seed is None
    assert DEFAULT_GRAMMAR.params == GeneratorParams()
    with pytest.raises(ValueError):
        DEFAULT_GRAMMAR.lut[0] = 1  # tables shared by every caller cannot be changed by one
    with pytest.raises(ValueError):
        DEFAULT_GRAMMAR.profiles[0, 0] = 0.0


def test_random_grammar_is_deterministic_and_seed_dependent() -> None:
    first, again, other = random_grammar(3), random_grammar(3), random_grammar(4)
    assert first == again
    assert first != other
    assert [m.pattern for m in first.motifs] != [m.pattern for m in other.motifs]
    assert first != GeneratorParams()
    # The drawn parameters survive the info file's JSON round trip unchanged.
    assert GeneratorParams.from_dict(json.loads(json.dumps(synth.dataclasses.asdict(first)))) == first


def test_random_grammar_output_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    def run(name: str, grammar_seed: int, seed: int = 1) -> bytes:
        report = synthesize(tmp_path / f"{name}.txt", 3000, seed=seed, grammar="random", grammar_seed=grammar_seed,
                            workers=1, progress=False)
        return Path(report.path).read_bytes() + Path(report.noise_free_path).read_bytes()

    a, again, b, other_data = run("a", 5), run("again", 5), run("b", 6), run("c", 5, seed=2)
    assert a == again
    assert a != b and a != other_data
    default = synthesize(tmp_path / "d.txt", 3000, seed=1, workers=1, progress=False)
    assert a != Path(default.path).read_bytes() + Path(default.noise_free_path).read_bytes()


def test_random_grammar_any_worker_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ROWS", 1000)  # several chunks from few rows
    reports = [
        synthesize(tmp_path / f"w{workers}.txt", 3500, seed=9, grammar="random", grammar_seed=2, workers=workers,
                   progress=False)
        for workers in (1, 2, 3)
    ]
    for report in reports[1:]:
        assert sha256_pair(report) == sha256_pair(reports[0])
        assert report.oracle_pearson == reports[0].oracle_pearson


def test_compiled_grammar_pickles_for_workers() -> None:
    grammar = make_grammar("random", 7)
    copy = pickle.loads(pickle.dumps(grammar))
    codes, lengths = encode_rows([row(("TATAAAAG", 30)), row(("TTTTTTTTTTTT", 50)), row()])
    np.testing.assert_array_equal(expression_model(codes, lengths, copy), expression_model(codes, lengths, grammar))
    assert copy.params == grammar.params and copy.seed == 7


@pytest.mark.parametrize("grammar_seed", [0, 1, 2])
def test_random_grammar_data_is_realistic(tmp_path: Path, grammar_seed: int) -> None:
    report = synthesize(tmp_path / "train.txt", RANDOM_ROWS, seed=grammar_seed + 100, grammar="random",
                        grammar_seed=grammar_seed, workers=1, progress=False)
    assert report.grammar == "random" and report.grammar_seed == grammar_seed
    assert 0.6 <= report.oracle_pearson <= 0.95
    seqs, texts = read_rows(report.path)
    values = np.array([float(x) for x in texts])
    assert values.min() >= 0 and values.max() <= 17
    assert 9.5 <= values.mean() <= 12.5  # the default's: 11.1
    assert 1.8 <= values.std() <= 3.2  # the default's: 2.35
    integer = np.array(["." not in t for t in texts])
    assert integer.mean() == pytest.approx(0.58, abs=0.03)
    for line_seq in seqs[:200]:
        assert line_seq.startswith(alphabet.ADAPTER_5P) and line_seq.endswith(alphabet.ADAPTER_3P)
    # The noise-free file is the random grammar's expression_model of each row, and the info
    # file names the grammar and holds the drawn parameters.
    grammar = make_grammar("random", grammar_seed)
    noise_free = np.loadtxt(report.noise_free_path, dtype=np.float64)
    np.testing.assert_allclose(noise_free, expression_model(*encode_rows(seqs), grammar), rtol=0, atol=1e-12)
    assert report.oracle_pearson == pytest.approx(float(np.corrcoef(noise_free, values)[0, 1]), abs=1e-9)
    info = json.loads(Path(report.info_path).read_text())
    assert info["grammar"] == {"name": "random", "seed": grammar_seed}
    assert info["params"] == json.loads(json.dumps(synth.dataclasses.asdict(grammar.params)))
    assert GeneratorParams.from_dict(info["params"]) == grammar.params  # the info file rebuilds the grammar
    # The planted signal is the grammar's own: the default grammar explains these labels less well.
    default_f = expression_model(*encode_rows(seqs))
    assert float(np.corrcoef(default_f, values)[0, 1]) < report.oracle_pearson - 0.2


def test_random_grammar_ranges() -> None:
    """The drawn parameters stay within the ranges random_grammar documents."""
    adapters = (alphabet.ADAPTER_5P, alphabet.ADAPTER_3P)
    motif_counts, strand_free, repressors, runs = set(), 0, 0, 0
    for grammar_seed in range(12):
        params = random_grammar(grammar_seed)
        grammar = compile_grammar(params, "random", grammar_seed)  # at most 16 lookup sites, valid patterns
        motif_counts.add(len(params.motifs))
        assert 4 <= len(params.motifs) <= 7 and len(grammar.sites) <= 16
        assert len(params.interactions) <= 3
        assert len({(a, b) for a, b, _ in params.interactions}) == len(params.interactions)
        assert 0.6 <= params.output_exponent <= 1.6
        assert params.motifs[0].effect > 0 and params.motifs[1].effect > 0
        assert {k: v for k, v in synth.dataclasses.asdict(params).items() if k not in RANDOM_FIELDS} == {
            k: v for k, v in synth.dataclasses.asdict(GeneratorParams()).items() if k not in RANDOM_FIELDS
        }  # sequences and measurement are the default's
        patterns = set()
        for motif in params.motifs:
            assert 7 <= len(motif.pattern) <= 16
            assert motif.pattern[0] != "N" and motif.pattern[-1] != "N"
            assert 15 <= motif.peak <= 75 and 8 <= motif.width <= 30 and 0.05 <= motif.floor <= 0.6
            assert 0.5 <= motif.saturation <= 1.5 and 0.15 <= motif.plant_prob <= 0.35
            assert {motif.forward_weight, motif.reverse_weight} <= {1.0} or (
                max(motif.forward_weight, motif.reverse_weight) == 1.0
                and 0.2 <= min(motif.forward_weight, motif.reverse_weight) <= 0.8
            )
            strand_free += motif.forward_weight == motif.reverse_weight
            repressors += motif.effect < 0
            runs += motif.run
            if motif.run:
                assert motif.pattern[0] in "AG" and 8 <= len(motif.pattern) <= 11
                assert params.run_length_range[0] == len(motif.pattern)
                assert 4 <= params.run_length_range[1] - params.run_length_range[0] <= 7
                continue
            bits = sum(2 - math.log2(len(synth._IUPAC[c])) for c in motif.pattern)
            assert 12 <= bits <= 21
            for strand in (motif.pattern, synth._revcomp(motif.pattern)):
                regex = re.compile("".join(f"[{synth._IUPAC[c]}]" for c in strand))
                assert not any(regex.search(adapter) for adapter in adapters)
            assert motif.pattern not in patterns and synth._revcomp(motif.pattern) not in patterns
            patterns.add(motif.pattern)
    # The family varies: several motif counts, both strand behaviours, repressors and runs occur.
    assert len(motif_counts) >= 3 and strand_free > 0 and repressors > 0 and runs > 0


RANDOM_FIELDS = {"motifs", "run_length_range", "bias", "interactions", "gc_slope", "output_exponent"}


def test_compile_grammar_rejects_bad_parameters() -> None:
    good = MotifSpec("X", "TTACCCG", 1.0, 1.0, 40.0, 10.0, 0.2, 1.0, 0.8, 0.2)
    with pytest.raises(ValueError, match="pattern"):
        compile_grammar(GeneratorParams(motifs=(synth.dataclasses.replace(good, pattern="TACG"),), interactions=()))
    with pytest.raises(ValueError, match="pattern"):
        compile_grammar(GeneratorParams(motifs=(synth.dataclasses.replace(good, pattern="TTACCXG"),), interactions=()))
    with pytest.raises(ValueError, match="run"):
        compile_grammar(GeneratorParams(motifs=(synth.dataclasses.replace(good, run=True),), interactions=()))
    with pytest.raises(ValueError, match="unique"):
        compile_grammar(GeneratorParams(motifs=(good, good), interactions=()))
    with pytest.raises(ValueError, match="unknown motif"):
        compile_grammar(GeneratorParams(motifs=(good,), interactions=(("X", "Y", 1.0),)))
    with pytest.raises(ValueError, match="16"):  # 9 non-palindromic motifs need 18 lookup sites
        motifs = tuple(synth.dataclasses.replace(good, name=f"X{i}") for i in range(9))
        compile_grammar(GeneratorParams(motifs=motifs, interactions=()))


def test_bad_grammar_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown grammar"):
        synthesize(tmp_path / "x.txt", 10, grammar="yeast", progress=False)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="random grammar"):
        synthesize(tmp_path / "x.txt", 10, grammar="default", grammar_seed=3, progress=False)
    with pytest.raises(UserError, match="non-negative"):
        synthesize(tmp_path / "x.txt", 10, grammar="random", grammar_seed=-1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_grammar_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.txt"
    args = ["synth", "--rows", "2000", "--seed", "4", "--out", str(out), "--workers", "1", "--no-progress"]
    assert cli_main(args + ["--grammar", "random", "--grammar-seed", "8"]) == 0
    printed = capsys.readouterr().out
    assert "grammar: random, grammar seed 8" in printed and "oracle Pearson" in printed
    info = json.loads(out.with_name("r.synth.json").read_text())
    assert info["grammar"] == {"name": "random", "seed": 8}
    assert info["params"] == json.loads(json.dumps(synth.dataclasses.asdict(random_grammar(8))))
    api = synthesize(tmp_path / "api.txt", 2000, seed=4, grammar="random", grammar_seed=8, workers=1, progress=False)
    assert out.read_bytes() == Path(api.path).read_bytes()
    # Without the options, the default grammar, printed as before.
    default_out = tmp_path / "d.txt"
    assert cli_main(["synth", "--rows", "2000", "--seed", "4", "--out", str(default_out), "--no-progress"]) == 0
    assert "grammar:" not in capsys.readouterr().out
    assert json.loads(default_out.with_name("d.synth.json").read_text())["grammar"]["name"] == "default"
    # A grammar seed without --grammar random, or an unknown grammar, is a user error.
    assert cli_main(["synth", "--rows", "10", "--out", str(tmp_path / "e.txt"), "--grammar-seed", "2"]) == 2
    assert "applies only to the random grammar" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["synth", "--rows", "10", "--out", str(tmp_path / "f.txt"), "--grammar", "yeast"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "e.txt").exists() and not (tmp_path / "f.txt").exists()
