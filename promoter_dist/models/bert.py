"""Team SYSU-SAIL's 3-mer BERT: masked-LM pretraining model and expression regressor.

Both are stock Hugging Face modules (``BertForMaskedLM`` / ``BertForSequenceClassification``)
over a token vocabulary the task passes in (SYSU-SAIL's 130 3-mer tokens of
:mod:`promoter_dist.data.kmer_tokenizer` by default), so an export reloads with
``AutoTokenizer`` / ``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification`` and
no code from this package (the export with its tokenizer: :mod:`promoter_dist.tasks.bert_io`).
Nothing here knows about DeepSpeed: the trainer wraps the module.

Published architecture (Team SYSU-SAIL's DREAM 2022 challenge report and published code,
GitHub de-Boer-Lab/random-promoter-dream-challenge-2022, ``dream_submissions/``; the
challenge: Rafi et al., Nature Biotechnology 2024, doi:10.1038/s41587-024-02414-w)
    BertEmbeddings, 3 BertLayers (hidden 512, 8 heads, intermediate 2048), then for
    fine-tuning BertPooler -> Dropout -> Linear(1), about 10.05M parameters.
    ``BertForSequenceClassification`` with ``num_labels=1`` is exactly that head:
    pooler (dense + tanh on [CLS]) -> dropout -> linear to one output.

Parameter counts (:func:`promoter_dist.models.common.count_parameters` with
``trainable_only=False``; the MLM model has no pooler but an MLM transform (dense +
LayerNorm) and a 130-wide decoder bias, its decoder weight being tied to the word
embeddings)::

    max_tokens   regression   masked LM
    512          10,051,073   10,051,714   <- default: the published "about 10.05M"
    192           9,887,233    9,887,874   (longest row the reader accepts, 300 bp)
    128           9,854,465    9,855,106   (a nominal 110-bp row)

The published count is matched to the parameter by 512 position embeddings, the
``transformers.BertConfig`` default, with 2 token-type embeddings (also the default;
they are never used, every token has type 0). So SYSU evidently kept the default
position table; :attr:`BertConfig.max_tokens` defaults to 512 for that reason. Only
positions ``0 .. T-1`` of a batch of ``T`` tokens are ever looked up, so a longer table
costs 512 parameters per unused position (163,840 between 512 and 192) and no compute.

Reading frames
    Tokens are non-overlapping 3-mers, which leaves three reading frames per input.
    SYSU's model code averages three token sequences per input, consistent with the
    three frames (an inference: their tokenizer is not public). This toolkit trains
    one frame per run, chosen by ``data.kmer_frame`` (default 0): the loader
    tokenizes each row in that frame only, and an export carries the tokenizer of the
    frame it was trained on. Why: the three frames see the same bases, so one frame
    keeps the model and its input pipeline a plain single-sequence BERT (exportable and
    reloadable by the standard ``Auto*`` classes) at a third of the compute per row;
    the vocabulary is frame-independent, so a model pretrained in one frame can be
    fine-tuned or evaluated in another. SYSU's averaging is available as a run setting,
    ``data.kmer_all_frames=true``: the loader then gives each row in all three frames
    (:func:`promoter_dist.data.kmer_tokenizer.encode_codes_all_frames`) and the regression
    task averages the model's outputs over them; the model itself stays this plain BERT.

Attention implementation
    ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``) by default,
    selectable with :attr:`BertConfig.attention`. Attention scores cost about T / 6H of
    the linear layers' FLOPs (4% at T = 128, H = 512), so the choice barely shows in a
    training step (CPU timings of both: benchmarks/README.md, "Figures moved from model
    docstrings"). sdpa wins on the other counts: it is what ``from_pretrained`` picks
    when nothing is said (the implementation is not stored in ``config.json``), so a
    reloaded export runs the same code path, and on a GPU it dispatches to the fused
    flash / memory-efficient kernels. Outputs of the two agree exactly (max abs diff 0.0
    in fp32 on CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # transformers is imported where used: reading a config must not pay for it
    import transformers
    from transformers import (
        BertForMaskedLM,
        BertForSequenceClassification,
        PreTrainedModel,
    )

from ..choices import check_choice_fields
from ..errors import ConfigError

#: SYSU-SAIL's vocabulary, the default of the builders' ``vocab_size`` and ``pad_token_id``:
#: five special tokens ([PAD] = 0, [CLS], [UNK], [SEP], [MASK]) and the 125 3-mers over ACGTN.
#: The tokenizer is data (:mod:`promoter_dist.data.kmer_tokenizer`); the tasks pass its sizes.
DEFAULT_VOCAB_SIZE = 130
DEFAULT_PAD_ID = 0
#: Tokens of a nominal 110-bp row (380-bp context): 126 3-mers + [CLS] + [SEP] = 128, in every
#: reading frame; the smallest position table :attr:`BertConfig.max_tokens` accepts.
NOMINAL_TOKENS = 128

#: Attention implementations and random initialisations: the allowed values live in these types only.
Attention = Literal["sdpa", "eager"]
Init = Literal["bert", "local"]
#: The weight files a model folder is loaded from: safetensors holds tensors only, never code.
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
#: Weight files that only a pickle load reads (torch.save; Hugging Face's older format): never loaded.
_PICKLED_WEIGHT_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_ARCH_KEYS = {  # transformers.BertConfig attribute -> BertConfig field, compared with a pretrained export
    "vocab_size": None,
    "hidden_size": "hidden",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate",
    "max_position_embeddings": "max_tokens",
}


@dataclass
class BertConfig:
    """SYSU-SAIL's BERT size (published values as defaults) and its initialisation."""

    hidden: int = 512
    """Hidden size of every layer (SYSU: 512)."""
    layers: int = 3
    """Transformer encoder layers (SYSU: 3)."""
    heads: int = 8
    """Attention heads per layer; must divide hidden (SYSU: 8)."""
    intermediate: int = 2048
    """Width of each layer's feed-forward block (SYSU: 2048)."""
    dropout: float = 0.1
    """Dropout on hidden states, attention probabilities and before the regression head (BERT default 0.1)."""
    max_tokens: int = 512
    """Position-table length, [CLS]/[SEP] included: >= 128 (110-bp row); 192 covers 300-bp rows; 512 = published size."""
    pretrained: str = ""
    """Folder of a masked-LM export (written by the mlm task) to initialise the encoder from; '' = random init."""
    attention: Attention = "sdpa"
    """Attention implementation: 'sdpa' (torch fused attention; default) or 'eager' (plain matmuls)."""
    init: Init = "bert"
    """Random initialisation: 'bert' (Hugging Face's N(0, 0.02)) or 'local' (sinusoidal positions, first-layer heads attending to tokens -1, +1, -2, +2; see :func:`local_attention_init`). Unused with ``pretrained``."""

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "intermediate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.bert.{key} must be a positive integer, not {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"model.bert.heads ({self.heads}) must divide model.bert.hidden ({self.hidden})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.bert.dropout must be in [0, 1), not {self.dropout!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < NOMINAL_TOKENS:
            raise ConfigError(
                f"model.bert.max_tokens must be an integer >= {NOMINAL_TOKENS} (the tokens of a 110-bp row), "
                f"not {self.max_tokens!r}"
            )
        if not isinstance(self.pretrained, str):
            raise ConfigError(f"model.bert.pretrained must be a folder path or '', not {self.pretrained!r}")
        # The coercer checks these for a config file; a BertConfig built in code gets the same check.
        check_choice_fields(self, "model.bert")

    def transformers_config(self, vocab_size: int, pad_token_id: int, **extra: object) -> transformers.BertConfig:
        """The Hugging Face config for these settings and vocabulary (``extra`` adds head options)."""
        from transformers import BertConfig as TransformersBertConfig

        return TransformersBertConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_tokens,
            pad_token_id=pad_token_id,
            attn_implementation=self.attention,
            **extra,
        )


# --------------------------------------------------------------------------- building


def build_mlm_model(
    config: BertConfig, vocab_size: int = DEFAULT_VOCAB_SIZE, pad_token_id: int = DEFAULT_PAD_ID
) -> BertForMaskedLM:
    """A masked-LM BERT: random init, or the whole model (head included) from ``config.pretrained``.

    Loading a pretrained MLM export here continues pretraining from it. ``vocab_size`` and
    ``pad_token_id`` are the tokenizer's (a pretrained export must have the same vocabulary size).
    """
    from transformers import BertForMaskedLM

    if config.pretrained:
        model = _load_pretrained(config, BertForMaskedLM, allowed_missing=(), vocab_size=vocab_size)
    else:
        model = BertForMaskedLM(config.transformers_config(vocab_size, pad_token_id))
        if config.init == "local":
            local_attention_init(model)
    return model.train()


def build_regression_model(
    config: BertConfig, vocab_size: int = DEFAULT_VOCAB_SIZE, pad_token_id: int = DEFAULT_PAD_ID
) -> BertForSequenceClassification:
    """The expression regressor: BERT -> pooler -> dropout -> linear(1).

    With ``config.pretrained`` the embeddings and encoder come from that masked-LM
    export; the pooler and the linear head are newly initialised (an MLM model has
    neither) and the MLM head is dropped. Dropout comes from ``config``; the sizes
    must agree with the export (a clear error names the keys that differ).
    ``vocab_size`` and ``pad_token_id`` are the tokenizer's.
    """
    from transformers import BertForSequenceClassification

    head = {"num_labels": 1, "problem_type": "regression"}
    if config.pretrained:
        model = _load_pretrained(
            config,
            BertForSequenceClassification,
            allowed_missing=("bert.pooler.", "classifier."),
            vocab_size=vocab_size,
            **head,
        )
    else:
        model = BertForSequenceClassification(config.transformers_config(vocab_size, pad_token_id, **head))
        if config.init == "local":
            local_attention_init(model)
    return model.train()


#: Token offsets the first layer's heads attend to under ``init='local'`` (head h gets entry h mod 4).
LOCAL_OFFSETS = (-1, 1, -2, 2)


@torch.no_grad()
def local_attention_init(model: PreTrainedModel, offsets: tuple[int, ...] = LOCAL_OFFSETS,
                         amplitude: float = 2.5, sharpness: float = 1.5) -> None:
    """Start a randomly initialised BERT with position codes that make neighbouring tokens easy to attend to.

    Why: the signal in promoter rows sits in motifs of 7-13 bp, i.e. in pairs and triples of
    adjacent 3-mer tokens, and 100 of a row's 128 tokens are constant vector flanks. From
    Hugging Face's init (random absolute position embeddings, near-uniform attention) a small
    BERT first learns the bag of 3-mers and stays there for a long time: on the synthetic demo
    data a linear model on 3-mer counts reaches Pearson 0.50 and one on adjacent token pairs
    0.69; the stock-initialised debug BERT was still at 0.50 after 100k rows, this init 0.63-0.65.

    What: the position embeddings are sinusoids of ``K`` periods from 2.5 to 100 tokens in the
    last ``2K`` hidden dimensions (``K = min(head_dim, hidden / 2) // 2``), with amplitude
    ``amplitude x initializer_range``, and zero elsewhere; token and token-type embeddings are
    zero in those dimensions (random as usual in the others). In the
    first layer, head ``h`` gets query/key weights that rotate those sinusoids by its offset
    ``offsets[h % len(offsets)]``, so its score for key ``j`` from query ``i`` is
    ``sum_k cos(w_k (i + offset - j))``, which peaks at ``j = i + offset`` (``sharpness`` scales
    both weights; with 1.5, 96% of a head's attention sits on its neighbour on real rows at hidden
    64 and 4 heads, see tests/models/test_bert.py). Everything else keeps
    the stock init and everything stays trainable; the model remains a plain Hugging Face BERT.
    """
    bert = model.base_model
    config = bert.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    pairs = min(head_dim, hidden // 2) // 2
    if pairs < 1:
        return
    dims = torch.arange(hidden - 2 * pairs, hidden)
    sin_dims, cos_dims = dims[0::2], dims[1::2]
    periods = torch.logspace(torch.log10(torch.tensor(2.5)), torch.log10(torch.tensor(100.0)), pairs)
    omega = 2 * torch.pi / periods
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)[:, None]
    scale = amplitude * config.initializer_range
    embeddings = bert.embeddings
    # Positions only as sinusoids: random position vectors add per-position noise to every token
    # that the model first has to learn to ignore (the outcome varied much more between seeds).
    embeddings.position_embeddings.weight.zero_()
    embeddings.position_embeddings.weight[:, sin_dims] = scale * torch.sin(omega * positions)
    embeddings.position_embeddings.weight[:, cos_dims] = scale * torch.cos(omega * positions)
    embeddings.word_embeddings.weight[:, dims] = 0.0
    embeddings.token_type_embeddings.weight[:, dims] = 0.0
    attention = bert.encoder.layer[0].attention.self
    for head in range(heads):
        rows = torch.arange(head * head_dim, head * head_dim + 2 * pairs)
        theta = omega * offsets[head % len(offsets)]
        cos, sin = torch.cos(theta) * sharpness, torch.sin(theta) * sharpness
        for weight in (attention.query.weight, attention.key.weight):
            weight[head * head_dim:(head + 1) * head_dim] = 0.0
        attention.query.bias[head * head_dim:(head + 1) * head_dim] = 0.0
        attention.key.bias[head * head_dim:(head + 1) * head_dim] = 0.0
        # Query: (sin wi, cos wi) -> (sin w(i+d), cos w(i+d)); key: (sin wj, cos wj) as it is.
        attention.query.weight[rows[0::2], sin_dims] = cos
        attention.query.weight[rows[0::2], cos_dims] = sin
        attention.query.weight[rows[1::2], sin_dims] = -sin
        attention.query.weight[rows[1::2], cos_dims] = cos
        attention.key.weight[rows[0::2], sin_dims] = sharpness
        attention.key.weight[rows[1::2], cos_dims] = sharpness


def _load_pretrained(
    config: BertConfig,
    cls: type[PreTrainedModel],
    allowed_missing: tuple[str, ...],
    vocab_size: int,
    **head: object,
) -> PreTrainedModel:
    """``cls.from_pretrained(config.pretrained)`` after checking it is a BERT MLM export of matching sizes."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    path = Path(config.pretrained).expanduser()
    where = f"model.bert.pretrained={config.pretrained!r}"
    if not path.is_dir():
        raise ConfigError(f"{where}: no such folder (expected a masked-LM export written by the mlm task)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where}: not a model export (no config.json in {path})")
    try:
        # trust_remote_code=False: an "auto_map" in the file must not run code or prompt for it.
        exported = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{where}: config.json cannot be read ({' '.join(str(error).split())})") from None
    architectures = getattr(exported, "architectures", None) or []
    if exported.model_type != "bert" or "BertForMaskedLM" not in architectures:
        raise ConfigError(
            f"{where}: not a BERT masked-LM export (model_type={exported.model_type!r}, "
            f"architectures={architectures}); pretrain with task.name=mlm first"
        )
    wanted = {key: vocab_size if field is None else getattr(config, field) for key, field in _ARCH_KEYS.items()}
    differ = [
        f"{'vocab_size' if field is None else 'model.bert.' + field}: settings {wanted[key]}, export {getattr(exported, key)}"
        for key, field in _ARCH_KEYS.items()
        if getattr(exported, key) != wanted[key]
    ]
    if differ:
        raise ConfigError(f"{where}: the export's sizes differ from the settings ({'; '.join(differ)})")
    weights_problem = unsafe_weights_problem(path, exported)
    if weights_problem:
        raise ConfigError(f"{where}: {weights_problem}")
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                path,
                hidden_dropout_prob=config.dropout,
                attention_probs_dropout_prob=config.dropout,
                attn_implementation=config.attention,
                dtype=torch.float32,  # fp32 master weights whatever precision the export was saved in
                use_safetensors=True,  # never the pickled pytorch_model.bin
                output_loading_info=True,
                **head,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        reason = " ".join(str(error).split())  # one line, whatever the library's message
        raise ConfigError(f"{where}: weights cannot be loaded ({reason})") from None
    # The encoder must come from the file: anything missing beyond the new head is an error.
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(allowed_missing))
    if missing or info["mismatched_keys"]:
        problem = missing[:3] or sorted(map(str, info["mismatched_keys"]))[:3]
        raise ConfigError(f"{where}: not a complete BERT masked-LM export (missing or mismatched: {', '.join(problem)} ...)")
    return model


def unsafe_weights_problem(folder: Path, config: transformers.PreTrainedConfig) -> str | None:
    """Why the weights of the model folder ``folder`` (config ``config``) will not be loaded; None when they will.

    Only safetensors weights are loaded (``model.safetensors``, or a sharded index of
    them): a folder may come from another user, and the other weight formats are pickles,
    whose loading can run code. The reason names the file found instead, or the one missing.
    """
    named = getattr(config, "transformers_weights", None)  # a config may name its weight file
    if named is not None and not str(named).endswith((".safetensors", ".safetensors.index.json")):
        return f"{folder / 'config.json'} names weights {named!r}, not a safetensors file; only safetensors weights are loaded"
    if any((folder / name).is_file() for name in SAFE_WEIGHT_FILES):
        return None
    pickled = sorted((entry.name for entry in folder.iterdir() if entry.name.endswith(_PICKLED_WEIGHT_SUFFIXES)),
                     key=lambda name: (name != "pytorch_model.bin", name))  # Hugging Face's own name first
    if pickled:
        return (f"{folder / pickled[0]} holds pickled weights, which are not loaded (unpickling can run code); "
                f"only safetensors weights ({SAFE_WEIGHT_FILES[0]}) are read: save the model again with save_pretrained")
    return f"no {SAFE_WEIGHT_FILES[0]} in {folder}"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide Hugging Face's progress bars and load reports inside the block (callers check the report themselves)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
