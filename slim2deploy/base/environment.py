"""Where a number or a file came from: host, CPU and library versions, without importing the libraries.

The one probe the package has. Versions come from the installed distributions' metadata, so
asking for torch's version does not import torch; the GPU part lives with the CUDA binding
(``deploy.cuda``) and the benchmark adds it (``measure.environment``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from slim2deploy.base.errors import SlimError

# library -> the distributions that provide it, preferred first
DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs"),
    "cuda_binding": ("cuda-python", "cuda-bindings", "pycuda"),
    "slim2deploy": ("slim2deploy",),
}


def package_version(library: str) -> str | None:
    """Version of ``library`` (a key of DISTRIBUTIONS, or a distribution name); None if absent.

    A module this process already imported reports its own ``__version__`` (with a local tag
    such as ``+cu130`` that the distribution metadata leaves out); anything else is looked up
    without being imported.
    """
    loaded = getattr(sys.modules.get(library), "__version__", None)
    if isinstance(loaded, str):
        return str(loaded)  # torch.__version__ is a str subclass that would pickle as a class
    for dist in DISTRIBUTIONS.get(library, (library,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def library_versions(*libraries: str) -> dict[str, str | None]:
    return {name: package_version(name) for name in libraries}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def nvidia_smi() -> dict[str, str]:
    """GPU name, driver and compute capability from nvidia-smi; empty without a GPU driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    first = out.strip().splitlines()[:1]
    if not first:
        return {}
    parts = [p.strip() for p in first[0].split(",")]
    return dict(zip(("gpu_name", "driver", "compute_capability"), parts, strict=False))


def tensorrt_version() -> str | None:
    """The TensorRT library this process would run (None without one).

    Asked of the module, not the distribution: engines are tied to the library that loads them,
    and the stubs or PyPI's download-only placeholder install a ``tensorrt`` without a version.
    """
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return getattr(trt, "__version__", None)


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(
    needed: int, flag: str, value: object, what: str, *, estimated: bool = False, advice: str | None = None
) -> None:
    """Refuse, before allocating, a flag value whose ``needed`` bytes exceed the RAM: a lower bound, or an
    ``estimated`` need (one checked against measurements to be never below them); ``advice`` replaces
    "use a smaller FLAG" where the value is not a flag."""
    total = physical_memory()
    if total is not None and needed > total:
        bound = "an estimated" if estimated else "at least"
        raise SlimError(
            f"{flag} {value}: {what} needs {bound} {needed / 2**30:,.1f} GiB, but this machine has "
            f"{total / 2**30:,.1f} GiB of memory; {advice or f'use a smaller {flag}'}"
        )
