"""Pruning to a latency budget on a target, closed loop: profile, select, cut, measure, correct.

The table predicts; the target decides. After surgery the slim model is measured on the target
interleaved with the unpruned one. Predictions are compared as ratios to that baseline: the
table's predicted slim/unpruned ratio times the baseline measured in the same run, so a machine
that got faster or slower since profiling does not count as a prediction error. If the slim model
misses the goal by more than ``MISS_TOLERANCE``, the measured ratio over the table's predicted
one becomes a correction factor (what layer-by-layer profiling misses near this solution --
fusions, layout changes -- taken from the model itself, as NetAdapt does), the budget handed to
the selector is divided by it, and the selection repeated (at most ``Budget.tries`` times). A model
that meets the goal but measures more than ``OVERSHOOT`` under the aim (the goal less the margin)
is corrected the same way, the other way round: it kept fewer channels than the goal needs (the
table over-predicted, or the machine got faster). Of the tries that meet the goal (within the
tolerance) the one measured nearest the aim is kept, else the closest miss; a corrected
budget that selects a model already measured ends the loop. The goal for
``--speedup S`` is the interleaved baseline measurement divided by S.

Every selection aims ``Budget.margin`` under the goal: a model predicted exactly at the goal is
measured on either side of it (timing noise of a few percent), so one aimed at it would meet
"at least S times faster" about half the time. Where only the margin stands between the goal
and the rails, the smallest model the rails allow is the aim.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text
from slim2deploy.measure.targets import DEFAULT_CACHE, CellCache, Target, make_target
from slim2deploy.model.checkpoint import Checkpoint
from slim2deploy.pipeline.profile import model_artifact, profile, read_table, refine
from slim2deploy.pipeline.prune import load_for_pruning, save_pruned
from slim2deploy.prune.latency import DEFAULT_MARGIN, LatencyTable
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.select import LatencySelector, OutOfReach, Selection, kept_whole, select
from slim2deploy.prune.summary import summarize
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups

MISS_TOLERANCE = 0.03
# a model that meets the goal but measures more than this fraction (of the goal) under the aim gave
# away channels (and accuracy) for nothing: the budget is loosened by the same correction and the
# selection repeated
OVERSHOOT = 0.10


def _rank(miss: float, aim: float) -> tuple[int, float]:
    """How good a try measured at ``miss`` x the goal is (larger is better): one that meets the goal
    (within the tolerance), nearest the aim (``aim`` x the goal: where the selection was pointed; a
    slower one keeps channels the margin was there to give up, a faster one gave up channels for
    nothing); else the smallest miss."""
    return (1, -abs(miss - aim)) if miss <= 1 + MISS_TOLERANCE else (0, -miss)


@dataclass(frozen=True)
class Budget:
    """A latency goal on a target: ``speedup`` over the unpruned model, or ``latency_ms``; the
    rails every selection respects. Plain data, like ``Selection`` (what a build caches on)."""

    speedup: float | None = None
    latency_ms: float | None = None
    target: str = "ort-cpu"
    batch: int = 64
    precision: str = "fp32"
    threads: int | None = None
    table: str | None = None  # a profile to reuse instead of profiling
    cache: str | None = str(DEFAULT_CACHE)
    tries: int = 4
    rails: Rails = field(default_factory=Rails)
    margin: float = DEFAULT_MARGIN  # aim this fraction under the goal
    keep: tuple[str, ...] = ()  # layers every selection leaves whole (``Selection.keep``)
    # a goal out of reach: False is one error; True prunes to the smallest model the rails allow and
    # reports the goal missed (a study comparing at equal latency must not stop on a noisy table)
    or_smallest: bool = False

    def __post_init__(self) -> None:
        if (self.speedup is None) == (self.latency_ms is None):
            raise SlimError("give exactly one latency budget: --speedup S or --latency-ms T")
        # checked here, before the minutes of profiling a bad value would otherwise cost
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1):
            raise SlimError(f"--speedup must be a number above 1 (unpruned latency / goal), got {self.speedup}")
        if self.latency_ms is not None and not (math.isfinite(self.latency_ms) and self.latency_ms > 0):
            raise SlimError(f"--latency-ms must be a positive number of milliseconds, got {self.latency_ms}")
        if not (isinstance(self.batch, int) and not isinstance(self.batch, bool) and self.batch >= 1):
            raise SlimError(f"--profile-batch must be a positive integer, got {self.batch!r}")
        if not (isinstance(self.tries, int) and self.tries >= 1):
            raise SlimError(f"--tries must be a positive integer, got {self.tries!r}")
        if not (isinstance(self.margin, int | float) and 0 <= self.margin < 0.5):
            raise SlimError(f"--margin must be a fraction in [0, 0.5) of the goal to aim under, got {self.margin!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.keep:  # written only when it says something: earlier builds' cache keys stay valid
            del d["keep"]
        return d

    def goal(self) -> str:
        return f"speed-up {self.speedup:g}x" if self.speedup is not None else f"{self.latency_ms:g} ms"

    def describe(self) -> str:
        r = self.rails
        kept = f"; keep {', '.join(self.keep)}" if self.keep else ""
        return (
            f"latency {self.goal()} on {self.target} batch {self.batch} {self.precision}, aimed {self.margin:.0%} "
            "under; rails: "
            f"min_channels={r.min_channels} max_prune={r.max_prune} round_to={r.round_to}{kept}"
        )


@dataclass
class BudgetResult:
    plan: PruningPlan
    summary: str
    table: LatencyTable
    chosen: dict[str, float]
    tries: list[dict[str, float]] = field(default_factory=list)
    met: bool = False


def _latency_table(
    budget: Budget,
    model: nn.Module,
    traced: PruningPlan,
    ckpt: Checkpoint,
    src: str | Path,
    target: Target,
    log: Callable[[str], None] | None,
) -> LatencyTable:
    """The table the budget names (``--table``), or one profiled now on ``target`` and refined once."""
    if budget.table:
        return read_table(budget.table, traced, ckpt, target)
    cache = CellCache(target, budget.cache)
    table = profile(model, traced, ckpt, src, target, budget.rails, cache=cache, log=log)
    first = Selection(LatencySelector(table.to_dict(), budget.latency_ms, budget.speedup), budget.rails, budget.keep)
    try:
        refine(table, traced, first, target, cache=cache, log=log)
    except OutOfReach:
        if not budget.or_smallest:
            raise
    return table


def check_table(budget: Budget, model: nn.Module, ckpt: Checkpoint, *, fold: bool, exact: bool) -> None:
    """Refuse now what ``prune_to_budget`` would refuse in ``budget.table`` (``build`` checks it before
    creating its output folder)."""
    if budget.table:
        traced = trace_groups(model, torch.zeros(1, *ckpt.input_shape), fold=fold, exact=exact)
        target = make_target(budget.target, budget.batch, budget.precision, budget.threads)
        read_table(budget.table, traced, ckpt, target)


def prune_to_budget(
    src: str | Path,
    dst: str | Path,
    budget: Budget,
    *,
    fold: bool = True,
    exact: bool = True,
    trust_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    target: Target | None = None,
    table_out: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> BudgetResult:
    """What ``slim2deploy prune --speedup/--latency-ms`` does; ``target`` overrides ``budget.target``."""
    rails = budget.rails
    target = target or make_target(budget.target, budget.batch, budget.precision, budget.threads)
    ckpt, rebuilt = load_for_pruning(src, trust_code, input_shape)
    rebuilt.check_batch(budget.batch, "--profile-batch")
    model = rebuilt.model
    x = torch.zeros(1, *ckpt.input_shape)
    traced = trace_groups(model, x, fold=fold, exact=exact)
    goal_ms = budget.latency_ms
    table = _latency_table(budget, model, traced, ckpt, src, target, log)
    if table_out:
        atomic_write_text(table_out, table.to_json())
    aim = 1.0 - budget.margin
    budget_ms = (budget.latency_ms or table.full_ms / float(budget.speedup or 1)) * aim
    tries: list[dict[str, float]] = []
    best: tuple[float, PruningPlan, Any, Selection, dict[str, float]] | None = None
    with tempfile.TemporaryDirectory(prefix="slim2deploy-budget-") as tmp:
        work = Path(tmp)
        base: Path | None = None
        held = kept_whole(traced.groups, budget.keep)
        floor = [
            min(set(rails.allowed(g.size)) & set(steps), default=g.size) if g.prunable and i not in held else g.size
            for i, (steps, g) in enumerate(zip(table.steps, traced.groups, strict=True))
        ]
        at_floor = False
        tried: set[tuple[int, ...]] = set()
        factor = 1.0  # measured / predicted ratio to the unpruned model, from the last try
        for attempt in range(budget.tries):
            selection = Selection(LatencySelector(table.to_dict(), latency_ms=budget_ms), rails, budget.keep)
            try:
                plan = select(traced, selection)
            except OutOfReach:
                # tightened past what the rails allow (or only the margin is out of reach): the smallest
                # model they allow is the last try
                if at_floor:
                    raise
                if best is None and table.predict(floor) > budget_ms / aim * (1 + 1e-9):
                    if not budget.or_smallest:  # the goal itself is out of reach: say so in its terms, not the margin's
                        at_goal = LatencySelector(table.to_dict(), latency_ms=budget_ms / aim)
                        select(traced, Selection(at_goal, rails, budget.keep))
                        raise
                    if log:
                        log(f"note: {budget.goal()} is out of reach; trying the smallest model the rails allow")
                budget_ms, at_floor = table.predict(floor), True
                selection = Selection(LatencySelector(table.to_dict(), latency_ms=budget_ms), rails, budget.keep)
                plan = select(traced, selection)
            counts = [len(g.keep) for g in plan.groups]
            if tuple(counts) in tried:
                if log:  # nothing new to learn from measuring it again
                    log(f"try {attempt + 1}: the corrected budget selects a model already measured; stopping")
                break
            slim = apply_plan(model, plan)
            base = base or model_artifact(model, ckpt, Path(src), target, work, "baseline")
            slim_ckpt = work / f"slim{attempt}.pt"
            save_pruned(ckpt, src, slim, plan, selection, slim_ckpt)
            art = model_artifact(slim, ckpt, slim_ckpt, target, work, f"slim{attempt}")
            base_ms, slim_ms = target.latencies([base, art])
            goal = goal_ms if goal_ms is not None else base_ms / float(budget.speedup or 1)
            ratio = table.predict(counts) / table.full_ms  # the table's slim/unpruned (full_ms > 0: checked)
            to_measured = factor * base_ms / table.full_ms  # table ms -> ms of this run's baseline
            row = {
                "budget_ms": budget_ms * to_measured,
                "predicted_ms": ratio * factor * base_ms,
                "predicted_speedup": 1.0 / (ratio * factor) if ratio > 0 else math.nan,
                "measured_ms": slim_ms,
                "baseline_ms": base_ms,
                "goal_ms": goal,
            }
            tries.append(row)
            if log:
                log(
                    f"try {attempt + 1}: predicted {row['predicted_ms']:.4g} ms, measured {slim_ms:.4g} ms "
                    f"(unpruned {base_ms:.4g} ms, goal {goal:.4g} ms)"
                )
            miss = slim_ms / goal
            if best is None or _rank(miss, aim) > _rank(best[0], aim):
                best = (miss, plan, slim, selection, row)
            tried.add(tuple(counts))
            if at_floor or aim - OVERSHOOT <= miss <= 1 + MISS_TOLERANCE:
                break
            if log and attempt + 1 < budget.tries:
                how = "over the goal: tightening" if miss > 1 else "faster than the goal needs: widening"
                log(f"try {attempt + 1}: {abs(miss - 1):.0%} {how} the budget by the measured/predicted ratio")
            if ratio > 0:
                factor = (slim_ms / base_ms) / ratio
                budget_ms = table.full_ms * (goal / base_ms) / factor * aim
            else:  # a table that predicts nothing here: tighten by the miss
                budget_ms *= goal / slim_ms
    assert best is not None
    miss, plan, slim, selection, chosen = best
    met = miss <= 1 + MISS_TOLERANCE
    plan.notes.append(
        f"measured on {target.describe()}: {chosen['measured_ms']:.4g} ms vs unpruned {chosen['baseline_ms']:.4g} ms "
        f"interleaved (speed-up {chosen['baseline_ms'] / chosen['measured_ms']:.2f}x), goal {budget.goal()} = "
        f"{chosen['goal_ms']:.4g} ms {'met' if met else 'MISSED'} ({len(tries)} of at most {budget.tries} tries)"
    )
    save_pruned(ckpt, src, slim, plan, selection, dst)
    return BudgetResult(plan, summarize(plan, model, x, slim), table, chosen, tries, met)
