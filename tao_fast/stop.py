"""SIGTERM / SIGINT stop a run cleanly: after the step in progress, with a training state saved.

The recipe (tao_fast/tuning.py) installs `StopRequest.handling_signals` around the run, in the
main thread of a single process only (under torchrun every rank would have to stop at the same
step, and the default behaviour is kept there). The first signal sets a flag and says so; the
recipe looks at it after each step (it saves a state and raises RunStopped: `--resume RUN_DIR`
continues exactly there), at the end of each round, and every fraction of a second while it
waits for traffic (tao_fast/data/follow.py: then it stops at once). A second signal kills the
process at once, by the signal's default action (the atomic writers leave the newest complete
state in place). The previous handlers are put back when the run ends.

For the tests, TAO_FAST_SIGTERM_AT=STEP makes the run send itself SIGTERM in the middle of
global step STEP (after its rollouts, like TAO_FAST_KILL_AT's SIGKILL): a fixed place to be
asked to stop, however fast the steps run.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SLICE_S = 0.1  # a wait looks at the flag this often


class RunStopped(Exception):
    """The run stopped on a signal, cleanly; the message says where and how to continue."""


class StopRequest:
    """Whether SIGTERM / SIGINT asked the run to stop (`requested`, `name`)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @contextmanager
    def handling_signals(self):
        """SIGTERM and SIGINT set the flag while the block runs (main thread, one process);
        elsewhere the block runs with the handlers as they are."""
        if (threading.current_thread() is not threading.main_thread()
                or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: its default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"[tao-fast] {signal.Signals(signum).name}: stopping after the step in progress "
              f"(a training state is saved; a second signal stops at once)", file=sys.stderr,
              flush=True)

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds`, or less when a stop is asked for; returns whether one was."""
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(min(SLICE_S, max(0.0, end - time.monotonic())))
        return self.requested


def sigterm_at() -> int | None:
    """TAO_FAST_SIGTERM_AT=STEP: the global step in which the run sends itself SIGTERM."""
    spec = os.environ.get("TAO_FAST_SIGTERM_AT", "")
    return int(spec) if spec else None
