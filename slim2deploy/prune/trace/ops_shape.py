"""Ops that move channels around without mixing them: reshapes, transposes, concatenation,
splits, slices and padding.

A channel can be followed through them as long as it stays in one dimension. Where an op cuts
through a group (a slice or a split), the group becomes two; where the cut sizes are numbers the
slim model must change (``torch.split(x, self.sizes)``, ``x[:, :self.k]``), the module attribute
holding them joins the group, so the surgery can lower it -- or, if no attribute holds the
number, the channels before the cut become unprunable (their count is fixed in the code).
"""

from __future__ import annotations

from dataclasses import replace
from itertools import accumulate
from typing import Any

from torch import fx

from slim2deploy.prune.trace.layout import Layout, node_args, prod, shape, val
from slim2deploy.prune.trace.registry import handles
from slim2deploy.prune.trace.state import TraceState

_BIG = 2**62  # slice ends past this mean "to the end" (Python's x[:, k:] traces as end = 2**63 - 1)


@handles("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze")
def reshape(t: TraceState, node: fx.Node, name: str) -> Any:
    """The channels stay whole in one dimension of the output: found by matching the element counts."""
    x = node.args[0]
    lay = t.lay(x)
    if not isinstance(lay, Layout):
        return None
    src, dst = shape(x), shape(node)
    outer = prod(src[: lay.dim])
    inner = lay.per_channel * prod(src[lay.dim + 1 :])
    c = lay.channels
    for d in range(len(dst)):
        if prod(dst[:d]) == outer and dst[d] % c == 0 and (dst[d] // c) * prod(dst[d + 1 :]) == inner:
            return Layout(d, lay.segs, dst[d] // c)
    t.stop(lay, f"{t.where(node)}: spreads the channels over several dimensions (e.g. a channel shuffle)")
    return t.fresh(node, reason=f"{t.where(node)}: output of a reshape that mixes channels with other dimensions")


@handles("transpose", "permute", "t")
def permute(t: TraceState, node: fx.Node, name: str) -> Any:
    lay = t.lay(node.args[0])
    if not isinstance(lay, Layout):
        return None
    nd = len(shape(node))
    args: Any = node.args
    if name == "t":
        order = list(range(nd))[::-1]
    elif name == "transpose":
        a, b = (int(v) % nd for v in args[1:3])
        order = list(range(nd))
        order[a], order[b] = order[b], order[a]
    else:
        order = [int(v) % nd for v in args[1]]
    return replace(lay, dim=order.index(lay.dim))


@handles("expand", "flip", "roll")
def along_other_dims(t: TraceState, node: fx.Node, name: str) -> Any:
    """Broadcasting, flipping or rolling dimensions other than the channels'."""
    x = node.args[0]
    lay = t.lay(x)
    if not isinstance(lay, Layout):
        return None
    src, dst = shape(x), shape(node)
    d = lay.dim + len(dst) - len(src)
    touched: set[int] = set()
    if name != "expand":
        dims = node_args(node).get("dims")
        if not dims:
            return None  # roll without dims rolls the flattened tensor
        touched = {int(v) % len(src) for v in dims}
    if dst[d] != src[lay.dim] or lay.dim in touched:
        return None
    return replace(lay, dim=d)


@handles("cat", "concat")
def cat(t: TraceState, node: fx.Node, name: str) -> Any:
    a = node_args(node)
    parts = list(a["tensors"])
    nd = len(shape(node))
    dim = int(a.get("dim") or 0) % nd
    lays = [t.lay(p) for p in parts]
    if not all(isinstance(v, Layout) for v in lays):
        return None
    if all(v.dim == dim and v.per_channel == 1 for v in lays):
        return Layout(dim, tuple(s for v in lays for s in v.segs))
    if any(v.dim == dim for v in lays):
        return None
    if any(v.dim != lays[0].dim or v.per_channel != lays[0].per_channel for v in lays[1:]):
        return None
    base = t.couple(lays, t.where(node))  # a concatenation along another dimension: channels coincide
    lays = [t.resolve(v) for v in lays]
    if any(len(v.segs) != len(base.segs) for v in lays):
        return base.flags(zero=False, const=False)  # not aligned: couple() made the groups unprunable
    segs = tuple(
        replace(s, zero=all(v.segs[i].zero for v in lays), const=all(v.segs[i].const for v in lays))
        for i, s in enumerate(base.segs)
    )
    return replace(base, segs=segs)


@handles("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "chunk", "unsafe_chunk")
def split(t: TraceState, node: fx.Node, name: str) -> Any:
    """Pieces along the channels are slices of them; equal pieces whose size is computed stay equal."""
    x = node.args[0]
    lay = t.lay(x)
    outs = val(node)
    if not isinstance(lay, Layout) or not isinstance(outs, (list, tuple)):
        return None
    a = node_args(node)
    dim = int(a.get("dim") or 0) % len(shape(x))
    if dim != lay.dim:
        return [lay for _ in outs]
    if lay.per_channel != 1:
        return None
    sizes = [int(o.shape[dim]) for o in outs]
    bounds = [0, *accumulate(sizes)]
    lay = t.cut_at(lay, bounds[1:-1])
    pieces = [lay.between(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    where = t.where(node)
    if "chunk" in name or name.endswith("split"):
        _equal_pieces(t, node, name, pieces, sizes, where)
    else:
        for i, piece in enumerate(pieces):
            _sized(t, node, sizes, i, piece, f"{where}: its size {sizes[i]} is not held by a module attribute")
    return [t.resolve(p) for p in pieces]


def _equal_pieces(t: TraceState, node: fx.Node, name: str, pieces: list[Layout], sizes: list[int], where: str) -> None:
    if len(set(sizes)) != 1:
        t.stop(pieces, f"{where}: splits {sum(sizes)} channels into unequal pieces {sizes}")
        return
    first = t.couple(pieces, where)  # every piece must keep the same count, so the pieces are coupled
    if "chunk" not in name:  # split(x, n): n is a number the slim model must lower
        _sized(t, node, [sizes[0]], 0, first, f"{where}: its piece size {sizes[0]} is not held by a module attribute")


def _sized(t: TraceState, node: fx.Node, sizes: list[int], index: int, covered: Layout, why: str) -> None:
    """The groups in ``covered`` change the number ``sizes[index]``: its attribute joins them, or they stop."""
    member = t.size_attribute(node, sizes, index)
    if member is None:
        t.stop(covered, why)
        return
    for s in t.resolve(covered).segs:
        t.add(s.gid, member)


@handles("slice", "narrow", "select")
def slice_(t: TraceState, node: fx.Node, name: str) -> Any:
    """Slicing other dimensions keeps every channel; slicing the channels takes the groups in range."""
    x = node.args[0]
    lay = t.lay(x)
    if not isinstance(lay, Layout):
        return None
    nd = len(shape(x))
    a = node_args(node)
    dim = int(a.get("dim") or 0) % nd
    if dim != lay.dim:
        return replace(lay, dim=lay.dim - (dim < lay.dim)) if name == "select" else lay
    if name == "select" or lay.per_channel != 1:
        return None
    c = lay.channels
    # the numbers the slim model must lower, with the channels each one counts
    numbers: list[tuple[int, int, int]] = []
    if name == "narrow":
        start = int(a["start"])
        lo = start + c if start < 0 else start
        hi = lo + int(a["length"])
        numbers.append((start, 0, lo) if start >= 0 else (start, lo, c))
        numbers.append((hi - lo, lo, hi))
    else:
        if int(a.get("step") or 1) != 1:
            return None
        lo, hi = _bound(a.get("start"), c, 0), _bound(a.get("end"), c, c)
        for v, b in ((a.get("start"), lo), (a.get("end"), hi)):
            if v is not None and 0 < b < c:  # 0 and "to the end" stay right whatever is removed
                numbers.append((int(v), 0, b) if int(v) >= 0 else (int(v), b, c))  # x[:, :-k] counts from the end
    if lo == 0 and hi == c:
        return lay
    lay = t.cut_at(lay, [lo, hi])
    for value, first, last in numbers:
        if first < last:
            why = f"{t.where(node)}: slices the channels at {value}, a number no module attribute holds"
            _sized(t, node, [abs(value)], 0, lay.between(first, last), why)
    return t.resolve(lay.between(lo, hi))


def _bound(v: Any, c: int, default: int) -> int:
    if v is None or int(v) >= _BIG:
        return default
    v = int(v)
    return max(0, min(c, v + c if v < 0 else v))


@handles(
    "pad",
    "constant_pad_nd",
    "reflection_pad1d",
    "reflection_pad2d",
    "reflection_pad3d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "_pad_circular",
)
def pad(t: TraceState, node: fx.Node, name: str) -> Any:
    """Padding spatial dimensions keeps every channel; padding the channels' dimension stops them."""
    x = node.args[0]
    lay = t.lay(x)
    if not isinstance(lay, Layout):
        return None
    a = node_args(node)
    amounts = [int(p) for p in (a.get("pad") or a.get("padding") or [])]
    nd = len(shape(x))
    touched = {nd - 1 - i // 2 for i, p in enumerate(amounts) if p}  # pairs run from the last dimension back
    if lay.dim in touched:
        why = f"{t.where(node)}: pads the channel dimension"
        t.stop(lay, why)
        return t.fresh(node, reason=why)
    mode = a.get("mode") or ("constant" if name in ("pad", "constant_pad_nd") else "edge")
    if mode != "constant" or not any(p > 0 for p in amounts):
        return lay  # reflection/replication/circular copy values: zeros and constants stay so
    value = float(a.get("value") or 0.0)
    # the border gets `value`: a constant channel is not constant any more, a zero one only if value is 0
    return replace(lay, segs=tuple(replace(s, zero=s.zero and value == 0.0, const=False) for s in lay.segs))
