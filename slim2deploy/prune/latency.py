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

Depth (``BranchSpec``): a table profiled with depth also prices removing each removable residual
branch. A branch one of whose groups keeps 0 channels is gone: none of its layers costs anything
(a cell with a width of 0 is never looked up), and the model saves ``extra_ms`` more -- what the
layers do not explain (BatchNorms and activations a runtime does not fuse, layers the table does
not model, kernel launches). ``calibrate_depth`` fits it on a third model measured with the other
two, the smallest the rails allow with every removable branch removed, so the table predicts that
one exactly too; the closed loop corrects what is left.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from slim2deploy.base.errors import SlimError
from slim2deploy.base.formats import parse_json
from slim2deploy.prune.knapsack import staircase
from slim2deploy.prune.latency_entries import (
    BranchSpec,
    LayerSpec,
    as_flag,
    as_ints,
    as_list,
    as_ms,
    field_error,
    parse_branches,
    parse_layer,
)

# a latency goal is aimed this fraction under: a model predicted exactly at the goal measures on
# either side of it (timing noise of a few percent); see pipeline.budget
DEFAULT_MARGIN = 0.03

TABLE_VERSION = 1


# what a latency measurement depends on (Target.key), with the parameter of a latency goal that sets it
MEASURED_WITH = {
    "target": "`target`",
    "batch": "`profile_batch`",
    "precision": "`profile_precision`",
    "threads": "`profile_threads`",
}


def _setting(value: Any) -> str:
    return "default" if value in (None, 0) else str(value)  # threads 0 / None: the runtime's own choice


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "unrecorded"


@dataclass
class LatencyTable:
    """Per-layer measured cells for one model on one target, batch and precision.

    ``sizes`` are the traced groups' channel counts (every group, in plan order); ``steps`` the
    kept counts profiled per group (empty for a group that cannot be pruned). ``full_ms`` is the
    measured latency of the unpruned model; ``meta`` records target, device, library versions,
    batch, precision and the model. ``depth``: profiled to price removing residual branches
    (``branches``, one per join that may go); a table without it cannot price a removal.
    """

    meta: dict[str, Any]
    sizes: list[int]
    steps: list[list[int]]
    layers: list[LayerSpec]
    full_ms: float
    base_ms: float = 0.0
    scale: float = 1.0
    depth: bool = False
    branches: list[BranchSpec] = field(default_factory=list)
    small_ms: float | None = None  # measured: the smallest model the steps allow (``anchors``)
    bare_ms: float | None = None  # measured: that model without its removable branches

    def anchors(self) -> tuple[list[int], list[int]]:
        """The kept counts of the smallest model the steps allow, and of it with every removable branch removed."""
        small = [kept[0] if kept else size for kept, size in zip(self.steps, self.sizes, strict=True)]
        bare = [*small]
        for b in self.branches:
            bare[b.groups[0]] = 0
        return small, bare

    def recalibrate(self) -> None:
        """Fit base, scale and the branches' cost again to the measured anchors: cells added since (a refined
        line) change what the layers explain, and a fit to the old cells can then predict nonsense."""
        if self.small_ms is None:  # a table from before the anchors were kept: its fit stands
            return
        small, bare = self.anchors()
        self.calibrate(self.full_ms, self.small_ms, small)
        if self.branches and self.bare_ms is not None:
            self.calibrate_depth(self.bare_ms, bare)

    def calibrate(self, full_ms: float, small_ms: float | None = None, small: Sequence[int] | None = None) -> None:
        """Make the table predict ``full_ms`` for the unpruned model, and ``small_ms`` for the kept
        counts ``small`` when given (then ``scale`` is fitted too; else it is 1)."""
        self.full_ms = float(full_ms)
        self.scale = 1.0  # part_ms is in the model's terms: the layers' standalone cost, unscaled, first
        layers_full = self.part_ms(self.sizes, range(len(self.layers)))
        if small_ms is not None and small is not None:
            spread = layers_full - self.part_ms(small, range(len(self.layers)))
            if spread > 0 and full_ms > small_ms:
                self.scale = (full_ms - small_ms) / spread
        self.base_ms = self.full_ms - self.scale * layers_full

    def calibrate_depth(self, measured_ms: float, counts: Sequence[int]) -> None:
        """Make the table predict ``measured_ms`` for ``counts`` (the smallest model with every branch removed,
        measured with ``calibrate``'s two): what the layers do not explain of it is shared out among the removed
        branches in proportion to what each adds at its join (the tensor its BatchNorms, activations and add
        read and write). Removing a branch never costs time: where standalone probes overprice its layers (their
        own launch, on a tiny layer) a branch saves at least nothing, even at its narrowest, and the closed
        loop corrects the rest."""
        gone = self.removed(counts)
        for b in self.branches:
            b.extra_ms = 0.0
        unexplained = self.predict(counts) - float(measured_ms)
        total = sum(b.size for b in gone)
        narrowest = [kept[0] if kept else size for kept, size in zip(self.steps, self.sizes, strict=True)]
        for b in gone:
            b.extra_ms = max(unexplained * b.size / total, -self.part_ms(narrowest, b.layers))

    def removed(self, counts: Sequence[int]) -> list[BranchSpec]:
        """The branches ``counts`` remove: one of their groups keeps no channel."""
        return [b for b in self.branches if any(counts[g] == 0 for g in b.groups)]

    def part_ms(self, counts: Sequence[int], layers: Iterable[int], branches: Iterable[BranchSpec] = ()) -> float:
        """The share of ``predict(counts)`` of these layers and branches: the layers' cost in the model (none for
        one in a removed branch, a width of 0 never looked up), less what the removed ``branches`` save more."""
        gone = self.removed(counts)
        skipped = {i for b in gone for i in b.layers}
        total = 0.0
        for i in layers:
            ci, co = self.layers[i].widths(counts)
            if i not in skipped and ci > 0 and co > 0:
                total += self.layers[i].ms(ci, co)
        return self.scale * total - sum(b.extra_ms for b in branches if any(b is g for g in gone))

    def predict(self, counts: Sequence[int]) -> float:
        """Predicted latency (ms) of the model with these kept counts per group (0: its branch removed)."""
        if len(counts) != len(self.sizes):
            raise SlimError(f"{len(counts)} kept counts given for a table of {len(self.sizes)} groups")
        return self.base_ms + self.part_ms(counts, range(len(self.layers)), self.branches)

    def touching(self, groups: Collection[int]) -> list[int]:
        """The layers whose widths one of ``groups`` sets."""
        return [i for i, layer in enumerate(self.layers) if layer.groups() & set(groups)]

    def group_ms(self, group: int, kept: int, counts: Sequence[int]) -> float:
        """What the layers touching ``group`` cost (in the model) when it keeps ``kept`` and the rest ``counts``."""
        trial = list(counts)
        trial[group] = kept
        return self.part_ms(trial, self.touching([group]))

    def staircases(self, tol: float = 0.03) -> dict[int, list[tuple[int, float]]]:
        """Per prunable group, the kept counts where its cost (at the full model) steps up -- the
        runtime's step structure as measured -- with the cost of each step."""
        return {
            g: staircase(steps, [self.group_ms(g, k, self.sizes) for k in steps], tol)
            for g, steps in enumerate(self.steps)
            if steps
        }

    def lines_around(self, counts: Sequence[int]) -> list[tuple[LayerSpec, int, int]]:
        """Unmeasured cells on each layer's row and column through ``counts`` (what to profile next); none of a
        layer its branch's removal takes away."""
        todo: list[tuple[LayerSpec, int, int]] = []
        for i, layer in enumerate(self.layers):
            seen = layer.measured()
            trials = [list(counts)]
            for g in layer.groups():
                trials += [[*counts[:g], k, *counts[g + 1 :]] for k in self.steps[g]]
            wanted = {
                layer.widths(trial)
                for trial in trials
                if min(layer.widths(trial)) > 0 and not any(i in b.layers for b in self.removed(trial))
            }
            todo += [(layer, ci, co) for ci, co in sorted(wanted) if (ci, co) not in seen]
        return todo

    def check_depth(self, removable: Collection[int]) -> None:
        """A selection that may empty the groups ``removable`` (removing their branches) needs a table that
        prices that; one profiled without depth is refused where the model has such a group."""
        if removable and not self.depth:
            raise SlimError(
                "the latency table was profiled without depth, so it cannot price removing a residual branch, "
                "which this pruning may do; profile the model again with `depth=True`, or prune with `depth=False`"
            )

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
                "`approximate`; profile again with the options you prune with"
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
            layer.pop("_estimated")
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
                raise field_error(key, "is missing")
        if not isinstance(d["meta"], dict):
            raise field_error("meta", f"is {d['meta']!r}, not a mapping")
        sizes = as_ints("sizes", d["sizes"], 1)
        steps = as_list("steps", d["steps"])
        if len(steps) != len(sizes):
            raise field_error("steps", f"has {len(steps)} lists for {len(sizes)} group sizes")
        for g, (size, kept) in enumerate(zip(sizes, steps, strict=True)):
            counts = as_ints(f"steps[{g}]", kept, 1)
            if counts != sorted(set(counts)) or any(k > size for k in counts):
                raise field_error(f"steps[{g}]", f"is {counts}, not ascending kept counts within 1..{size}")
        layers = [
            parse_layer(f"layers[{i}]", layer, len(sizes)) for i, layer in enumerate(as_list("layers", d["layers"]))
        ]
        if not layers:  # profile refuses a model without prunable layers: such a table was edited
            raise field_error("layers", "is empty: the table models no layer")
        table = cls(
            meta=dict(d["meta"]),
            sizes=sizes,
            steps=[list(kept) for kept in steps],
            layers=layers,
            full_ms=as_ms("full_ms", d["full_ms"], positive=True),
            base_ms=as_ms("base_ms", d["base_ms"], signed=True),
            scale=as_ms("scale", d.get("scale", 1.0), positive=True),
            depth=as_flag("depth", d.get("depth", False)),  # tables from before depth: profiled without it
            branches=parse_branches(d.get("branches", []), len(sizes), len(layers)),
            small_ms=as_ms("small_ms", d["small_ms"], positive=True) if d.get("small_ms") is not None else None,
            bare_ms=as_ms("bare_ms", d["bare_ms"], positive=True) if d.get("bare_ms") is not None else None,
        )
        if table.branches and not table.depth:
            raise field_error("branches", "lists branches, but the table was profiled without depth")
        # calibrate() may fit a base below zero and a branch may save more than its layers; the smallest
        # models profiled must still take time
        floor, bare = table.anchors()
        for counts, what in ((floor, "the smallest model"), (bare, "the smallest model without branches")):
            floor_ms = table.predict(counts)
            if not floor_ms > 0:
                raise field_error("base_ms", f"is {table.base_ms!r}: {what} profiled is predicted at {floor_ms:.4g} ms")
        return table

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        return cls.from_dict(parse_json(text, "the latency table", advice="profile the model again"))
