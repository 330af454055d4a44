"""A latency goal as a selection: ``Selection(Budget(speedup=2), rails, keep, depth)`` (plain data, no torch).

A ratio or a list of widths selects from the scores alone; a latency goal cannot: it needs a latency table
of the model on its target and a closed loop that measures what it cut (``pipeline.budget``). So ``Budget``
is the selector that *asks* for latency -- the one selection type callers hold -- and ``Selection.goal``
says whether a selection is one. The selection recorded in the plan is the resolved one: a
``LatencySelector`` with its table and the budget in milliseconds that met the goal.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.latency import DEFAULT_MARGIN
from slim2deploy.prune.plan import Group
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.select import Selection, Selector, register_selector


@register_selector
@dataclass(frozen=True)
class Budget(Selector):
    """A latency goal on a target: ``speedup`` over the unpruned model, or ``latency_ms``, measured at
    ``batch``/``precision``/``threads``; ``table`` reuses a profile, ``cache`` keeps measured layer cells (None:
    the default folder; ``no_cache``: none); at most ``tries`` measured tries, aimed ``margin`` under the goal.
    ``or_smallest``: a goal out of reach prunes to the smallest model the rails allow and reports the goal
    missed (a study comparing at equal latency must not stop on a noisy table), instead of one error."""

    speedup: float | None = None
    latency_ms: float | None = None
    target: str = "ort-cpu"
    batch: int = 64
    precision: str = "fp32"
    threads: int | None = None
    table: str | None = None
    cache: str | None = None
    no_cache: bool = False
    tries: int = 4
    margin: float = DEFAULT_MARGIN
    or_smallest: bool = False
    kind: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        if (self.speedup is None) == (self.latency_ms is None):
            raise SlimError("give exactly one latency goal: `speedup` or `latency_ms`")
        # checked here, before the minutes of profiling a bad value would otherwise cost
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1):
            raise SlimError(f"`speedup` must be a number above 1 (unpruned latency / goal), got {self.speedup}")
        if self.latency_ms is not None and not (math.isfinite(self.latency_ms) and self.latency_ms > 0):
            raise SlimError(f"`latency_ms` must be a positive number of milliseconds, got {self.latency_ms}")
        if not (isinstance(self.batch, int) and not isinstance(self.batch, bool) and self.batch >= 1):
            raise SlimError(f"`profile_batch` must be a positive integer, got {self.batch!r}")
        if not (isinstance(self.tries, int) and self.tries >= 1):
            raise SlimError(f"`tries` must be a positive integer, got {self.tries!r}")
        if not (isinstance(self.margin, int | float) and 0 <= self.margin < 0.5):
            raise SlimError(f"`margin` must be a fraction in [0, 0.5) of the goal to aim under, got {self.margin!r}")

    def params(self) -> dict[str, Any]:
        return {
            "speedup": self.speedup, "latency_ms": self.latency_ms, "target": self.target, "batch": self.batch,
            "precision": self.precision, "threads": self.threads, "table": self.table, "cache": self.cache,
            "no_cache": self.no_cache, "tries": self.tries, "margin": self.margin, "or_smallest": self.or_smallest,
        }  # fmt: skip

    def kept_counts(
        self, groups: Sequence[Group], rails: Rails, removable: Collection[int] = ()
    ) -> tuple[list[int], dict[str, Any]]:
        raise SlimError(
            "a latency goal is met by measuring, not from the scores alone: prune with the closed loop "
            "(pipeline.budget.prune_to_budget, 'slim2deploy prune' with a speed-up)"
        )

    def goal(self) -> str:
        return f"speed-up {self.speedup:g}x" if self.speedup is not None else f"{self.latency_ms:g} ms"

    def describe(self) -> str:
        return (
            f"latency {self.goal()} on {self.target} batch {self.batch} {self.precision}, aimed {self.margin:.0%} under"
        )


def goal_of(selection: Selection) -> Budget | None:
    """The latency goal a selection asks for, or None for one made from the scores alone."""
    return selection.selector if isinstance(selection.selector, Budget) else None


def by_budget(rails: Rails | None = None, keep: Sequence[str] = (), depth: bool = True, **goal: Any) -> Selection:
    """``Selection(Budget(**goal), rails, keep, depth)``."""
    return Selection(Budget(**goal), rails or Rails(), tuple(keep), depth)
