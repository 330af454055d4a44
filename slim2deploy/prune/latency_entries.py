"""The entries of a latency table (``prune.latency``): the layers it models with their measured cells, and the
residual branches it prices; and the checks every field of a table read from a file goes through (no torch).

What a table's fields may hold is checked as data (``LatencyTable.from_dict``), so an edited or damaged table
is one error naming the field, never a traceback or a silently wrong prediction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from slim2deploy.base.errors import SlimError


@dataclass
class LayerSpec:
    """One convolution or linear whose width some group changes, with its measured cells.

    Input width = ``in_fixed`` + sum of ``kept * block`` over ``in_groups`` (``[group, block]``
    pairs: after a flatten each channel owns ``block`` features; a concatenation has several).
    Output width = ``out_fixed`` when ``out_group`` is None, else that group's kept count. A
    depthwise convolution has ``in_groups == [[out_group, 1]]``.
    """

    name: str
    op: str  # "conv" or "linear"
    in_fixed: int
    in_groups: list[list[int]]
    out_fixed: int
    out_group: int | None
    kernel: list[int] = field(default_factory=list)
    stride: list[int] = field(default_factory=list)
    padding: list[int] = field(default_factory=list)
    dilation: list[int] = field(default_factory=list)
    depthwise: bool = False
    in_hw: list[int] = field(default_factory=list)
    cells: dict[str, float] = field(default_factory=dict)
    _parsed: dict[tuple[int, int], float] | None = field(default=None, init=False, repr=False, compare=False)
    _estimated: dict[tuple[int, int], float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def widths(self, counts: Sequence[int]) -> tuple[int, int]:
        ci = self.in_fixed + sum(counts[g] * block for g, block in self.in_groups)
        co = self.out_fixed if self.out_group is None else counts[self.out_group]
        return ci, co

    def groups(self) -> set[int]:
        found = {g for g, _ in self.in_groups}
        if self.out_group is not None:
            found.add(self.out_group)
        return found

    def signature(self) -> str:
        """What the cost depends on besides the widths (the cache key's layer part)."""
        return (
            f"{self.op} k{self.kernel} s{self.stride} p{self.padding} d{self.dilation} "
            f"dw{int(self.depthwise)} hw{self.in_hw}"
        )

    def measured(self) -> dict[tuple[int, int], float]:
        if self._parsed is None or len(self._parsed) != len(self.cells):
            self._parsed = {_cell(key): ms for key, ms in self.cells.items()}
            self._estimated = {}
        return self._parsed

    def record(self, ci: int, co: int, ms: float) -> None:
        self.cells[f"{ci},{co}"] = float(ms)
        self._parsed = None

    def ms(self, ci: int, co: int) -> float:
        """Measured cost of the cell, or the rank-1 estimate from the nearest measured crossing."""
        cells = self.measured()
        if (ci, co) in cells:
            return cells[(ci, co)]
        if (ci, co) not in self._estimated:  # a knapsack asks for the same cells again and again
            self._estimated[(ci, co)] = self._estimate(ci, co)
        return self._estimated[(ci, co)]

    def _estimate(self, ci: int, co: int) -> float:
        cells = self.measured()
        if not cells:
            raise SlimError(f"layer {self.name} has no measured latency; profile the model again")
        best: tuple[float, float] | None = None
        for (ri, rc), anchor in cells.items():
            if (ri, co) in cells and (ci, rc) in cells and anchor > 0:
                distance = abs(ri - ci) / max(ci, 1) + abs(rc - co) / max(co, 1)
                if best is None or distance < best[0]:
                    best = (distance, cells[(ri, co)] * cells[(ci, rc)] / anchor)
        if best is not None:
            return best[1]
        # no crossing covers the cell: scale the nearest cell by the arithmetic it does
        (ni, no), near = min(cells.items(), key=lambda kv: abs(kv[0][0] - ci) + abs(kv[0][1] - co))
        return near * (ci * co) / max(ni * no, 1)


@dataclass
class BranchSpec:
    """A removable residual branch (``prune.plan.Branch``) as the table prices it: emptying any one of
    ``groups`` removes it, with its ``layers`` (indices into the table's layers: every convolution and
    linear of the branch the table models, not only those touching the emptied group) and ``extra_ms``
    more in the model (``LatencyTable.calibrate_depth``). ``size``: elements per sample of the tensor the
    branch adds at its join ``join``, by which that extra is shared among branches."""

    join: str
    groups: list[int]
    layers: list[int]
    size: int
    extra_ms: float = 0.0


def _cell(key: str) -> tuple[int, int]:
    a, b = key.split(",")
    return int(a), int(b)


OPS = ("conv", "linear")
_LAYER_REQUIRED = ("name", "op", "in_fixed", "in_groups", "out_fixed", "out_group")
_LAYER_INTS = {"in_fixed": 0, "out_fixed": 0}
_LAYER_LISTS = {"kernel": 1, "stride": 1, "padding": 0, "dilation": 1, "in_hw": 1}


def field_error(where: str, why: str) -> SlimError:
    return SlimError(f"latency table field {where} {why}; profile the model again")


def as_list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise field_error(where, f"is {value!r}, not a list")
    return value


def as_int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise field_error(where, f"is {value!r}, not a whole number >= {low}")
    return value


def as_ints(where: str, value: Any, low: int) -> list[int]:
    return [as_int(f"{where}[{i}]", v, low) for i, v in enumerate(as_list(where, value))]


def as_ms(where: str, value: Any, *, positive: bool = False, signed: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or (value < 0 and not signed) or (positive and value <= 0):
        wanted = "> 0" if positive else "" if signed else ">= 0"
        raise field_error(where, f"is {value!r}, not a finite number {wanted}".rstrip())
    return float(value)


def as_group(where: str, value: Any, n_groups: int) -> int:
    g = as_int(where, value, 0)
    if g >= n_groups:
        raise field_error(where, f"is group {g}, but the table has {n_groups} groups")
    return g


def parse_layer(where: str, d: Any, n_groups: int) -> LayerSpec:
    if not isinstance(d, dict):
        raise field_error(where, f"is {d!r}, not a mapping")
    known = {f.name for f in fields(LayerSpec) if f.init}
    unknown = sorted(set(d) - known)
    if unknown:
        raise field_error(f"{where}.{unknown[0]}", "is not a layer field")
    missing = [key for key in _LAYER_REQUIRED if key not in d]
    if missing:
        raise field_error(f"{where}.{missing[0]}", "is missing")
    if not isinstance(d["name"], str):
        raise field_error(f"{where}.name", f"is {d['name']!r}, not a string")
    if d["op"] not in OPS:
        raise field_error(f"{where}.op", f"is {d['op']!r}, not one of {', '.join(OPS)}")
    if not isinstance(d.get("depthwise", False), bool):
        raise field_error(f"{where}.depthwise", f"is {d['depthwise']!r}, not true or false")
    for key, low in _LAYER_INTS.items():
        as_int(f"{where}.{key}", d[key], low)
    for key, low in _LAYER_LISTS.items():
        as_ints(f"{where}.{key}", d.get(key, []), low)
    for i, pair in enumerate(as_list(f"{where}.in_groups", d["in_groups"])):
        if not isinstance(pair, list) or len(pair) != 2:
            raise field_error(f"{where}.in_groups[{i}]", f"is {pair!r}, not a [group, block] pair")
        as_group(f"{where}.in_groups[{i}]", pair[0], n_groups)
        as_int(f"{where}.in_groups[{i}] block", pair[1], 1)
    if d["out_group"] is not None:
        as_group(f"{where}.out_group", d["out_group"], n_groups)
    cells = d.get("cells", {})
    if not isinstance(cells, dict):
        raise field_error(f"{where}.cells", f"is {cells!r}, not a mapping")
    for key, ms in cells.items():
        if not isinstance(key, str) or not re.fullmatch(r"[1-9][0-9]*,[1-9][0-9]*", key):
            raise field_error(f"{where}.cells", f"has the key {key!r}, not 'c_in,c_out' (two positive whole numbers)")
        as_ms(f"{where}.cells[{key!r}]", ms, positive=True)  # a timed run takes time, however small the layer
    return LayerSpec(**{**d, "cells": dict(cells)})


def as_flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise field_error(where, f"is {value!r}, not true or false")
    return value


_BRANCH_FIELDS = ("join", "groups", "layers", "size", "extra_ms")


def parse_branches(value: Any, n_groups: int, n_layers: int) -> list[BranchSpec]:
    """The branch records, each group and layer of the table in one branch at most."""
    found: list[BranchSpec] = []
    owned: dict[str, set[int]] = {"groups": set(), "layers": set()}
    for i, d in enumerate(as_list("branches", value)):
        where = f"branches[{i}]"
        if not isinstance(d, dict):
            raise field_error(where, f"is {d!r}, not a mapping")
        unknown = sorted(set(d) - set(_BRANCH_FIELDS))
        if unknown:
            raise field_error(f"{where}.{unknown[0]}", "is not a branch field")
        missing = [key for key in _BRANCH_FIELDS if key not in d and key != "extra_ms"]
        if missing:
            raise field_error(f"{where}.{missing[0]}", "is missing")
        if not isinstance(d["join"], str):
            raise field_error(f"{where}.join", f"is {d['join']!r}, not a string")
        picked = {
            "groups": as_ints(f"{where}.groups", d["groups"], 0),
            "layers": as_ints(f"{where}.layers", d["layers"], 0),
        }
        for key, n in (("groups", n_groups), ("layers", n_layers)):
            ks = picked[key]
            if (
                (key == "groups" and not ks)
                or len(set(ks)) != len(ks)
                or any(k >= n for k in ks)
                or owned[key] & set(ks)
            ):
                raise field_error(f"{where}.{key}", f"is {ks}: {key} of this table, distinct, in no other branch")
            owned[key] |= set(ks)
        size = as_int(f"{where}.size", d["size"], 1)
        extra = as_ms(f"{where}.extra_ms", d.get("extra_ms", 0.0), signed=True)
        found.append(BranchSpec(d["join"], picked["groups"], picked["layers"], size, extra))
    return found
