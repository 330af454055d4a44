"""Element-wise ops: one input channel in, the same channel out; or operands combined per channel."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import fx

from slim2deploy.prune.plan import Member
from slim2deploy.prune.trace.layout import OPAQUE, Layout, node_args, shape, val
from slim2deploy.prune.trace.registry import handles
from slim2deploy.prune.trace.state import TraceState

# True where f(0) == 0, so zeroed channels stay zero; every one maps a constant to a constant
UNARY = {
    **dict.fromkeys(
        "relu relu6 silu gelu leaky_relu elu selu celu tanh mish hardswish hardshrink softshrink dropout "
        "feature_dropout alpha_dropout feature_alpha_dropout clone contiguous alias detach _to_copy to type_as "
        "lift_fresh_copy neg abs sin tan atan asin sinh asinh erf expm1 log1p sqrt square sign trunc round "
        "floor ceil frac".split(),
        True,
    ),
    **dict.fromkeys("sigmoid hardsigmoid exp softplus log_sigmoid cos cosh rsqrt reciprocal log erfc".split(), False),
}
CLAMPS = {
    "hardtanh": ("min_val", "max_val"),
    "clamp": ("min", "max"),
    "clamp_min": ("min", None),
    "clamp_max": (None, "max"),
    "threshold": ("threshold", "value"),
}
DROPOUTS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}


@handles(*UNARY, *CLAMPS, "pow")
def unary(t: TraceState, node: fx.Node, name: str) -> Any:
    """Output channel c is a function of input channel c alone (at the same position)."""
    x = node.args[0]
    lay = t.lay(x)
    if not isinstance(lay, Layout) or shape(x) != shape(node):
        return None
    if any(isinstance(val(a), torch.Tensor) and a is not x for a in node.all_input_nodes):
        return None
    a = node_args(node)
    if name == "threshold":  # y = x if x > threshold else value
        keeps_zero = a["value"] == 0 or a["threshold"] < 0
    elif name in CLAMPS:
        lo, hi = (a.get(k) if k else None for k in CLAMPS[name])
        keeps_zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    elif name == "pow":
        exponent = a.get("exponent")
        if not isinstance(exponent, (int, float)):
            return None
        keeps_zero = exponent > 0
    elif name in DROPOUTS:
        if a.get("train"):
            return None
        keeps_zero = True
    else:
        keeps_zero = UNARY[name]
    return lay if keeps_zero else lay.flags(zero=False)


@handles("add", "sub", "rsub", "mul", "div")
def binary(t: TraceState, node: fx.Node, name: str) -> Any:
    """All operands that carry the channels keep the same indices (residual adds, squeeze-excite)."""
    out_shape = shape(node)
    nd = len(out_shape)
    full: list[Layout] = []
    numbers: list[float] = []
    per_sample = False  # an input-dependent value broadcast along the channels
    others: list[fx.Node] = []
    first_is_full = False
    for i, op in enumerate(node.args[:2]):
        lay = t.lay(op)
        if isinstance(lay, Layout):
            moved = replace(lay, dim=lay.dim + nd - len(shape(op)))
            if lay.channels * lay.per_channel == out_shape[moved.dim]:
                full.append(moved)
                first_is_full |= i == 0
            else:
                per_sample = True
        elif lay is OPAQUE:
            per_sample = True
        elif isinstance(op, fx.Node) and isinstance(val(op), torch.Tensor):
            others.append(op)
        elif isinstance(op, (int, float)):
            numbers.append(float(op))
    if not full or any(f.dim != full[0].dim or f.per_channel != full[0].per_channel for f in full):
        return None
    base = t.couple(full, t.where(node))
    full = [t.resolve(f) for f in full]
    if any(len(f.segs) != len(base.segs) for f in full):
        return base.flags(zero=False, const=False)  # not aligned: couple() made the groups unprunable
    for op in others:
        _per_channel_operand(t, node, base, op, nd)
    segs = []
    for i, s in enumerate(base.segs):
        zs = [f.segs[i].zero for f in full]
        cs = all(f.segs[i].const for f in full) and not per_sample
        if name == "mul":
            zero = any(zs) or 0.0 in numbers
        elif name == "div":
            zero = first_is_full and full[0].segs[i].zero
        else:
            zero = all(zs) and not others and not per_sample and all(n == 0 for n in numbers)
        segs.append(replace(s, zero=zero, const=cs))
    return replace(base, segs=tuple(segs))


def _per_channel_operand(t: TraceState, node: fx.Node, base: Layout, op: fx.Node, nd: int) -> None:
    """A parameter combined per channel follows the group; a computed tensor stops it."""
    s = shape(op)
    d = base.dim - (nd - len(s))
    if d < 0 or s[d] == 1:
        return
    fqn = t.param(op)
    if fqn is None:
        t.stop(base, f"{t.where(node)}: combined per channel with a computed tensor")
        return
    for seg, off in base.offsets():
        t.add(seg.gid, Member(fqn, d, "through", off * base.per_channel, base.per_channel))


@handles("prelu", "_prelu_kernel")
def prelu(t: TraceState, node: fx.Node, name: str) -> Any:
    """PReLU: one learned slope per channel (or one for all), zero stays zero."""
    x, w = node.args[0], node.args[1]
    lay = t.lay(x)
    fqn = t.param(w)
    if not isinstance(lay, Layout) or lay.dim != 1 or lay.per_channel != 1 or fqn is None:
        return None
    if shape(w)[0] != 1:
        for seg, off in lay.offsets():
            t.add(seg.gid, Member(fqn, 0, "through", off))
    return lay
