"""SIGTERM handled as SIGINT is: an exception that unwinds the stack, so every temporary folder,
half-written output and lock is cleaned up by the ``with`` block that made it.

The default SIGTERM action ends the process at once: profiling probes, export work folders, int8
calibration graphs and ``OUT/.lock`` would stay behind. ``Terminated`` is a ``KeyboardInterrupt``, so
code that already cleans up after Ctrl-C cleans up after ``kill`` too, and a DataLoader worker that
receives it leaves its loop as after Ctrl-C (its own temporary folder is removed on the way out).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

TERMINATED_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process that SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised where the main thread was, like KeyboardInterrupt for SIGINT."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM raises ``Terminated``; the previous handler is restored after it.

    Outside the main thread (where Python cannot install handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
