"""Ctrl-C during training: finish the step, save a checkpoint, stop; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import sys
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after saving a checkpoint; the message says where and how to continue."""


class StopOnInterrupt:
    """While active, the first SIGINT only sets `requested` (the loop checks it between steps)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        # Signal handlers can only be set from the main thread (library callers may train in another one).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nsdft: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
