"""Peak host memory of a model alone: a fresh process opens the same runner, runs it, and reports.

A separate process, so the number is the model's and not this process's history. The child
opens the runner through the registry with the parent runner's own options, so it makes its
session exactly as the benchmark did (for ONNX Runtime: the one session factory, honouring the
file's optimisation hint). ``<prefix>_runtime_only_rss`` is the child right after importing
numpy and the runtime library, before the model is loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import slim2deploy
from slim2deploy.base.errors import SlimError
from slim2deploy.runtime.base import Runner

_SCRIPT = r"""
import importlib, json, resource, sys


def peak_bytes():
    # VmHWM belongs to this address space; ru_maxrss would carry the parent's peak across fork+exec
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


import numpy as np
from slim2deploy.runtime.registry import open_runner

path, kind, library, batch, options = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
if library:
    importlib.import_module(library)
base = peak_bytes()
with open_runner(path, backend=kind, **options) as runner:
    x = np.zeros((batch, *runner.info.sample_shape), dtype=runner.info.input_dtype)
    for _ in range(3):
        runner.infer(x)
print(json.dumps({"peak_rss": peak_bytes(), "runtime_only_rss": base}))
"""


def peak_rss(runner: Runner, batch: int, timeout_s: float = 600) -> dict[str, int]:
    """``{<prefix>_peak_rss, <prefix>_runtime_only_rss}`` in bytes; empty where the runner has no such probe."""
    if runner.rss_prefix is None or runner.path is None:
        return {}
    env = dict(os.environ)
    # the child imports this very copy of slim2deploy, installed or not (bench/latency.py runs from a checkout)
    root = str(Path(slim2deploy.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    args = [str(runner.path), runner.kind, runner.library or "", str(batch), json.dumps(runner.options)]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SCRIPT, *args], capture_output=True, text=True, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise SlimError(f"measuring the memory of {runner.name} took over {timeout_s:g} s; use `rss=False`") from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SlimError(f"measuring the memory of {runner.name} failed: {tail[0]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return {f"{runner.rss_prefix}_{k}": int(v) for k, v in found.items()}
