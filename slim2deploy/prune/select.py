"""Selection: from scored groups to the channels each group keeps.

Three separate pieces, so each can change alone:

- the *score* of every channel, computed when the model is traced (``prune.trace.trace_groups``
  with a score from ``prune.score``; the paper's |gamma|, the largest over the group's BatchNorms);
- a *selector*, the rule that turns scores into a kept count per group: a global threshold at a
  ratio (the paper), fixed widths (controls in the study), or a latency budget on a target;
- the *rails* (``prune.rails.Rails``), which every selector respects.

Inside a group the kept channels are always the highest-scoring ones. ``Selection`` (selector +
rails + depth) is plain data: it is recorded in the plan and is what a build caches on.

Depth (``Selection.depth``, on by default): a group that lies inside a removable residual branch
(``PruningPlan.branches``) may keep no channel, which removes the whole branch (``prune.depth``);
the rails' floor holds for every group that stays. A ratio empties such a group when none of its
channels scores above the threshold; a latency budget when removing the branch keeps the most
importance within the budget (its table prices the removal). A branch with a group ``keep`` holds
whole is never removed.
"""

from __future__ import annotations

import abc
import fnmatch
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.importance import DEFAULT_IMPORTANCE, NAMES
from slim2deploy.prune.latency import LatencyTable
from slim2deploy.prune.latency_solve import problem, solve
from slim2deploy.prune.plan import Group, Member, PruningPlan, copy_group
from slim2deploy.prune.rails import DEFAULT_MAX_PRUNE, DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO, Rails, check_ratio
from slim2deploy.prune.score import ScoreFn, gamma_warning, importance_score
from slim2deploy.prune.trace import trace_groups


class Selector(abc.ABC):
    """A rule that decides how many channels each prunable group keeps."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def kept_counts(
        self, groups: Sequence[Group], rails: Rails, removable: Collection[int] = ()
    ) -> tuple[list[int], dict[str, Any]]:
        """Kept count per group (prunable ones; others keep their size) and facts worth recording.

        The groups whose index is in ``removable`` may get 0: their residual branch is removed.
        """

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The selector's parameters as plain data."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params()}

    def describe(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.params().items() if not isinstance(v, list))
        return shown if shown and list(self.params()) == [self.kind] else f"{self.kind} {shown}".rstrip()


SELECTORS: dict[str, type[Selector]] = {}


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Class decorator: make a selector known to ``Selection.from_dict`` by its ``kind``."""
    SELECTORS[cls.kind] = cls
    return cls


@register_selector
@dataclass(frozen=True)
class RatioSelector(Selector):
    """The paper: pool the scores of all prunable channels, the threshold is the value at position
    ``int(ratio * N)`` of the sorted pool, and a group keeps its channels scoring strictly above it
    (then the rails). A removable group none of whose channels scores above it keeps none."""

    ratio: float
    kind: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def kept_counts(
        self, groups: Sequence[Group], rails: Rails, removable: Collection[int] = ()
    ) -> tuple[list[int], dict[str, Any]]:
        pooled = sorted(s for g in groups if g.prunable for s in g.scores or [])
        if not pooled:
            return [g.size for g in groups], {"threshold": None}
        threshold = pooled[min(int(len(pooled) * self.ratio), len(pooled) - 1)]
        counts = []
        for i, g in enumerate(groups):
            above = sum(s > threshold for s in g.scores or [])
            empty = above == 0 and i in removable
            counts.append(g.size if not g.prunable else 0 if empty else rails.fit(g.size, above))
        return counts, {"threshold": threshold}


@register_selector
@dataclass(frozen=True)
class WidthsSelector(Selector):
    """Given kept counts, one per traced group in order (e.g. another plan's widths); rails apply.
    A width of 0 removes a removable group's branch (elsewhere the rails raise it to their floor)."""

    widths: tuple[int, ...]
    kind: ClassVar[str] = "widths"

    def params(self) -> dict[str, Any]:
        return {"widths": list(self.widths)}

    def kept_counts(
        self, groups: Sequence[Group], rails: Rails, removable: Collection[int] = ()
    ) -> tuple[list[int], dict[str, Any]]:
        if len(self.widths) != len(groups):
            raise SlimError(f"{len(self.widths)} widths given for a model with {len(groups)} channel groups")
        return [
            g.size if not g.prunable else 0 if w == 0 and i in removable else rails.fit(g.size, w)
            for i, (g, w) in enumerate(zip(groups, self.widths, strict=True))
        ], {}


@register_selector
@dataclass(frozen=True)
class LatencySelector(Selector):
    """Keep the most importance whose predicted latency on the table's target fits a budget
    (``prune.latency_solve``: a knapsack over the table's profiled steps the rails allow, removing
    residual branches the table prices where that keeps more).

    The budget is ``latency_ms``, or the table's measured full-model latency divided by
    ``speedup``. Importance of keeping k channels of a group is the sum of its k largest scores;
    a removed branch's groups are worth nothing. ``tolerance``: kept counts whose cost is within
    it of a wider count's are the same step (the wider is kept).
    """

    table: dict[str, Any]
    latency_ms: float | None = None
    speedup: float | None = None
    tolerance: float = 0.03
    kind: ClassVar[str] = "latency"

    def __post_init__(self) -> None:
        if (self.latency_ms is None) == (self.speedup is None):
            raise SlimError("give exactly one latency budget: `speedup` or `latency_ms`")
        value = self.speedup if self.speedup is not None else self.latency_ms
        if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
            raise SlimError(f"the latency budget must be a positive number, got {value!r}")

    def params(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "speedup": self.speedup,
            "tolerance": self.tolerance,
            "table": self.table,
        }

    def describe(self) -> str:
        t = LatencyTable.from_dict(self.table)
        goal = f"speedup={self.speedup:g}" if self.speedup is not None else f"latency_ms={self.latency_ms:g}"
        return f"latency {goal} on {t.describe()}"

    def budget_ms(self, table: LatencyTable) -> float:
        return float(self.latency_ms) if self.latency_ms is not None else table.full_ms / float(self.speedup or 1)

    def kept_counts(
        self, groups: Sequence[Group], rails: Rails, removable: Collection[int] = ()
    ) -> tuple[list[int], dict[str, Any]]:
        table = LatencyTable.from_dict(self.table)
        question = problem(table, groups, rails, removable, self.tolerance)
        budget = self.budget_ms(table) * (1 + 1e-9)  # float noise: a model predicted at the budget fits it
        counts = solve(question, budget)
        return counts, {
            "threshold": None,
            "budget_ms": budget,
            "predicted_ms": table.predict(counts),
            "full_ms": table.full_ms,
            "target": table.describe(),
        }


@dataclass(frozen=True)
class Selection:
    """What to prune: a selector, the rails it respects, the layers it must leave whole (``keep``: module
    names, shell wildcards allowed), whether a group inside a removable residual branch may be emptied,
    removing the branch (``depth``), and the score that ranks channels (``importance``, a name in
    ``prune.score.IMPORTANCE``; the caller traces with it). Plain data, recorded in the plan."""

    selector: Selector
    rails: Rails = field(default_factory=Rails)
    keep: tuple[str, ...] = ()
    depth: bool = True
    importance: str = DEFAULT_IMPORTANCE

    @property
    def score(self) -> ScoreFn:
        return importance_score(self.importance)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"selector": self.selector.to_dict(), "rails": self.rails.to_dict(), "depth": self.depth}
        if self.keep:  # written only when it says something: older plans and cache keys stay as they were
            d["keep"] = list(self.keep)
        if self.importance != DEFAULT_IMPORTANCE:
            d["importance"] = self.importance
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        if not isinstance(d, dict) or not isinstance(d.get("selector"), dict):
            raise SlimError("a selection must be a mapping with a 'selector' mapping")
        depth = d.get("depth", False)  # recorded before depth existed: no branch was removed
        if not isinstance(depth, bool):
            raise SlimError(f"a selection's depth must be true or false, got {depth!r}")
        params = dict(d["selector"])
        kind = params.pop("kind", None)
        if kind not in SELECTORS:
            raise SlimError(f"unknown selector {kind!r}; known: {', '.join(sorted(SELECTORS))}")
        try:
            selector = SELECTORS[kind](**params)
        except TypeError as exc:
            raise SlimError(f"selector {kind!r} does not take {sorted(params)}: {exc}") from exc
        keep = d.get("keep", [])
        if not (isinstance(keep, list) and all(isinstance(k, str) and k for k in keep)):
            raise SlimError(f"a selection's keep must be a list of layer names, got {keep!r:.80}")
        importance = d.get("importance", DEFAULT_IMPORTANCE)
        if importance not in NAMES:
            raise SlimError(f"a selection's importance must be one of {', '.join(NAMES)}, got {importance!r:.80}")
        return cls(selector, Rails.from_dict(d.get("rails", {})), tuple(keep), depth, importance)

    def describe(self) -> str:
        r = self.rails
        kept = f"; keep {', '.join(self.keep)}" if self.keep else ""
        return (
            f"{self.selector.describe()}; rails: min_channels={r.min_channels} max_prune={r.max_prune} "
            f"round_to={r.round_to}{kept}; depth {'on' if self.depth else 'off'}; importance {self.importance}"
        )


def by_ratio(ratio: float, rails: Rails | None = None, keep: Sequence[str] = (), depth: bool = True) -> Selection:
    return Selection(RatioSelector(ratio), rails or Rails(), tuple(keep), depth)


def kept_whole(groups: Sequence[Group], patterns: Sequence[str]) -> dict[int, str]:
    """Index -> pattern of the groups whose channels belong to a layer ``patterns`` name (the layer's own
    outputs: its ``out``, BatchNorm and per-channel members, not the channels it reads). A pattern that
    names no layer is refused: a typo would keep nothing and say nothing."""
    found: dict[int, str] = {}
    for pattern in patterns:
        hits = [
            i
            for i, g in enumerate(groups)
            if any(m.role != "in" and fnmatch.fnmatchcase(m.module, pattern) for m in g.members)
        ]
        if not hits:
            layers = sorted({m.module for g in groups for m in g.members if m.role == "out"})
            shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
            raise SlimError(f"`keep` {pattern!r} matches no layer of the model; its layers are named like {shown}")
        for i in hits:
            found.setdefault(i, pattern)
    return found


def selection_groups(traced: PruningPlan, selection: Selection) -> tuple[list[Group], dict[int, str], set[int]]:
    """The traced groups as the selector sees them: copies, those ``keep`` holds made unprunable (``held``: index
    -> pattern); and with depth the groups it may empty (``removable``: of the removable branches none of whose
    groups is held -- a kept layer never goes with its branch)."""
    groups = [copy_group(g) for g in traced.groups]
    held = kept_whole(groups, selection.keep)
    for i, pattern in held.items():
        groups[i].reasons.append(f"kept whole: keep {pattern!r}")
    branches = [b for b in traced.branches if b.removable and all(groups[i].prunable for i in b.groups)]
    return groups, held, {i for b in branches for i in b.groups} if selection.depth else set()


def select(traced: PruningPlan, selection: Selection) -> PruningPlan:
    """A new plan whose groups keep their highest-scoring channels in the counts the selector chose."""
    groups, held, removable = selection_groups(traced, selection)
    plan = replace(
        traced,
        groups=groups,
        new_biases=[],
        notes=list(traced.notes),
        selection=selection.to_dict(),
        min_channels=selection.rails.min_channels,
        max_prune=selection.rails.max_prune,
        round_to=selection.rails.round_to,
        ratio=getattr(selection.selector, "ratio", None),
    )
    counts, facts = selection.selector.kept_counts(plan.groups, selection.rails, removable)
    if held:
        plan.notes.append(_keep_cost(selection, traced.groups, counts, held, removable))
    plan.threshold = facts.get("threshold")
    if "predicted_ms" in facts:
        plan.notes.append(
            f"latency on {facts['target']}: budget {facts['budget_ms']:.4g} ms, "
            f"predicted {facts['predicted_ms']:.4g} ms (unpruned {facts['full_ms']:.4g} ms measured, "
            f"predicted speed-up {facts['full_ms'] / facts['predicted_ms']:.2f}x)"
        )
    if not any(g.prunable for g in plan.groups):
        plan.notes.append("no prunable group: nothing removed")
    weak = gamma_warning(plan.groups)
    if weak is not None:
        plan.notes.append(f"warning: {weak}")
    for i, (g, k) in enumerate(zip(plan.groups, counts, strict=True)):
        if not g.prunable:
            g.keep = list(range(g.size))
            continue
        scores = g.scores or []
        order = sorted(range(g.size), key=lambda c: (-scores[c], c))
        g.keep = [] if k == 0 and i in removable else sorted(order[: min(g.size, max(1, k))])
    _settle_branches(plan, selection.rails)
    _add_fold_biases(plan)
    return plan


def _keep_cost(
    selection: Selection, traced: Sequence[Group], counts: list[int], held: dict[int, str], removable: Collection[int]
) -> str:
    """What ``keep`` cost: the channels the same selection would have removed from the kept layers, and how
    many more it removed elsewhere instead."""
    free, _ = selection.selector.kept_counts([copy_group(g) for g in traced], selection.rails, removable)
    spared = sum(traced[i].size - free[i] for i in held)
    elsewhere = sum(free[i] - counts[i] for i in range(len(traced)) if i not in held)
    kept = sum(traced[i].size for i in held)
    return (
        f"keep {', '.join(repr(p) for p in selection.keep)}: {len(held)} group(s), {kept} channels "
        f"kept whole; without it this selection would have removed {spared} of them"
        + (f", and it removes {elsewhere} more channels elsewhere instead" if elsewhere > 0 else "")
    )


def _settle_branches(plan: PruningPlan, rails: Rails) -> None:
    """A removed branch's other groups stay whole: their layers go with it, and cutting their channels
    would change the constant it is replaced by. Of two branches joined by one add only the first
    goes, so that the add still depends on the input."""
    joins: set[str] = set()
    for b in plan.removed_branches():
        if b.node in joins:
            for i in b.groups:
                g = plan.groups[i]
                if not g.keep:
                    order = sorted(range(g.size), key=lambda k: (-(g.scores or [])[k], k))
                    g.keep = sorted(order[: rails.fit(g.size, 0)])
            continue
        joins.add(b.node)
        for i in b.groups:
            if plan.groups[i].keep:
                plan.groups[i].keep = list(range(plan.groups[i].size))


def _add_fold_biases(plan: PruningPlan) -> None:
    """Layers that receive a fold get a bias; decided here so apply_plan never looks at weights."""
    has = {m.tensor for g in plan.groups for m in g.members}
    # a layer's outputs can lie in several groups (cut by a slice) or several times in one (grouped conv)
    outputs: dict[str, list[tuple[Group, Member]]] = {}
    for g in plan.groups:
        for m in g.members:
            if m.role == "out" and m.dim == 0:
                outputs.setdefault(m.tensor, []).append((g, m))
    for g in plan.groups:
        if not g.pruned or not g.keep:  # an emptied group's branch is removed whole: nothing to fold
            continue
        for m in g.members:
            bias = f"{m.module}.bias"
            if m.fold and bias not in has and bias not in plan.new_biases:
                plan.new_biases.append(bias)
                for out, w in outputs.get(m.tensor, []):
                    out.members.append(Member(bias, 0, "out", w.start))
                has.add(bias)


def plan_pruning(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float | Selection,
    *,
    min_channels: int = DEFAULT_MIN_CHANNELS,
    max_prune: float = DEFAULT_MAX_PRUNE,
    round_to: int = DEFAULT_ROUND_TO,
    fold: bool = True,
    exact: bool = True,
    score: ScoreFn | None = None,
    depth: bool = True,
) -> PruningPlan:
    """Trace ``model``, score its groups with ``score`` (default: the selection's importance, |gamma|) and
    choose the channels to keep; the model is not modified.

    ``ratio`` is the fraction of prunable channels below the global |gamma| threshold (the
    paper's percent), with the rails and ``depth`` given here; or a whole ``Selection`` (then they
    come from it). ``depth``: a residual branch all of whose channels in one group fall below the
    threshold is removed, instead of kept at the rails' floor.
    """
    rails = Rails(min_channels, max_prune, round_to)
    selection = ratio if isinstance(ratio, Selection) else by_ratio(ratio, rails, depth=depth)
    traced = trace_groups(model, example_input, fold=fold, exact=exact, score=score or selection.score)
    return select(traced, selection)


def select_channels(
    traced: PruningPlan,
    ratio: float,
    *,
    min_channels: int = DEFAULT_MIN_CHANNELS,
    max_prune: float = DEFAULT_MAX_PRUNE,
    round_to: int = DEFAULT_ROUND_TO,
    depth: bool = True,
) -> PruningPlan:
    """The global threshold at ``ratio``, the rails and ``depth`` on a traced plan; a new plan."""
    return select(traced, by_ratio(ratio, Rails(min_channels, max_prune, round_to), depth=depth))
