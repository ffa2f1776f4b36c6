"""The trainer: one training step readable top to bottom, in small named pieces.

``Trainer.train()`` runs epochs of ``train_step`` (micro batches -> forward/backward ->
optimizer step), validates, and asks its components for the rest: checkpoints
(:class:`~promoter_dist.checkpointing.CheckpointManager`: save, prune, resume exactly; the
end-of-run export, :func:`~promoter_dist.checkpointing.export_for_task`), records
(:class:`~promoter_dist.records.MetricsLog`; the best validation predictions,
:func:`~promoter_dist.records.write_best_predictions`), collectives (:mod:`promoter_dist.distributed`) and the engine (:mod:`promoter_dist.engine`). Models and
tasks know nothing of DeepSpeed. A :class:`~promoter_dist.stopping.StopRequest`, when the
launch code passes one, makes every rank checkpoint the step in progress and stop together.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import torch

from . import distributed as dist
from .checkpointing import LATEST, CheckpointManager, TrainShape, export_for_task
from .config import TrainConfig, config_dict, dump_yaml
from .data.loader import ShardLoader
from .engine import build_engine, set_beta1, set_learning_rate
from .errors import NonFiniteLossError, UserError
from .io import atomic_open, check_output_folder
from .launch.environment import DistEnv
from .models.common import count_parameters
from .optim.engine_grads import zero_engine_gradients
from .records import MetricsLog, setup_logging, write_best_predictions
from .schedules import ONE_CYCLE, Plateau, lr_at, one_cycle_momentum, span_steps
from .stopping import StopRequest
from .tasks import build_task

log = logging.getLogger("promoter_dist")

Batch = dict[str, torch.Tensor]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Builds model, engine and loaders from one config and trains them."""

    def __init__(self, config: TrainConfig, env: DistEnv, stop: StopRequest | None = None):
        self.config, self.env, self.stop = config, env, stop
        # Checked before anything is written: a file or an unwritable folder is one line, not a traceback.
        self.out_dir = check_output_folder(config.run.out_dir, "run.out_dir")
        setup_logging(self.out_dir, env.rank)
        self.write_config()

        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        self.task = build_task(config)
        model = self.task.build_model()
        self.parameter_count = count_parameters(model, trainable_only=True)
        log.info("model %s for task %s: %s trainable parameters", config.model.name, config.task.name,
                 f"{self.parameter_count:,}")
        self.device = dist.device()
        self.engine = build_engine(model, config, env.world_size, self.device)

        pin = self.device.type == "cuda"  # page-locked batches: the copy to the GPU overlaps compute
        with dist.failing_together():  # an unreadable shard folder on one node ends every rank
            self.train_loader = ShardLoader(config.data.shards,
                                            config.loader_config(config.data.train_split, True, pin),
                                            env.rank, env.world_size)
            self.val_loader = None
            if config.data.val_split:
                self.val_loader = ShardLoader(config.data.shards,
                                              config.loader_config(config.data.val_split, False, pin),
                                              env.rank, env.world_size)
        self.grad_accum = config.engine.grad_accum
        self.steps_per_epoch = len(self.train_loader) // self.grad_accum
        if self.steps_per_epoch < 1:
            raise UserError(f"data.shards: {len(self.train_loader)} batches per rank is less than one optimizer step "
                            f"of engine.grad_accum={self.grad_accum} micro batches; lower data.batch_size")

        self.gsam = None
        if config.optim.gsam.enabled:
            from .optim.gsam_deepspeed import DeepSpeedGSAM

            # rho follows the rate between these two (plateau: down to final_factor x lr, then stays).
            lr_max = config.optim.lr
            lr_min = lr_max * config.schedule.final_factor if config.schedule.name != "constant" else lr_max
            self.gsam = DeepSpeedGSAM(self.engine, config.optim.gsam, lr_max=lr_max, lr_min=lr_min)
        self.plateau = None
        if config.schedule.name == "plateau":
            mode = "min" if config.schedule.plateau_metric == "loss" else "max"
            self.plateau = Plateau(config.schedule.plateau_factor, config.schedule.plateau_patience, mode)

        shape = TrainShape(env.world_size, config.engine.grad_accum, config.data.batch_size, config.engine.zero_stage)
        self.checkpoints = CheckpointManager(self.out_dir, env.rank, shape, config.run.keep_checkpoints)
        self.metrics = MetricsLog(self.out_dir, env.is_main, getattr(self.engine, "monitor", None))
        self.step = 0
        self.skipped_steps = 0
        self.stopped_at_step: int | None = None
        """The step whose checkpoint was written before stopping on request (None: not stopped)."""
        # This rank's finite train losses since the last train record: a record averages every step
        # of its window, across epoch ends and a resume from a checkpoint taken inside the window.
        self.log_window: dict[str, float] = {"loss_sum": 0.0, "steps": 0}
        self.best: dict[str, Any] | None = None
        self._fallback_batch: Batch | None = None
        self.stop_agreed = False
        """Some rank got a stop request, as agreed by every rank during the last step."""
        self.resume()

    # -- setup ----------------------------------------------------------------------------

    def write_config(self) -> None:
        """The resolved config beside the run (rank 0), so a run is reproducible from its folder."""
        if self.env.is_main:
            with atomic_open(self.out_dir / "config.yaml", "w") as f:
                f.write(dump_yaml(self.config))

    # -- one step -------------------------------------------------------------------------

    def forward_loss(self, batch: Batch, micro: int = 0) -> torch.Tensor:
        """Scalar training loss of micro batch ``micro`` of this rank's step (bf16 runs inside the model: see engine.py)."""
        self.seed_micro_batch(micro)
        return self.task.training_loss(self.engine, _to_device(batch, self.device))

    def seed_micro_batch(self, micro: int) -> None:
        """Random draws (dropout, label noise, masking) keyed by the step and the micro batch's place in the
        global batch, not by rank: a run resumed on another shape with the same micro batches draws the
        same numbers. GSAM's two passes over a micro batch draw the same ones too."""
        position = self.env.rank * self.grad_accum + micro
        key = np.random.SeedSequence([self.config.run.seed, self.step, position]).generate_state(1, np.uint64)[0]
        torch.manual_seed(int(key))

    def train_step(self, micro_batches: list[Batch], load_error: UserError | None = None) -> float:
        """One optimizer step over ``grad_accum`` micro batches; returns the mean loss over ranks.

        ``load_error``: this rank's micro batches failed to load and ``micro_batches`` stand in for
        them, so that its collectives match the other ranks' until every rank raises together.
        """
        set_learning_rate(self.engine, self.learning_rate())
        self.cycle_momentum()
        if self.gsam is not None:
            dist.raise_together(load_error)
            numbered = list(enumerate(micro_batches))
            loss = float(self.gsam.step(numbered, lambda item: self.forward_loss(item[1], item[0])))
            self.stop_agreed = self.stop_requested()
            return loss
        return self.accumulate(micro_batches, load_error)

    def accumulate(self, micro_batches: list[Batch], load_error: UserError | None) -> float:
        """Forward and backward of each micro batch; the engine steps the optimizer after the last.

        The common path holds one collective and one host synchronisation per optimizer step
        (``dist.agree_on_step``), just before the last backward, which in DeepSpeed reduces the
        gradients and applies the optimizer: a non-finite loss on any rank, a failed load or a
        stop request is known to every rank before anything reaches the weights. Earlier micro
        batches' gradients are only accumulated, and a skipped step discards them.
        """
        losses: list[torch.Tensor] = []
        last = len(micro_batches) - 1
        loss_mean = math.nan
        for i, batch in enumerate(micro_batches):
            loss = self.forward_loss(batch, i)
            losses.append(loss.detach())
            if i == last:
                agreed = dist.agree_on_step(torch.stack(losses), self.stop is not None and self.stop.requested,
                                            load_error is not None)
                self.stop_agreed = agreed.stop_ranks > 0
                if agreed.failed_ranks:
                    dist.raise_together(load_error)
                if agreed.nonfinite_ranks:
                    raise NonFiniteLossError(self.step + 1, agreed.loss_mean)
                loss_mean = agreed.loss_mean
            self.engine.backward(loss)
            self.engine.step()  # applies the optimizer only at the accumulation boundary
        return loss_mean

    def learning_rate(self) -> float:
        """The rate for the current step: a pure function of the step, or the plateau scale."""
        s, base = self.config.schedule, self.config.optim.lr
        rate = lr_at(self.step, base_lr=base, steps_per_epoch=self.steps_per_epoch, name=s.name,
                     warmup_steps=s.warmup_steps, decay_epochs=s.decay_epochs, final_factor=s.final_factor,
                     per_epoch=s.per_epoch, decay_steps=s.decay_steps, pct_start=s.one_cycle.pct_start,
                     div_factor=s.one_cycle.div_factor, final_div_factor=s.one_cycle.final_div_factor)
        return rate * (self.plateau.scale if self.plateau is not None else 1.0)

    def cycle_momentum(self) -> None:
        """Under schedule one_cycle with cycle_momentum, the step's beta1 on the optimizer (as torch's OneCycleLR)."""
        s = self.config.schedule
        if s.name != ONE_CYCLE or not s.one_cycle.cycle_momentum:
            return
        total = span_steps(self.steps_per_epoch, s.decay_epochs, s.decay_steps)
        set_beta1(self.engine, one_cycle_momentum(self.step, total_steps=total, pct_start=s.one_cycle.pct_start,
                                                  base_momentum=s.one_cycle.base_momentum,
                                                  max_momentum=s.one_cycle.max_momentum))

    def discard_step(self, micro_steps_before: int) -> None:
        """Drop a half-done step: clear accumulated gradients and the engine's micro-step count."""
        zero_engine_gradients(self.engine)
        self.engine.micro_steps = micro_steps_before

    # -- the loop -------------------------------------------------------------------------

    def micro_batch_groups(self, batches: Iterator[Batch]) -> Iterator[tuple[list[Batch], UserError | None]]:
        """The rest of this epoch's steps as (``grad_accum`` micro batches, this rank's load error or None).

        A batch that fails to load on one rank (a corrupt block) ends every rank together: at
        the step's one agreement, with a batch this rank has seen standing in for the missing
        ones; before any batch was seen, at once, with a collective of its own.
        """
        done = self.train_loader.step // self.grad_accum
        for _ in range(done, self.steps_per_epoch):
            group: list[Batch] = []
            error: UserError | None = None
            try:
                group.extend(next(batches) for _ in range(self.grad_accum))
            except UserError as caught:
                error = caught
            if self._fallback_batch is None:
                dist.raise_together(error)
                self._fallback_batch = group[0]
            if error is not None:
                group += [self._fallback_batch] * (self.grad_accum - len(group))
            yield group, error

    def train(self) -> dict[str, Any]:
        """Run to the configured end, or to a requested stop; returns what happened.

        ``best``: the best validation record; ``last``: the newest one (None when stopped early);
        ``steps``, ``skipped_steps``, ``parameters``; ``stopped_at_step``: the step whose
        checkpoint was written before stopping on request, None when the run finished.
        """
        run = self.config.run
        self.engine.train()
        finished = self.max_steps_reached()
        while not finished and self.train_loader.epoch < run.epochs:
            finished = self.train_epoch()
        result = {"best": self.best, "last": None, "steps": self.step, "skipped_steps": self.skipped_steps,
                  "parameters": self.parameter_count, "stopped_at_step": self.stopped_at_step}
        if self.stopped_at_step is not None:  # the rerun finishes the run
            return result
        if self.env.is_main:
            log.info("done: %d steps, %d skipped; best %s", self.step, self.skipped_steps, self.best)
            if run.plots:
                self.metrics.plot(run.out_dir)
            self.export()
        dist.barrier()
        return {**result, "last": self.metrics.last("val")}

    def max_steps_reached(self) -> bool:
        return bool(self.config.run.max_steps) and self.step >= self.config.run.max_steps

    def train_epoch(self) -> bool:
        """Steps to the end of the current epoch (or max_steps); True when the run should stop."""
        run = self.config.run
        epoch = self.train_loader.epoch
        batches = iter(self.train_loader)
        timed_steps, window_start = 0, time.perf_counter()  # for samples/s: steps since this process started the window
        for group, load_error in self.micro_batch_groups(batches):
            micro_steps_before = self.engine.micro_steps
            try:
                loss = self.train_step(group, load_error)
            except NonFiniteLossError as error:
                if self.config.engine.nonfinite == "stop":
                    log.error("%s", error)
                    raise
                self.discard_step(micro_steps_before)
                self.skipped_steps += 1
                log.warning("step %d skipped: %s; %d skipped so far", self.step + 1, error, self.skipped_steps)
                loss = float("nan")
            self.step += 1
            timed_steps += 1
            if math.isfinite(loss):
                self.log_window["loss_sum"] += loss
                self.log_window["steps"] += 1
            if self.step % run.log_every == 0:
                elapsed = time.perf_counter() - window_start
                samples = timed_steps * self.config.data.batch_size * self.grad_accum * self.env.world_size
                window = self.log_window
                mean_loss = dist.all_reduce_mean(window["loss_sum"] / window["steps"] if window["steps"] else float("nan"))
                self.metrics.record({"kind": "train", "step": self.step, "epoch": epoch,
                             "loss": mean_loss, "lr": self.learning_rate(),
                             "samples_per_s": samples / elapsed})
                self.log_window = {"loss_sum": 0.0, "steps": 0}
                timed_steps, window_start = 0, time.perf_counter()
            stopping = self.max_steps_reached()
            if (run.eval_every and self.step % run.eval_every == 0) or stopping:
                self.validate(epoch)
            periodic = bool(run.checkpoint_every) and self.step % run.checkpoint_every == 0
            if periodic or stopping:
                self.save_checkpoint()
            if stopping:
                return True
            if self.stop_agreed:  # preemption or time limit on some rank: save this step and stop here
                if not periodic:
                    self.save_checkpoint()
                self.stopped_at_step = self.step
                log.warning("stop requested (%s): checkpoint step%08d written; stopping before step %d",
                            self.stop.signal_name or "another rank", self.step, self.step + 1)
                return True
        for _ in batches:  # micro batches that do not fill a step: consumed so the epoch advances
            pass
        if not (run.eval_every and self.step % run.eval_every == 0):
            self.validate(epoch)
        if not (run.checkpoint_every and self.step % run.checkpoint_every == 0):
            self.save_checkpoint()
        if self.env.is_main and self.config.run.plots:
            self.metrics.plot(run.out_dir)
        return False

    def stop_requested(self) -> bool:
        """True on every rank when some rank got a stop request (no collective when none can come)."""
        return self.stop is not None and dist.any_rank(self.stop.requested)

    # -- validation -----------------------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Metrics over the whole validation split (all ranks), and the gathered outputs.

        Ranks may hold different numbers of validation batches, none included; a rank that has
        run out keeps pace with a throw-away forward at ZeRO-3, whose forward gathers weights
        from every rank. A batch that fails to load on one rank ends every rank together.
        """
        assert self.val_loader is not None
        rng = _rng_state()
        dist.average_norm_statistics(self.engine.module)
        self.engine.eval()
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        keep_pace = self.config.engine.zero_stage == 3
        batches = iter(self.val_loader)
        with torch.no_grad():
            while True:
                with dist.failing_together():
                    batch = next(batches, None)
                if not dist.any_rank(batch is not None):
                    break
                if batch is None:
                    if keep_pace:
                        self.task.evaluate_batch(self.engine, _to_device(self.pace_batch(), self.device))
                    continue
                for key, value in self.task.evaluate_batch(self.engine, _to_device(batch, self.device)).items():
                    parts[key].append(value.detach().cpu().reshape(-1))
                if self._fallback_batch is None:
                    self._fallback_batch = batch
        self.engine.train()
        _set_rng_state(rng)
        gathered = dist.gather_arrays({k: torch.cat(v).numpy() for k, v in parts.items()})
        return self.task.summarize(gathered), gathered

    def pace_batch(self) -> Batch:
        """A batch this rank has seen, for a forward whose output is thrown away."""
        if self._fallback_batch is None:  # e.g. validating right after resuming at an epoch's end
            loader = self.train_loader
            # Read in this process: any batch of this rank's will do, and no worker is forked for it.
            fresh = ShardLoader(loader.shard_dir, replace(loader.config, num_workers=0, pin_memory=False),
                                self.env.rank, self.env.world_size)
            self._fallback_batch = next(iter(fresh))
        return self._fallback_batch

    def validate(self, epoch: int) -> None:
        """Evaluate, log, step the plateau schedule and keep the best checkpoint."""
        if self.val_loader is None:
            return
        metrics, outputs = self.evaluate()
        record = {"kind": "val", "step": self.step, "epoch": epoch, **metrics}
        if self.plateau is not None:
            self.plateau.update(metrics.get(self.config.schedule.plateau_metric, float("nan")))
            record["lr_scale"] = self.plateau.scale
        self.metrics.record(record)
        key = self.config.run.best_metric
        value = metrics.get(key, float("nan"))
        better = self.best is None or (value < self.best[key] if key == "loss" else value > self.best[key])
        if math.isfinite(value) and better:
            self.best = record
            self.save_checkpoint(best=True)
            if self.env.is_main:
                write_best_predictions(self.out_dir, outputs, self.step, self.config.run.plots)

    def export(self) -> None:
        """The BERT models' Hugging Face folder in <out_dir>/export; the other models live in the checkpoint."""
        if self.config.model.name != "bert":
            return
        which = export_for_task(self.out_dir, self.task, self.out_dir / "export")
        if which is not None:
            log.info("exported the %s checkpoint to %s", which, self.out_dir / "export")

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Trainer state shared by all ranks (the engine saves model and optimizer)."""
        return {
            "step": self.step, "skipped_steps": self.skipped_steps, "best": self.best,
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "gsam": self.gsam.state_dict() if self.gsam else None,
            "config": config_dict(self.config), "world_size": self.env.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.skipped_steps, self.best = int(state["step"]), int(state["skipped_steps"]), state["best"]
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        if self.gsam is not None and state.get("gsam"):
            self.gsam.load_state_dict(state["gsam"])

    def rank_state(self) -> dict[str, Any]:
        """What differs by rank: loader position, RNG state and the loss window."""
        return {"loader": self.train_loader.state_dict(), "rng": _rng_state(), "rank": self.env.rank,
                "log_window": dict(self.log_window)}

    def save_checkpoint(self, best: bool = False) -> None:
        """This step's checkpoint on every rank (the best one carries its validation record)."""
        self.checkpoints.save(self.engine, self.step, self.state_dict(), self.rank_state(),
                              best=best, best_record=self.best if best else None)

    def resume(self) -> None:
        """Continue from <out_dir>/checkpoints/latest when it exists (run.resume=auto)."""
        latest = self.checkpoints.pointer(LATEST)
        if latest is None:
            self.metrics.start_fresh()
            return
        if self.config.run.resume == "never":
            raise UserError(f"{self.checkpoints.dir}: holds checkpoint {latest}; use a new run.out_dir or "
                            "run.resume=auto")
        resumed = self.checkpoints.resume(self.engine, config_dict(self.config),
                                          trust_pickle=self.config.run.trust_pickled_checkpoints)
        self.load_state_dict(resumed.trainer_state)
        self.train_loader.load_state_dict(resumed.rank_state["loader"])
        self.log_window = dict(resumed.rank_state.get("log_window", self.log_window))
        _set_rng_state(resumed.rank_state["rng"])
        self.metrics.resume_at(self.step)
        log.info("resumed from %s: step %d, epoch %d, batch %d", resumed.tag, self.step, self.train_loader.epoch,
                 self.train_loader.step)
