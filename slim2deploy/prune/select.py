"""Selection: from scored groups to the channels each group keeps.

Three separate pieces, so each can change alone:

- the *score* of every channel, computed when the model is traced (``prune.trace.trace_groups``
  with a score from ``prune.score``; the paper's |gamma|, the largest over the group's BatchNorms);
- a *selector*, the rule that turns scores into a kept count per group: a global threshold at a
  ratio (the paper), fixed widths (controls in the study), or a latency budget on a target;
- the *rails* (``prune.rails.Rails``), which every selector respects.

Inside a group the kept channels are always the highest-scoring ones. ``Selection`` (selector +
rails) is plain data: it is recorded in the plan and is what a build caches on.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.plan import Group, Member, PruningPlan, copy_group
from slim2deploy.prune.rails import DEFAULT_MAX_PRUNE, DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO, Rails, check_ratio
from slim2deploy.prune.score import ScoreFn, max_abs_gamma
from slim2deploy.prune.trace import trace_groups


class Selector(abc.ABC):
    """A rule that decides how many channels each prunable group keeps."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def kept_counts(self, groups: Sequence[Group], rails: Rails) -> tuple[list[int], dict[str, Any]]:
        """Kept count per group (prunable ones; others keep their size) and facts worth recording."""

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The selector's parameters as plain data."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params()}

    def describe(self) -> str:
        return self.kind + " " + " ".join(f"{k}={v}" for k, v in self.params().items() if not isinstance(v, list))


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
    (then the rails)."""

    ratio: float
    kind: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def kept_counts(self, groups: Sequence[Group], rails: Rails) -> tuple[list[int], dict[str, Any]]:
        pooled = sorted(s for g in groups if g.prunable for s in g.scores or [])
        if not pooled:
            return [g.size for g in groups], {"threshold": None}
        threshold = pooled[min(int(len(pooled) * self.ratio), len(pooled) - 1)]
        counts = [
            rails.fit(g.size, sum(s > threshold for s in g.scores or [])) if g.prunable else g.size for g in groups
        ]
        return counts, {"threshold": threshold}


@register_selector
@dataclass(frozen=True)
class WidthsSelector(Selector):
    """Given kept counts, one per traced group in order (e.g. another plan's widths); rails apply."""

    widths: tuple[int, ...]
    kind: ClassVar[str] = "widths"

    def params(self) -> dict[str, Any]:
        return {"widths": list(self.widths)}

    def kept_counts(self, groups: Sequence[Group], rails: Rails) -> tuple[list[int], dict[str, Any]]:
        if len(self.widths) != len(groups):
            raise SlimError(f"{len(self.widths)} widths given for a model with {len(groups)} channel groups")
        return [rails.fit(g.size, w) if g.prunable else g.size for g, w in zip(groups, self.widths, strict=True)], {}


@dataclass(frozen=True)
class Selection:
    """What to prune: a selector and the rails it respects. Plain data, recorded in the plan."""

    selector: Selector
    rails: Rails = field(default_factory=Rails)

    def to_dict(self) -> dict[str, Any]:
        return {"selector": self.selector.to_dict(), "rails": self.rails.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        if not isinstance(d, dict) or not isinstance(d.get("selector"), dict):
            raise SlimError("a selection must be a mapping with a 'selector' mapping")
        params = dict(d["selector"])
        kind = params.pop("kind", None)
        if kind not in SELECTORS:
            raise SlimError(f"unknown selector {kind!r}; known: {', '.join(sorted(SELECTORS))}")
        try:
            selector = SELECTORS[kind](**params)
        except TypeError as exc:
            raise SlimError(f"selector {kind!r} does not take {sorted(params)}: {exc}") from exc
        return cls(selector, Rails.from_dict(d.get("rails", {})))

    def describe(self) -> str:
        r = self.rails
        return (
            f"{self.selector.describe()}; rails: min_channels={r.min_channels} max_prune={r.max_prune} "
            f"round_to={r.round_to}"
        )


def by_ratio(ratio: float, rails: Rails | None = None) -> Selection:
    return Selection(RatioSelector(ratio), rails or Rails())


def select(traced: PruningPlan, selection: Selection) -> PruningPlan:
    """A new plan whose groups keep their highest-scoring channels in the counts the selector chose."""
    plan = replace(
        traced,
        groups=[copy_group(g) for g in traced.groups],
        new_biases=[],
        notes=list(traced.notes),
        selection=selection.to_dict(),
        min_channels=selection.rails.min_channels,
        max_prune=selection.rails.max_prune,
        round_to=selection.rails.round_to,
        ratio=getattr(selection.selector, "ratio", None),
    )
    counts, facts = selection.selector.kept_counts(plan.groups, selection.rails)
    plan.threshold = facts.get("threshold")
    if not any(g.prunable for g in plan.groups):
        plan.notes.append("no prunable group: nothing removed")
    for g, k in zip(plan.groups, counts, strict=True):
        if not g.prunable:
            g.keep = list(range(g.size))
            continue
        scores = g.scores or []
        order = sorted(range(g.size), key=lambda i: (-scores[i], i))
        g.keep = sorted(order[: min(g.size, max(1, k))])
    _add_fold_biases(plan)
    return plan


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
        if not g.pruned:
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
    score: ScoreFn = max_abs_gamma,
) -> PruningPlan:
    """Trace ``model``, score its groups with ``score`` and choose the channels to keep; the model is
    not modified.

    ``ratio`` is the fraction of prunable channels below the global |gamma| threshold (the
    paper's percent), with the rails given here; or a whole ``Selection`` (then the rails come
    from it).
    """
    selection = ratio if isinstance(ratio, Selection) else by_ratio(ratio, Rails(min_channels, max_prune, round_to))
    return select(trace_groups(model, example_input, fold=fold, score=score), selection)


def select_channels(
    traced: PruningPlan,
    ratio: float,
    *,
    min_channels: int = DEFAULT_MIN_CHANNELS,
    max_prune: float = DEFAULT_MAX_PRUNE,
    round_to: int = DEFAULT_ROUND_TO,
) -> PruningPlan:
    """The global threshold at ``ratio`` and the rails on a traced plan; a new plan."""
    return select(traced, by_ratio(ratio, Rails(min_channels, max_prune, round_to)))
