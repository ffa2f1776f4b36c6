"""Non-finite losses and weights in the real trainer (one in-process DeepSpeed rank on the CPU).

A subclass of the Trainer returns a NaN loss at one chosen step (and micro batch): ``engine.nonfinite=stop``
stops with a clear error and leaves only checkpoints from before; ``skip`` drops the step without touching
the weights (even when the NaN comes after an accumulated micro batch) and trains on. Weights that hold
NaN are never written into a checkpoint.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from promoter_dist.config import load_config
from promoter_dist.errors import NonFiniteLossError, UserError

REPO = Path(__file__).resolve().parents[1]
NAN_STEP = 3


@pytest.fixture(scope="module")
def env(lone_process_group):
    """A single-process DeepSpeed group, as ``python train.py`` gets."""
    assert (lone_process_group.rank, lone_process_group.world_size) == (0, 1)
    return lone_process_group


def tiny_config(shards: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "nad" / "debug.yaml", [
        f"data.shards={shards}", f"run.out_dir={out}", "data.glove=", "data.batch_size=16",
        "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2", "model.nad.head_dim=8",
        "run.max_steps=6", "run.log_every=1", "run.checkpoint_every=2", "run.plots=false",
        "engine.tensorboard=false", "engine.csv=false", *extra])


def make_trainer(env, config, nan_step: int | None = NAN_STEP, nan_micro: int = 0):
    from promoter_dist.trainer import Trainer

    class NaNTrainer(Trainer):
        """Returns a NaN loss on micro batch ``nan_micro`` of step ``nan_step``; snapshots weights before each step."""

        def __init__(self, *args, **kwargs):
            self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
            self.calls: dict[int, int] = defaultdict(int)
            super().__init__(*args, **kwargs)

        def train_step(self, micro_batches, *rest):
            self.snapshots[self.step] = weights(self)
            return super().train_step(micro_batches, *rest)

        def forward_loss(self, batch, micro=0):
            loss = super().forward_loss(batch, micro)
            index = self.calls[self.step]
            self.calls[self.step] += 1
            if self.step == nan_step and index == nan_micro:
                return loss * float("nan")
            return loss

    return NaNTrainer(config, env)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def tag_dirs(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoints").iterdir() if p.is_dir()}


# --------------------------------------------------------------------------- stop


def test_stop_raises_naming_the_step_and_keeps_the_checkpoint_before(env, small_shards, tmp_path):
    from promoter_dist.checkpointing import fp32_state_dict

    out = tmp_path / "run"
    trainer = make_trainer(env, tiny_config(small_shards, out, "engine.nonfinite=stop"))
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.train()
    error = caught.value
    assert error.step == NAN_STEP + 1 and math.isnan(error.loss)  # steps are numbered from 1 in logs and tags
    assert f"at step {NAN_STEP + 1}" in str(error) and "engine.nonfinite=skip" in str(error)
    assert trainer.step == NAN_STEP  # the step was not counted

    # The periodic checkpoint of step 2 is the latest; nothing was written at or after the NaN.
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    assert tag_dirs(out) == {"step00000002"}
    saved = fp32_state_dict(out, "latest")
    assert all_finite(saved)
    before_nan = trainer.snapshots[2]  # the weights after two steps: what the checkpoint holds
    for name, value in before_nan.items():
        assert torch.equal(saved[name], value), name
    # The NaN step was not applied to the weights in memory either.
    assert same(weights(trainer), trainer.snapshots[NAN_STEP])
    assert all_finite(weights(trainer))


# --------------------------------------------------------------------------- skip


@pytest.fixture(scope="module")
def skipped_run(env, small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("skip") / "run"
    trainer = make_trainer(env, tiny_config(small_shards, out, "engine.nonfinite=skip"))
    result = trainer.train()
    return trainer, result, out


@pytest.mark.slow
def test_skip_leaves_the_weights_of_the_skipped_step_and_trains_on(skipped_run):
    from promoter_dist.checkpointing import fp32_state_dict

    trainer, result, out = skipped_run
    assert result["steps"] == 6 and result["skipped_steps"] == 1
    assert trainer.skipped_steps == 1
    snaps = trainer.snapshots
    assert sorted(snaps) == list(range(6))
    assert not same(snaps[NAN_STEP - 1], snaps[NAN_STEP])  # ordinary steps move the weights
    assert same(snaps[NAN_STEP], snaps[NAN_STEP + 1])  # the skipped one does not
    assert not same(snaps[NAN_STEP + 1], snaps[NAN_STEP + 2])  # and training goes on after it
    assert not same(snaps[5], weights(trainer))
    assert all_finite(weights(trainer))
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    assert all_finite(fp32_state_dict(out, "latest"))


@pytest.mark.parametrize("stage", [0, 2])
def test_skip_on_the_second_micro_batch_discards_the_first_ones_gradient(env, small_shards, tmp_path, stage):
    """grad_accum=2, NaN on micro batch 2 of step 2 after micro batch 1 went backward; and the NaN on
    micro batch 1, whose NaN gradient is accumulated before the step's one finiteness check.

    Both runs then train on identical batches, so their weights must stay identical if each run's
    half-accumulated gradient (finite in one, NaN in the other) was really dropped. Label noise is off
    so the two runs draw the same random numbers.
    """
    nan_step = 2
    extra = ["engine.nonfinite=skip", "engine.grad_accum=2", f"engine.zero_stage={stage}", "task.label_noise=0",
             "run.max_steps=4", "run.checkpoint_every=0"]
    late = make_trainer(env, tiny_config(small_shards, tmp_path / "late", *extra), nan_step, nan_micro=1)
    late.train()
    assert late.calls[nan_step] == 2  # micro batch 1 did go forward (and backward) before the NaN
    assert late.skipped_steps == 1
    assert same(late.snapshots[nan_step], late.snapshots[nan_step + 1])
    early = make_trainer(env, tiny_config(small_shards, tmp_path / "early", *extra), nan_step, nan_micro=0)
    early.train()
    assert early.calls[nan_step] == 2 and early.skipped_steps == 1  # checked once, after the last forward
    assert same(early.snapshots[nan_step], early.snapshots[nan_step + 1])
    assert same(late.snapshots[nan_step], early.snapshots[nan_step])  # identical up to the NaN step
    assert not same(late.snapshots[nan_step + 1], weights(late))  # step 3 did train
    final_late, final_early = weights(late), weights(early)
    for name in final_late:
        assert torch.allclose(final_late[name], final_early[name], rtol=0, atol=1e-6), name


# --------------------------------------------------------------------------- NaN weights


@pytest.mark.slow
def test_nan_weights_are_never_checkpointed(skipped_run):
    trainer, _, out = skipped_run
    ckpt = out / "checkpoints"
    latest, best = ckpt / "latest", ckpt / "best"
    latest_before = latest.read_text()
    best_before = best.read_text() if best.exists() else None
    dirs_before = tag_dirs(out)
    with torch.no_grad():
        next(trainer.engine.module.parameters()).view(-1)[0] = float("nan")
    trainer.step = 8
    for as_best in (False, True):
        with pytest.raises(UserError) as caught:
            trainer.save_checkpoint(best=as_best)
        message = str(caught.value)
        assert "NaN" in message and "step 8" in message and "\n" not in message, message
    assert latest.read_text() == latest_before
    assert (best.read_text() if best.exists() else None) == best_before
    assert tag_dirs(out) == dirs_before


# --------------------------------------------------------------------------- stop requests


def test_a_stop_request_checkpoints_the_step_in_progress_and_the_rerun_continues(env, small_shards, tmp_path):
    """A request set during step 2 (as a signal handler would) stops after step 2 with its checkpoint;
    the same config run again resumes there and finishes; the best record is the trainer's own."""
    from promoter_dist.checkpointing import read_best_record
    from promoter_dist.stopping import StopRequest
    from promoter_dist.trainer import Trainer

    out = tmp_path / "run"
    config = tiny_config(small_shards, out, "run.checkpoint_every=0", "run.eval_every=3")
    stop = StopRequest()

    class SignalledTrainer(Trainer):
        def train_step(self, micro_batches, *rest):
            if self.step == 1:
                stop.request()
            return super().train_step(micro_batches, *rest)

    first = SignalledTrainer(config, env, stop).train()
    assert first["stopped_at_step"] == 2 and first["steps"] == 2 and first["last"] is None
    assert stop.signal_name == "request"
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"

    second = Trainer(config, env).train()  # no request object: never checks
    assert second["stopped_at_step"] is None and second["steps"] == 6
    assert second["last"]["step"] == 6
    assert read_best_record(out) == second["best"]
    assert second["best"]["pearson"] == max(r["pearson"] for r in
                                            (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
                                            if r["kind"] == "val")


# --------------------------------------------------------------------------- host synchronisation


def test_a_step_reads_the_device_once_and_holds_one_collective(env, small_shards, tmp_path, monkeypatch):
    """Our side of an optimizer step over two micro batches: one agreement (one collective) and one
    device-to-host read; every tensor read to the host (``item``, ``tolist``, ``float``, ``bool``)
    outside DeepSpeed's own backward and step is counted, as each drains a GPU's queue."""
    from promoter_dist import distributed
    from promoter_dist.stopping import StopRequest
    from promoter_dist.trainer import Trainer

    counts: dict[str, int] = defaultdict(int)
    inside = {"step": False, "engine": False}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            if inside["step"] and not inside["engine"]:
                counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    for name in ("agree_on_step", "any_rank", "raise_together", "finite_global_sum",
                 "all_reduce_mean", "all_reduce_max", "all_reduce_sum_"):
        monkeypatch.setattr(distributed, name, counted(name, getattr(distributed, name)))
    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(f"Tensor.{name}", getattr(torch.Tensor, name)))

    class CountingTrainer(Trainer):
        steps_counted = 0

        def train_step(self, micro_batches, *rest):
            if self.steps_counted == 0:  # DeepSpeed's own reads are not ours to count
                for method in ("backward", "step"):
                    def outside(*args, _bound=getattr(self.engine, method), **kwargs):
                        inside["engine"] = True
                        try:
                            return _bound(*args, **kwargs)
                        finally:
                            inside["engine"] = False
                    setattr(self.engine, method, outside)
            inside["step"] = True
            try:
                return super().train_step(micro_batches, *rest)
            finally:
                inside["step"] = False
                self.steps_counted += 1

    config = tiny_config(small_shards, tmp_path / "run", "engine.grad_accum=2", "run.log_every=100",
                         "run.checkpoint_every=0", "run.max_steps=3")
    trainer = CountingTrainer(config, env, StopRequest())  # with a request object, as under SLURM
    trainer.train()
    steps = trainer.steps_counted
    assert steps == 3
    # agree_on_step itself reads its packed vector once (tolist) and calls all_reduce_sum_ once.
    assert dict(counts) == {"agree_on_step": steps, "Tensor.tolist": steps, "all_reduce_sum_": steps}, dict(counts)


def test_a_batch_that_fails_to_load_mid_run_ends_the_step_before_it_reaches_the_weights(env, small_shards, tmp_path):
    """A load error after the first step: the batch already seen stands in for the missing micro batches
    (so a rank's collectives match its peers'), and the error is raised at the step's agreement,
    before the optimizer step: the weights are those of the step before."""
    out = tmp_path / "run"
    config = tiny_config(small_shards, out, "engine.grad_accum=2", "run.checkpoint_every=0")

    def failing(batches):
        for i, batch in enumerate(batches):
            if i == 5:  # the second micro batch of step 3
                raise UserError("shards/train-000000.tar: block 3 at byte 4096: checksum mismatch")
            yield batch

    trainer = make_trainer(env, config, nan_step=None)
    groups = trainer.micro_batch_groups
    trainer.micro_batch_groups = lambda batches: groups(failing(batches))
    with pytest.raises(UserError, match="block 3 at byte 4096: checksum mismatch"):
        trainer.train()
    assert trainer.step == 2 and trainer.calls[2] == 2  # step 3 ran both forwards, one on the stand-in batch
    assert same(weights(trainer), trainer.snapshots[2])
