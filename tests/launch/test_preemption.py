"""The preemption relay in this process: USR2 sets the task's stop request, then rank 0 hands over to submitit."""

from __future__ import annotations

import os
import signal
import time

import pytest

from promoter_dist.launch.preemption import PreemptionRelay, preemption_signal
from promoter_dist.stopping import StopRequest


@pytest.fixture
def submitit_handler(monkeypatch):
    """A stand-in for submitit's USR2 handler (what the relay takes over), restored afterwards."""
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def _send_usr2(stop: StopRequest) -> None:
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)


def test_preemption_signal_follows_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert preemption_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preemption_signal() == signal.SIGUSR1


def test_the_signal_sets_the_relays_stop_request_and_rank_0_requeues_after_the_checkpoint(submitit_handler):
    stop, other = StopRequest(), StopRequest()
    lines: list[str] = []
    relay = PreemptionRelay.install(stop, grace_s=0, log=lines.append)
    assert not stop.requested
    _send_usr2(stop)
    assert stop.requested and stop.signal_name == "SIGUSR2"
    assert not other.requested  # the request belongs to this relay's task, no one else's
    assert lines == ["SIGUSR2: preempted or at the time limit; the trainer checkpoints at the next step and stops"]
    assert submitit_handler == []  # the trainer checkpoints first; submitit's handler waits for it
    relay.requeue(rank=1, step=7)
    assert submitit_handler == [] and lines[-1] == "checkpoint of step 7 written on every rank; rank 0 requeues the job"
    relay.requeue(rank=0, step=7)
    assert submitit_handler == [signal.SIGUSR2]
    assert lines[-1] == "checkpoint of step 7 written on every rank; requeueing"


def test_without_a_checkpoint_in_time_rank_0_requeues_once_the_grace_period_is_over(submitit_handler):
    stop = StopRequest()
    lines: list[str] = []
    relay = PreemptionRelay.install(stop, grace_s=0.2, log=lines.append)
    _send_usr2(stop)
    _send_usr2(stop)  # a second signal starts no second timer
    deadline = time.monotonic() + 5
    while not submitit_handler and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert submitit_handler == [signal.SIGUSR2]
    assert "no checkpoint 0 s after the signal: requeueing from the last periodic checkpoint" in lines
    assert relay.timer is not None and not relay.timer.is_alive()


def test_a_checkpoint_in_time_cancels_the_grace_timer(submitit_handler):
    stop = StopRequest()
    relay = PreemptionRelay.install(stop, grace_s=0.3, log=lambda line: None)
    _send_usr2(stop)
    relay.requeue(rank=1, step=3)  # a rank other than 0: it only stops its timer
    time.sleep(0.5)
    assert submitit_handler == []
