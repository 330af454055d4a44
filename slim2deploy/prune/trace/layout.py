"""What flows along the traced graph: the layout of a tensor's channels, and small graph helpers.

Every tensor that carries channels gets a layout: the dimension holding them, the list of
segments along it (one per coupled group; a concatenation has several) and ``per_channel``,
the number of consecutive features each channel owns (1, or more after a flatten).

Each segment also records whether its channels are exactly zero when the group's BatchNorms
have gamma = beta = 0 (``zero``), and whether they are an input-independent constant, the same
at every position, when only gamma = 0 (``const``: a removed channel still emits act(beta)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx


@dataclass(frozen=True)
class Seg:
    gid: int
    length: int
    zero: bool = False
    const: bool = False


@dataclass(frozen=True)
class Layout:
    dim: int
    segs: tuple[Seg, ...]
    per_channel: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)

    def offsets(self) -> Iterator[tuple[Seg, int]]:
        off = 0
        for s in self.segs:
            yield s, off
            off += s.length

    def flags(self, zero: bool | None = None, const: bool | None = None) -> Layout:
        segs = tuple(
            replace(s, zero=s.zero if zero is None else zero, const=s.const if const is None else const)
            for s in self.segs
        )
        return replace(self, segs=segs)

    def between(self, lo: int, hi: int) -> Layout:
        """The segments lying in channels [lo, hi); the caller has cut the groups at lo and hi."""
        return replace(self, segs=tuple(s for s, off in self.offsets() if lo <= off and off + s.length <= hi))


class Opaque:
    """A data-dependent value with no channel dimension we can follow (e.g. a 0-d tensor)."""


OPAQUE = Opaque()


def op_name(target: Any) -> str:
    packet = getattr(target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", str(target))
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def node_args(node: fx.Node) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in val(x).shape)


def prod(xs: Any) -> int:
    return math.prod(int(v) for v in xs)


def is_tensor(x: Any) -> bool:
    return isinstance(val(x), torch.Tensor)
