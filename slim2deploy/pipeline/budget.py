"""Pruning to a latency goal on a target, closed loop: profile, select, cut, measure, correct.

The table predicts; the target decides. After surgery the slim model is measured on the target
interleaved with the unpruned one (a ``Try``). Predictions are compared as ratios to that baseline: the
table's predicted slim/unpruned ratio times the baseline measured in the same run, so a machine that got
faster or slower since profiling does not count as a prediction error. ``next_step`` -- a pure rule, tested
alone -- decides from the last try: a model that misses the goal by more than ``MISS_TOLERANCE`` turns
measured ratio over predicted ratio into a correction factor (what layer-by-layer profiling misses near this
solution -- fusions, layout changes -- taken from the model itself, as NetAdapt does) and the budget handed to
the selector is divided by it; a model that meets the goal but measures more than ``OVERSHOOT`` under the aim
(the goal less the margin) is corrected the same way, the other way round: it kept fewer channels than the
goal needs. Of the tries that meet the goal (within the tolerance) the one measured nearest the aim is kept,
else the closest miss (``best_try``); a corrected budget that selects a model already measured ends the loop.
The goal for a speed-up ``S`` is the interleaved baseline measurement divided by ``S``.

Every selection aims ``margin`` under the goal: a model predicted exactly at the goal is measured on either
side of it (timing noise of a few percent), so one aimed at it would meet "at least S times faster" about
half the time. Where only the margin stands between the goal and the rails, the smallest model the rails
allow is the aim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text, temporary_folder
from slim2deploy.measure.targets import DEFAULT_CACHE, CellCache, Target, make_target
from slim2deploy.model.checkpoint import Checkpoint
from slim2deploy.pipeline.profile import model_artifact, profile, read_table, refine
from slim2deploy.pipeline.prune import load_for_pruning, prune_checkpoint, save_pruned
from slim2deploy.prune.goal import Budget, goal_of
from slim2deploy.prune.latency import LatencyTable
from slim2deploy.prune.latency_solve import OutOfReach, problem
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.select import LatencySelector, Selection, select, selection_groups
from slim2deploy.prune.summary import summarize
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups

MISS_TOLERANCE = 0.03
# a model that meets the goal but measures more than this fraction (of the goal) under the aim gave
# away channels (and accuracy) for nothing: the budget is loosened by the same correction and the
# selection repeated
OVERSHOOT = 0.10


@dataclass(frozen=True)
class Try:
    """One measured try: what was handed to the selector, what the table predicted, what was measured."""

    counts: tuple[int, ...]
    budget_ms: float  # in the table's milliseconds
    predicted_ratio: float  # the table's slim / unpruned
    measured_ms: float
    baseline_ms: float  # the unpruned model, measured interleaved with this one
    goal_ms: float
    factor: float  # the measured/predicted correction this try was selected with

    @property
    def miss(self) -> float:
        """Measured over goal: above 1 misses it."""
        return self.measured_ms / self.goal_ms

    def row(self, table_full_ms: float) -> dict[str, float]:
        """What the summary and the report show of it, in this run's milliseconds."""
        scale = self.factor * self.baseline_ms / table_full_ms  # table ms -> ms of this run's baseline
        ratio = self.predicted_ratio * self.factor
        return {
            "budget_ms": self.budget_ms * scale,
            "predicted_ms": ratio * self.baseline_ms,
            "predicted_speedup": 1.0 / ratio if ratio > 0 else math.nan,
            "measured_ms": self.measured_ms,
            "baseline_ms": self.baseline_ms,
            "goal_ms": self.goal_ms,
        }


@dataclass(frozen=True)
class Step:
    """What the loop does after a try: stop, or select again with ``budget_ms`` (table ms) and ``factor``."""

    budget_ms: float | None
    factor: float
    why: str


def _rank(miss: float, aim: float) -> tuple[int, float]:
    """How good a try measured at ``miss`` x the goal is (larger is better): one that meets the goal
    (within the tolerance), nearest the aim (``aim`` x the goal: where the selection was pointed; a
    slower one keeps channels the margin was there to give up, a faster one gave up channels for
    nothing); else the smallest miss."""
    return (1, -abs(miss - aim)) if miss <= 1 + MISS_TOLERANCE else (0, -miss)


def best_try(tries: list[Try], aim: float) -> Try:
    """The try to keep (``_rank``)."""
    return max(tries, key=lambda t: _rank(t.miss, aim))


def next_step(last: Try, aim: float, table_full_ms: float) -> Step:
    """The rule of the module docstring, from the last try alone."""
    miss = last.miss
    if aim - OVERSHOOT <= miss <= 1 + MISS_TOLERANCE:
        return Step(None, last.factor, "the goal is met, near the aim")
    how = "over the goal: tightening" if miss > 1 else "faster than the goal needs: widening"
    why = f"{abs(miss - 1):.0%} {how} the budget by the measured/predicted ratio"
    if last.predicted_ratio <= 0:  # a table that predicts nothing here: move by the miss itself
        return Step(last.budget_ms / miss, last.factor, why)
    factor = (last.measured_ms / last.baseline_ms) / last.predicted_ratio
    return Step(table_full_ms * (last.goal_ms / last.baseline_ms) / factor * aim, factor, why)


@dataclass
class BudgetResult:
    plan: PruningPlan
    summary: str
    table: LatencyTable
    chosen: dict[str, float]
    tries: list[dict[str, float]] = field(default_factory=list)
    met: bool = False


def cache_dir(budget: Budget) -> str | None:
    return None if budget.no_cache else str(budget.cache or DEFAULT_CACHE)


def target_of(budget: Budget) -> Target:
    return make_target(budget.target, budget.batch, budget.precision, budget.threads)


def _latency_table(
    selection: Selection,
    model: nn.Module,
    traced: PruningPlan,
    ckpt: Checkpoint,
    src: str | Path,
    target: Target,
    log: Callable[[str], None] | None,
) -> LatencyTable:
    """The table the goal names (``table``), or one profiled now on ``target`` and refined once."""
    budget = _goal(selection)
    if budget.table:
        return read_table(budget.table, traced, ckpt, target, selection.depth)
    cache = CellCache(target, cache_dir(budget))
    table = profile(model, traced, ckpt, src, target, selection.rails, depth=selection.depth, cache=cache, log=log)
    first = replace(selection, selector=LatencySelector(table.to_dict(), budget.latency_ms, budget.speedup))
    try:
        refine(table, traced, first, target, cache=cache, log=log)
    except OutOfReach:
        if not budget.or_smallest:
            raise
    return table


def _goal(selection: Selection) -> Budget:
    budget = goal_of(selection)
    if budget is None:
        raise SlimError("this selection has no latency goal: prune it with `ratio` instead")
    return budget


def check_table(selection: Selection, model: nn.Module, ckpt: Checkpoint, *, fold: bool, exact: bool) -> None:
    """Refuse now what ``prune_to_budget`` would refuse in the goal's ``table`` (``build`` checks it before
    creating its output folder)."""
    budget = goal_of(selection)
    if budget is not None and budget.table:
        traced = trace_groups(model, torch.zeros(1, *ckpt.input_shape), fold=fold, exact=exact)
        read_table(budget.table, traced, ckpt, target_of(budget), selection.depth)


@dataclass
class Pruned:
    """What pruning a checkpoint by any selection gives: the plan, its summary, and for a latency goal the
    closed loop's tries (None otherwise)."""

    plan: PruningPlan
    summary: str
    latency: BudgetResult | None = None


def prune_selected(src: str | Path, dst: str | Path, selection: Selection, **options: Any) -> Pruned:
    """Prune ``src`` into ``dst`` by ``selection``: through the closed loop for a latency goal, from the scores
    otherwise. ``options``: ``fold``, ``exact``, ``trust_code``, ``input_shape``; for a goal also
    ``table_out``, ``target`` and ``log``."""
    if goal_of(selection) is not None:
        result = prune_to_budget(src, dst, selection, **options)
        return Pruned(result.plan, result.summary, result)
    kept = {k: v for k, v in options.items() if k in ("fold", "exact", "trust_code", "input_shape")}
    plan, summary = prune_checkpoint(src, dst, selection, **kept)
    return Pruned(plan, summary)


def prune_to_budget(
    src: str | Path,
    dst: str | Path,
    selection: Selection,
    *,
    fold: bool = True,
    exact: bool = True,
    trust_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    target: Target | None = None,
    table_out: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> BudgetResult:
    """What ``slim2deploy prune --speedup/--latency-ms`` does; ``target`` overrides the goal's."""
    budget = _goal(selection)
    target = target or target_of(budget)
    ckpt, rebuilt = load_for_pruning(src, trust_code, input_shape)
    rebuilt.check_batch(budget.batch, "`profile_batch`")
    model = rebuilt.model
    x = torch.zeros(1, *ckpt.input_shape)
    traced = trace_groups(model, x, fold=fold, exact=exact, score=selection.score)
    table = _latency_table(selection, model, traced, ckpt, src, target, log)
    if table_out:
        atomic_write_text(table_out, table.to_json())
    aim = 1.0 - budget.margin
    loop = _Loop(selection, table, traced, model, ckpt, src, target, log)
    with temporary_folder("slim2deploy-budget-") as tmp:
        tries = loop.run(Path(tmp), (budget.latency_ms or table.full_ms / float(budget.speedup or 1)) * aim, aim)
    best = best_try([t for t, _ in tries], aim)
    plan, slim, chosen_selection = next(found for t, found in tries if t is best)
    chosen = best.row(table.full_ms)
    met = best.miss <= 1 + MISS_TOLERANCE
    plan.notes.append(
        f"measured on {target.describe()}: {best.measured_ms:.4g} ms vs unpruned {best.baseline_ms:.4g} ms "
        f"interleaved (speed-up {best.baseline_ms / best.measured_ms:.2f}x), goal {budget.goal()} = "
        f"{best.goal_ms:.4g} ms {'met' if met else 'MISSED'} ({len(tries)} of at most {budget.tries} tries)"
    )
    save_pruned(ckpt, src, slim, plan, chosen_selection, dst)
    rows = [t.row(table.full_ms) for t, _ in tries]
    return BudgetResult(plan, summarize(plan, model, x, slim), table, chosen, rows, met)


@dataclass
class _Loop:
    """The closed loop's state: the table, the traced model, where and how tries are measured."""

    selection: Selection
    table: LatencyTable
    traced: PruningPlan
    model: nn.Module
    ckpt: Checkpoint
    src: str | Path
    target: Target
    log: Callable[[str], None] | None

    def fastest(self) -> list[int]:
        """The fastest kept counts the rails (and ``keep``) allow among the table's profiled steps, as the table
        predicts; with depth, removable branches the table prices removed where that is faster."""
        groups, _, removable = selection_groups(self.traced, self.selection)
        return problem(self.table, groups, self.selection.rails, removable, 0.0).fastest()

    def select(self, budget_ms: float) -> tuple[PruningPlan, Selection]:
        chosen = replace(self.selection, selector=LatencySelector(self.table.to_dict(), latency_ms=budget_ms))
        return select(self.traced, chosen), chosen

    def plan_for(self, budget_ms: float, aim: float, first: bool) -> tuple[PruningPlan, Selection, float, bool]:
        """The plan for ``budget_ms``; past what the rails allow (tightened too far, or only the margin out of
        reach), the smallest model they allow, marked as the last try. On the first try a goal itself out of
        reach is one error in its own terms (unless the goal asks for the smallest model then)."""
        try:
            return (*self.select(budget_ms), budget_ms, False)
        except OutOfReach:
            floor_ms = self.table.predict(self.fastest())
            budget = _goal(self.selection)
            if first and floor_ms > budget_ms / aim * (1 + 1e-9):
                if not budget.or_smallest:
                    self.select(budget_ms / aim)  # raises, naming the goal rather than the margin
                    raise
                if self.log:
                    self.log(f"note: {budget.goal()} is out of reach; trying the smallest model the rails allow")
            return (*self.select(floor_ms), floor_ms, True)

    def measure(self, work: Path, base: Path | None, plan: PruningPlan, chosen: Selection, n: int) -> tuple:
        slim = apply_plan(self.model, plan)
        base = base or model_artifact(self.model, self.ckpt, Path(self.src), self.target, work, "baseline")
        slim_ckpt = work / f"slim{n}.pt"
        save_pruned(self.ckpt, self.src, slim, plan, chosen, slim_ckpt)
        art = model_artifact(slim, self.ckpt, slim_ckpt, self.target, work, f"slim{n}")
        base_ms, slim_ms = self.target.latencies([base, art])
        return slim, base, base_ms, slim_ms

    def run(
        self, work: Path, budget_ms: float, aim: float
    ) -> list[tuple[Try, tuple[PruningPlan, nn.Module, Selection]]]:
        budget = _goal(self.selection)
        tries: list[tuple[Try, tuple[PruningPlan, nn.Module, Selection]]] = []
        base: Path | None = None
        factor, at_floor = 1.0, False
        for n in range(budget.tries):
            if at_floor:
                break
            plan, chosen, budget_ms, at_floor = self.plan_for(budget_ms, aim, first=n == 0)
            counts = tuple(len(g.keep) for g in plan.groups)
            if any(t.counts == counts for t, _ in tries):
                if self.log:  # nothing new to learn from measuring it again
                    self.log(f"try {n + 1}: the corrected budget selects a model already measured{_why_same(plan)}; "
                             "stopping")  # fmt: skip
                break
            slim, base, base_ms, slim_ms = self.measure(work, base, plan, chosen, n)
            goal = budget.latency_ms if budget.latency_ms is not None else base_ms / float(budget.speedup or 1)
            ratio = self.table.predict(list(counts)) / self.table.full_ms
            done = Try(counts, budget_ms, ratio, slim_ms, base_ms, goal, factor)
            tries.append((done, (plan, slim, chosen)))
            if self.log:
                row = done.row(self.table.full_ms)
                self.log(
                    f"try {n + 1}: predicted {row['predicted_ms']:.4g} ms, measured {slim_ms:.4g} ms "
                    f"(unpruned {base_ms:.4g} ms, goal {goal:.4g} ms)"
                )
            step = next_step(done, aim, self.table.full_ms)
            if step.budget_ms is None:
                break
            if self.log and n + 1 < budget.tries:
                self.log(f"try {n + 1}: {step.why}")
            budget_ms, factor = step.budget_ms, step.factor
        return tries


def _why_same(plan: PruningPlan) -> str:
    """Why a wider budget changed nothing, where the plan shows it: every channel cut is worth nothing."""
    cut = [abs(g.scores[i]) for g in plan.groups if g.scores is not None for i in g.removed]
    return (
        " (every channel it leaves out has importance 0: keeping them would cost time for nothing)"
        if cut and not any(cut)
        else ""
    )
