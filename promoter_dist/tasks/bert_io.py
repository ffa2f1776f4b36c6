"""A BERT model and its 3-mer tokenizer as one Hugging Face folder: export and reload.

An export holds ``save_pretrained`` of the model and of the tokenizer of the reading frame
the run trained on, so it reloads with ``AutoTokenizer`` and ``AutoModelForMaskedLM`` /
``AutoModelForSequenceClassification`` and no code from this package. The weights are
``model.safetensors`` and the tokenizer ``tokenizer.json``: neither can carry code, and
:func:`load_exported` reads nothing else (no pickled weights, no remote code). The model lives in
:mod:`promoter_dist.models.bert`, the tokenizer in :mod:`promoter_dist.data.kmer_tokenizer`;
the tasks join them here.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torch import nn

from ..data.alphabet import ADAPTER_3P
from ..data.kmer_tokenizer import FULL_FLANK_BP, build_tokenizer
from ..errors import ConfigError, UserError
from ..models.bert import SAFE_WEIGHT_FILES, quiet_transformers, unsafe_weights_problem

if TYPE_CHECKING:  # transformers is imported where used
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The fast tokenizer's one file in an export (JSON).
TOKENIZER_FILE = "tokenizer.json"


def export_pretrained(model: nn.Module, out_dir: str | os.PathLike, frame: int,
                      flank_bp: int = FULL_FLANK_BP) -> Path:
    """Save ``model`` (``save_pretrained``) and the tokenizer of the run's frame and flanks into ``out_dir``, atomically.

    Everything is written into a hidden sibling folder first and renamed into place, so
    a reader never sees a half-written export. An existing export at ``out_dir`` is
    replaced (it is moved aside, the new one renamed in, then the old one deleted; a
    crash between the two renames leaves the old export in ``.<name>.old-*``). A folder
    there that is neither empty nor an export (no config.json) is refused, not deleted.
    The weights are written as ``model.safetensors`` (checked). Returns the export folder.
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
        with quiet_transformers():
            model.save_pretrained(tmp)
        if not any((tmp / name).is_file() for name in SAFE_WEIGHT_FILES):  # what every reader requires
            raise RuntimeError(f"save_pretrained wrote no {SAFE_WEIGHT_FILES[0]} into {tmp}")
        # The tokenizer's position limit follows the model's position table.
        build_tokenizer(frame, model_max_length=model.config.max_position_embeddings,
                        flank_bp=flank_bp).save_pretrained(tmp)
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


#: tokenizer.json is a few kB; a larger one is not read for the flank check.
_MAX_TOKENIZER_BYTES = 1 << 20


def export_flank_bp(out_dir: str | os.PathLike) -> int | None:
    """The ``data.kmer_flank_bp`` an export's tokenizer was built with, or None where it does not say.

    Read from ``tokenizer.json`` (JSON only): the downstream flank it appends to every row
    is ``flank_bp - 13`` bases (:func:`promoter_dist.data.kmer_tokenizer.vector_flanks`).
    """
    path = Path(out_dir) / TOKENIZER_FILE
    try:
        if path.stat().st_size > _MAX_TOKENIZER_BYTES:
            return None
        steps = json.loads(path.read_text(encoding="utf-8"))["normalizer"]["normalizers"]
        appended = [step["content"] for step in steps
                    if step.get("type") == "Replace" and step.get("pattern") == {"Regex": r"\z"}]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if len(appended) != 1 or not isinstance(appended[0], str):
        return None
    return len(appended[0]) + len(ADAPTER_3P)


def check_export_flanks(pretrained: str, flank_bp: int) -> None:
    """ConfigError if the export at ``pretrained`` was made with other vector flanks than ``flank_bp``.

    The flanks set where a row's tokens sit, and so which position embeddings they meet.
    """
    made_with = export_flank_bp(Path(pretrained).expanduser())
    if made_with is not None and made_with != flank_bp:
        raise ConfigError(f"model.bert.pretrained={pretrained!r} was made with data.kmer_flank_bp={made_with}, this "
                          f"run has {flank_bp}: set data.kmer_flank_bp={made_with} (a row's tokens must sit where "
                          "they sat in pretraining)")


def load_exported(
    out_dir: str | os.PathLike, kind: Literal["mlm", "regression"]
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model) of an export; the model is in eval mode.

    ``kind`` is 'mlm' (``AutoModelForMaskedLM``) or 'regression'
    (``AutoModelForSequenceClassification``; the export must be a fine-tuned regressor:
    to start a regressor from a masked-LM export use
    :func:`promoter_dist.models.bert.build_regression_model`). Only JSON and safetensors
    are read: the weights from ``model.safetensors`` (a folder with only pickled weights
    is refused, naming the file), the tokenizer from ``tokenizer.json`` as a fast tokenizer
    (other tokenizer files are ignored), and no remote code.
    """
    from safetensors import SafetensorError
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    auto = {
        "mlm": (AutoModelForMaskedLM, "BertForMaskedLM"),
        "regression": (AutoModelForSequenceClassification, "BertForSequenceClassification"),
    }
    if kind not in auto:
        raise ValueError(f"kind must be 'mlm' or 'regression', not {kind!r}")
    path = Path(out_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model export (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # an auto_map runs nothing
    except (OSError, ValueError) as error:
        raise UserError(f"{path / 'config.json'}: cannot be read ({' '.join(str(error).split())})") from None
    architectures = getattr(config, "architectures", None) or []
    model_cls, arch = auto[kind]
    if arch not in architectures:
        raise UserError(f"{path}: holds {architectures}, not a {arch} export (kind={kind!r})")
    problem = unsafe_weights_problem(path, config)
    if problem:
        raise UserError(problem)  # it names the file
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"{path}: no {TOKENIZER_FILE} (the export's tokenizer; no other tokenizer file is read)")
    try:
        with quiet_transformers():
            # The concrete fast class reads tokenizer.json (JSON), whatever tokenizer_config.json names.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, trust_remote_code=False)
            model = model_cls.from_pretrained(path, config=config, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{path}: cannot be loaded ({' '.join(str(error).split())})") from None
    return tokenizer, model.eval()


def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside generic wrappers that keep it as ``.module``."""
    from transformers import (
        BertForMaskedLM,
        BertForSequenceClassification,
        PreTrainedModel,
    )

    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not isinstance(model, (BertForMaskedLM, BertForSequenceClassification)):
        raise TypeError(f"expected a BertForMaskedLM or BertForSequenceClassification, got {type(model).__name__}")
    return model
