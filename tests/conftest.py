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


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(2)
    yield


needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
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
    return errors[0]


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
