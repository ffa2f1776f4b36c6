"""SYSU-SAIL's 3-mer BERT: size against the report, export and reload through the Auto*
classes, fine-tuning init from a masked-LM export, errors, settings validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from promoter_dist.config import load_config
from promoter_dist.data.dream import ReadOptions, read_dream
from promoter_dist.data.kmer_tokenizer import PAD_ID, VOCAB_SIZE, encode_codes
from promoter_dist.errors import UserError
from promoter_dist.models.bert import (
    NOMINAL_TOKENS,
    READER_MAX_TOKENS,
    BertSettings,
    build_mlm_model,
    build_regression_model,
    count_parameters,
    export_pretrained,
    load_exported,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "dream2022" / "samples" / "train_first1000.txt"
PUBLISHED_SIZE = 10.05e6  # models.md, SYSU-SAIL section: "about 10.05M parameters"
# The report gives three significant figures after the point: anything that rounds to
# 10.05M (+-5,000 parameters, 0.05%) matches it.
PUBLISHED_TOLERANCE = 5_000
TINY = dict(hidden=64, layers=2, heads=4, intermediate=128)


@pytest.fixture(scope="module")
def sample():
    """The first 32 real rows: their raw sequences and their codes."""
    rows, _ = read_dream(SAMPLE, ReadOptions(workers=0))
    text = SAMPLE.read_text().splitlines()
    n = 32
    sequences = [text[line - 1].split("\t")[0] for line in rows.lines[:n]]
    return sequences, rows.codes[:n], rows.lengths[:n]


def tokens(sample, frame: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    _, codes, lengths = sample
    ids, mask = encode_codes(codes, lengths, frame=frame)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def test_published_parameter_count():
    sizes = {}
    for max_tokens in (512, READER_MAX_TOKENS, NOMINAL_TOKENS):
        with torch.device("meta"):  # counts only: no memory, no init
            settings = BertSettings(max_tokens=max_tokens)
            regression, mlm = build_regression_model(settings), build_mlm_model(settings)
            sizes[max_tokens] = (count_parameters(regression), count_parameters(mlm))
        print(f"max_tokens={max_tokens}: regression {sizes[max_tokens][0]:,}, masked LM {sizes[max_tokens][1]:,}")
    # The defaults (512 positions) reproduce the published size; the docstring's table holds.
    assert BertSettings().max_tokens == 512
    assert abs(sizes[512][0] - PUBLISHED_SIZE) <= PUBLISHED_TOLERANCE
    assert sizes == {512: (10_051_073, 10_051_714), 192: (9_887_233, 9_887_874), 128: (9_854_465, 9_855_106)}
    # Only the position table depends on max_tokens: hidden (512) parameters per position.
    assert sizes[512][0] - sizes[192][0] == (512 - 192) * 512


def test_token_limits_follow_the_tokenizer(sample):
    ids, mask = tokens(sample)
    nominal = [i for i, s in enumerate(sample[0]) if len(s) == 110]
    assert nominal and all(int(mask[i].sum()) == NOMINAL_TOKENS == 128 for i in nominal)
    longest = np.full((1, 300), 0, dtype=np.uint8)  # the reader's longest accepted row, all A
    assert encode_codes(longest, np.array([300]), frame=0)[0].shape[1] == READER_MAX_TOKENS == 192


def test_models_are_plain_hf_modules_and_run_under_bf16_autocast(sample):
    torch.manual_seed(0)
    settings = BertSettings(**TINY)
    ids, mask = tokens(sample)
    mlm, reg = build_mlm_model(settings), build_regression_model(settings)
    assert mlm.training and reg.training
    assert mlm.config.vocab_size == VOCAB_SIZE and mlm.config.pad_token_id == PAD_ID
    assert mlm.config._attn_implementation == "sdpa"
    assert reg.config.num_labels == 1 and reg.config.problem_type == "regression"
    assert reg.classifier.out_features == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = mlm(input_ids=ids, attention_mask=mask).logits
        out = reg(input_ids=ids, attention_mask=mask, labels=torch.ones(len(ids)))
    assert logits.shape == (*ids.shape, VOCAB_SIZE) and logits.dtype == torch.bfloat16
    assert out.logits.shape == (len(ids), 1) and torch.isfinite(out.loss)
    out.loss.backward()
    assert reg.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_eager_and_sdpa_agree(sample):
    ids, mask = tokens(sample)
    outputs = []
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = build_mlm_model(BertSettings(**TINY, attention=attention)).eval()
        with torch.no_grad():
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


@pytest.mark.parametrize("frame", [0, 2])
def test_export_reloads_with_auto_classes_identically(sample, tmp_path, frame):
    sequences = sample[0]
    ids, mask = tokens(sample, frame)
    torch.manual_seed(1)
    mlm = build_mlm_model(BertSettings(**TINY)).eval()
    reg = build_regression_model(BertSettings(**TINY)).eval()
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


def test_regression_from_pretrained_keeps_encoder_and_starts_a_fresh_head(tmp_path):
    torch.manual_seed(2)
    mlm = build_mlm_model(BertSettings(**TINY))
    export_pretrained(mlm, tmp_path / "pre", frame=0)
    settings = BertSettings(**TINY, dropout=0.2, pretrained=str(tmp_path / "pre"))
    heads = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        reg = build_regression_model(settings)
        assert reg.training and reg.config.num_labels == 1 and reg.config.problem_type == "regression"
        assert reg.config.hidden_dropout_prob == 0.2 and reg.dropout.p == 0.2
        source = mlm.bert.state_dict()
        for key, value in reg.bert.state_dict().items():
            if not key.startswith("pooler."):
                assert torch.equal(value, source[key]), key
        assert reg.classifier.weight.shape == (1, TINY["hidden"])
        heads.append(torch.cat([reg.classifier.weight.flatten(), reg.bert.pooler.dense.weight.flatten()]))
    # The pooler and the linear head are newly initialised (from the RNG), not read from the file.
    assert not torch.equal(heads[0], heads[1])


def test_bad_pretrained_paths_give_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=r"model\.bert\.pretrained=.*nowhere.*no such folder"):
        build_regression_model(BertSettings(**TINY, pretrained=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty.*no config\.json"):
        build_regression_model(BertSettings(**TINY, pretrained=str(tmp_path / "empty")))
    # A fine-tuned regressor is not a masked-LM export.
    export_pretrained(build_regression_model(BertSettings(**TINY)), tmp_path / "reg", frame=0)
    with pytest.raises(UserError, match=r"reg.*not a BERT masked-LM export"):
        build_regression_model(BertSettings(**TINY, pretrained=str(tmp_path / "reg")))
    with pytest.raises(UserError, match=r"not a BertForMaskedLM export"):
        load_exported(tmp_path / "reg", "mlm")
    # Sizes that differ from the settings are named.
    export_pretrained(build_mlm_model(BertSettings(**TINY)), tmp_path / "mlm", frame=0)
    with pytest.raises(UserError, match=r"model\.bert\.layers: settings 3, export 2"):
        build_regression_model(BertSettings(**{**TINY, "layers": 3}, pretrained=str(tmp_path / "mlm")))
    with pytest.raises(UserError, match="no config.json"):
        load_exported(missing, "mlm")
    with pytest.raises(ValueError, match="kind"):
        load_exported(tmp_path / "mlm", "classifier")


def test_export_replaces_an_export_but_never_other_folders(tmp_path):
    torch.manual_seed(5)
    first, second = build_mlm_model(BertSettings(**TINY)), build_mlm_model(BertSettings(**TINY))
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


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"heads": 7}, "model.bert.heads"),
        ({"hidden": 0}, "model.bert.hidden"),
        ({"layers": -1}, "model.bert.layers"),
        ({"intermediate": 0}, "model.bert.intermediate"),
        ({"dropout": 1.0}, "model.bert.dropout"),
        ({"max_tokens": 100}, "model.bert.max_tokens"),
        ({"attention": "flash"}, "model.bert.attention"),
    ],
)
def test_settings_validation_names_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        BertSettings(**bad)
    # Through the config loader the same message reaches the user as a UserError.
    overrides = [f"model.bert.{name}={value}" for name, value in bad.items()]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_every_setting_has_a_docstring():
    import ast
    import inspect

    import promoter_dist.models.bert as module

    tree = ast.parse(inspect.getsource(module.BertSettings))
    body = tree.body[0].body
    fields = [node.target.id for node in body if isinstance(node, ast.AnnAssign)]
    documented = [
        node.target.id
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    ]
    assert fields == documented and "pretrained" in fields


def test_local_init_first_layer_heads_attend_to_their_neighbour(sample):
    """init='local': on real rows, each first-layer head puts most of its attention on token i + offset."""
    from promoter_dist.models.bert import LOCAL_OFFSETS

    torch.manual_seed(0)
    settings = BertSettings(**TINY, init="local", dropout=0.0, attention="eager")
    model = build_regression_model(settings).eval()
    ids, mask = tokens(sample)
    with torch.no_grad():
        attentions = model.bert(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    n = ids.shape[1]
    for head in range(settings.heads):
        offset = LOCAL_OFFSETS[head % len(LOCAL_OFFSETS)]
        queries = torch.arange(2, n - 2)  # every query whose neighbour at the offset exists
        keys = queries + offset
        on_neighbour = attentions[:, head, queries, keys]  # (rows, queries)
        attended = mask[:, keys].bool() & mask[:, queries].bool()
        print(f"head {head} (offset {offset:+d}): {on_neighbour[attended].mean():.3f} of the attention on its neighbour")
        assert on_neighbour[attended].mean() > 0.6, (head, on_neighbour[attended].mean())
    # The stock init spreads attention: no head prefers one neighbour like that.
    stock = build_regression_model(BertSettings(**TINY, dropout=0.0, attention="eager")).eval()
    with torch.no_grad():
        spread = stock.bert(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    assert spread[:, :, torch.arange(2, n - 2), torch.arange(3, n - 1)].mean() < 0.1
    with pytest.raises(ValueError, match="model.bert.init"):
        BertSettings(init="sinusoid")
