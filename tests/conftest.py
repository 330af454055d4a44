"""Hooks and fixtures; the functions and constants tests share are in helpers.py."""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT, run_main, tiny_checkpoint

# two cores: two torch threads in one process, or one in each of pytest-xdist's two workers (make test: -n 2)
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)

# caches the suite fills (measured latency cells, mypy's) stay in the checkout's ignored .test-cache/, never
# in the home folder; set before slim2deploy is imported (its default cache folder is read at import)
os.environ["XDG_CACHE_HOME"] = str(ROOT / ".test-cache")
# matplotlib creates its config folder (~/.config/matplotlib) even with nothing to write there; children inherit both
os.environ["MPLCONFIGDIR"] = str(ROOT / ".test-cache" / "matplotlib")
# Hypothesis' failing examples and constants too (read when used; it would make .hypothesis/ in the working directory)
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(ROOT / ".test-cache" / "hypothesis")

_CHILD_PROCESS = re.compile(r"\b(run_cli|torchrun|run_script|subprocess\.run|subprocess\.Popen)\(")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that run the real CLI (or torchrun, or a script) in a child process ``subprocess``, so a
    quick run can leave them out (``-m "not subprocess"``; ``make test`` runs everything), and skip ``gpu``
    tests where there is no CUDA GPU."""
    import inspect

    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            source = ""
        if _CHILD_PROCESS.search(source):
            item.add_marker(pytest.mark.subprocess)


@pytest.fixture(autouse=True)
def _few_threads():
    """Two torch threads in each test; a streamed folder's workers a test leaves running are stopped when it
    ends (as a command stops them), not by a later test's garbage collection, where torch waits 5 s for each."""
    import torch

    from slim2deploy.cli import stop_loader_workers

    torch.set_num_threads(THREADS)
    yield
    stop_loader_workers()


@pytest.fixture(scope="session")
def blobs_npz(tmp_path_factory):
    """A small learnable dataset as .npz: 4 classes of 1x16x16 uint8 images with class-specific bright quarters."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 512
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 80, (n, 1, 16, 16)).astype(np.uint8)
    for c, (r, q) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
        x[y == c, :, r : r + 8, q : q + 8] += 120
    path = tmp_path_factory.mktemp("blobs") / "blobs.npz"
    np.savez(path, x_train=x[:448], y_train=y[:448], x_val=x[448:], y_val=y[448:])
    return path


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``make_checkpoint(arch="vgg11", width=0.125, input_shape=(1, 28, 28), num_classes=10, meta=None,
    bn_seed=None, sparse_seed=None, path=None)``: a small slim2deploy checkpoint (``helpers.tiny_checkpoint``),
    made once per session for each set of arguments. The file returned is shared: read it, never change it or
    write beside it; ``path``: a copy there, the test's own."""
    made: dict[str, Path] = {}

    def make(arch: str = "vgg11", *, path: Path | None = None, **settings) -> Path:
        key = json.dumps([arch, settings], sort_keys=True)
        if key not in made:
            folder = tmp_path_factory.mktemp("checkpoint")
            made[key] = tiny_checkpoint(folder / f"{arch.replace(':', '-')}.pt", arch, **settings)
        if path is None:
            return made[key]
        shutil.copyfile(made[key], path)
        return Path(path)

    return make


@pytest.fixture
def cli():
    """Run ``slim2deploy ARGS`` in this process (``helpers.run_main``: the code the command runs, without seconds
    of start-up); returns (status, stdout, stderr)."""

    def run(*args: object) -> tuple[int, str, str]:
        proc = run_main(*args)
        return proc.returncode, proc.stdout, proc.stderr

    return run
