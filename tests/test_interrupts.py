"""A signal that arrives while a module is imported is raised after it, never inside:
raised inside a native library's initialisation, it leaves the library half made ("initialization failed")."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import tempfile
import time

import pytest

from slim2deploy.base.files import temporary_folder
from slim2deploy.base.interrupts import Terminated, held, sigterm_as_interrupt

SLOW_MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.{name})
deadline = time.monotonic() + 0.3
while time.monotonic() < deadline:  # Python keeps running here, where a handler could raise
    pass
FINISHED = True
"""


@pytest.mark.parametrize(("name", "exc"), [("SIGTERM", Terminated), ("SIGINT", KeyboardInterrupt)])
def test_a_signal_during_an_import_is_raised_once_the_import_is_over(tmp_path, monkeypatch, name, exc):
    module_name = f"slow_to_import_{name.lower()}"
    (tmp_path / f"{module_name}.py").write_text(SLOW_MODULE.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    with pytest.raises(exc), sigterm_as_interrupt():
        module = importlib.import_module(module_name)
        assert module.FINISHED
        time.sleep(5)  # the held signal is raised here, within a retry
        pytest.fail("the held signal was never raised")
    assert sys.modules[module_name].FINISHED and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_handlers_are_restored_and_nothing_is_held_after_the_block():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_inside_held_is_raised_when_the_block_ends():
    steps = []
    with pytest.raises(Terminated), sigterm_as_interrupt():
        with held():
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:  # Python runs here, where a handler could raise
                pass
            steps.append("block finished")
        steps.append("after the block")
    assert steps == ["block finished"]


def test_a_temporary_folder_is_removed_whatever_ends_the_block(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(Terminated), sigterm_as_interrupt(), temporary_folder("probe-") as folder:
        (folder / "f").write_text("x")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert folder.parent == tmp_path and list(tmp_path.iterdir()) == []


def test_a_signal_still_held_when_the_block_ends_is_raised_there(tmp_path, monkeypatch):
    module_name = "slow_to_import_at_the_end"
    (tmp_path / f"{module_name}.py").write_text(SLOW_MODULE.format(name="SIGTERM"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    steps = []
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            importlib.import_module(module_name)  # the block ends right after, before a retry
            steps.append("imported")
        steps.append("after the block")
    assert steps == ["imported"] and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
