"""Predictions of a trained run on a DREAM-format file, for a challenge submission.

``promoter-dist predict --checkpoint RUN --input test_sequences.txt --out submission.json``
loads the run's resolved ``config.yaml`` and the consolidated fp32 weights of one of its
checkpoints (:func:`promoter_dist.checkpointing.fp32_state_dict`, any ZeRO stage, read
weights-only), or an exported model file (safetensors with the run's config), then
streams the input through the model in batches. Row ``i`` of the result is the
prediction for 0-based line ``i`` of the input, which is the key the DREAM submission
JSON uses (:func:`promoter_dist.scoring.write_submission`).

Input validation
    The file is read by the DREAM reader with the shard stage's rules (two tab-separated
    fields, bases ``ACGTN`` in any case, at most ``max_length`` bp; the expression column
    may be absent, and is ignored), but strictly: the first bad row stops the run with
    ``file:line [field]: why``. A submission needs one value per line, so a row cannot
    be skipped the way the shard stage skips it.

Rows a model cannot take
    NAD's model reads the 80 words of a row of exactly 110 bp without N (the 71,103 rows
    of the challenge's test file all qualify). By default any other row is an error
    naming its ``file:line``, never a silent NaN or a dropped row. With ``pad=True``
    (``--pad``) rows of another length are fitted to 110 bp with plasmid sequence,
    keeping the 3' end (the side of the transcription start): a shorter row gets the
    vector bases just upstream of its 5' adapter prepended, a longer row loses bases at
    its 5' end. Rows with N remain an error: NAD has no word for N.
    The BERT models take any length whose tokens fit ``model.bert.max_tokens``; a longer
    row is an error naming its line (nothing is truncated silently). ``pad`` does not
    apply to them.
    The bin models (LegNet, Prix Fixe) read the window of every row, as in training
    (``data.onehot``: vector sequence + the row without its 5' adapter, the last
    ``data.onehot_window`` bp, 150 as published),
    with N as 0.25 in each base channel and the singleton channel 0; with
    ``task.reverse_complement`` the prediction is the mean over both orientations of the
    row. Every row fits; ``pad`` does not apply to them.

Memory
    The file is read in chunks of whole lines and each chunk is encoded only when its
    rows are batched, so only one chunk's rows and one batch's model inputs are held at
    a time, plus one float32 per row of output (27 MB for the 6.7M training rows).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .errors import InputError, UserError

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
READ_CHUNK_BYTES = 1 << 20
"""Bytes of the input parsed at a time (about 7,600 rows of a DREAM test file)."""


# --------------------------------------------------------------------------- loading


def run_folder(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` checked to be a training run's folder (it holds ``config.yaml`` and checkpoints)."""
    from .checkpointing import checkpoints_dir

    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{path}: no such run folder (expected the run.out_dir of a training run)")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (expected the run.out_dir of a training run)")
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path}: not a run folder (no config.yaml; expected the run.out_dir of a training run)")
    if not checkpoints_dir(path).is_dir():
        raise UserError(f"{path}: the run has no checkpoints folder (it saved no checkpoint yet)")
    return path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' (a GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), not {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a valid torch device") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: no CUDA GPU is visible to torch (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return resolved


_PREDICT_OVERRIDES = ["data.glove=''", "model.bert.pretrained=''"]
"""The GloVe file (NAD) and a pretrained export (BERT) only initialise a fresh model; the trained
values are in the checkpoint (NAD's embedding is a saved buffer), so neither file is read at
predict time and either may be gone."""


def load_run_config(run_dir: str | os.PathLike) -> Any:
    """The run's resolved config, set up to rebuild the model from the checkpoint alone."""
    from .config import load_config

    path = run_folder(run_dir) / "config.yaml"
    return load_config(path, _PREDICT_OVERRIDES)


@dataclass
class Trained:
    """A trained model ready to predict, and where it came from."""

    task: Any
    model: nn.Module
    config: Any
    source: str
    """For the report: 'checkpoint <tag> of <run>' or 'export <file> (checkpoint <tag>)'."""


def load_model(checkpoint: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu",
               trust_pickle: bool = False) -> Trained:
    """The model of a run folder's checkpoint ``which`` ('best', 'latest' or a tag), or of an export file.

    ``checkpoint`` is a run folder (its run.out_dir) or a file written by ``promoter-dist export``
    (safetensors with the run's config). The model holds fp32 weights (loaded strictly), is in eval
    mode and sits on ``device``. Regression and soft-classification runs predict expression; an MLM run is refused.
    Checkpoint files are read weights-only unless ``trust_pickle``.
    """
    from .checkpointing import (
        checkpoint_tag,
        checkpoints_dir,
        fp32_state_dict,
        is_export,
        read_export,
    )
    from .config import config_from_mapping, parse_yaml

    if is_export(checkpoint):
        exported = read_export(checkpoint)
        origin = f"{exported.path}"
        config = config_from_mapping(parse_yaml(exported.config_text, f"{origin} (config)"), _PREDICT_OVERRIDES,
                                     f"{origin} (config)")
        state, source = exported.state, f"export {origin} (checkpoint {exported.checkpoint or '?'})"
        _check_regression(config, origin)
    else:
        folder = run_folder(checkpoint)
        config = load_run_config(folder)
        _check_regression(config, str(folder))
        tag = checkpoint_tag(folder, which)
        origin = str(checkpoints_dir(folder) / tag)
        # DeepSpeed's consolidation prints progress on stdout; keep stdout for our own report.
        with contextlib.redirect_stdout(sys.stderr):
            state = fp32_state_dict(folder, tag, trust_pickle)
        source = f"checkpoint {tag} of {folder}"
    from .tasks import build_task

    task = build_task(config)
    model = task.build_model()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UserError(f"{origin}: the weights do not fit the model of its config "
                        f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return Trained(task, model.to(resolve_device(device)).eval(), config, source)


def _check_regression(config: Any, origin: str) -> None:
    if config.task.name == "mlm":
        raise UserError(f"{origin}: a {config.task.name} run (task.name={config.task.name}) predicts no expression; "
                        f"use a regression run (e.g. a fine-tuned one)")


def load_trained(run_dir: str | os.PathLike, which: str = "best",
                 device: str | torch.device = "cpu") -> tuple[Any, nn.Module, Any]:
    """(task, model, config) of :func:`load_model`."""
    trained = load_model(run_dir, which, device)
    return trained.task, trained.model, trained.config


# --------------------------------------------------------------------------- rows -> model inputs


@dataclass
class RowBatch:
    """Validated rows of one model batch (a slice of the input, in file order)."""

    codes: np.ndarray
    """uint8 (n, W) base codes, PAD beyond each row's length."""
    lengths: np.ndarray
    """int64 (n,) row lengths."""
    lines: np.ndarray
    """int64 (n,) 1-based input lines."""

    def __len__(self) -> int:
        return len(self.lengths)


def fit_nominal(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows fitted to 110 bp with plasmid sequence, keeping their 3' end: (n, 110) uint8.

    A row of L < 110 bp gets the last 110 - L bases of the vector upstream of its 5'
    adapter prepended (the DNA that precedes it in the plasmid); a row of L > 110 bp
    keeps its last 110 bases. 110-bp rows are returned unchanged.
    """
    from .data.alphabet import NOMINAL_LENGTH, encode
    from .data.kmer_tokenizer import UPSTREAM_FLANK

    codes = np.asarray(codes, dtype=np.uint8)
    lengths = np.asarray(lengths, dtype=np.int64)
    up = encode(UPSTREAM_FLANK)
    if codes.shape[0] and NOMINAL_LENGTH - lengths.min() > len(up):
        raise ValueError(f"rows shorter than {NOMINAL_LENGTH - len(up)} bp cannot be fitted")
    extended = np.concatenate([np.broadcast_to(up, (codes.shape[0], len(up))), codes], axis=1)
    start = len(up) + lengths - NOMINAL_LENGTH  # the window ends at each row's last base
    return extended[np.arange(codes.shape[0])[:, None], start[:, None] + np.arange(NOMINAL_LENGTH)]


class RowEncoder:
    """A task's model inputs for validated rows, and the per-model row checks."""

    def __init__(self, config: Any, path: str, pad: bool):
        self.config = config
        self.path = path
        self.pad = pad
        self.nad = config.model.name == "nad"
        self.onehot = config.tokens == "onehot"

    def check(self, codes: np.ndarray, lengths: np.ndarray, has_n: np.ndarray, lines: np.ndarray) -> None:
        """Raise InputError at the first row this model cannot take (see the module docstring)."""
        from .data.alphabet import NOMINAL_LENGTH

        if self.nad:
            if has_n.any():
                line = int(lines[np.flatnonzero(has_n)[0]])
                raise InputError(self.path, "sequence contains N: NAD's model reads 5-mer words over ACGT only "
                                            f"({int(has_n.sum())} such rows in this part of the file)",
                                 line=line, field="sequence")
            off = lengths != NOMINAL_LENGTH
            if off.any() and not self.pad:
                at = np.flatnonzero(off)[0]
                raise InputError(self.path, f"sequence of {int(lengths[at])} bp: NAD's model takes exactly "
                                            f"{NOMINAL_LENGTH} bp ({int(off.sum())} such rows in this part of the "
                                            f"file); --pad fits rows to {NOMINAL_LENGTH} bp with vector sequence",
                                 line=int(lines[at]), field="sequence")
            return
        if self.onehot:  # every row has a window: vector sequence fills what it lacks
            return
        from .data.kmer_tokenizer import kmer_count

        limit = self.config.model.bert.max_tokens
        frame = 0 if self.config.data.kmer_all_frames else self.config.data.kmer_frame  # frame 0 has the most
        tokens = kmer_count(lengths.astype(np.int64), frame, self.config.data.kmer_flank_bp) + 2
        over = tokens > limit
        if over.any():
            at = np.flatnonzero(over)[0]
            raise InputError(self.path, f"sequence of {int(lengths[at])} bp gives {int(tokens[at])} tokens; the "
                                        f"model takes at most {limit} (model.bert.max_tokens)",
                             line=int(lines[at]), field="sequence")

    def inputs(self, batch: RowBatch) -> dict[str, torch.Tensor]:
        """The batch keys the task's model reads, as CPU tensors (the loader's encodings)."""
        if self.nad:
            from .data.nad_words import words_from_codes

            codes = fit_nominal(batch.codes, batch.lengths) if self.pad else batch.codes
            return {"words": torch.from_numpy(words_from_codes(codes).astype(np.int64))}
        if self.onehot:
            from .data.onehot import window_codes

            return {"window": torch.from_numpy(window_codes(batch.codes, batch.lengths, self.config.data.onehot_window))}
        from .data.kmer_tokenizer import encode_for_model

        data = self.config.data  # all frames: the regression task averages over the three
        ids, mask = encode_for_model(batch.codes, batch.lengths, data.kmer_frame, data.kmer_all_frames,
                                     data.kmer_flank_bp)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _rebatch(parts: Iterable[RowBatch], batch_size: int) -> Iterator[RowBatch]:
    """Cut chunks of rows into batches of exactly ``batch_size`` rows (the last may be short)."""
    pending: list[RowBatch] = []
    held = 0
    for part in parts:
        pending.append(part)
        held += len(part)
        if held < batch_size:
            continue
        joined = _concatenate(pending)
        full = held - held % batch_size
        for start in range(0, full, batch_size):
            yield _slice(joined, slice(start, start + batch_size))
        rest = _slice(joined, slice(full, held))
        pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held:
        yield _concatenate(pending)


def _slice(batch: RowBatch, index: slice) -> RowBatch:
    codes = batch.codes[index]
    lengths = batch.lengths[index]
    width = int(lengths.max(initial=1))  # drop padding columns no row of the slice needs
    return RowBatch(codes[:, :width], lengths, batch.lines[index])


def _concatenate(parts: list[RowBatch]) -> RowBatch:
    if len(parts) == 1:
        return parts[0]
    from .data.alphabet import PAD

    width = max(p.codes.shape[1] for p in parts)
    codes = np.full((sum(len(p) for p in parts), width), PAD, dtype=np.uint8)
    at = 0
    for part in parts:
        codes[at : at + len(part), : part.codes.shape[1]] = part.codes
        at += len(part)
    return RowBatch(codes, np.concatenate([p.lengths for p in parts]), np.concatenate([p.lines for p in parts]))


# --------------------------------------------------------------------------- predicting


def predict_with_model(task: Any, model: nn.Module, config: Any, input_path: str | os.PathLike, *,
                       batch_size: int = 1024, pad: bool = False, precision: str = "fp32",
                       progress: bool = False) -> np.ndarray:
    """float32 (N,) expression predictions for the N lines of ``input_path``, in line order.

    ``model`` comes from :func:`load_trained` (its device is used). ``precision='bf16'``
    runs the forward passes under bf16 autocast (faster on a GPU; fp32 is exact).
    Raises InputError naming ``file:line`` for a bad row or one the model cannot take.
    """
    from .data.dream import ReadOptions, ReadReport, iter_rows

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, not {batch_size!r}")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    path = Path(input_path)
    device = next(model.parameters()).device
    encoder = RowEncoder(config, str(path), pad)
    # Strict: a submission needs a value for every line, so a bad row cannot be skipped.
    # workers=0: parsing in this process is cheap next to the model, and forks no copy of it.
    options = ReadOptions(labels="optional", strict=True, workers=0, chunk_bytes=READ_CHUNK_BYTES)
    report = ReadReport(str(path))
    size, gzipped = 0, False
    with contextlib.suppress(OSError):  # a missing or unreadable file is reported by the reader
        if path.is_file():
            size = path.stat().st_size
            with path.open("rb") as probe:
                gzipped = probe.read(2) == b"\x1f\x8b"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="row", unit_scale=True, desc=f"predict {path.name}", dynamic_ncols=True)

    def chunks() -> Iterator[RowBatch]:
        for rows in iter_rows(path, options, report):
            if not len(rows):
                continue
            lengths = rows.lengths.astype(np.int64)
            encoder.check(rows.codes, lengths, rows.has_n, rows.lines)
            if bar is not None and not gzipped and report.bytes_read:
                # The bar's total: rows so far scaled by the bytes still to read (exact at the end).
                bar.total = max(round(report.rows_ok * size / report.bytes_read), report.rows_ok)
                bar.refresh()
            yield RowBatch(rows.codes, lengths, rows.lines)

    outputs: list[np.ndarray] = []
    expected_line = 1
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast:
            for batch in _rebatch(chunks(), batch_size):
                # Strict reading keeps every line, so row i of the output is line i + 1.
                if int(batch.lines[0]) != expected_line or int(batch.lines[-1]) != expected_line + len(batch) - 1:
                    raise RuntimeError(f"{path}: the reader skipped or reordered lines near line {expected_line}")
                expected_line += len(batch)
                inputs = {k: v.to(device, non_blocking=True) for k, v in encoder.inputs(batch).items()}
                outputs.append(task.predict(model, inputs).float().cpu().numpy())
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if not outputs:
        raise InputError(str(path), "the file is empty (no rows)")
    return np.concatenate(outputs)


def predict_file(run_dir: str | os.PathLike, input_path: str | os.PathLike, which: str = "best",
                 batch_size: int = 1024, device: str | torch.device = "auto", progress: bool = False, *,
                 pad: bool = False, precision: str = "fp32") -> np.ndarray:
    """float32 (N,) predictions of checkpoint ``which`` of ``run_dir`` for the N lines of ``input_path``.

    Value ``i`` is the prediction for 0-based line ``i`` (the submission key). See
    :func:`load_trained` and :func:`predict_with_model`.
    """
    trained = load_model(run_dir, which, resolve_device(device))
    task, model, config = trained.task, trained.model, trained.config
    return predict_with_model(task, model, config, input_path, batch_size=batch_size, pad=pad,
                              precision=precision, progress=progress)
