"""A run's checkpoints: the one module that writes and reads ``<run>/checkpoints/``.

Layout::

    latest                 text: tag of the newest periodic checkpoint (moved only after every rank wrote)
    best                   text: tag of the best validation checkpoint
    best.json              the validation record that made it the best (as a metrics.jsonl line)
    step00001200/          DeepSpeed tag folder: model states, ZeRO optimizer partitions, the trainer's
                           shared state (client state), and trainer-rank<r>.pt: rank r's loader position,
                           RNG state, loss window and own BatchNorm statistics
                           shape.json: ranks, accumulation, micro batch and ZeRO stage it was written with
                           universal/: made on demand, DeepSpeed's universal checkpoint of it, for a
                           resume on another shape
    best-step00001100/     the same, for the best checkpoint

:class:`CheckpointManager` writes a checkpoint collectively from a training engine and
resumes one; the read-only functions below (:func:`checkpoint_tag`, :func:`fp32_state_dict`,
:func:`export_model`, :func:`read_best_record`) need no engine and serve ``predict`` and
``export``; :func:`export_for_task` writes a task's portable form (BERT's Hugging Face folder)
at the end of a run. Pointer files hold a plain tag (:data:`TAG_PATTERN`) or are refused.

Untrusted files: a checkpoint may come from another user, so every ``torch.load`` of one,
DeepSpeed's own loading included, runs with ``weights_only=True`` inside
:func:`weights_only_loads` (tensors, containers, numbers and the few DeepSpeed types in
:data:`DEEPSPEED_TYPES`; never arbitrary code). A file that needs more is refused with one line
naming it, unless the user vouches for it (``run.trust_pickled_checkpoints``, ``--trust-pickle``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import distributed as dist
from .engine import parameters_finite
from .errors import UserError
from .io import atomic_open, fsync_paths, write_json_atomic

log = logging.getLogger("promoter_dist")

LATEST, BEST = "latest", "best"
"""The two pointer files."""
BEST_RECORD = "best.json"
"""The best checkpoint's validation record, beside the ``best`` pointer."""
TAG_PATTERN = re.compile(r"(best-)?step[0-9]{8,20}")
"""The tags :meth:`CheckpointManager.save` writes; a pointer holding anything else is refused, since
a pointer may come from another user and a path in it (``..``, ``/``) would lead outside the run."""


DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Classes DeepSpeed 0.19 pickles into its checkpoint files (loss scaler, ZeRO stage, fragment
addresses): plain records, allowed in a weights-only load. Found by loading checkpoints of every
ZeRO stage with ``weights_only=True`` until nothing else was refused."""


class UntrustedFileError(UserError):
    """A file that only a full pickle load could read: refused, since unpickling runs code."""


def _allowed_types() -> list[Any]:
    import importlib

    found = []
    for name in DEEPSPEED_TYPES:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), attr))
    return found


def _path_of(file: Any) -> str:
    if isinstance(file, (str, os.PathLike)):
        return os.fspath(file)
    return str(getattr(file, "name", file))  # an open file


@contextlib.contextmanager
def weights_only_loads(trust_pickle: bool = False) -> Iterator[None]:
    """Every ``torch.load`` inside the block (DeepSpeed's too) loads weights only, never code.

    DeepSpeed's checkpoint code calls ``torch.load(..., weights_only=False)``; inside this block
    that call is made with ``weights_only=True`` and the types of :data:`DEEPSPEED_TYPES`. A file
    that needs anything else raises :class:`UntrustedFileError` naming it; a file that is not a
    torch file at all raises :class:`UserError`. ``trust_pickle=True`` leaves loads as they are.
    """
    if trust_pickle:
        yield
        return
    original = torch.load
    allowed = _allowed_types()

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, map_location, **kwargs)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            what = f"it refers to {found.group(1)}" if found else "it is not a weights-only torch file"
            raise UntrustedFileError(
                f"{_path_of(f)}: refused: {what}, and reading it would need a full pickle load, which runs code "
                "stored in the file; if it is your own file, set run.trust_pickled_checkpoints=true or pass "
                "--trust-pickle") from None
        except (RuntimeError, EOFError, ValueError) as error:
            raise UserError(f"{_path_of(f)}: not a readable checkpoint file ({str(error).strip().splitlines()[0]})") \
                from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def read_pointer(run_dir: str | os.PathLike, name: str) -> str | None:
    """The tag a pointer file ('latest' or 'best') holds, or None when there is none yet.

    Anything but a tag of :data:`TAG_PATTERN` is refused with one line naming the pointer file.
    """
    path = checkpoints_dir(run_dir) / name
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(65)  # a tag is at most 31 bytes; more is not a tag, and need not be read whole
    except OSError as error:
        raise UserError(f"{path}: unreadable checkpoint pointer ({error.strerror or error})") from None
    tag = raw.decode("ascii", errors="replace").strip()
    if len(raw) > 64 or not TAG_PATTERN.fullmatch(tag):
        raise UserError(f"{path}: not a checkpoint pointer (it must hold one tag such as step00001200 or "
                        f"best-step00001200, not {raw[:40]!r})")
    return tag


def checkpoint_tag(run_dir: str | os.PathLike, which: str = BEST) -> str:
    """The tag ``which`` ('best', 'latest' or a tag name) names in a run folder."""
    ckpt = checkpoints_dir(run_dir)
    if (ckpt / which).is_dir():
        return which
    tag = read_pointer(run_dir, which)
    if tag is None:
        known = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []
        raise UserError(f"{ckpt / which}: no such checkpoint pointer or tag (found: {', '.join(known) or 'nothing'})")
    return tag


def fp32_state_dict(run_dir: str | os.PathLike, which: str = BEST,
                    trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Plain fp32 weights of a checkpoint, for any ZeRO stage: loads with ``model.load_state_dict``.

    Read weights-only (:func:`weights_only_loads`) unless ``trust_pickle``.
    """
    with weights_only_loads(trust_pickle):
        return _fp32_state_dict(run_dir, which)


def _fp32_state_dict(run_dir: str | os.PathLike, which: str) -> dict[str, torch.Tensor]:
    ckpt = checkpoints_dir(run_dir)
    tag = checkpoint_tag(run_dir, which)
    folder = ckpt / tag
    if (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists() or list(folder.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
        except (ValueError, KeyError, FileNotFoundError):
            state = None  # ZeRO-0 checkpoints hold optimizer files too but no partitioned weights
        if state is not None:
            return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model_file = folder / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        raise UserError(f"{folder}: not a DeepSpeed checkpoint (no model states file)")
    module = torch.load(model_file, map_location="cpu")["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


EXPORT_FORMAT = "promoter-dist/1"
"""``format`` metadata of an exported model file."""


def export_model(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = BEST,
                 trust_pickle: bool = False) -> Path:
    """Write a checkpoint's fp32 weights and the run's config as one safetensors file (atomically).

    safetensors holds tensors and string metadata only, so the file cannot carry code; the
    metadata holds ``format``, the resolved ``config`` (YAML, as in the run's config.yaml) and
    the ``checkpoint`` it came from. ``promoter-dist predict --checkpoint FILE`` runs from it;
    ``safetensors.torch.load_file(FILE)`` gives the state dict for ``model.load_state_dict``.
    """
    from safetensors.torch import save

    tag = checkpoint_tag(run_dir, which)
    config_path = Path(run_dir) / "config.yaml"
    try:
        config_text = config_path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: cannot read the run's config ({error})") from None
    state = fp32_state_dict(run_dir, tag, trust_pickle)
    # Tied weights share storage in the module; safetensors stores each tensor on its own.
    tensors = {name: value.detach().contiguous().clone() for name, value in state.items()}
    data = save(tensors, metadata={"format": EXPORT_FORMAT, "config": config_text, "checkpoint": tag})
    out = Path(out)
    with atomic_open(out, "wb") as f:
        f.write(data)
    return out


def export_for_task(run_dir: str | os.PathLike, task: Any, out_dir: str | os.PathLike) -> str | None:
    """The best (else the latest) checkpoint in the task's portable form (``task.export``) at ``out_dir``.

    The model is rebuilt by ``task.build_model()`` from the checkpoint's consolidated fp32 weights,
    so this works for every ZeRO stage without gathering partitions. Returns the pointer used
    ('best' or 'latest'), or None when the run holds no checkpoint.
    """
    which = BEST if read_pointer(run_dir, BEST) else LATEST
    if read_pointer(run_dir, which) is None:
        return None
    model = task.build_model()
    model.load_state_dict(fp32_state_dict(run_dir, which), strict=True)
    task.export(model, Path(out_dir))
    return which


@dataclass
class ExportedModel:
    """An exported model file, read and checked."""

    path: Path
    config_text: str
    """The run's resolved config (YAML)."""
    checkpoint: str
    """The tag of the checkpoint it was exported from."""
    state: dict[str, torch.Tensor]
    """fp32 weights for ``model.load_state_dict``."""


def is_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file (an export), not a run folder."""
    return Path(path).is_file()


def read_export(path: str | os.PathLike) -> ExportedModel:
    """Read an export written by :func:`export_model` (no pickle: safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
        state = load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    except OSError as error:
        raise UserError(f"{path}: cannot read the exported model ({error.strerror or error})") from None
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a safetensors model file written by promoter-dist export ({error})") from None
    if metadata.get("format") != EXPORT_FORMAT or not isinstance(metadata.get("config"), str):
        raise UserError(f"{path}: a safetensors file without promoter-dist metadata (format {EXPORT_FORMAT!r} and the "
                        "run's config); write it with promoter-dist export")
    return ExportedModel(path, metadata["config"], str(metadata.get("checkpoint", "")), state)


def read_best_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The validation record (a ``val`` line of metrics.jsonl) of the run's best checkpoint.

    The trainer chose it by ``run.best_metric``; nobody chooses again.
    """
    path = checkpoints_dir(run_dir) / BEST_RECORD
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the run kept no best checkpoint (no validation metric was finite)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable best-checkpoint record ({error})") from None
    record = payload.get("record") if isinstance(payload, dict) else None
    if not isinstance(record, dict) or record.get("kind") != "val":
        raise UserError(f"{path}: not a best-checkpoint record (no validation record in it)")
    return record


def changed_keys(saved: Any, now: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in saved.keys() | now.keys():
            yield from changed_keys(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
    elif saved != now:
        yield prefix


SHAPE_FILE = "shape.json"
"""In every tag folder: the shape the checkpoint was written with (:class:`TrainShape`)."""
UNIVERSAL = "universal"
"""In a tag folder: its DeepSpeed universal checkpoint, made when a run resumes on another shape."""


@dataclass(frozen=True)
class TrainShape:
    """How a run shares its global batch: ranks x accumulation steps x micro batch, and the ZeRO stage."""

    world_size: int
    grad_accum: int
    batch_size: int
    zero_stage: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.grad_accum * self.batch_size

    def describe(self) -> str:
        return (f"{self.world_size} rank(s) x engine.grad_accum={self.grad_accum} x data.batch_size={self.batch_size}"
                f" = {self.global_batch}")

    def keeping(self, global_batch: int) -> str:
        """Settings of this shape's ranks that would give ``global_batch``, as a sentence."""
        options = []
        if global_batch % (self.world_size * self.grad_accum) == 0:
            options.append(f"data.batch_size={global_batch // (self.world_size * self.grad_accum)}")
        if global_batch % (self.world_size * self.batch_size) == 0:
            options.append(f"engine.grad_accum={global_batch // (self.world_size * self.batch_size)}")
        if not options:
            return f"no setting of {self.world_size} rank(s) divides it; use a rank count that divides it"
        return f"on {self.world_size} rank(s) set " + " or ".join(options)


@dataclass
class Resumed:
    """What a resumed checkpoint gives back to the trainer."""

    tag: str
    """The checkpoint's tag."""
    trainer_state: dict[str, Any]
    """The state shared by all ranks (step, best record, schedules, GSAM, config, world size)."""
    rank_state: dict[str, Any]
    """This rank's own state (loader position, RNG state, loss window)."""


class CheckpointManager:
    """Saves, prunes and resumes the checkpoints of one run, on every rank together.

    ``save`` and ``resume`` are collective (every rank calls them); pointers, the best record
    and pruning are rank 0's. A checkpoint's weights hold the ranks' average BatchNorm
    statistics (what evaluation and export use); each rank's own statistics are saved beside
    them, and put back after saving and on resume, so training continues exactly.
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, shape: TrainShape, keep: int):
        self.run_dir = Path(run_dir)
        self.dir = checkpoints_dir(run_dir)
        self.rank, self.shape, self.keep = rank, shape, keep
        self.world_size = shape.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def pointer(self, name: str) -> str | None:
        """The tag of pointer ``name`` ('latest' or 'best'), or None."""
        return read_pointer(self.run_dir, name)

    def rank_file(self, tag: str) -> Path:
        return self.dir / tag / f"trainer-rank{self.rank}.pt"

    # -- writing ------------------------------------------------------------------------------

    def save(self, engine: Any, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any],
             best: bool = False, best_record: dict[str, Any] | None = None) -> str:
        """Write checkpoint ``step<N>`` (``best-step<N>`` when ``best``) on every rank; returns its tag.

        The pointer moves only after every rank wrote and flushed every file of the checkpoint
        (and its folder) to disk; a best checkpoint's validation record is written beside its
        pointer. Refuses (on every rank) to write weights that hold NaN/inf, keeping the last
        good checkpoint.
        """
        if dist.any_rank(not parameters_finite(engine)):
            raise UserError(f"step {step}: the weights hold NaN/inf; refusing to write a checkpoint "
                            f"(the last good one in {self.dir} is kept)")
        own_statistics = [b.detach().clone() for b in dist.norm_statistics(engine.module)]
        dist.average_norm_statistics(engine.module)
        tag = f"{'best-' if best else ''}step{step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
        with atomic_open(self.rank_file(tag), "wb") as f:
            torch.save({**rank_state, "norm_statistics": own_statistics}, f)
        if self.is_main:
            write_json_atomic(self.dir / tag / SHAPE_FILE, asdict(self.shape))
        _copy_into(dist.norm_statistics(engine.module), own_statistics)
        dist.barrier()  # every rank wrote its files ...
        flush_folder(self.dir / tag)  # ... and each flushes what this node holds of them
        dist.barrier()
        if self.is_main:
            if best and best_record is not None:
                write_json_atomic(self.dir / BEST_RECORD, {"tag": tag, "record": best_record})
            with atomic_open(self.dir / (BEST if best else LATEST), "w") as f:
                f.write(tag)
            self.prune()
        dist.barrier()
        return tag

    def prune(self) -> None:
        """Keep the newest ``keep`` periodic tags and the current best one."""
        keep = {self.pointer(LATEST), self.pointer(BEST)}
        periodic = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        keep.update(periodic[-self.keep:])
        for path in self.dir.iterdir():
            if path.is_dir() and path.name.startswith(("step", "best-")) and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------

    def saved_shape(self, tag: str) -> TrainShape | None:
        """The shape checkpoint ``tag`` was written with (None for a checkpoint older than shape files)."""
        path = self.dir / tag / SHAPE_FILE
        if not path.exists():
            return None
        try:
            fields = json.loads(path.read_text())
            return TrainShape(**{k: int(fields[k]) for k in ("world_size", "grad_accum", "batch_size", "zero_stage")})
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path}: not a checkpoint shape record ({error})") from None

    def resume(self, engine: Any, config: dict[str, Any], trust_pickle: bool = False) -> Resumed | None:
        """Load ``latest`` into ``engine`` (model, optimizer, BatchNorm statistics), or None.

        Collective: a problem on any rank (a missing or refused file) ends every rank with the
        same message. Files are read weights-only unless ``trust_pickle``. ``config`` is the run's
        resolved config as a dict: a checkpoint written under another one resumes with a warning
        naming the keys that differ. A checkpoint of another shape with the same global batch
        resumes through DeepSpeed's universal checkpoint (:meth:`resume_reshaped`); one with
        another global batch is refused, naming the settings that would keep it.
        """
        tag = self.pointer(LATEST)
        if tag is None:
            return None
        saved = self.saved_shape(tag)
        if saved is not None and saved.global_batch != self.shape.global_batch:
            raise UserError(f"{self.dir / tag}: saved with {saved.describe()}, now {self.shape.describe()}: a resumed "
                            f"run keeps its global batch of {saved.global_batch}; {self.shape.keeping(saved.global_batch)}")
        if saved is not None and saved.world_size != self.world_size:
            return self.resume_reshaped(engine, tag, saved, config, trust_pickle)
        rank_file = self.rank_file(tag)
        with dist.failing_together():
            if not rank_file.exists():
                raise UserError(f"{rank_file}: missing; checkpoint {tag} was written by a run of another world "
                                "size, or is incomplete (exact resume needs every rank's file)")
        rank_state = self._read_rank_state(rank_file, tag, trust_pickle)
        state = self._trainer_state(self._load_engine(engine, self.dir / tag, trust_pickle), tag, config)
        if state["world_size"] != self.world_size:
            raise UserError(f"{self.dir / tag}: saved with {state['world_size']} ranks, now {self.world_size}")
        _copy_into(dist.norm_statistics(engine.module), rank_state.pop("norm_statistics", []))
        return Resumed(tag, state, rank_state)

    def resume_reshaped(self, engine: Any, tag: str, saved: TrainShape, config: dict[str, Any],
                        trust_pickle: bool) -> Resumed:
        """Resume checkpoint ``tag`` of another world size with the same global batch.

        Carried over: weights and optimizer state (ZeRO 1-3: converted once, by rank 0, into the
        tag's ``universal`` folder with DeepSpeed's ``ds_to_universal``, then loaded by every rank
        with ``load_universal``; ZeRO 0 holds them whole), the trainer's shared state (step,
        schedules, GSAM, best record) and the loader's global position. BatchNorm running
        statistics: every rank starts from the ranks' average the checkpoint holds (per-rank
        statistics belong to a rank layout that no longer exists). Random draws are keyed by step
        and micro-batch position, not by rank, so no rank's random state is needed.
        """
        log.warning("checkpoint %s was saved with %s; resuming with %s", tag, saved.describe(), self.shape.describe())
        rank_state = self._read_rank_state(self.dir / tag / "trainer-rank0.pt", tag, trust_pickle)
        rank_state.pop("norm_statistics", None)
        if saved.zero_stage > 0:
            folder = self.universal_checkpoint(tag, trust_pickle)
            engine._config.load_universal_checkpoint = True  # the flag DeepSpeed reads at load time
            try:
                client = self._load_engine(engine, folder, trust_pickle)
            finally:
                engine._config.load_universal_checkpoint = False
        else:
            client = self._load_engine(engine, self.dir / tag, trust_pickle)
        state = self._trainer_state(client, tag, config)
        self._load_average_norm_statistics(engine, tag, trust_pickle)
        state["world_size"] = self.world_size
        return Resumed(tag, state, rank_state)

    def universal_checkpoint(self, tag: str, trust_pickle: bool) -> Path:
        """The tag's universal checkpoint folder, converted by rank 0 the first time it is needed."""
        folder = self.dir / tag / UNIVERSAL
        with dist.failing_together():
            if self.is_main and not folder.is_dir():
                from argparse import Namespace

                from deepspeed.checkpoint import ds_to_universal

                # A fresh folder of an unpredictable name: nothing planted at a guessable name is reused.
                partial = Path(tempfile.mkdtemp(dir=self.dir / tag, prefix=f"{UNIVERSAL}.tmp-"))
                log.info("converting checkpoint %s into a universal checkpoint for the new shape (DeepSpeed "
                         "ds_to_universal) -> %s", tag, folder)
                arguments = Namespace(input_folder=str(self.dir / tag), output_folder=str(partial),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
                with weights_only_loads(trust_pickle), contextlib.redirect_stdout(io.StringIO()):
                    ds_to_universal.main(arguments)  # in this process: its loads are weights-only too
                for path in sorted(p for p in partial.rglob("*") if p.is_dir()) + [partial]:
                    flush_folder(path)
                os.replace(partial, folder)
                fsync_paths([self.dir / tag])
        dist.barrier()
        return folder

    @staticmethod
    def _load_engine(engine: Any, folder: Path, trust_pickle: bool) -> dict | None:
        """DeepSpeed's load of checkpoint folder ``folder`` (model and optimizer), weights-only; its client state."""
        with weights_only_loads(trust_pickle):
            _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        return client

    def _read_rank_state(self, rank_file: Path, tag: str, trust_pickle: bool) -> dict[str, Any]:
        """A rank state file, after every file of the checkpoint was checked readable weights-only."""
        with dist.failing_together(), weights_only_loads(trust_pickle):
            rank_state = torch.load(rank_file, map_location="cpu")
            if not isinstance(rank_state, dict) or not {"loader", "rng"} <= rank_state.keys():
                raise UserError(f"{rank_file}: not a trainer rank state (no loader position or RNG state)")
            # Before DeepSpeed loads (collectively): each rank checks every file of the checkpoint
            # here, where a refusal on one rank can still end all of them together.
            for path in sorted((self.dir / tag).glob("*.pt")):
                torch.load(path, map_location="cpu", mmap=not trust_pickle)
        return rank_state

    def _trainer_state(self, client: dict | None, tag: str, config: dict[str, Any]) -> dict[str, Any]:
        state = (client or {}).get("trainer")
        if not isinstance(state, dict):
            raise UserError(f"{self.dir / tag}: holds no trainer state (not a checkpoint of this toolkit)")
        changed = sorted(changed_keys(state["config"], config))
        if changed:
            log.warning("config differs from the checkpoint's in: %s", ", ".join(changed))
        return state

    def _load_average_norm_statistics(self, engine: Any, tag: str, trust_pickle: bool) -> None:
        """The checkpoint's BatchNorm buffers (the ranks' average) into the module, on every rank."""
        buffers = {name: b for name, b in engine.module.named_buffers()
                   if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")}
        if not buffers:
            return
        with dist.failing_together(), weights_only_loads(trust_pickle):
            # ZeRO 0-2 write mp_rank_00_model_states.pt, ZeRO-3 one per rank; buffers are whole in each.
            path = next((self.dir / tag / name for name in ("mp_rank_00_model_states.pt",
                                                            "zero_pp_rank_0_mp_rank_00_model_states.pt")
                         if (self.dir / tag / name).exists()), self.dir / tag / "mp_rank_00_model_states.pt")
            module = torch.load(path, map_location="cpu").get("module") or {}
            missing = sorted(set(buffers) - set(module))
            if missing:
                raise UserError(f"{path}: no BatchNorm statistics {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for name, buffer in buffers.items():
                buffer.copy_(module[name])


def flush_folder(folder: Path) -> None:
    """fsync every file of ``folder`` and the folder itself (what this node wrote reaches the disk)."""
    fsync_paths(sorted(p for p in folder.iterdir() if p.is_file()) + [folder])


def _copy_into(buffers: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, values):
            buffer.copy_(value)
