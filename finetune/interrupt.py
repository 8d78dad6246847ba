"""Ctrl-C during training: finish the step, save a checkpoint, stop; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# Under torchrun/accelerate launch the launcher forwards the terminal's Ctrl-C to every worker a second time at
# once; a repeat this soon is that echo, not the user asking to stop at once.
ECHO_WINDOW_S = 3.0


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after saving a checkpoint; the message says where and how to continue."""


class StopOnInterrupt:
    """While active, the first SIGINT only sets `requested` (the loop checks it between steps)."""

    def __init__(self) -> None:
        self.requested = False
        self._first_at = 0.0
        self._previous = None
        self._installed = False

    def __enter__(self) -> "StopOnInterrupt":
        # Signal handlers can only be set from the main thread (library callers may train in another one).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            # A handler not set from Python reads back as None: restore Python's default then.
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
            if launched and time.monotonic() - self._first_at < ECHO_WINDOW_S:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first_at = time.monotonic()
        print("\nsdft: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
