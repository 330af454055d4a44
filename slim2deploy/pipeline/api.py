"""The Python API of the commands: what the CLI does, with the flags as keyword arguments.

```python
import slim2deploy as s2d
s2d.slim("sparse.pt", "slim.pt", ratio=0.5)                           # or speedup=2 (measured on target=)
s2d.export("slim.pt", "slim.onnx", precisions=["fp32", "int8"], calib="calib.npz")
model = s2d.model_from_checkpoint(s2d.load_checkpoint("slim.pt"))    # a torch.nn.Module
```

Parameter names are the flags' (``--profile-batch`` is ``profile_batch``), and an error names the parameter
to change in backquotes. (``slim`` is what ``slim2deploy prune`` does: ``slim2deploy.prune`` is the package
of the pruning layer.) ``train``, ``finetune`` and ``build`` are ``pipeline.train.train_command``,
``pipeline.train.finetune_checkpoint`` and ``pipeline.build.build``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from slim2deploy.base.errors import SlimError
from slim2deploy.pipeline.budget import prune_selected
from slim2deploy.pipeline.export import PrecisionExport, export_checkpoint
from slim2deploy.prune.goal import by_budget
from slim2deploy.prune.importance import DEFAULT_IMPORTANCE
from slim2deploy.prune.latency import DEFAULT_MARGIN
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rails import DEFAULT_MAX_PRUNE, DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO, Rails
from slim2deploy.prune.select import by_ratio

__all__ = ["export", "slim"]


def slim(
    src: str | Path,
    dst: str | Path,
    *,
    ratio: float | None = None,
    speedup: float | None = None,
    latency_ms: float | None = None,
    target: str = "ort-cpu",
    profile_batch: int = 64,
    profile_precision: str = "fp32",
    profile_threads: int | None = None,
    table: str | None = None,
    cache: str | None = None,
    no_cache: bool = False,
    tries: int = 4,
    margin: float = DEFAULT_MARGIN,
    min_channels: int = DEFAULT_MIN_CHANNELS,
    max_prune: float = DEFAULT_MAX_PRUNE,
    round_to: int = DEFAULT_ROUND_TO,
    keep: Sequence[str] = (),
    depth: bool = True,
    importance: str = DEFAULT_IMPORTANCE,
    fold: bool = True,
    exact: bool = True,
    trust_code: bool = False,
    log: Callable[[str], None] | None = print,
) -> PruningPlan:
    """Prune the checkpoint ``src`` into ``dst``: to a ``ratio`` of its prunable channels (the paper's global
    threshold), or to a ``speedup`` / ``latency_ms`` measured on ``target`` (closed loop); returns the plan.
    ``depth``: a residual branch may be removed whole where the selection empties one of its groups.
    ``importance``: what ranks the channels, ``"gamma"`` (|gamma|) or ``"gamma-out"`` (``prune.score``).
    ``log`` receives the per-layer summary and the loop's progress."""
    if sum(v is not None for v in (ratio, speedup, latency_ms)) != 1:
        raise SlimError("give exactly one of `ratio`, `speedup` and `latency_ms`")
    rails = Rails(min_channels, max_prune, round_to)
    if ratio is not None:
        selection = by_ratio(ratio, rails, keep, depth)
    else:
        selection = by_budget(
            rails, keep, depth, speedup=speedup, latency_ms=latency_ms, target=target, batch=profile_batch,
            precision=profile_precision, threads=profile_threads, table=table, cache=cache, no_cache=no_cache,
            tries=tries, margin=margin,
        )  # fmt: skip
    selection = replace(selection, importance=importance)
    pruned = prune_selected(src, dst, selection, fold=fold, exact=exact, trust_code=trust_code, log=log)
    if log is not None:
        log(pruned.summary)
    return pruned.plan


def export(src: str | Path, dst: str | Path, **options: object) -> dict[str, PrecisionExport]:
    """Export the checkpoint ``src`` to ONNX at ``dst`` (``pipeline.export.export_checkpoint``: ``precisions``,
    ``calib``, ``int8_flavour``, ``data``, ...); one parity-gated report per precision."""
    return export_checkpoint(src, dst, **options)  # type: ignore[arg-type]
