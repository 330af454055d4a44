"""The latency table: what each layer a group touches costs on a target, as data (no torch).

A target's latency is modelled as ``base_ms + scale * sum(layer_ms(layer, c_in, c_out))`` over
the convolutions and linears whose input or output width a prunable group changes. ``base_ms``
is everything else (layers no group changes, the runtime's fixed overhead). ``scale`` is what a
layer costs inside the model per millisecond it costs standalone (a standalone probe also pays
for its input and output copies; and on a shared machine the load differs between the moments
cells and models are measured). Both are calibrated on two real models measured interleaved,
the unpruned one and the smallest the rails allow, so the table predicts both exactly.

A convolution's cost depends on its input *and* output widths, so every layer has its own grid
of measured cells ``(c_in, c_out) -> ms``. Profiling does not fill the grid (15 x 15 cells per
layer at the default rails): it measures the *row* through the layer's current input width and
the *column* through its current output width, first at the full model and then again around
each solution (``pipeline.profile``). Between measured lines a cell is estimated by a rank-1
(separable) model anchored at the nearest measured crossing ``(ri, rc)``:
``f(ci, co) ~= f(ri, co) * f(ci, rc) / f(ri, rc)``, exact on every measured line -- so exact
along the lines through the solution once it has been re-profiled. Any runtime's step
structure (a 40-channel conv costing what a 48-channel one costs) is in the measured cells,
not assumed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from slim2deploy.base.errors import SlimError
from slim2deploy.base.formats import parse_json
from slim2deploy.prune.knapsack import staircase

# a latency goal is aimed this fraction under: a model predicted exactly at the goal measures on
# either side of it (timing noise of a few percent); see pipeline.budget
DEFAULT_MARGIN = 0.03

TABLE_VERSION = 1


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
        return self._parsed

    def record(self, ci: int, co: int, ms: float) -> None:
        self.cells[f"{ci},{co}"] = float(ms)
        self._parsed = None

    def ms(self, ci: int, co: int) -> float:
        """Measured cost of the cell, or the rank-1 estimate from the nearest measured crossing."""
        cells = self.measured()
        if (ci, co) in cells:
            return cells[(ci, co)]
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


# what a latency measurement depends on (Target.key), with the flag of 'prune'/'build' that sets it
MEASURED_WITH = {
    "target": "--target",
    "batch": "--profile-batch",
    "precision": "--profile-precision",
    "threads": "--profile-threads",
}


def _setting(value: Any) -> str:
    return "default" if value in (None, 0) else str(value)  # threads 0 / None: the runtime's own choice


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "unrecorded"


def _cell(key: str) -> tuple[int, int]:
    a, b = key.split(",")
    return int(a), int(b)


# what a table's fields may hold: checked as data by LatencyTable.from_dict, so an edited or damaged
# table is one error naming the field, never a traceback or a silently wrong prediction
OPS = ("conv", "linear")
_LAYER_REQUIRED = ("name", "op", "in_fixed", "in_groups", "out_fixed", "out_group")
_LAYER_INTS = {"in_fixed": 0, "out_fixed": 0}
_LAYER_LISTS = {"kernel": 1, "stride": 1, "padding": 0, "dilation": 1, "in_hw": 1}


def _bad(where: str, why: str) -> SlimError:
    return SlimError(f"latency table field {where} {why}; profile the model again")


def _items(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(where, f"is {value!r}, not a list")
    return value


def _int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(where, f"is {value!r}, not a whole number >= {low}")
    return value


def _ints(where: str, value: Any, low: int) -> list[int]:
    return [_int(f"{where}[{i}]", v, low) for i, v in enumerate(_items(where, value))]


def _ms(where: str, value: Any, *, positive: bool = False, signed: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or (value < 0 and not signed) or (positive and value <= 0):
        wanted = "> 0" if positive else "" if signed else ">= 0"
        raise _bad(where, f"is {value!r}, not a finite number {wanted}".rstrip())
    return float(value)


def _group(where: str, value: Any, n_groups: int) -> int:
    g = _int(where, value, 0)
    if g >= n_groups:
        raise _bad(where, f"is group {g}, but the table has {n_groups} groups")
    return g


def _layer(where: str, d: Any, n_groups: int) -> LayerSpec:
    if not isinstance(d, dict):
        raise _bad(where, f"is {d!r}, not a mapping")
    known = {f.name for f in fields(LayerSpec) if f.init}
    unknown = sorted(set(d) - known)
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", "is not a layer field")
    missing = [key for key in _LAYER_REQUIRED if key not in d]
    if missing:
        raise _bad(f"{where}.{missing[0]}", "is missing")
    if not isinstance(d["name"], str):
        raise _bad(f"{where}.name", f"is {d['name']!r}, not a string")
    if d["op"] not in OPS:
        raise _bad(f"{where}.op", f"is {d['op']!r}, not one of {', '.join(OPS)}")
    if not isinstance(d.get("depthwise", False), bool):
        raise _bad(f"{where}.depthwise", f"is {d['depthwise']!r}, not true or false")
    for key, low in _LAYER_INTS.items():
        _int(f"{where}.{key}", d[key], low)
    for key, low in _LAYER_LISTS.items():
        _ints(f"{where}.{key}", d.get(key, []), low)
    for i, pair in enumerate(_items(f"{where}.in_groups", d["in_groups"])):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _bad(f"{where}.in_groups[{i}]", f"is {pair!r}, not a [group, block] pair")
        _group(f"{where}.in_groups[{i}]", pair[0], n_groups)
        _int(f"{where}.in_groups[{i}] block", pair[1], 1)
    if d["out_group"] is not None:
        _group(f"{where}.out_group", d["out_group"], n_groups)
    cells = d.get("cells", {})
    if not isinstance(cells, dict):
        raise _bad(f"{where}.cells", f"is {cells!r}, not a mapping")
    for key, ms in cells.items():
        if not isinstance(key, str) or not re.fullmatch(r"[1-9][0-9]*,[1-9][0-9]*", key):
            raise _bad(f"{where}.cells", f"has the key {key!r}, not 'c_in,c_out' (two positive whole numbers)")
        _ms(f"{where}.cells[{key!r}]", ms, positive=True)  # a timed run takes time, however small the layer
    return LayerSpec(**{**d, "cells": dict(cells)})


@dataclass
class LatencyTable:
    """Per-layer measured cells for one model on one target, batch and precision.

    ``sizes`` are the traced groups' channel counts (every group, in plan order); ``steps`` the
    kept counts profiled per group (empty for a group that cannot be pruned). ``full_ms`` is the
    measured latency of the unpruned model; ``meta`` records target, device, library versions,
    batch, precision and the model.
    """

    meta: dict[str, Any]
    sizes: list[int]
    steps: list[list[int]]
    layers: list[LayerSpec]
    full_ms: float
    base_ms: float = 0.0
    scale: float = 1.0

    def calibrate(self, full_ms: float, small_ms: float | None = None, small: Sequence[int] | None = None) -> None:
        """Make the table predict ``full_ms`` for the unpruned model, and ``small_ms`` for the kept
        counts ``small`` when given (then ``scale`` is fitted too; else it is 1)."""
        self.full_ms = float(full_ms)
        layers_full = self._layers_ms(self.sizes)
        self.scale = 1.0
        if small_ms is not None and small is not None:
            spread = layers_full - self._layers_ms(small)
            if spread > 0 and full_ms > small_ms:
                self.scale = (full_ms - small_ms) / spread
        self.base_ms = self.full_ms - self.scale * layers_full

    def _layers_ms(self, counts: Sequence[int]) -> float:
        return sum(layer.ms(*layer.widths(counts)) for layer in self.layers)

    def predict(self, counts: Sequence[int]) -> float:
        """Predicted latency (ms) of the model with these kept counts per group."""
        if len(counts) != len(self.sizes):
            raise SlimError(f"{len(counts)} kept counts given for a table of {len(self.sizes)} groups")
        return self.base_ms + self.scale * self._layers_ms(counts)

    def group_ms(self, group: int, kept: int, counts: Sequence[int]) -> float:
        """What the layers touching ``group`` cost (in the model) when it keeps ``kept`` and the rest ``counts``."""
        trial = list(counts)
        trial[group] = kept
        return self.scale * sum(layer.ms(*layer.widths(trial)) for layer in self.layers if group in layer.groups())

    def staircases(self, tol: float = 0.03) -> dict[int, list[tuple[int, float]]]:
        """Per prunable group, the kept counts where its cost (at the full model) steps up -- the
        runtime's step structure as measured -- with the cost of each step."""
        return {
            g: staircase(steps, [self.group_ms(g, k, self.sizes) for k in steps], tol)
            for g, steps in enumerate(self.steps)
            if steps
        }

    def lines_around(self, counts: Sequence[int]) -> list[tuple[LayerSpec, int, int]]:
        """Unmeasured cells on each layer's row and column through ``counts`` (what to profile next)."""
        todo: list[tuple[LayerSpec, int, int]] = []
        for layer in self.layers:
            seen = layer.measured()
            wanted: set[tuple[int, int]] = set()
            for g in layer.groups():
                for k in self.steps[g]:
                    trial = list(counts)
                    trial[g] = k
                    wanted.add(layer.widths(trial))
            wanted.add(layer.widths(counts))
            todo += [(layer, ci, co) for ci, co in sorted(wanted) if (ci, co) not in seen]
        return todo

    def check_model(self, sizes: Sequence[int], prunable: Sequence[bool] | None = None) -> None:
        """The table is for a model with these groups; each group to be pruned has measured counts."""
        if list(sizes) != self.sizes:
            what = self.meta.get("model", "another model")
            raise SlimError(
                f"the latency table was profiled for {what} (group sizes {self.sizes[:6]}...), "
                f"not this model ({list(sizes)[:6]}...); run 'slim2deploy profile' on this checkpoint"
            )
        bare = [i for i, p in enumerate(prunable or []) if p and not self.steps[i]]
        if bare:
            approx = "with" if self.meta.get("approximate") else "without"
            raise SlimError(
                f"the latency table has no kept counts for {len(bare)} group(s) this pruning may cut "
                f"(first: group {bare[0]}, {self.sizes[bare[0]]} channels): it was profiled {approx} "
                "--approximate; profile again with the options you prune with"
            )

    def check_measured_for(self, arch: str, input_shape: Sequence[int], how: dict[str, Any]) -> None:
        """Refuse a table profiled for another model (architecture, input size: the same channel counts
        at another resolution cost otherwise) or measured otherwise than ``how`` (``target``, ``batch``,
        ``precision``, ``threads``, as in ``meta``): its steps and milliseconds would be another run's."""
        m = self.meta
        shape = list(m.get("input_shape") or [])
        if m.get("arch") != arch or shape != list(input_shape):
            raise SlimError(
                f"the latency table was profiled for {m.get('arch')} on {_shape(shape)} inputs, not for this "
                f"model ({arch} on {_shape(input_shape)}): its layers cost otherwise; run 'slim2deploy profile' "
                "on this checkpoint"
            )
        differ = [
            f"{flag} {_setting(m.get(key))} (this run: {_setting(how[key])})"
            for key, flag in MEASURED_WITH.items()
            if _setting(m.get(key)) != _setting(how[key])
        ]
        if differ:
            raise SlimError(
                f"the latency table was measured with other settings than this run's: {', '.join(differ)}; "
                "pass the table's settings, or re-run 'slim2deploy profile' with the ones you prune with"
            )

    def describe(self) -> str:
        m = self.meta
        return f"{m.get('target', '?')} batch {m.get('batch', '?')} {m.get('precision', '?')} on {m.get('device', '?')}"

    def to_dict(self) -> dict[str, Any]:
        d = {"version": TABLE_VERSION, **asdict(self)}
        for layer in d["layers"]:
            layer.pop("_parsed")
        return d

    @classmethod
    def from_dict(cls, d: Any) -> LatencyTable:
        """The table in ``d``, checked field by field; a damaged or edited table raises one ``SlimError``."""
        if not isinstance(d, dict):
            raise SlimError(f"not a slim2deploy latency table (a JSON {type(d).__name__}, expected a mapping)")
        if d.get("version") != TABLE_VERSION:
            raise SlimError(f"not a slim2deploy latency table (version {d.get('version')!r}, expected {TABLE_VERSION})")
        for key in ("meta", "sizes", "steps", "layers", "full_ms", "base_ms"):
            if key not in d:
                raise _bad(key, "is missing")
        if not isinstance(d["meta"], dict):
            raise _bad("meta", f"is {d['meta']!r}, not a mapping")
        sizes = _ints("sizes", d["sizes"], 1)
        steps = _items("steps", d["steps"])
        if len(steps) != len(sizes):
            raise _bad("steps", f"has {len(steps)} lists for {len(sizes)} group sizes")
        for g, (size, kept) in enumerate(zip(sizes, steps, strict=True)):
            counts = _ints(f"steps[{g}]", kept, 1)
            if counts != sorted(set(counts)) or any(k > size for k in counts):
                raise _bad(f"steps[{g}]", f"is {counts}, not ascending kept counts within 1..{size}")
        layers = [_layer(f"layers[{i}]", layer, len(sizes)) for i, layer in enumerate(_items("layers", d["layers"]))]
        if not layers:  # profile refuses a model without prunable layers: such a table was edited
            raise _bad("layers", "is empty: the table models no layer")
        table = cls(
            meta=dict(d["meta"]),
            sizes=sizes,
            steps=[list(kept) for kept in steps],
            layers=layers,
            full_ms=_ms("full_ms", d["full_ms"], positive=True),
            base_ms=_ms("base_ms", d["base_ms"], signed=True),
            scale=_ms("scale", d.get("scale", 1.0), positive=True),
        )
        if table.base_ms < 0:
            # calibrate() may fit a base below zero; the smallest model profiled must still take time
            floor_ms = table.predict([kept[0] if kept else size for kept, size in zip(steps, sizes, strict=True)])
            if not floor_ms > 0:
                raise _bad(
                    "base_ms", f"is {table.base_ms!r}: the smallest model profiled is predicted at {floor_ms:.4g} ms"
                )
        return table

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        return cls.from_dict(parse_json(text, "the latency table", advice="profile the model again"))
