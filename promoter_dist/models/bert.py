"""Team SYSU-SAIL's 3-mer BERT: masked-LM pretraining model and expression regressor.

Both are stock Hugging Face modules (``BertForMaskedLM`` / ``BertForSequenceClassification``)
over the 130-token vocabulary of :mod:`promoter_dist.data.kmer_tokenizer`, so an export
reloads with ``AutoTokenizer`` / ``AutoModelForMaskedLM`` /
``AutoModelForSequenceClassification`` and no code from this package. Nothing here
knows about DeepSpeed: the trainer wraps the module.

Published architecture (team report; ``/work/shared/reference/models.md``)
    BertEmbeddings, 3 BertLayers (hidden 512, 8 heads, intermediate 2048), then for
    fine-tuning BertPooler -> Dropout -> Linear(1), about 10.05M parameters.
    ``BertForSequenceClassification`` with ``num_labels=1`` is exactly that head:
    pooler (dense + tanh on [CLS]) -> dropout -> linear to one output.

Parameter counts (measured with :func:`count_parameters`; the MLM model has no pooler but
an MLM transform (dense + LayerNorm) and a 130-wide decoder bias, its decoder weight
being tied to the word embeddings)::

    max_tokens   regression   masked LM
    512          10,051,073   10,051,714   <- default: the published "about 10.05M"
    192           9,887,233    9,887,874   (longest row the reader accepts, 300 bp)
    128           9,854,465    9,855,106   (a nominal 110-bp row)

The published count is matched to the parameter by 512 position embeddings, the
Hugging Face ``BertConfig`` default, with 2 token-type embeddings (also the default;
they are never used, every token has type 0). So SYSU evidently kept the default
position table; :attr:`BertSettings.max_tokens` defaults to 512 for that reason. Only
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
    selectable with :attr:`BertSettings.attention`. Measured on this project's CPU
    (2 cores shared with other jobs, so timings vary by 10% or more) for a batch of
    64 x 128 tokens with the published sizes, the two interleaved: a forward pass takes
    the same time either way (bf16 autocast: best 1.54 s eager vs 1.56 s sdpa; fp32:
    1.87 s vs 1.85 s); forward + backward medians were 7.2 vs 7.6 s (bf16) and 11.2 vs
    12.1 s (fp32), within the noise. Attention scores cost about T / 6H of the linear
    layers' FLOPs (4% at T = 128, H = 512), so the choice barely shows. The attention
    core alone (forward + backward, 64 x 8 heads x 128 x 64) is 2x faster with sdpa in
    fp32 (106 vs 202 ms) and somewhat slower in bf16 (495 vs 404 ms). sdpa wins on
    the other counts:
    it is what ``from_pretrained`` picks when nothing is said (the implementation is
    not stored in ``config.json``), so a reloaded export runs the same code path, and
    on a GPU it dispatches to the fused flash / memory-efficient kernels. Outputs of
    the two agreed exactly (max abs diff 0.0 in fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch
from torch import nn
if TYPE_CHECKING:  # transformers is imported where used: reading a config must not pay for it
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

from ..data.alphabet import NOMINAL_LENGTH
from ..data.dream import ReadOptions
from ..data.kmer_tokenizer import PAD_ID, VOCAB_SIZE, build_tokenizer, kmer_count
from ..errors import UserError

#: Tokens of a nominal 110-bp row (380-bp context): 126 3-mers + [CLS] + [SEP] = 128.
#: Frame 0 gives the most 3-mers, so this holds for every frame.
NOMINAL_TOKENS = int(kmer_count(NOMINAL_LENGTH, 0)) + 2
#: Tokens of the longest row the DREAM reader accepts by default (300 bp): 192.
READER_MAX_TOKENS = int(kmer_count(ReadOptions().max_length, 0)) + 2

ATTENTION = ("sdpa", "eager")
INITS = ("bert", "local")
_ARCH_KEYS = {  # BertConfig attribute -> BertSettings field, compared with a pretrained export
    "vocab_size": None,
    "hidden_size": "hidden",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate",
    "max_position_embeddings": "max_tokens",
}


@dataclass
class BertSettings:
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
    """Folder of a masked-LM export (export_pretrained) to initialise the encoder from; '' = random init."""
    attention: str = "sdpa"
    """Attention implementation: 'sdpa' (torch fused attention; default) or 'eager' (plain matmuls)."""
    init: str = "bert"
    """Random initialisation: 'bert' (Hugging Face's N(0, 0.02)) or 'local' (sinusoidal positions, first-layer heads attending to tokens -1, +1, -2, +2; see :func:`local_attention_init`). Unused with ``pretrained``."""

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "intermediate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.bert.{key} must be a positive integer, not {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"model.bert.heads ({self.heads}) must divide model.bert.hidden ({self.hidden})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.bert.dropout must be in [0, 1), not {self.dropout!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < NOMINAL_TOKENS:
            raise ValueError(
                f"model.bert.max_tokens must be an integer >= {NOMINAL_TOKENS} (the tokens of a 110-bp row), "
                f"not {self.max_tokens!r}"
            )
        if not isinstance(self.pretrained, str):
            raise ValueError(f"model.bert.pretrained must be a folder path or '', not {self.pretrained!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"model.bert.attention must be one of {list(ATTENTION)}, not {self.attention!r}")
        if self.init not in INITS:
            raise ValueError(f"model.bert.init must be one of {list(INITS)}, not {self.init!r}")

    def bert_config(self, **extra: object) -> BertConfig:
        """The Hugging Face config for these settings (``extra`` adds head options)."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_tokens,
            pad_token_id=PAD_ID,
            attn_implementation=self.attention,
            **extra,
        )


# --------------------------------------------------------------------------- building


def build_mlm_model(settings: BertSettings) -> BertForMaskedLM:
    """A masked-LM BERT: random init, or the whole model (head included) from ``settings.pretrained``.

    Loading a pretrained MLM export here continues pretraining from it.
    """
    from transformers import BertForMaskedLM

    if settings.pretrained:
        model = _load_pretrained(settings, BertForMaskedLM, allowed_missing=())
    else:
        model = BertForMaskedLM(settings.bert_config())
        if settings.init == "local":
            local_attention_init(model)
    return model.train()


def build_regression_model(settings: BertSettings) -> BertForSequenceClassification:
    """The expression regressor: BERT -> pooler -> dropout -> linear(1).

    With ``settings.pretrained`` the embeddings and encoder come from that masked-LM
    export; the pooler and the linear head are newly initialised (an MLM model has
    neither) and the MLM head is dropped. Dropout comes from ``settings``; the sizes
    must agree with the export (a clear error names the keys that differ).
    """
    from transformers import BertForSequenceClassification

    head = {"num_labels": 1, "problem_type": "regression"}
    if settings.pretrained:
        model = _load_pretrained(
            settings,
            BertForSequenceClassification,
            allowed_missing=("bert.pooler.", "classifier."),
            **head,
        )
    else:
        model = BertForSequenceClassification(settings.bert_config(**head))
        if settings.init == "local":
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


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, tied weights counted once (``model.parameters()`` dedups them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _load_pretrained(
    settings: BertSettings, cls: type[PreTrainedModel], allowed_missing: tuple[str, ...], **head: object
) -> PreTrainedModel:
    """``cls.from_pretrained(settings.pretrained)`` after checking it is a matching BERT MLM export."""
    from transformers import AutoConfig

    path = Path(settings.pretrained).expanduser()
    where = f"model.bert.pretrained={settings.pretrained!r}"
    if not path.is_dir():
        raise UserError(f"{where}: no such folder (expected a masked-LM export written by the mlm task)")
    if not (path / "config.json").is_file():
        raise UserError(f"{where}: not a model export (no config.json in {path})")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{where}: config.json cannot be read ({error})") from None
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != "bert" or "BertForMaskedLM" not in architectures:
        raise UserError(
            f"{where}: not a BERT masked-LM export (model_type={config.model_type!r}, "
            f"architectures={architectures}); pretrain with task.name=mlm first"
        )
    wanted = {key: VOCAB_SIZE if field is None else getattr(settings, field) for key, field in _ARCH_KEYS.items()}
    differ = [
        f"{'vocab_size' if field is None else 'model.bert.' + field}: settings {wanted[key]}, export {getattr(config, key)}"
        for key, field in _ARCH_KEYS.items()
        if getattr(config, key) != wanted[key]
    ]
    if differ:
        raise UserError(f"{where}: the export's sizes differ from the settings ({'; '.join(differ)})")
    try:
        with _quiet_hf():
            model, info = cls.from_pretrained(
                path,
                hidden_dropout_prob=settings.dropout,
                attention_probs_dropout_prob=settings.dropout,
                attn_implementation=settings.attention,
                dtype=torch.float32,  # fp32 master weights whatever precision the export was saved in
                output_loading_info=True,
                **head,
            )
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{where}: weights cannot be loaded ({error})") from None
    # The encoder must come from the file: anything missing beyond the new head is an error.
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(allowed_missing))
    if missing or info["mismatched_keys"]:
        problem = missing[:3] or sorted(map(str, info["mismatched_keys"]))[:3]
        raise UserError(f"{where}: not a complete BERT masked-LM export (missing or mismatched: {', '.join(problem)} ...)")
    return model


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide the loader's progress bars and its load report (the caller checks the report itself)."""
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


# --------------------------------------------------------------------------- export / reload


def export_pretrained(model: nn.Module, out_dir: str | os.PathLike, frame: int) -> Path:
    """Save ``model`` (``save_pretrained``) and the frame's tokenizer into ``out_dir``, atomically.

    Everything is written into a hidden sibling folder first and renamed into place, so
    a reader never sees a half-written export. An existing export at ``out_dir`` is
    replaced (it is moved aside, the new one renamed in, then the old one deleted; a
    crash between the two renames leaves the old export in ``.<name>.old-*``). A folder
    there that is neither empty nor an export (no config.json) is refused, not deleted.
    Returns the export folder.
    """
    model = _unwrap(model)
    out_dir = Path(out_dir)
    replaceable = out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "config.json").is_file())
    if out_dir.exists() and not replaceable:
        raise UserError(f"{out_dir}: exists and is not a model export; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    try:
        with _quiet_hf():
            model.save_pretrained(tmp)
        # The tokenizer's position limit follows the model's position table.
        build_tokenizer(frame, model_max_length=model.config.max_position_embeddings).save_pretrained(tmp)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_exported(
    out_dir: str | os.PathLike, kind: Literal["mlm", "regression"]
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model) of an export, through the ``Auto*`` classes; the model is in eval mode.

    ``kind`` is 'mlm' (``AutoModelForMaskedLM``) or 'regression'
    (``AutoModelForSequenceClassification``; the export must be a fine-tuned regressor:
    to start a regressor from a masked-LM export use :func:`build_regression_model`).
    """
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = {
        "mlm": (AutoModelForMaskedLM, "BertForMaskedLM"),
        "regression": (AutoModelForSequenceClassification, "BertForSequenceClassification"),
    }
    if kind not in auto:
        raise ValueError(f"kind must be 'mlm' or 'regression', not {kind!r}")
    path = Path(out_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model export (no config.json)")
    architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    model_cls, arch = auto[kind]
    if arch not in architectures:
        raise UserError(f"{path}: holds {architectures}, not a {arch} export (kind={kind!r})")
    with _quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = model_cls.from_pretrained(path)
    return tokenizer, model.eval()


def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside generic wrappers that keep it as ``.module``."""
    from transformers import BertForMaskedLM, BertForSequenceClassification, PreTrainedModel

    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not isinstance(model, (BertForMaskedLM, BertForSequenceClassification)):
        raise TypeError(f"expected a BertForMaskedLM or BertForSequenceClassification, got {type(model).__name__}")
    return model
