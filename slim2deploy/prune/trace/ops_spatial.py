"""Pooling, resampling and reductions over dimensions other than the channels'.

Each output channel c is computed from input channel c alone, so the channels pass through.
Max pooling, resampling (nearest, linear, cubic: weights that sum to one) and means keep a zero
channel zero and a constant one constant; average pooling that counts zero padding does not keep
a constant (the border windows average it with zeros).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import fx

from slim2deploy.prune.trace.layout import Layout, node_args, shape
from slim2deploy.prune.trace.registry import handles
from slim2deploy.prune.trace.state import TraceState

# op name -> number of trailing spatial dimensions it works on
SPATIAL = {
    **{f"max_pool{n}d": n for n in (1, 2, 3)},
    **{f"max_pool{n}d_with_indices": n for n in (2, 3)},
    **{f"avg_pool{n}d": n for n in (1, 2, 3)},
    **{f"adaptive_avg_pool{n}d": n for n in (1, 2, 3)},
    **{f"adaptive_max_pool{n}d": n for n in (1, 2, 3)},
    "_adaptive_avg_pool2d": 2,
    "_adaptive_avg_pool3d": 3,
    "upsample_nearest1d": 1,
    "upsample_nearest2d": 2,
    "upsample_nearest3d": 3,
    "_upsample_nearest_exact1d": 1,
    "_upsample_nearest_exact2d": 2,
    "_upsample_nearest_exact3d": 3,
    "upsample_linear1d": 1,
    "upsample_bilinear2d": 2,
    "_upsample_bilinear2d_aa": 2,
    "upsample_bicubic2d": 2,
    "_upsample_bicubic2d_aa": 2,
    "upsample_trilinear3d": 3,
}


@handles(*SPATIAL)
def spatial(t: TraceState, node: fx.Node, name: str) -> Any:
    x = node.args[0]
    lay = t.lay(x)
    if not isinstance(lay, Layout) or lay.dim >= len(shape(x)) - SPATIAL[name] or lay.per_channel != 1:
        return None
    out = lay
    if name.startswith("avg_pool"):
        a = node_args(node)
        padded = any(int(p) for p in (a.get("padding") or [0]))
        if padded and a.get("count_include_pad", True):
            out = lay.flags(const=False)
    if isinstance(node.meta.get("val"), (list, tuple)):
        return [out, None]  # (values, indices)
    return out


@handles("mean", "sum", "amax", "amin")
def reduce(t: TraceState, node: fx.Node, name: str) -> Any:
    a = node_args(node)
    x = a["self"]
    lay = t.lay(x)
    dims = a.get("dim")
    if not isinstance(lay, Layout) or not dims:
        return None
    nd = len(shape(x))
    dims = [int(d) % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if lay.dim in dims or lay.per_channel != 1:
        return None
    if a.get("keepdim"):
        return lay
    return replace(lay, dim=lay.dim - sum(d < lay.dim for d in dims))
