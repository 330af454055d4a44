"""Where the numbers came from: host, CPU, GPU, driver, CUDA and library versions.

Built from the package's one probe (``base.environment``) and the CUDA binding's device query
(``deploy.cuda``); torch is asked only if something already imported it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from slim2deploy.base.environment import host_info, library_versions, nvidia_smi
from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.cuda import cuda_device_info


def gpu_info() -> dict[str, Any]:
    gpu: dict[str, Any] = dict(nvidia_smi())
    try:
        gpu = {**(cuda_device_info() or {}), **gpu}
    except SlimError:
        pass
    torch = sys.modules.get("torch")  # only if something already paid for importing torch
    if torch is not None and "gpu_name" not in gpu and torch.cuda.is_available():
        gpu["gpu_name"] = torch.cuda.get_device_name(0)
        gpu["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    return gpu


def environment(threads: int | None = None) -> dict[str, Any]:
    """Host, CPU, threads, library versions and the GPU (None without one)."""
    env: dict[str, Any] = {
        **host_info(),
        "threads": threads or 0,
        "numpy": np.__version__,
        **library_versions("onnxruntime", "torch", "tensorrt", "cuda_binding"),
    }
    if "torch" in sys.modules:
        env["torch_cuda"] = getattr(sys.modules["torch"].version, "cuda", None)
    env["gpu"] = gpu_info() or None
    return env
