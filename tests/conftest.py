import os
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
