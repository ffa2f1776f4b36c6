"""A BERT model and its 3-mer tokenizer as one Hugging Face folder: export and reload through
the Auto* classes, replacing an export safely, reload errors, fine-tuning from an export."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from promoter_dist.data.kmer_tokenizer import PAD_ID, VOCAB_SIZE, encode_codes
from promoter_dist.errors import UserError
from promoter_dist.models.bert import (
    BertConfig,
    build_mlm_model,
    build_regression_model,
)
from promoter_dist.tasks.bert_io import export_pretrained, load_exported
from tests.bert_rows import first_rows, tokens

TINY = dict(hidden=64, layers=2, heads=4, intermediate=128)
VOCABULARY = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID)  # what the tasks pass


@pytest.fixture(scope="module")
def sample():
    """The first 32 real rows: their raw sequences and their codes."""
    return first_rows(32)


@pytest.mark.parametrize("frame", [0, 2])
def test_export_reloads_with_auto_classes_identically(sample, tmp_path, frame):
    sequences = sample[0]
    ids, mask = tokens(sample, frame)
    torch.manual_seed(1)
    mlm = build_mlm_model(BertConfig(**TINY), **VOCABULARY).eval()
    reg = build_regression_model(BertConfig(**TINY), **VOCABULARY).eval()
    export_pretrained(mlm, tmp_path / "mlm", frame=frame)
    export_pretrained(reg, tmp_path / "reg", frame=frame)

    for kind, model, auto in (("mlm", mlm, AutoModelForMaskedLM), ("regression", reg, AutoModelForSequenceClassification)):
        folder = tmp_path / ("mlm" if kind == "mlm" else "reg")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # The saved tokenizer on the raw rows gives exactly the loader's ids.
        enc = tokenizer(sequences, padding=True, return_tensors="pt")
        assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
        reloaded = [auto.from_pretrained(folder).eval(), load_exported(folder, kind)[1]]
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            for other in reloaded:
                assert not other.training
                got = other(**enc).logits
                assert (got - expected).abs().max().item() == 0.0


def test_regression_fine_tunes_from_an_export(tmp_path):
    torch.manual_seed(2)
    mlm = build_mlm_model(BertConfig(**TINY), **VOCABULARY)
    export_pretrained(mlm, tmp_path / "pre", frame=1)
    reg = build_regression_model(BertConfig(**TINY, pretrained=str(tmp_path / "pre")), **VOCABULARY)
    source = mlm.bert.state_dict()
    for key, value in reg.bert.state_dict().items():
        if not key.startswith("pooler."):
            assert torch.equal(value, source[key]), key


def test_an_export_records_its_flanks_and_a_run_with_others_is_refused(sample, tmp_path):
    from promoter_dist.config import load_config
    from promoter_dist.errors import ConfigError
    from promoter_dist.tasks.bert_io import export_flank_bp
    from promoter_dist.tasks.mlm import MLMTask
    from promoter_dist.tasks.regression import RegressionTask

    mlm = build_mlm_model(BertConfig(**TINY), **VOCABULARY)
    export_pretrained(mlm, tmp_path / "short", frame=0, flank_bp=23)
    export_pretrained(mlm, tmp_path / "full", frame=2)
    assert export_flank_bp(tmp_path / "short") == 23 and export_flank_bp(tmp_path / "full") == 150
    assert export_flank_bp(tmp_path / "nowhere") is None
    # The saved tokenizer adds the short flanks itself: the same ids as the loader's path.
    codes, lengths = sample[1], sample[2]
    enc = AutoTokenizer.from_pretrained(tmp_path / "short")(sample[0], padding=True, return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], encode_codes(codes, lengths, 0, flank_bp=23)[0])
    sizes = [f"model.bert.{key}={value}" for key, value in TINY.items()]
    for task, name in ((MLMTask, "mlm"), (RegressionTask, "regression")):
        def config(flank_bp: int, export: str = "short"):
            return load_config(None, ["model.name=bert", f"task.name={name}", *sizes,
                                      f"model.bert.pretrained={tmp_path / export}", f"data.kmer_flank_bp={flank_bp}"])

        assert task(config(23)).build_model() is not None
        with pytest.raises(ConfigError, match=r"was made with data\.kmer_flank_bp=23, this run has 150"):
            task(config(150)).build_model()
        with pytest.raises(ConfigError, match=r"was made with data\.kmer_flank_bp=150, this run has 23"):
            task(config(23, "full")).build_model()


def test_reload_errors_are_clear(tmp_path):
    missing = tmp_path / "nowhere"
    export_pretrained(build_regression_model(BertConfig(**TINY), **VOCABULARY), tmp_path / "reg", frame=0)
    with pytest.raises(UserError, match=r"not a BertForMaskedLM export"):
        load_exported(tmp_path / "reg", "mlm")
    with pytest.raises(UserError, match="no config.json"):
        load_exported(missing, "mlm")
    with pytest.raises(ValueError, match="kind"):
        load_exported(tmp_path / "reg", "classifier")
    with pytest.raises(TypeError, match="BertForMaskedLM or BertForSequenceClassification"):
        export_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear", frame=0)


def test_export_replaces_an_export_but_never_other_folders(tmp_path):
    torch.manual_seed(5)
    first = build_mlm_model(BertConfig(**TINY), **VOCABULARY)
    second = build_mlm_model(BertConfig(**TINY), **VOCABULARY)
    out = tmp_path / "export"
    export_pretrained(first, out, frame=0)
    export_pretrained(second, out, frame=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or old folders left
    _, loaded = load_exported(out, "mlm")
    assert torch.equal(loaded.bert.embeddings.word_embeddings.weight, second.bert.embeddings.word_embeddings.weight)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("A")["input_ids"] == encode_codes(np.zeros((1, 1), np.uint8), np.array([1]), frame=1)[0][0].tolist()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a model export"):
        export_pretrained(first, other, frame=0)
    assert (other / "keep.txt").read_text() == "mine"


def test_export_is_safetensors_and_json_only(sample, tmp_path):
    torch.manual_seed(6)
    export_pretrained(build_mlm_model(BertConfig(**TINY), **VOCABULARY), tmp_path / "export", frame=0)
    # Nothing a reader would have to unpickle: weights in safetensors, the rest JSON.
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    tokenizer, _ = load_exported(tmp_path / "export", "mlm")
    ids, mask = tokens(sample, 0)
    enc = tokenizer(sample[0], padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)


def test_reload_needs_safetensors_weights_and_tokenizer_json(tmp_path):
    export_pretrained(build_mlm_model(BertConfig(**TINY), **VOCABULARY), tmp_path / "export", frame=0)
    (tmp_path / "export" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"export: no tokenizer\.json"):
        load_exported(tmp_path / "export", "mlm")
    (tmp_path / "export" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no model\.safetensors in .*export"):
        load_exported(tmp_path / "export", "mlm")
    with pytest.raises(UserError, match=r"model\.bert\.pretrained=.*no model\.safetensors in"):
        build_regression_model(BertConfig(**TINY, pretrained=str(tmp_path / "export")), **VOCABULARY)
