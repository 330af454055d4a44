"""slim2deploy: Network Slimming (Liu et al. 2017) from sparse training to TensorRT engines.

Heavy modules (torch, onnx, onnxruntime, tensorrt) are imported lazily so that the runtime
and benchmark parts work on a GPU box with only numpy and the runtime installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first access
_EXPORTS = {
    "SlimError": "slim2deploy.base.errors",
    "create_model": "slim2deploy.model.zoo",
    "list_models": "slim2deploy.model.zoo",
    "Checkpoint": "slim2deploy.model.checkpoint",
    "save_checkpoint": "slim2deploy.model.checkpoint",
    "load_checkpoint": "slim2deploy.model.checkpoint",
    "model_from_checkpoint": "slim2deploy.prune.rebuild",
    "PruningPlan": "slim2deploy.prune.plan",
    "plan_pruning": "slim2deploy.prune.select",
    "trace_groups": "slim2deploy.prune.trace",
    "max_abs_gamma": "slim2deploy.prune.score",
    "Selection": "slim2deploy.prune.select",
    "Rails": "slim2deploy.prune.rails",
    "summarize": "slim2deploy.prune.summary",
    "apply_plan": "slim2deploy.prune.surgery",
    "slim": "slim2deploy.pipeline.api",
    "export": "slim2deploy.pipeline.api",
    "finetune_checkpoint": "slim2deploy.pipeline.train",
    "train_command": "slim2deploy.pipeline.train",
    "import_model": "slim2deploy.pipeline.import_model",
    "build": "slim2deploy.pipeline.build",
    "BuildConfig": "slim2deploy.pipeline.build",
    "Budget": "slim2deploy.prune.goal",
    "open_runner": "slim2deploy.runtime.registry",
    "benchmark": "slim2deploy.measure.benchmark",
}

__all__ = sorted(_EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slim2deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
