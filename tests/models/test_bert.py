"""SYSU-SAIL's 3-mer BERT: size against the report, defaults against the tokenizer's
constants, fine-tuning init from a masked-LM model folder, errors, settings validation.
The export with its tokenizer is tested in tests/tasks/test_bert_io.py."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from promoter_dist.config import load_config
from promoter_dist.data.alphabet import NOMINAL_LENGTH
from promoter_dist.data.dream import ReadOptions
from promoter_dist.data.kmer_tokenizer import (
    PAD_ID,
    VOCAB_SIZE,
    encode_codes,
    kmer_count,
)
from promoter_dist.errors import ConfigError, UserError
from promoter_dist.models.bert import (
    DEFAULT_PAD_ID,
    DEFAULT_VOCAB_SIZE,
    NOMINAL_TOKENS,
    BertConfig,
    build_mlm_model,
    build_regression_model,
)
from promoter_dist.models.common import count_parameters
from tests.bert_rows import first_rows, tokens

#: Tokens of the longest row the DREAM reader accepts by default (300 bp): 192.
READER_MAX_TOKENS = int(kmer_count(ReadOptions().max_length, 0)) + 2
PUBLISHED_SIZE = 10.05e6  # SYSU-SAIL's report: "about 10.05M parameters"
# The report gives three significant figures after the point: anything that rounds to
# 10.05M (+-5,000 parameters, 0.05%) matches it.
PUBLISHED_TOLERANCE = 5_000
TINY = dict(hidden=64, layers=2, heads=4, intermediate=128)


@pytest.fixture(scope="module")
def sample():
    """The first 32 real rows: their raw sequences and their codes."""
    return first_rows(32)


def test_published_parameter_count():
    sizes = {}
    for max_tokens in (512, READER_MAX_TOKENS, NOMINAL_TOKENS):
        with torch.device("meta"):  # counts only: no memory, no init
            settings = BertConfig(max_tokens=max_tokens)
            regression, mlm = build_regression_model(settings), build_mlm_model(settings)
            sizes[max_tokens] = (
                count_parameters(regression, trainable_only=False),
                count_parameters(mlm, trainable_only=False),
            )
        print(f"max_tokens={max_tokens}: regression {sizes[max_tokens][0]:,}, masked LM {sizes[max_tokens][1]:,}")
    # The defaults (512 positions) reproduce the published size; the docstring's table holds.
    assert BertConfig().max_tokens == 512
    assert abs(sizes[512][0] - PUBLISHED_SIZE) <= PUBLISHED_TOLERANCE
    assert sizes == {512: (10_051_073, 10_051_714), 192: (9_887_233, 9_887_874), 128: (9_854_465, 9_855_106)}
    # Only the position table depends on max_tokens: hidden (512) parameters per position.
    assert sizes[512][0] - sizes[192][0] == (512 - 192) * 512


def test_defaults_equal_the_tokenizer_constants():
    """The model knows the vocabulary and the nominal row's tokens only as plain defaults."""
    assert (DEFAULT_VOCAB_SIZE, DEFAULT_PAD_ID) == (VOCAB_SIZE, PAD_ID) == (130, 0)
    assert NOMINAL_TOKENS == int(kmer_count(NOMINAL_LENGTH, 0)) + 2 == 128
    # Passed sizes reach the Hugging Face config.
    with torch.device("meta"):
        model = build_mlm_model(BertConfig(**TINY), vocab_size=VOCAB_SIZE + 3, pad_token_id=2)
    assert model.config.vocab_size == VOCAB_SIZE + 3 and model.config.pad_token_id == 2
    assert model.cls.predictions.decoder.out_features == VOCAB_SIZE + 3


def test_token_limits_follow_the_tokenizer(sample):
    ids, mask = tokens(sample)
    nominal = [i for i, s in enumerate(sample[0]) if len(s) == 110]
    assert nominal and all(int(mask[i].sum()) == NOMINAL_TOKENS == 128 for i in nominal)
    longest = np.full((1, 300), 0, dtype=np.uint8)  # the reader's longest accepted row, all A
    assert encode_codes(longest, np.array([300]), frame=0)[0].shape[1] == READER_MAX_TOKENS == 192


def test_models_are_plain_hf_modules_and_run_under_bf16_autocast(sample):
    torch.manual_seed(0)
    settings = BertConfig(**TINY)
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
        model = build_mlm_model(BertConfig(**TINY, attention=attention)).eval()
        with torch.no_grad():
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_regression_from_pretrained_keeps_encoder_and_starts_a_fresh_head(tmp_path):
    torch.manual_seed(2)
    mlm = build_mlm_model(BertConfig(**TINY))
    mlm.save_pretrained(tmp_path / "pre")  # the model part of an export (tests/tasks/test_bert_io.py)
    settings = BertConfig(**TINY, dropout=0.2, pretrained=str(tmp_path / "pre"))
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
    with pytest.raises(ConfigError, match=r"model\.bert\.pretrained=.*nowhere.*no such folder"):
        build_regression_model(BertConfig(**TINY, pretrained=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty.*no config\.json"):
        build_regression_model(BertConfig(**TINY, pretrained=str(tmp_path / "empty")))
    # A fine-tuned regressor is not a masked-LM export.
    build_regression_model(BertConfig(**TINY)).save_pretrained(tmp_path / "reg")
    with pytest.raises(ConfigError, match=r"reg.*not a BERT masked-LM export"):
        build_regression_model(BertConfig(**TINY, pretrained=str(tmp_path / "reg")))
    # Sizes that differ from the settings are named, the vocabulary too.
    build_mlm_model(BertConfig(**TINY)).save_pretrained(tmp_path / "mlm")
    with pytest.raises(ConfigError, match=r"model\.bert\.layers: settings 3, export 2"):
        build_regression_model(BertConfig(**{**TINY, "layers": 3}, pretrained=str(tmp_path / "mlm")))
    with pytest.raises(ConfigError, match=r"vocab_size: settings 131, export 130"):
        build_regression_model(BertConfig(**TINY, pretrained=str(tmp_path / "mlm")), vocab_size=131)


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"heads": 7}, "model.bert.heads"),
        ({"hidden": 0}, "model.bert.hidden"),
        ({"layers": -1}, "model.bert.layers"),
        ({"intermediate": 0}, "model.bert.intermediate"),
        ({"dropout": 1.0}, "model.bert.dropout"),
        ({"max_tokens": 100}, "model.bert.max_tokens"),
        ({"attention": "flash"}, "model.bert.attention must be one of"),
        ({"init": "sinusoid"}, "model.bert.init must be one of"),
    ],
)
def test_settings_validation_names_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        BertConfig(**bad)
    # Through the config loader the same message reaches the user as a UserError.
    overrides = [f"model.bert.{name}={value}" for name, value in bad.items()]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_every_setting_has_a_docstring():
    import ast
    import inspect

    import promoter_dist.models.bert as module

    tree = ast.parse(inspect.getsource(module.BertConfig))
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
    settings = BertConfig(**TINY, init="local", dropout=0.0, attention="eager")
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
    stock = build_regression_model(BertConfig(**TINY, dropout=0.0, attention="eager")).eval()
    with torch.no_grad():
        spread = stock.bert(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    assert spread[:, :, torch.arange(2, n - 2), torch.arange(3, n - 1)].mean() < 0.1
    with pytest.raises(ConfigError, match="model.bert.init"):
        BertConfig(init="sinusoid")
