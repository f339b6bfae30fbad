"""A graceful stop on SIGINT (Ctrl-C) and SIGTERM (what cluster schedulers send before they kill a job).

The first signal only sets a flag: the training loop finishes or abandons the step it is in, writes a
checkpoint of the last completed step and exits with one line saying how to resume. A second signal
exits at once, without a checkpoint. Signals that arrive within :data:`SAME_STOP_WINDOW_S` of the first
count as the same stop: under torchrun a Ctrl-C reaches every worker directly and then again as the
SIGTERM torchrun forwards, and neither should cost the checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_STOP_WINDOW_S = 2.0
"""Seconds after the first signal during which further signals belong to the same stop."""


class StopRequested:
    """Context manager that turns the first SIGINT / SIGTERM into a stop request.

    ``signum`` is the first signal received (None: no stop requested). Handlers are installed only in
    the main thread (Python delivers signals there) and the previous ones are restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            name = signal.Signals(signum).name
            print(
                f"\n{name}: stopping after the current step and writing a checkpoint; "
                "send it again to exit at once without one",
                file=sys.stderr,
                flush=True,
            )
            return
        if time.monotonic() - self._first_at < SAME_STOP_WINDOW_S:
            return
        print(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint", file=sys.stderr)
        raise SystemExit(128 + signum)

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
