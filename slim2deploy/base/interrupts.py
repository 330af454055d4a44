"""SIGTERM handled as SIGINT is: an exception that unwinds the stack, so every temporary folder,
half-written output and lock is cleaned up by the ``with`` block that made it.

The default SIGTERM action ends the process at once: profiling probes, export work folders, int8
calibration graphs and ``OUT/.lock`` would stay behind. ``Terminated`` is a ``KeyboardInterrupt``, so
code that already cleans up after Ctrl-C cleans up after ``kill`` too, and a DataLoader worker that
receives it leaves its loop as after Ctrl-C (its own temporary folder is removed on the way out).

An exception raised while a module is being imported can land inside a native library's own
initialisation (ONNX Runtime's pybind module runs Python while it starts): the library is left half made
and the import fails with "initialization failed" (measured: 2 of 80 signals sent during
``import onnxruntime``). So a signal that arrives during an import, or inside ``held()``, is held and
raised as soon as the import or the block is over (an import is checked again every ``RETRY_S`` seconds).
``held()`` is for the few lines between making a temporary file or folder and the ``try`` that removes
it: an exception raised in between would leave it behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

TERMINATED_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process that SIGTERM ended
RETRY_S = 0.05

_held: list[type[BaseException]] = []  # the interrupt that arrived at an unsafe moment, raised later
_holding = 0  # depth of held() blocks


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised where the main thread was, like KeyboardInterrupt for SIGINT."""


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise_or_hold(exc: type[BaseException], frame: FrameType | None) -> None:
    if _holding or _importing(frame):
        if not _held:
            _held.append(exc)
        if not _holding:
            signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    _held.clear()
    raise exc()


def _on_signal(exc: type[BaseException]) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        _raise_or_hold(exc, frame)

    return handler


def _retry(signum: int, frame: FrameType | None) -> None:
    if _held:
        _raise_or_hold(_held[0], frame)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGTERM and Ctrl-C wait until the block is over, then are raised where it ends."""
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
    if not _holding and _held:
        exc = _held[0]
        _held.clear()
        raise exc()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM raises ``Terminated`` and Ctrl-C ``KeyboardInterrupt``, never inside an import;
    the previous handlers are restored after it. A signal still held when the block ends is raised there.

    Outside the main thread (where Python cannot install handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal(Terminated)),
        signal.SIGALRM: signal.signal(signal.SIGALRM, _retry),
    }
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's own Ctrl-C, not a caller's
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal(KeyboardInterrupt))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        pending = _held[:1]
        _held.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pending:  # it came during the block's last import: the block ended before the retry
        raise pending[0]()
