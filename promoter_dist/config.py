"""One typed configuration tree for a training run.

Defaults live here, in code, with a docstring under every field. A YAML file holds only
the differences from these defaults; dotted overrides (``optim.lr=1e-4``) come last.
Unknown keys and bad values raise :class:`~promoter_dist.errors.ConfigError` naming the
key. A setting chosen from a fixed set is typed ``Literal[...]``: the coercer checks it
against that type, so its allowed values are written once; ``__post_init__`` keeps only
range and cross-field checks. The DeepSpeed config is built from this tree by
:func:`to_deepspeed`; there is no second hand-kept JSON.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .choices import check_choice, is_choice
from .data.kmer_tokenizer import FULL_FLANK_BP, MIN_FLANK_BP, check_flank_bp
from .data.loader import KmerFrame, LoaderConfig, Tokens, View
from .errors import ConfigError, UserError
from .io import read_input
from .models.bert import BertConfig
from .models.dream_rnn import PrixFixeConfig
from .models.legnet import LegNetConfig
from .models.nad import NADConfig
from .optim.gsam import GSAMConfig

ModelName = Literal["nad", "bert", "legnet", "dream_rnn"]
"""The models a run trains."""
BIN_MODELS: tuple[ModelName, ...] = ("legnet", "dream_rnn")
"""Models that predict expression bins from one-hot windows (trained with task.name=soft_classification)."""
TaskName = Literal["regression", "mlm", "soft_classification"]
"""The objectives a run trains for."""
Precision = Literal["fp32", "bf16", "fp16"]
"""Engine arithmetic: fp32, bf16 autocast over fp32 weights, or DeepSpeed fp16."""
TASK_METRICS: dict[TaskName, tuple[str, ...]] = {
    "regression": ("loss", "pearson", "spearman"),
    "mlm": ("loss", "accuracy"),
    "soft_classification": ("loss", "pearson", "spearman"),
}
"""Validation metrics each task reports (what best_metric and plateau_metric may name)."""


@dataclass
class RunConfig:
    """Where a run writes, how long it trains, how often it logs and saves."""

    out_dir: str = "runs/nad-debug"
    """Run folder: resolved config, logs, metrics, plots and checkpoints."""
    seed: int = 1
    """Seed of model initialisation, data order and label noise (NAD used 1)."""
    epochs: int = 50
    """Training epochs (NAD: 50)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: run all epochs)."""
    log_every: int = 50
    """Optimizer steps between training-loss log lines."""
    eval_every: int = 0
    """Optimizer steps between validation runs within an epoch (0: only at each epoch end)."""
    checkpoint_every: int = 500
    """Optimizer steps between periodic checkpoints (0: only at epoch ends); what a requeued job resumes from."""
    keep_checkpoints: int = 2
    """Periodic checkpoints kept on disk, newest first; the best one is kept apart."""
    resume: Literal["auto", "never"] = "auto"
    """'auto': continue from <out_dir>/checkpoints when one exists; 'never': refuse to reuse a folder that has one."""
    best_metric: str = ""
    """Validation metric that selects the best checkpoint (higher is better, 'loss' lower); '' picks the task's: pearson for regression and soft_classification, loss for MLM."""
    plots: bool = True
    """Write PNG curves and a predicted-vs-measured plot into the run folder."""
    trust_pickled_checkpoints: bool = False
    """Resume from checkpoint files that need a full pickle load (only your own legacy files: unpickling runs code)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "max_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"run.{key} must be >= 0, not {getattr(self, key)}")
        if self.log_every == 0:
            raise ConfigError("run.log_every must be >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError("run.keep_checkpoints must be >= 1 (a resume needs the latest checkpoint)")


@dataclass
class DataConfig:
    """Which shards feed the run and how they are streamed."""

    shards: str = "out/demo/shards"
    """Shard folder written by `promoter-dist shards build` (holds manifest.json)."""
    glove: str = "out/demo/glove/vectors.w2v.txt"
    """GloVe vectors for NAD's embedding: word2vec text (`promoter-dist glove`) or GloVe text (NAD's published file)."""
    trust_pickled_vectors: bool = False
    """Load a pickled gensim .kv as data.glove (only your own legacy files: unpickling runs code)."""
    train_split: str = "train"
    """Split trained on."""
    val_split: str = "val"
    """Split evaluated each epoch ('' for none)."""
    view: Literal["", View] = ""
    """Row subset: 'all', 'nad' (110 bp, no N) or 'top'; '' picks the model's own (NAD: nad, MLM: top, else all)."""
    batch_size: int = 64
    """Micro batch per rank; the global batch is batch_size x world size x engine.grad_accum."""
    eval_batch_size: int = 0
    """Micro batch per rank for validation (0: same as batch_size)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: read in the training process)."""
    lanes: int = 64
    """Most lanes of the training order (it has gcd(lanes, global batch)); ranks x engine.grad_accum must divide that, so the order, and a resume, hold on any such shape."""
    shuffle_buffer: int = 16384
    """Rows held for shuffling over all lanes of the training order (each lane holds its share, at least 1,024)."""
    kmer_frame: KmerFrame = 0
    """Reading frame (0, 1 or 2) of the 3-mer tokens for the BERT models."""
    kmer_flank_bp: int = 150
    """BERT: vector sequence on each side of a row for the 3-mer tokens, the row's own adapters included: 150 as published (133 bp of vector before the row, 137 after); b in 19..150 keeps the b - 17 / b - 13 vector bases next to the row. The flanks are the same in every row and set most of a step's compute; a fine-tuning run must use its pretraining's value."""
    kmer_all_frames: bool = False
    """BERT: tokenize every row in all three reading frames (input_ids (B, 3, T)); regression averages the model's outputs over them, as SYSU-SAIL's model code averaged three token sequences; the masked LM trains on all three. Three times the compute per row; the Hugging Face export holds the model and the data.kmer_frame tokenizer (average over the three frames' outputs yourself)."""

    onehot_window: int = 150
    """LegNet and Prix Fixe models: input window (bp), the row without its 5' adapter after vector sequence, its last this many bases (published: 150)."""

    def __post_init__(self) -> None:
        try:
            check_flank_bp(self.kmer_flank_bp)
        except ValueError:
            raise ConfigError(f"data.kmer_flank_bp must be an integer in {MIN_FLANK_BP}..{FULL_FLANK_BP} (150 bp of "
                              f"vector each side, adapters included, as published), not {self.kmer_flank_bp!r}") from None
        if not 1 <= self.onehot_window <= 150:
            raise ConfigError(f"data.onehot_window must be in [1, 150] (the vector flank is 150 bp), not {self.onehot_window}")
        # The loader's rule for the fields it is built from (TrainConfig.loader_config), under data.* names.
        LoaderConfig.check_counts({key: getattr(self, key) for key in ("batch_size", "shuffle_buffer", "lanes",
                                                                         "num_workers")}, "data")
        if self.eval_batch_size < 0:  # 0: the training batch size
            raise ConfigError(f"data.eval_batch_size must be >= 0, not {self.eval_batch_size}")


@dataclass
class ModelConfig:
    """Which model, and the settings of each."""

    name: ModelName = "nad"
    """'nad' (GloVe + CNN/FPN + transformers), 'bert' (SYSU-SAIL's 3-mer BERT), 'legnet' (autosome.org's LegNet) or 'dream_rnn' (a Prix Fixe composition: DREAM-RNN, or DREAM-CNN with dream_rnn.core=legnet)."""
    nad: NADConfig = field(default_factory=NADConfig)
    """Team NAD's model (read when name is 'nad')."""
    bert: BertConfig = field(default_factory=BertConfig)
    """Team SYSU-SAIL's BERT (read when name is 'bert')."""
    legnet: LegNetConfig = field(default_factory=LegNetConfig)
    """LegNet, the DREAM 2022 winner (read when name is 'legnet'); defaults are the published 1,852,846-parameter model."""
    dream_rnn: PrixFixeConfig = field(default_factory=PrixFixeConfig)
    """Prix Fixe blocks (read when name is 'dream_rnn'); defaults are DREAM-RNN, core=legnet gives DREAM-CNN."""


@dataclass
class TaskConfig:
    """What the model is trained to do: its objective and targets."""

    name: TaskName = "regression"
    """'regression' (expression from sequence), 'mlm' (masked-token pretraining, BERT only) or 'soft_classification' (expression bins, LegNet and Prix Fixe models)."""
    loss: Literal["smooth_l1", "mse"] = "smooth_l1"
    """Regression loss: 'smooth_l1' or 'mse'."""
    smooth_l1_beta: float = 0.1
    """SmoothL1 transition point on the target scale (NAD: 0.1 on [0,1])."""
    label_map: Literal["nad", "none"] = "nad"
    """Target transform: 'nad' (y<=8 -> 5+3y/8, then (y-5)/12, giving [0,1]) or 'none'."""
    label_noise: float = 0.05
    """Std of Gaussian noise added to training targets, clipped to [0,1] under the 'nad' map (NAD: 0.05; 0: off)."""
    mask_prob: float = 0.15
    """MLM: fraction of tokens chosen for prediction (80% [MASK], 10% random, 10% kept)."""
    target_shift: float = 0.5
    """soft_classification: the target is N(y + target_shift, target_scale) integrated over the unit bins (LegNet: 0.5)."""
    target_scale: float = 0.5
    """soft_classification: standard deviation of the target distribution (LegNet: 0.5)."""
    reverse_complement: bool = True
    """soft_classification: train on every row in both orientations (each batch of B rows is 2B samples, is-reverse 0 and 1) and average the two orientations' predictions in validation and predict, as LegNet did."""

    def __post_init__(self) -> None:
        if self.smooth_l1_beta <= 0:
            raise ConfigError(f"task.smooth_l1_beta must be > 0, not {self.smooth_l1_beta}")
        if self.label_noise < 0:
            raise ConfigError(f"task.label_noise must be >= 0, not {self.label_noise}")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"task.mask_prob must be in (0, 1), not {self.mask_prob}")
        if self.target_scale <= 0:
            raise ConfigError(f"task.target_scale must be > 0, not {self.target_scale}")


@dataclass
class OptimConfig:
    """The optimizer (a torch optimizer handed to DeepSpeed) and its GSAM wrapper."""

    name: Literal["adamw", "adam", "lion"] = "adamw"
    """'adamw' (NAD; BERT pretraining; LegNet), 'adam' (BERT fine-tuning) or 'lion' (LegNet's optimised variant; lion-pytorch, decoupled weight decay scaled by the rate)."""
    lr: float = 2e-4
    """Peak learning rate (NAD: 2e-4)."""
    weight_decay: float = 5e-2
    """Decoupled weight decay for AdamW, L2 for Adam (NAD: 5e-2)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    gsam: GSAMConfig = field(default_factory=GSAMConfig)
    """Surrogate-gap guided sharpness-aware minimisation around the optimizer."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, not {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, not {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), not {self.betas}")


@dataclass
class OneCycleConfig:
    """torch's OneCycleLR settings (cosine annealing, two phases); defaults are torch's, as LegNet used them."""

    pct_start: float = 0.3
    """Fraction of the cycle spent raising the rate from lr / div_factor to lr (LegNet: 0.3)."""
    div_factor: float = 25.0
    """The cycle starts at optim.lr / div_factor (LegNet: 25)."""
    final_div_factor: float = 1e4
    """The cycle ends at optim.lr / div_factor / final_div_factor (torch's default, 1e4)."""
    cycle_momentum: bool = True
    """Move the optimizer's beta1 opposite to the rate, max_momentum -> base_momentum -> max_momentum (torch's default; LegNet's challenge run had it, the optimised variant not)."""
    base_momentum: float = 0.85
    """beta1 at the peak rate."""
    max_momentum: float = 0.95
    """beta1 at the start and end of the cycle."""

    def __post_init__(self) -> None:
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"schedule.one_cycle.pct_start must be in (0, 1), not {self.pct_start}")
        for key in ("div_factor", "final_div_factor"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"schedule.one_cycle.{key} must be > 0, not {getattr(self, key)}")
        for key in ("base_momentum", "max_momentum"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"schedule.one_cycle.{key} must be in [0, 1), not {getattr(self, key)}")


@dataclass
class ScheduleConfig:
    """How the learning rate moves; see promoter_dist.schedules."""

    name: Literal["linear", "cosine", "constant", "plateau", "one_cycle"] = "linear"
    """'linear' (decay to final_factor x lr), 'cosine', 'constant', 'plateau' (ReduceLROnPlateau on a metric) or 'one_cycle' (torch's OneCycleLR with optim.lr as the peak, every step)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 (linear, cosine, constant)."""
    decay_epochs: float = 50.0
    """Epochs over which linear/cosine reach final_factor and one_cycle ends (NAD: 50, the whole run)."""
    decay_steps: int = 0
    """Optimizer steps over which linear/cosine reach final_factor and one_cycle ends; 0: decay_epochs epochs (LegNet: 80,000)."""
    one_cycle: OneCycleConfig = field(default_factory=OneCycleConfig)
    """Shape of the 'one_cycle' schedule."""
    final_factor: float = 0.01
    """Learning rate at the end of the decay, as a fraction of optim.lr (NAD: 0.01); with 'plateau', the rate at which a GSAM rho schedule reaches rho_min."""
    per_epoch: bool = True
    """Change the rate once per epoch as NAD did (False: every optimizer step; one_cycle always moves every step)."""
    plateau_metric: str = "loss"
    """Validation metric watched by 'plateau': 'loss' (lower is better) or e.g. 'pearson' (higher is better)."""
    plateau_factor: float = 0.5
    """'plateau': factor applied to the rate when the metric stalls (SYSU: 0.5)."""
    plateau_patience: int = 2
    """'plateau': evaluations without improvement before the rate is cut (SYSU: 2)."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, not {self.warmup_steps}")
        if self.warmup_steps and self.name == "one_cycle":
            raise ConfigError("schedule.warmup_steps does not apply to schedule.name=one_cycle, which warms up "
                              "itself (schedule.one_cycle.pct_start): set it to 0")
        if self.decay_steps < 0:
            raise ConfigError(f"schedule.decay_steps must be >= 0, not {self.decay_steps}")
        if self.decay_epochs <= 0:
            raise ConfigError(f"schedule.decay_epochs must be > 0, not {self.decay_epochs}")
        if not 0 <= self.final_factor <= 1:
            raise ConfigError(f"schedule.final_factor must be in [0, 1], not {self.final_factor}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"schedule.plateau_factor must be in (0, 1), not {self.plateau_factor}")
        if self.plateau_patience < 0:
            raise ConfigError(f"schedule.plateau_patience must be >= 0, not {self.plateau_patience}")


@dataclass
class EngineConfig:
    """The DeepSpeed engine: ZeRO stage, precision, accumulation, clipping, monitors."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters)."""
    precision: Precision = "fp32"
    """'fp32'; 'bf16': autocast compute with fp32 weights (BatchNorm, GloVe table and GSAM stay exact); 'fp16': DeepSpeed fp16 with loss scaling."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step."""
    gradient_clipping: float = 0.0
    """Clip the global gradient norm to this value (0: off). Always written to DeepSpeed, whose default is 1.0."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: 'stop' with a clear message, or 'skip' the batch (never written into a checkpoint)."""
    tensorboard: bool = True
    """Write TensorBoard events through DeepSpeed's monitor into <out_dir>/monitor."""
    csv: bool = True
    """Write CSV metrics through DeepSpeed's monitor into <out_dir>/monitor."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO offload of optimizer states: 'none' or 'cpu' (stages 1-3)."""
    reduce_bucket_size: int = 5_000_000
    """Elements per gradient reduction bucket; smaller than the model, so ZeRO-2/3 free gradients during backward."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the other ranks before failing (a dead or hung rank ends the run)."""
    tf32: bool = True
    """GPUs: TF32 tensor cores for fp32 matmuls and convolutions (10-bit mantissa products, fp32 sums)."""

    def __post_init__(self) -> None:
        LoaderConfig.check_counts({"grad_accum": self.grad_accum}, "engine")
        if self.gradient_clipping < 0:
            raise ConfigError(f"engine.gradient_clipping must be >= 0, not {self.gradient_clipping}")
        if self.offload_optimizer == "cpu" and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer=cpu needs engine.zero_stage >= 1")
        if self.reduce_bucket_size < 1:
            raise ConfigError(f"engine.reduce_bucket_size must be >= 1, not {self.reduce_bucket_size}")
        if self.timeout_s <= 0:
            raise ConfigError(f"engine.timeout_s must be > 0, not {self.timeout_s}")


@dataclass
class TrainConfig:
    """The whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    """Output folder, length, logging and checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and streaming."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model and its size."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Objective and targets."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and GSAM."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed engine settings."""

    def __post_init__(self) -> None:
        if self.task.name == "mlm" and self.model.name != "bert":
            raise ConfigError("task.name=mlm needs model.name=bert")
        if (self.model.name in BIN_MODELS) != (self.task.name == "soft_classification"):
            raise ConfigError(f"model.name={self.model.name} with task.name={self.task.name}: the bin models "
                              f"({', '.join(BIN_MODELS)}) train with task.name=soft_classification, and only they do")
        if self.model.name == "nad" and self.data.view not in ("", "nad"):
            raise ConfigError("model.name=nad reads NAD words, which exist only in data.view=nad (110 bp, no N)")
        if self.model.name == "nad" and self.engine.precision == "fp16":
            raise ConfigError("engine.precision=fp16 casts weights but not NAD's fp32 BatchNorm statistics: use bf16")
        if self.optim.gsam.enabled and self.engine.precision == "fp16":
            raise ConfigError("optim.gsam with engine.precision=fp16 is not supported: use bf16 or fp32")
        if self.optim.gsam.enabled and self.engine.offload_optimizer != "none":
            raise ConfigError("optim.gsam needs the gradients on the device: set engine.offload_optimizer=none")
        gsam = self.optim.gsam
        if gsam.enabled and gsam.rho_min < gsam.rho_max and self.schedule.name == "constant":
            raise ConfigError("optim.gsam.rho_min is below rho_max, but schedule.name=constant never moves the "
                            "learning rate that rho follows: set rho_min = rho_max, or another schedule")
        # A misspelt metric is never found in the validation record: no best checkpoint would ever be
        # kept, and the plateau schedule would cut the rate after every `patience + 1` evaluations.
        metrics = TASK_METRICS[self.task.name]
        if not self.run.best_metric:
            self.run.best_metric = "loss" if self.task.name == "mlm" else "pearson"
        checked = [("schedule.plateau_metric", self.schedule.plateau_metric), ("run.best_metric", self.run.best_metric)]
        for key, value in checked:
            if value not in metrics:
                raise ConfigError(f"{key} must be one of {list(metrics)} for task.name={self.task.name}, not {value!r}")

    @property
    def view(self) -> View:
        """The row subset actually streamed."""
        if self.data.view:
            return self.data.view
        if self.model.name == "nad":
            return "nad"
        return "top" if self.task.name == "mlm" else "all"

    @property
    def tokens(self) -> Tokens:
        """The loader's token kind for this model."""
        if self.model.name in BIN_MODELS:
            return "onehot"
        return "nad" if self.model.name == "nad" else "kmer"

    def loader_config(self, split: str, training: bool, pin_memory: bool = False) -> LoaderConfig:
        """Stream settings for one split: shuffled equal batches for training, every row once for evaluation.

        ``pin_memory``: page-locked batches for a GPU rank. Evaluation reads with the same workers.
        """
        data = self.data
        return LoaderConfig(
            split=split, view=self.view, tokens=self.tokens,
            batch_size=data.batch_size if training else (data.eval_batch_size or data.batch_size),
            shuffle=training, shuffle_buffer=data.shuffle_buffer, drop_last=training,
            seed=self.run.seed, num_workers=data.num_workers, kmer_frame=data.kmer_frame,
            kmer_all_frames=data.kmer_all_frames, kmer_flank_bp=data.kmer_flank_bp, onehot_window=data.onehot_window, pin_memory=pin_memory,
            grad_accum=self.engine.grad_accum if training else 1, lanes=data.lanes,
        )


# --------------------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if is_choice(tp):
        return check_choice(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-4' (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan / inf slip past every range check of the sections
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """A ``cls`` instance from defaults updated by ``values``; unknown keys name themselves."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names), key=str)  # YAML keys may be ints or bools too
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known under {prefix or 'the root'}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            tp = hints[name]
            if dataclasses.is_dataclass(tp):
                kwargs[name] = _build(tp, values[name] if values[name] is not None else {}, key) if isinstance(
                    values[name], dict) or values[name] is None else _coerce(values[name], tp, key)
            else:
                kwargs[name] = _coerce(values[name], tp, key)
        # Missing fields take their declared defaults (the dataclass fills them in).
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (UserError, ValueError, TypeError) as error:  # a section class may still raise these: one error type out
        message = str(error)
        raise ConfigError(message if prefix and prefix in message else f"{prefix or 'config'}: {message}") from None


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``'optim.gsam.rho_max=0.05'`` -> ``{'optim': {'gsam': {'rho_max': 0.05}}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_reason(error)})") from None
    out: dict = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _yaml_reason(error: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        text = read_input(path, "a YAML config file", ConfigError).decode()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> dict:
    """The mapping in YAML config text read from ``source`` (named in errors)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({_yaml_reason(error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config file must hold a mapping of sections, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- YAML file <- dotted overrides, checked."""
    values: dict = read_yaml(path) if path else {}
    return config_from_mapping(values, overrides, str(path) if path else "")


def config_from_mapping(values: dict, overrides: list[str] = (), source: str = "") -> TrainConfig:
    """Defaults <- ``values`` (a YAML file's mapping, read from ``source``) <- dotted overrides, checked."""
    for text in overrides:
        values = _merge(values, parse_override(text))
    if source:
        try:
            return _build(TrainConfig, values)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    return _build(TrainConfig, values)


def config_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists) of a config tree, for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def dump_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML, in field order."""
    return yaml.safe_dump(config_dict(config), sort_keys=False)


STAGE3_GPU_PERSISTENCE = 100_000
"""ZeRO-3 on GPUs: parameters up to this many elements stay gathered between steps (DeepSpeed's own
default), so biases, norms and position tables are not all-gathered on every module call."""


def to_deepspeed(config: TrainConfig, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed config dict for this run; everything in it comes from ``config``.

    ``device_type`` ("cuda" or "cpu") picks what suits the ranks' devices: on GPUs reductions
    overlap the backward pass (on a stream of their own), small ZeRO-3 parameters stay gathered and
    offloaded optimizer states live in pinned memory; CPU ranks over gloo keep what was measured to
    work there (no overlap, every parameter partitioned, pageable memory).
    """
    engine = config.engine
    gpu = device_type == "cuda"
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.zero_stage in (1, 2):
        zero.update(reduce_bucket_size=engine.reduce_bucket_size, allgather_bucket_size=engine.reduce_bucket_size,
                    overlap_comm=gpu, contiguous_gradients=True)
    if engine.zero_stage == 3:
        zero.update(reduce_bucket_size=engine.reduce_bucket_size, overlap_comm=gpu,
                    stage3_param_persistence_threshold=STAGE3_GPU_PERSISTENCE if gpu else 0)
    if engine.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    out_dir = str(Path(config.run.out_dir).resolve())
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": config.data.batch_size * engine.grad_accum * world_size,
        # DeepSpeed >= 0.19.3 clips at 1.0 unless told otherwise; 0 turns clipping off.
        "gradient_clipping": engine.gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints would duplicate it
        "wall_clock_breakdown": False,
        "seed": config.run.seed,
        "tensorboard": {"enabled": engine.tensorboard, "output_path": f"{out_dir}/monitor", "job_name": "tensorboard"},
        "csv_monitor": {"enabled": engine.csv, "output_path": f"{out_dir}/monitor", "job_name": "csv"},
    }
    # bf16 runs as autocast over fp32 weights (inside the model: engine.autocast_forward), not DeepSpeed's bf16 weights:
    # BatchNorm running statistics and the frozen GloVe table are fp32 buffers DeepSpeed would not
    # cast, and bf16 weights swallow GSAM's small perturbation. The models are small; compute is bf16.
    if engine.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if config.optim.name == "lion":
        # DeepSpeed lists the optimizers its ZeRO stages were tested with; Lion (lion-pytorch) steps on the same
        # flat fp32 partitions as AdamW does and is checked against one process by the tests.
        ds["zero_allow_untested_optimizer"] = True
    return ds
