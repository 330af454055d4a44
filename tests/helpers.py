"""Functions and constants the test modules share (fixtures and hooks live in conftest.py).

A plain module, imported as ``from helpers import ...``: no test module imports another, so each
can be run, moved or deleted alone (tests/test_architecture.py checks it). Heavy libraries are
imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from torch import nn

    from slim2deploy.prune.plan import PruningPlan

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)


# ---- child processes ---------------------------------------------------------------------------------------------


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


def run_main(*args: object, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    """`slim2deploy ARGS` run in this process, answered as ``run_cli`` answers (exit status, stdout, stderr): the
    code a command runs, without the seconds a child spends importing torch. What needs a process of its own (a
    signal, an exit status the interpreter sets, the README's commands as typed) stays with ``run_cli``."""
    from slim2deploy.cli import main

    return _in_process(main, ["slim2deploy", *map(str, args)], cwd=cwd, env=env)


def run_bench(name: str, *args: object) -> subprocess.CompletedProcess[str]:
    """``python bench/<name>.py ARGS`` run in this process (its ``main(argv)``), answered as a child would be."""
    with bench_on_path():
        return _in_process(bench_script(name).main, [f"bench/{name}.py", *map(str, args)])


@contextlib.contextmanager
def bench_on_path() -> Iterator[None]:
    """bench/ on the import path for the block, as it is for a script run by path (its sibling modules:
    studylib, gpu_doc)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _in_process(main: Any, argv: list[str], cwd: Path | None = None, env: dict | None = None):
    """``main(argv[1:])`` with its output captured and ``env``/``cwd`` set for the call; an exception it lets
    through is written to stderr as Python would, with status 1."""
    import io
    import traceback

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    here = os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv[1:])
            except SystemExit as exc:  # argparse refuses a flag
                status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:  # what a child would print before exiting 1
                traceback.print_exc()
                status = 1
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def torchrun(*args: str, procs: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=procs -m slim2deploy ARGS`` on the CPU, one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone"]
    return subprocess.run(
        [*command, "-m", "slim2deploy", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


_HOLDER = """
import sys, time
from slim2deploy.base.cache import exclusive_dir
with exclusive_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen[str]:
    """A second process holding ``folder``'s build lock (as a running build does) until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


# ---- refusals: one error line, nothing changed on disk -------------------------------------------------------------

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


# ---- models, checkpoints, data -------------------------------------------------------------------------------------


def randomize_batchnorm(model: nn.Module, seed: int = 0, every_weight: bool = False) -> nn.Module:
    """Random BatchNorm parameters and statistics, so that BatchNorm is no identity (an unfolded or wrongly
    folded one shows in the outputs) and channels score differently: gamma in [0.05, 1], beta and the running
    mean ~ N(0, 0.2), the running variance in [0.5, 2]. ``every_weight``: every other floating-point tensor
    too, uniform in [-0.1, 0.1], so that no fresh initialisation reproduces any (biases made zero included).
    Returns the model in eval mode."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.weight.uniform_(0.05, 1.0, generator=gen)
            m.bias.normal_(0.0, 0.2, generator=gen)
            m.running_mean.normal_(0.0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
        if every_weight:
            done = {id(t) for m in norms for t in (m.weight, m.bias, m.running_mean, m.running_var)}
            for t in model.state_dict(keep_vars=True).values():
                if t.is_floating_point() and id(t) not in done:
                    t.uniform_(-0.1, 0.1, generator=gen)
    return model.eval()


def zero_channels(model: nn.Module, plan: PruningPlan, fraction: float, seed: int, beta: bool = True) -> int:
    """Set gamma (and beta) to zero for a random ``fraction`` of every prunable group's channels."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    total = 0
    with torch.no_grad():
        for g in plan.groups:
            if not g.prunable:
                continue
            chosen = torch.randperm(g.size, generator=gen)[: int(g.size * fraction)].tolist()
            bns = {m.module for m in g.members if m.role == "bn"}
            for m in g.members:
                if m.module in bns and (m.role == "bn" or (beta and m.tensor.endswith(".bias"))):
                    model.get_parameter(m.tensor)[m.indices(chosen)] = 0
            total += len(chosen)
    return total


def tiny_checkpoint(
    path: Path,
    arch: str = "vgg11",
    width: float = 0.125,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    meta: dict[str, Any] | None = None,
    bn_seed: int | None = None,
    sparse_seed: int | None = None,
) -> Path:
    """A slim2deploy checkpoint of a zoo model (initialised from seed 0) at ``path``. ``bn_seed``: BatchNorm
    randomised (``randomize_batchnorm``); ``sparse_seed``: then gamma and beta zero in half of every prunable
    group's channels, chosen with that seed, so that pruning them changes no output. Tests take it from the
    ``make_checkpoint`` fixture (conftest.py), which makes each kind once per session."""
    import torch

    from slim2deploy.model.checkpoint import checkpoint_for, save_checkpoint
    from slim2deploy.model.zoo import create_model
    from slim2deploy.prune.trace import trace_groups

    kwargs = {"in_channels": input_shape[0], "num_classes": num_classes, "width": width}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(arch, **kwargs).eval()
    if bn_seed is not None:
        randomize_batchnorm(model, bn_seed)
    if sparse_seed is not None:
        zero_channels(model, trace_groups(model, torch.zeros(1, *input_shape)), 0.5, seed=sparse_seed)
    return save_checkpoint(checkpoint_for(model, arch, kwargs, input_shape, num_classes, meta=meta), path)


SAMPLE = (3, 16, 16)  # the input of ``tiny_net``


def tiny_net(width: int, seed: int = 0) -> nn.Module:
    """conv-bn-relu, a strided conv, a grouped conv, pooling and a linear layer: 10 classes of ``SAMPLE``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, 10),
    ).eval()


def export_tiny(path: Path, width: int, static_batch: int | None = None) -> tuple[Path, nn.Module]:
    """A small conv net exported with the TorchScript exporter (dynamic batch unless ``static_batch``)."""
    import warnings

    import torch

    model = tiny_net(width)
    x = torch.randn(static_batch or 1, *SAMPLE)
    dynamic = None if static_batch else {"input": {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: fast and enough here
        torch.onnx.export(
            model, (x,), str(path), input_names=["input"], output_names=["logits"], dynamic_axes=dynamic, dynamo=False
        )
    return path, model


def bench_script(name: str) -> Any:
    """``bench/<name>.py`` loaded by its path (the scripts are not a package; users run them by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_image_folder(root: Path, images: int, size: int, classes: int = 4, seed: int = 0) -> Path:
    """``bench/image_folder.py``'s folder as PNG files: ``images`` under ``root/class<k>/``, sides varying
    +-25% around ``size`` (so a loader must resize), noise plus a bright patch at a class-specific place and
    colour, learnable in an epoch."""
    bench_script("image_folder").make_image_folder(root, images, size, classes, fmt="png", seed=seed)
    return root
