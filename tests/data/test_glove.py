"""GloVe over NAD's 5-mer words: counting, fitting, vector files, embedding matrix."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from promoter_dist.data import glove
from promoter_dist.data.glove import (
    Cooccurrence,
    GloveConfig,
    count_cooccurrence,
    embedding_matrix,
    fit_glove,
    is_pickle,
    load_vectors,
    save_vectors,
    train_glove,
)
from promoter_dist.data.nad_words import NUM_WORDS, VOCABULARY, word_id
from promoter_dist.errors import UserError

NAD_VECTORS = Path(__file__).resolve().parents[2] / "data" / "dream2022" / "nad_glove" / "vectors.txt"

# Small, fast fits: the vocabulary of the planted corpus is 32 words.
SMALL = GloveConfig(dim=32, iterations=50, workers=1)


def brute_force(sentences: list[list[int]], window: int) -> np.ndarray:
    """Left-context co-occurrence by plain loops: matrix[centre, context] += 1/d."""
    matrix = np.zeros((NUM_WORDS, NUM_WORDS))
    for sentence in sentences:
        for j, centre in enumerate(sentence):
            for d in range(1, window + 1):
                if j - d >= 0:
                    matrix[centre, sentence[j - d]] += 1.0 / d
    return matrix


def planted_corpus(n_sentences: int = 1500, seed: int = 0) -> np.ndarray:
    """Sentences of 20 pairs (a, a + 16): word a + 16 always follows word a."""
    rng = np.random.default_rng(seed)
    firsts = rng.integers(0, 16, size=(n_sentences, 20))
    rows = np.empty((n_sentences, 40), dtype=np.int16)
    rows[:, 0::2] = firsts
    rows[:, 1::2] = firsts + 16
    return rows


@pytest.fixture(scope="module")
def planted_cooc() -> Cooccurrence:
    return count_cooccurrence([planted_corpus()], SMALL)


# ---------------------------------------------------------------- counting


def test_tiny_corpus_by_hand() -> None:
    cooc = count_cooccurrence([np.array([[1, 2, 3]]), np.array([[4, 5]])], GloveConfig(workers=1))
    m = cooc.matrix
    assert m[2, 1] == 1.0 and m[3, 2] == 1.0 and m[3, 1] == 0.5  # centre, left context, 1/d
    assert m[1, 2] == 0.0 and m[1, 3] == 0.0  # no right context
    assert m[4, 3] == 0.0  # no pair across sentences
    assert m[5, 4] == 1.0
    assert m.sum() == 3.5
    assert cooc.sentences == 2
    assert cooc.word_counts[[1, 2, 3, 4, 5]].tolist() == [1] * 5 and cooc.word_counts.sum() == 5


@pytest.mark.parametrize("window", [1, 3, 10])
def test_count_equals_brute_force(window: int) -> None:
    rng = np.random.default_rng(window)
    batches = [
        rng.integers(0, 12, size=(5, 17)),  # few words: many repeated pairs
        rng.integers(0, NUM_WORDS, size=(3, 80)).astype(np.int16),
        np.array([[7]]),  # a one-word sentence has no pairs
        rng.integers(0, 12, size=(4, 11)).astype(np.uint16),
    ]
    cooc = count_cooccurrence(batches, GloveConfig(window=window, workers=1))
    sentences = [list(map(int, row)) for batch in batches for row in batch]
    np.testing.assert_allclose(cooc.matrix, brute_force(sentences, window), rtol=1e-12, atol=0)
    assert cooc.sentences == 13
    np.testing.assert_array_equal(
        cooc.word_counts, np.bincount(np.concatenate([np.ravel(b) for b in batches]), minlength=NUM_WORDS)
    )


def test_window_cut_off() -> None:
    sentence = np.array([[100, *range(1, 11), 200]])  # 200 is 11 words right of 100
    m = count_cooccurrence([sentence], GloveConfig(window=10, workers=1)).matrix
    assert m[200, 100] == 0.0
    assert m[10, 100] == m[200, 1] == pytest.approx(1 / 10)  # distance 10: still counted
    assert np.count_nonzero(m) == 65  # 11 + 10 + ... + 2 pairs at distances 1..10


def test_parallel_count_equals_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(glove, "_CHUNK_ROWS", 97)  # many blocks per worker
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, NUM_WORDS, size=(n, 80), dtype=np.int16) for n in (700, 1, 0, 333)]
    serial = count_cooccurrence(batches, GloveConfig(workers=1))
    parallel = count_cooccurrence(iter(batches), GloveConfig(workers=2))
    np.testing.assert_array_equal(parallel.matrix, serial.matrix)
    np.testing.assert_array_equal(parallel.word_counts, serial.word_counts)
    assert parallel.sentences == serial.sentences == 1034
    assert serial.matrix.sum() > 0


@pytest.mark.parametrize("bad", [np.array([[1, 1024]]), np.array([[-1, 3]]), np.array([1, 2, 3]), np.array([[0.5]])])
def test_bad_word_ids_are_user_errors(bad: np.ndarray) -> None:
    for workers in (1, 2):
        with pytest.raises(UserError, match="batch 1"):
            count_cooccurrence([np.array([[1, 2]]), bad], GloveConfig(workers=workers))


# ---------------------------------------------------------------- fitting


def test_min_count_drops_rare_words() -> None:
    rows = np.tile(np.arange(10, dtype=np.int16), (20, 1))  # words 0..9: 20 times each
    rows[:4, 0] = 42  # word 42: 4 times, word 0: 16 times
    rows[4:9, 1] = 43  # word 43: 5 times
    cooc = count_cooccurrence([rows], GloveConfig(workers=1))
    vectors, ids, stats = fit_glove(cooc, GloveConfig(dim=4, iterations=2, min_count=5), progress=False)
    assert 42 not in ids and 43 in ids
    assert ids == sorted([*range(10), 43])
    assert vectors.shape == (11, 4) and vectors.dtype == np.float32
    assert stats["vocab_size"] == 11
    _, ids_all, _ = fit_glove(cooc, GloveConfig(dim=4, iterations=2, min_count=1), progress=False)
    assert 42 in ids_all


def test_fit_is_seeded(planted_cooc: Cooccurrence) -> None:
    config = GloveConfig(dim=16, iterations=3, workers=1)
    a, ids_a, _ = fit_glove(planted_cooc, config, progress=False)
    b, ids_b, _ = fit_glove(planted_cooc, config, progress=False)
    c, _, _ = fit_glove(planted_cooc, GloveConfig(dim=16, iterations=3, seed=2), progress=False)
    np.testing.assert_array_equal(a, b)
    assert ids_a == ids_b == list(range(32))
    params, _ = glove._fit(planted_cooc, config, progress=False)
    np.testing.assert_array_equal(a, params.w + params.w_context)  # GloVe's output: w + w~
    assert not np.allclose(a, c)


def test_fit_learns_planted_structure(planted_cooc: Cooccurrence, capsys: pytest.CaptureFixture) -> None:
    params, stats = glove._fit(planted_cooc, SMALL, progress=True)
    assert "iteration 50/50" in capsys.readouterr().err
    losses = stats["loss_per_iteration"]
    assert len(losses) == 50
    assert stats["initial_loss"] / stats["final_loss"] > 100
    assert losses[-1] < losses[0] / 10
    ids = params.word_ids
    x = planted_cooc.matrix[np.ix_(ids, ids)]
    model = params.w @ params.w_context.T + params.b[:, None] + params.b_context[None, :]
    nonzero = x > 0
    r = np.corrcoef(model[nonzero], np.log(x[nonzero]))[0, 1]
    assert r > 0.9
    assert stats["pearson_log_x"] == pytest.approx(r, abs=1e-4)
    # The planted pair (a, a + 16) is the strongest entry of its row, and the model knows it.
    assert all(int(np.argmax(model[a + 16])) == a for a in range(16))


def test_fit_without_entries_is_user_error() -> None:
    cooc = count_cooccurrence([np.array([[1], [2], [3]] * 5)], GloveConfig(workers=1))
    with pytest.raises(UserError, match="no co-occurrences"):
        fit_glove(cooc, GloveConfig(dim=4, iterations=1), progress=False)
    with pytest.raises(UserError, match="min_count"):
        fit_glove(cooc, GloveConfig(dim=4, iterations=1, min_count=6), progress=False)


def test_config_is_validated() -> None:
    with pytest.raises(UserError, match="window"):
        GloveConfig(window=0)
    with pytest.raises(UserError, match="workers"):
        GloveConfig(workers=0)
    assert GloveConfig().resolved_workers() >= 1


# ---------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ids = [5, 0, 1023, 77]
    scales = 1e3 ** rng.integers(-3, 3, size=(4, 8))  # values across 15 orders of magnitude
    vectors = (rng.normal(size=(4, 8)) * scales).astype(np.float32)
    paths = save_vectors(vectors, ids, tmp_path / "out")
    assert list(paths) == ["word2vec"] and Path(paths["word2vec"]).name == "vectors.w2v.txt"
    assert Path(paths["word2vec"]).read_text().splitlines()[0] == "4 8"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vectors.w2v.txt"]  # no pickle, no temporaries
    for path in (paths["word2vec"], tmp_path / "out"):
        kv = load_vectors(path)
        assert kv.index_to_key == [VOCABULARY[i] for i in ids]
        for i, row in zip(ids, vectors):
            np.testing.assert_array_equal(kv[VOCABULARY[i]], row)  # exact, float32


def test_nad_published_vectors() -> None:
    kv = load_vectors(NAD_VECTORS)
    lines = NAD_VECTORS.read_text().splitlines()
    assert len(lines) == 1025 and lines[-1].startswith("<unk> ")
    assert len(kv) == 1024 and kv.vector_size == 128
    assert "<unk>" not in kv.key_to_index  # skipped: GloVe's mean of rare words, not a 5-mer
    assert sorted(kv.index_to_key) == sorted(VOCABULARY)
    by_word = {line.split()[0]: line.split()[1:] for line in lines}
    for word in ("GGGGG", "ACGTA", "TTTTT"):
        np.testing.assert_array_equal(kv[word], np.array([float(v) for v in by_word[word]], dtype=np.float32))
    np.testing.assert_allclose(kv["GGGGG"][:3], [0.539899, 0.151866, -0.492288], rtol=0, atol=1e-7)

    matrix = embedding_matrix(kv)
    assert matrix.shape == (1024, 128) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[word_id("GGGGG")], kv["GGGGG"])
    aacgt = np.array([float(v) for v in by_word["AACGT"]], dtype=np.float32)
    np.testing.assert_array_equal(matrix[word_id("AACGT")], aacgt)


def test_embedding_matrix_missing_words(tmp_path: Path) -> None:
    save_vectors(np.ones((2, 3), dtype=np.float32), [word_id("GGGGG"), 0], tmp_path)
    kv = load_vectors(tmp_path / "vectors.w2v.txt")
    with pytest.raises(UserError, match=r"1022 of 1024 words have no vector \(AAAAC, AAAAG"):
        embedding_matrix(kv)
    matrix = embedding_matrix(kv, allow_missing=True)
    assert matrix[word_id("GGGGG")].tolist() == [1, 1, 1] and matrix[0].tolist() == [1, 1, 1]
    assert np.count_nonzero(matrix.any(axis=1)) == 2


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("AAAAA 1 2 3\nAAAAC 1 2\n", 2, "expected 3 values"),  # ragged
        ("2 3\nAAAAA 1 2 3\nAAAAC 1 2 3 4\n", 3, "expected 3 values"),  # ragged against header
        ("AAAAA 1 2 3\nAAAAC 1 x 3\n", 2, "'x' is not a number"),
        ("AAAAA 1 2 nan\n", 1, "not finite"),
        ("", 1, "empty"),
        ("\n\n", 1, "empty"),
        ("3 2\nAAAAA 1 2\nAAAAC 1 2\n", 1, "header announces 3 vectors, file has 2"),
        ("AAAAA 1 2\nhello 1 2\n", 2, "not a 5-mer"),
        ("AAAAA 1 2\nAAAAA 3 4\n", 2, "repeats line 1"),
        ("AAAAA\n", 1, "expected a word followed by"),
    ],
)
def test_malformed_vector_files(tmp_path: Path, content: str, line: int, reason: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        load_vectors(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}")
    assert reason in message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such vector file"):
        load_vectors(tmp_path / "absent.txt")
    pickle_like = tmp_path / "broken.kv"
    pickle_like.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match=f"{pickle_like}: a pickle"):
        load_vectors(pickle_like)
    with pytest.raises(UserError, match=f"{pickle_like}: not a readable gensim"):
        load_vectors(pickle_like, trust_pickle=True)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"AAAAA 1 2\n\xff\xfe 1 2\n")
    with pytest.raises(UserError, match=f"{binary}:2: not UTF-8"):
        load_vectors(binary)
    array = tmp_path / "vectors.npy"
    np.save(array, np.zeros((2, 3), np.float32))
    with pytest.raises(UserError, match=f"{array}: a NumPy .npy array, not a vector file"):
        load_vectors(array)
    with pytest.raises(UserError, match="/dev/null: a character device, not a regular file"):
        load_vectors("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=f"{fifo}: a FIFO"):  # refused without waiting for a writer
        load_vectors(fifo)


def legacy_kv(path: Path, words: list[str], vectors: np.ndarray) -> Path:
    """A gensim ``KeyedVectors.save`` file, as earlier versions of `promoter-dist glove` wrote."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=np.float32)
    kv.add_vectors(words, vectors)
    with open(path, "wb") as handle:
        kv.save(handle)
    return path


def test_legacy_kv_is_refused_unless_trusted(tmp_path: Path) -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = legacy_kv(tmp_path / "vectors.kv", ["GGGGG", "AAAAA"], vectors)
    for target in (path, tmp_path):  # a folder without vectors.w2v.txt means its legacy vectors.kv
        with pytest.raises(UserError) as info:
            load_vectors(target)
        message = str(info.value)
        assert message.startswith(f"{path}: a pickle") and "\n" not in message
        assert "promoter-dist glove" in message and "data.trust_pickled_vectors=true" in message
    kv = load_vectors(path, trust_pickle=True)
    assert kv.index_to_key == ["GGGGG", "AAAAA"]
    np.testing.assert_array_equal(kv.vectors, vectors)
    save_vectors(vectors, [word_id("GGGGG"), word_id("AAAAA")], tmp_path)
    assert load_vectors(tmp_path).index_to_key == ["GGGGG", "AAAAA"]  # the text file wins over the pickle


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_are_told_by_content(tmp_path: Path, protocol: int) -> None:
    data = pickle.dumps({"GGGGG": [1.0, 2.0]}, protocol=protocol)
    assert is_pickle(data)
    path = tmp_path / "vectors.txt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=f"{path}: a pickle"):
        load_vectors(path)


def test_text_files_are_not_pickles(tmp_path: Path) -> None:
    save_vectors(np.ones((3, 2), dtype=np.float32), [0, 1, word_id("GGGGG")], tmp_path)
    for path in (NAD_VECTORS, tmp_path / "vectors.w2v.txt"):
        assert not is_pickle(Path(path).read_bytes())


# ---------------------------------------------------------------- end to end


def test_train_glove_writes_everything(tmp_path: Path) -> None:
    rows = planted_corpus(300, seed=1)
    config = GloveConfig(dim=8, iterations=4, workers=2)
    info = train_glove((rows[i : i + 100] for i in range(0, 300, 100)), tmp_path / "glove", config, progress=False)
    written = json.loads((tmp_path / "glove" / "glove.json").read_text())
    assert written == info
    assert info["sentences"] == 300 and info["tokens"] == 12000 and info["vocab_size"] == 32
    assert info["config"]["dim"] == 8 and info["workers_used"] == 2
    assert len(info["loss_per_iteration"]) == 4 and info["final_loss"] < info["initial_loss"]
    assert len(info["dropped_words"]) == NUM_WORDS - 32 and "AAAAA" not in info["dropped_words"]
    assert set(info["timings_s"]) == {"count", "fit", "save", "total"}
    assert info["files"] == {"word2vec": "vectors.w2v.txt"}
    assert sorted(p.name for p in (tmp_path / "glove").iterdir()) == ["glove.json", "vectors.w2v.txt"]
    kv = load_vectors(tmp_path / "glove" / info["files"]["word2vec"])
    assert len(kv) == 32 and kv.vector_size == 8
    assert embedding_matrix(kv, allow_missing=True)[:32].any(axis=1).all()
