"""The preemption signal of a training task: first to the trainer, then to submitit.

sbatch is given ``--signal=USR2@<signal_delay_s>``. submitit's own handler for it calls the
job's ``checkpoint()`` and requeues the job on rank 0, and does nothing on the other ranks;
but a DeepSpeed save is collective, so the trainer must checkpoint on every rank before
that. :class:`PreemptionRelay` takes the signal on every rank and sets the task's
:class:`~promoter_dist.stopping.StopRequest`, which the trainer agrees on over all ranks at
the next step boundary; once the trainer has written that step's checkpoint and returned,
rank 0 hands over to submitit's handler (:meth:`PreemptionRelay.requeue`). Should the
trainer not reach a step boundary within the grace period, rank 0 requeues without that
checkpoint and the rerun resumes from the last periodic one.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

from ..stopping import StopRequest


def preemption_signal() -> int:
    """The signal submitit's task handles as preemption (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class PreemptionRelay:
    """Routes the preemption signal of a training task to the trainer's stop request, then to submitit.

    submitit's own handler (checkpoint() and requeue on rank 0, nothing elsewhere) is kept and
    called only once the trainer has stopped with a checkpoint, or after ``grace_s`` seconds.
    """

    def __init__(self, stop: StopRequest, signum: int, submitit_handler: Any, grace_s: float,
                 log: Callable[[str], None]):
        self.stop = stop
        self.signum = signum
        self.submitit_handler = submitit_handler
        self.grace_s = grace_s
        self.log = log
        self.timer: threading.Timer | None = None

    @classmethod
    def install(cls, stop: StopRequest, grace_s: float, log: Callable[[str], None]) -> PreemptionRelay:
        """Take over the preemption signal in this process; the handler installed before it is kept for later."""
        signum = preemption_signal()
        relay = cls(stop, signum, signal.getsignal(signum), grace_s, log)
        signal.signal(signum, relay.on_signal)
        return relay

    def on_signal(self, signum: int, frame: Any = None) -> None:
        """Signal handler: ask the trainer to checkpoint and stop; on the first signal, start the grace timer."""
        first = not self.stop.requested
        self.stop.request(signum, frame)
        self.log(f"{signal.Signals(signum).name}: preempted or at the time limit; the trainer checkpoints at the "
                 "next step and stops")
        if first and callable(self.submitit_handler) and self.grace_s > 0:
            # Rank 0 requeues anyway if the trainer cannot get to a step boundary in time; the
            # checkpoint pointer moves only after every rank wrote, so a half-written save is ignored.
            self.timer = threading.Timer(self.grace_s, self._requeue_without_checkpoint)
            self.timer.daemon = True
            self.timer.start()

    def _requeue_without_checkpoint(self) -> None:
        self.log(f"no checkpoint {self.grace_s:.0f} s after the signal: requeueing from the last periodic checkpoint")
        try:
            self.submitit_handler(self.signum, None)  # rank 0: requeue; SLURM then ends every task
        except SystemExit as exit_:  # raised in this thread, where it would end only the thread
            os._exit(exit_.code if isinstance(exit_.code, int) else 1)

    def requeue(self, rank: int, step: int) -> None:
        """The trainer wrote the checkpoint of ``step`` on every rank and stopped: rank 0 requeues.

        On rank 0 submitit's handler calls the job's ``checkpoint()``, pickles what it returns,
        requeues the job and exits; the other ranks return, end, and the requeue restarts them.
        """
        if self.timer is not None:
            self.timer.cancel()
        self.log(f"checkpoint of step {step} written on every rank"
                 + ("; requeueing" if rank == 0 else "; rank 0 requeues the job"))
        if rank == 0 and callable(self.submitit_handler):
            self.submitit_handler(self.signum, None)  # checkpoint() -> pickle -> requeue -> exit


__all__ = ["PreemptionRelay", "preemption_signal"]
