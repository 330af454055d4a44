"""Layers with weights: convolutions and linears read channels and make new ones; BatchNorm scores them.

Exactness. A group is prunable only if every convolution or linear that reads it sees zeros (the
group's BatchNorms at gamma = beta = 0), or a constant that is folded into its bias (a linear, or
a convolution without padding, when only gamma = 0); otherwise gamma does not tell how much the
channel matters (e.g. a pre-activation ResNet shortcut convolution reading the raw residual
stream) and the group is listed as unprunable.

Grouped convolutions (``groups`` G > 1, not depthwise) stay grouped and dense: channel j of every
one of the G groups is coupled, on the input side and on the output side, so the same indices
are removed from each group and G is unchanged (see the README for why).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import fx

from slim2deploy.prune.plan import Member
from slim2deploy.prune.trace.layout import Layout, Seg, node_args, shape
from slim2deploy.prune.trace.registry import handles
from slim2deploy.prune.trace.state import TraceState


@handles("conv1d", "conv2d", "conv3d", "convolution")
def conv(t: TraceState, node: fx.Node, name: str) -> Any:
    a = node_args(node)
    if a.get("transposed"):
        return None
    x, w, b = a["input"], a["weight"], a.get("bias")
    wname, bname = t.param(w), t.param(b)
    if wname is None or (b is not None and bname is None):
        return None
    lay = t.lay(x)
    wshape = shape(w)
    groups = int(a.get("groups") or 1)
    out_c, in_c = wshape[0], wshape[1] * groups
    spatial = len(wshape) - 2
    if isinstance(lay, Layout) and (lay.dim != len(shape(x)) - spatial - 1 or lay.per_channel != 1):
        return None
    padding = a.get("padding")
    no_pad = padding == "valid" or (isinstance(padding, (list, tuple)) and not any(int(p) for p in padding))
    where = t.where(node)
    if groups == 1:
        if isinstance(lay, Layout):
            t.consume(lay, wname, 1, t.fold and no_pad and t.plain_module(wname), where)
        return t.produce(node, wname, bname, len(shape(node)) - spatial - 1)
    if groups == in_c == out_c:  # depthwise: output channel k reads only input channel k
        if not isinstance(lay, Layout):
            return None
        for s, off in lay.offsets():
            t.add(s.gid, Member(wname, 0, "through", off))
            if bname:
                t.add(s.gid, Member(bname, 0, "through", off))
        return replace(
            lay, segs=tuple(replace(s, zero=s.zero and bname is None, const=s.const and no_pad) for s in lay.segs)
        )
    return _grouped(t, node, lay, wname, bname, groups, where)


def _grouped(t: TraceState, node: fx.Node, lay: Any, wname: str, bname: str | None, groups: int, where: str) -> Layout:
    """Channel j of every input group is one coupled channel, and so is channel j of every output group."""
    out_c, per_in = shape(node.args[1])[0], shape(node.args[1])[1]
    if isinstance(lay, Layout):
        lay = t.cut_at(lay, [g * per_in for g in range(1, groups)])
        first = t.couple([lay.between(g * per_in, (g + 1) * per_in) for g in range(groups)], where)
        t.consume(first, wname, 1, False, where)
    per_out = out_c // groups
    gid = t.new(per_out)
    for g in range(groups):
        t.add(gid, Member(wname, 0, "out", g * per_out))
        if bname:
            t.add(gid, Member(bname, 0, "out", g * per_out))
    dim = len(shape(node)) - (len(shape(node.args[1])) - 2) - 1
    return Layout(dim, tuple(Seg(gid, per_out) for _ in range(groups)))


@handles("linear")
def linear(t: TraceState, node: fx.Node, name: str) -> Any:
    a = node_args(node)
    x, w, b = a["input"], a["weight"], a.get("bias")
    wname, bname = t.param(w), t.param(b)
    if wname is None or (b is not None and bname is None):
        return None
    lay = t.lay(x)
    if isinstance(lay, Layout):
        if lay.dim != len(shape(x)) - 1:
            return None
        t.consume(lay, wname, 1, t.fold and t.plain_module(wname), t.where(node))
    return t.produce(node, wname, bname, len(shape(node)) - 1)


@handles("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm")
def batchnorm(t: TraceState, node: fx.Node, name: str) -> Any:
    a = node_args(node)
    x = a["input"]
    lay = t.lay(x)
    if not isinstance(lay, Layout) or lay.dim != 1 or lay.per_channel != 1:
        return None
    tensors = {k: a.get(k) for k in ("weight", "bias", "running_mean", "running_var")}
    names = {k: t.param(v) for k, v in tensors.items() if v is not None}
    if any(v is None for v in names.values()):
        return None
    for s, off in lay.offsets():
        for k, fqn in names.items():
            t.add(s.gid, Member(fqn, 0, "bn" if k == "weight" else "through", off))  # type: ignore[arg-type]
    out = lay.flags(zero=True, const=True) if "weight" in names else lay.flags(zero=False)
    if isinstance(node.meta.get("val"), (list, tuple)):
        return [out] + [None] * (len(node.meta["val"]) - 1)
    return out
