"""Stopping a run cleanly on a signal: SIGTERM (a scheduler's preemption or time-limit notice, which
torchrun forwards to its workers) or SIGINT (Ctrl-C).

The signal only sets a flag. TrainLoop finishes the optimizer step it is in, every process learns
whether any process was signalled (one all-reduce of two integers per step), a checkpoint of that
step is written, and `TrainingStopped` is raised naming it; `--resume auto` continues exactly there.
A second SIGINT stops at once (KeyboardInterrupt). Handlers are installed only while `fit` runs,
from the main thread, and the previous ones are restored after it. A signal the process ignores
(SIG_IGN: `nohup`, or a job a non-interactive shell starts in the background, which ignores
SIGINT) stays ignored, as Python itself leaves SIGINT alone when it starts ignored.
"""

from __future__ import annotations

import signal
import threading

import torch

from nemokern.parallel import all_reduce

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(RuntimeError):
    """A run stopped by a signal after a checkpoint; `signum` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """`with StopSignals() as s:` ... `s.agreed(device, active)`: the signal any process received
    (0 for none)."""

    def __init__(self):
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = self.received or signum

    def agreed(self, device: torch.device, distributed: bool) -> int:
        """The signal any process received (SIGTERM if some got SIGTERM and others SIGINT), 0 for
        none; the same on every process of the default group, all of which must call it."""
        if not distributed:
            return self.received
        got = torch.tensor([self.received == s for s in SIGNALS], dtype=torch.int64, device=device)
        all_reduce(got)  # how many processes received each signal
        return next((int(s) for s, n in zip(SIGNALS, got.tolist()) if n), 0)

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
