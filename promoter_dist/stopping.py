"""A request to checkpoint and stop at the next step boundary (preemption, time limit).

The launch code that installs a signal handler owns one :class:`StopRequest` and passes
it to the trainer; the handler sets it on whichever rank got the signal, and the trainer
asks every step whether any rank has one (a collective, so all ranks save the same step
and stop together). A trainer given no request never checks, and pays nothing for it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any


@dataclass
class StopRequest:
    """Set from a signal handler; read by the trainer at each step boundary."""

    requested: bool = False
    """This process received the request."""
    signal_name: str = ""
    """The signal that carried it, for the log."""

    def request(self, signum: int | None = None, frame: Any = None) -> None:
        """Signal-handler signature: ask for a checkpoint and a stop (async-signal safe)."""
        self.requested = True
        self.signal_name = signal.Signals(signum).name if signum is not None else "request"
