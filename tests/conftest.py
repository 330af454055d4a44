import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
# caches the suite fills (measured latency cells, mypy's) stay in the checkout's ignored .test-cache/, never
# in the home folder; set before slim2deploy is imported (its default cache folder is read at import)
os.environ["XDG_CACHE_HOME"] = str(ROOT / ".test-cache")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the real `slim2deploy` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "slim2deploy", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


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
    import torch

    torch.set_num_threads(2)
    yield


needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)


def write_image_folder(root: Path, images: int, size: int, classes: int = 4, seed: int = 0) -> Path:
    """``images`` PNG files under ``root/class<k>/``, sides varying +-25% around ``size`` (so a loader must
    resize): noise plus a bright patch at a class-specific place and colour, learnable in an epoch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % classes
        h, w = (int(v) for v in rng.integers(int(size * 0.75), int(size * 1.25) + 1, 2))
        img = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
        top, left = (c // 2 % 2) * h // 2, (c % 2) * w // 2
        img[top : top + h // 2, left : left + w // 2, c % 3] += 150
        Image.fromarray(img).save(root / f"class{c}" / f"{i:05d}.png")
    return root


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


def torchrun(*args: str, procs: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=procs -m slim2deploy ARGS`` on the CPU, one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone"]
    return subprocess.run(
        [*command, "-m", "slim2deploy", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


# an error line: "slim2deploy CMD: error: ...", argparse's "PROG: error: ...", or bench/latency.py's "error: ..."
ERROR_LINE = re.compile(r"^([\w.]+( \w+)?: )?error: ")


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots`` (temporary ones included; links not followed): a file's content hash, a
    link's target, what anything else is (a folder, a FIFO); so a command that added, changed, replaced or
    removed anything, a folder or a link included, leaves a different snapshot. Special files are never read."""
    found = {}
    for root in roots:
        found[str(root)] = "exists" if os.path.lexists(root) else "missing"
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                mode = os.lstat(path).st_mode
                if stat.S_ISREG(mode):
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                elif stat.S_ISLNK(mode):
                    found[str(path)] = f"link to {os.readlink(path)}"
                else:
                    found[str(path)] = f"mode {stat.S_IFMT(mode):o}"
    return found


def assert_refused(result: tuple[int, str, str], needle: str, before: dict[str, str], *roots: Path) -> str:
    """Exit status 2, exactly one error line (containing ``needle``), no traceback, nothing changed under
    ``roots`` (``before`` is their snapshot); returns the error line."""
    status, _, err = result
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2, err
    assert len(errors) == 1 and ERROR_LINE.match(errors[0]), err
    assert "Traceback" not in err
    assert needle in errors[0], errors[0]
    assert snapshot(*roots) == before, "a refused command changed files"
    own = _own_flags(errors[0])
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", errors[0]))
    assert own is None or named <= own, f"the error names flags its command does not have: {named - own}"
    return errors[0]


def _own_flags(line: str) -> set[str] | None:
    """The flags of the command an error line comes from (None: the top-level parser's own line)."""
    import argparse

    from slim2deploy.cli import build_parser
    from slim2deploy.cli.latency import build_parser as latency_parser

    found = re.match(r"slim2deploy (\w+): error: ", line)
    if found is None:
        parser = latency_parser() if line.startswith(("error: ", "latency.py: error: ")) else None
    else:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[found.group(1)]
    return None if parser is None else {s for a in parser._actions for s in a.option_strings}


@pytest.fixture
def cli(capsys):
    """Run ``slim2deploy ARGS`` in this process (the code the command runs, without seconds of start-up);
    returns (status, stdout, stderr)."""
    from slim2deploy.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        try:
            status = main([str(a) for a in args])
        except SystemExit as exc:  # argparse refuses a flag
            status = int(exc.code or 0)
        out, err = capsys.readouterr()
        return status, out, err

    return run
