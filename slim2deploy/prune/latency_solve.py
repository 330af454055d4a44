"""The latency budget's solver: the most importance whose predicted latency fits, width and depth (no torch).

What ``prune.select.LatencySelector`` asks. The importance of keeping k channels of a group is the sum of its k
largest scores (the paper's |gamma|, raw: like the paper's one global threshold this assumes one scale for all
BatchNorms, which sparse training gives); a removed residual branch is worth 0, every group of it (its channels
go with it, whatever count another of its groups was given). Kept counts are the table's profiled steps the
rails allow.

Each prunable group is an *item* offering its kept counts; the groups of a branch the table prices
(``LatencyTable.branches``) make one item together, offering their counts' combinations and "removed" (its
most dead group emptied: the one whose largest score is smallest, so that the constant the branch leaves is the
least wrong). An option costs what the layers of its item (those its groups' widths set; for a branch, every
layer in it, and what its removal saves more) cost in the table with the item at that option and the rest at
the current solution: costs linearised around it. The exact multiple-choice knapsack (``prune.knapsack``) picks
one option per item; the budget handed to it is searched (bisection) for the largest whose solution the table
itself predicts within the real budget; then re-linearised around that solution (bounded), keeping the best;
what the budget has left is spent widening one item at a time where that gains importance (a channel of zero
importance is never kept for its own sake). Exact where latency is additive over items (no layer's widths
depend on two items); a heuristic, always within budget, where it is not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.knapsack import solve_mckp, staircase
from slim2deploy.prune.latency import BranchSpec, LatencyTable
from slim2deploy.prune.plan import Group
from slim2deploy.prune.rails import Rails

# combinations of a branch's groups' counts evaluated at once; past it the partial ones are thinned to their
# cost/value frontier (a bottleneck's two groups of up to 64 steps each stay whole)
MAX_COMBINATIONS = 4096

Option = tuple[int, ...]  # the kept counts of an item's groups, in its order


class OutOfReach(SlimError):
    """A latency budget that even the fastest model the rails allow is predicted to miss."""


@dataclass
class Item:
    """Groups chosen together: one group, or the groups of a branch the table prices (``branch``), removed by
    emptying ``dead``; ``layers``: the table layers whose cost they set."""

    groups: list[int]
    layers: list[int]
    branch: BranchSpec | None = None
    dead: int = -1


@dataclass
class Problem:
    """One budget question: the table, the groups' options (kept counts) and gains (importance by count)."""

    table: LatencyTable
    groups: Sequence[Group]
    options: dict[int, list[int]]
    gains: dict[int, list[float]]
    items: list[Item]
    tolerance: float

    def value(self, counts: Sequence[int]) -> float:
        gone = {g for b in self.table.removed(counts) for g in b.groups}
        return sum(self.gains[i][k] for i, k in enumerate(counts) if i in self.gains and i not in gone)

    def removal(self, item: Item) -> Option:
        return tuple(0 if g == item.dead else self.groups[g].size for g in item.groups)

    def fastest(self) -> list[int]:
        """The fastest model the rails allow, as the table predicts: every group at its floor, and each priced
        branch removed where that is faster (a branch whose layers the table overprices may save less)."""
        counts = [g.size for g in self.groups]
        for item in self.items:
            put(counts, item, tuple(self.options[g][0] for g in item.groups))
        for item in self.items:
            if item.branch is not None:
                gone = with_option(counts, item, self.removal(item))
                counts = gone if self.table.predict(gone) <= self.table.predict(counts) else counts
        return counts

    def cost(self, item: Item, counts: Sequence[int]) -> float:
        return self.table.part_ms(counts, item.layers, [item.branch] if item.branch else [])

    def menu(self, item: Item, current: Sequence[int]) -> list[tuple[Option, float, float]]:
        """The item's options around ``current`` as (option, linearised cost, value), cheapest first, none
        dominated by another (costlier and worth no more)."""
        whole = list(current)  # a removed branch's groups' curves are measured as if it stayed
        if item.branch and any(current[g] == 0 for g in item.groups):
            put(whole, item, tuple(self.groups[g].size for g in item.groups))
        combos: list[Option] = [()]
        for n, g in enumerate(item.groups):
            ks = self.options[g]
            curve = staircase(ks, [self.table.group_ms(g, k, whole) for k in ks], self.tolerance)
            combos = [(*c, k) for c in combos for k, _ in curve]
            if len(combos) > MAX_COMBINATIONS and n + 1 < len(item.groups):
                combos = [o for o, _, _ in self._frontier(item, whole, combos)]
        found = self._frontier(item, current, combos)
        if item.branch:
            found.append((self.removal(item), self.cost(item, with_option(current, item, self.removal(item))), 0.0))
            found = _undominated(found)
        return found

    def _frontier(self, item: Item, current: Sequence[int], combos: list[Option]) -> list[tuple[Option, float, float]]:
        """Each (partial) combination of the item's first counts, the rest as in ``current``, costed and valued."""
        rated = []
        for combo in combos:
            option = (*combo, *(current[g] for g in item.groups[len(combo) :]))
            gain = sum(self.gains[g][k] for g, k in zip(item.groups, option, strict=True))
            rated.append((combo, self.cost(item, with_option(current, item, option)), gain))
        return _undominated(rated)

    def raises(self, item: Item, counts: Sequence[int]) -> list[Option]:
        """Options one step wider than ``counts``: one group widened; a removed branch back at its floor."""
        now = tuple(counts[g] for g in item.groups)
        if item.branch and 0 in now:
            return [tuple(self.options[g][0] for g in item.groups)]
        return [(*now[:n], k, *now[n + 1 :]) for n, g in enumerate(item.groups) for k in self.options[g] if k > now[n]]

    def fill(self, counts: list[int], budget: float) -> list[int]:
        """Spend what the budget has left: widen one item at a time, best value gain first, for a gain only: a
        channel worth nothing (a gamma sparse training set to 0) costs time and adds nothing, so it goes even
        where the budget could pay for it, as does a removed branch (emptied, it is exact where its gamma are
        zero). Measured: VGG-11 w0.5 sparse-trained (67.8% of gamma < 1e-2) kept 47.9% dead gamma at
        ``--speedup 2`` when these were spent too, and scored no better after fine-tuning than the model
        without them at 1.7 times its speed (docs/results.md)."""
        counts = list(counts)
        while True:
            have = self.value(counts)
            moves = []
            for n, item in enumerate(self.items):
                for option in self.raises(item, counts):
                    trial = with_option(counts, item, option)
                    gain = self.value(trial) - have
                    if gain > 0 and self.table.predict(trial) <= budget:
                        moves.append((gain, n, option, trial))
            if not moves:
                return counts
            counts = max(moves, key=lambda m: m[:3])[3]


def at(counts: Sequence[int], group: int, kept: int) -> list[int]:
    return [*counts[:group], kept, *counts[group + 1 :]]


def put(counts: list[int], item: Item, option: Option) -> None:
    for g, k in zip(item.groups, option, strict=True):
        counts[g] = k


def with_option(counts: Sequence[int], item: Item, option: Option) -> list[int]:
    trial = list(counts)
    put(trial, item, option)
    return trial


def _undominated(rated: list[tuple[Option, float, float]]) -> list[tuple[Option, float, float]]:
    """Cheapest first; an option costing more than another and worth no more is dropped. Of equals a branch's
    removal wins (fewer kernels, and exact where it is worth nothing), then the wider."""
    kept: list[tuple[Option, float, float]] = []
    for entry in sorted(rated, key=lambda e: (e[1], -e[2], 0 not in e[0], [-k for k in e[0]])):
        if not kept or entry[2] > kept[-1][2]:
            kept.append(entry)
    return kept


def problem(
    table: LatencyTable, groups: Sequence[Group], rails: Rails, removable: Collection[int], tolerance: float
) -> Problem:
    """The budget question for ``groups``: options, gains, and the items (a branch the table prices is one item
    where every group of it may be emptied, ``removable``, and pruned)."""
    table.check_model([g.size for g in groups], [g.prunable for g in groups])
    table.check_depth(removable)
    options: dict[int, list[int]] = {}
    gains: dict[int, list[float]] = {}
    for i, g in enumerate(groups):
        allowed = sorted(set(rails.allowed(g.size)) & set(table.steps[i]))
        if g.prunable and allowed:
            options[i] = allowed
            gains[i] = [0.0, *itertools.accumulate(sorted((abs(s) for s in g.scores or []), reverse=True))]
    offered = [b for b in table.branches if all(g in options and g in removable for g in b.groups)]
    items = [
        Item(list(b.groups), sorted({*table.touching(b.groups), *b.layers}), b, min(b.groups, key=_deadness(groups)))
        for b in offered
    ]
    inside = {g for b in offered for g in b.groups}
    items += [Item([i], table.touching([i])) for i in options if i not in inside]
    items.sort(key=lambda item: min(item.groups))
    return Problem(table, groups, options, gains, items, tolerance)


def _deadness(groups: Sequence[Group]) -> Callable[[int], tuple[float, float, int]]:
    """A sort key of group indices, the most dead first: its largest score, then their sum."""

    def key(g: int) -> tuple[float, float, int]:
        scores = [abs(s) for s in groups[g].scores or [0.0]]
        return max(scores), sum(scores), g

    return key


def solve(p: Problem, budget: float) -> list[int]:
    """Kept counts per group (0: that group's branch removed, the rest of it whole) within ``budget`` ms."""
    table = p.table
    fastest = p.fastest()
    floor_ms = table.predict(fastest)
    if floor_ms > budget:
        _out_of_reach(p, budget, floor_ms, fastest)
    best = (p.value(fastest), fastest)
    current = [g.size for g in p.groups]
    for _ in range(4):  # re-linearise around the latest solution
        menus = [p.menu(item, current) for item in p.items]
        fixed = table.predict(current) - sum(p.cost(item, current) for item in p.items)
        # the knapsack prunes partial sums over its budget: costs shifted to start at 0 (a removal may save
        # more than its layers cost), the budget by as much
        lows = [min(cost for _, cost, _ in menu) for menu in menus]
        choices = [[(cost - low, value) for _, cost, value in menu] for menu, low in zip(menus, lows, strict=True)]
        # the linearised cost is off where both widths of a layer change: search the budget handed to
        # the knapsack for the largest one whose solution the table itself predicts within budget
        lo, hi, t, found = 0.0, 2.0, 1.0, None
        for _ in range(11):
            picked = solve_mckp(choices, budget * t - fixed - sum(lows))
            trial = list(current)
            for item, menu, j in zip(p.items, menus, picked or [], strict=False):
                put(trial, item, menu[j][0])
            if picked is not None and table.predict(trial) <= budget:
                lo, found = t, trial
                if p.value(trial) > best[0]:
                    best = (p.value(trial), trial)
            elif picked is None:  # nothing fits what was handed over: hand over more
                lo = t
            else:
                hi = t
            t = (lo + hi) / 2
        if found is None or found == current:
            break
        current = found
    return p.fill(best[1], budget)


def _out_of_reach(p: Problem, budget: float, floor_ms: float, fastest: list[int]) -> None:
    table = p.table
    # a speed-up below 1x is no goal --speedup takes: then the rails themselves are what to change
    why = (
        f"a speed-up of {table.full_ms / floor_ms:.2f}x over {table.full_ms:.4g} ms; ask for at most that, or"
        if floor_ms < table.full_ms
        else f"no faster than the unpruned {table.full_ms:.4g} ms: the rails allow no speed-up on this target;"
    )
    depth = any(item.branch for item in p.items)
    gone = len(table.removed(fastest))
    raise OutOfReach(
        f"a latency of {budget:.4g} ms on {table.describe()} is out of reach: the fastest model the rails allow"
        + (
            f" ({gone} of its {sum(1 for i in p.items if i.branch)} removable residual branches removed)"
            if depth
            else ""
        )
        + f" is predicted at {floor_ms:.4g} ms, {why} loosen `min_channels` / `max_prune` / `round_to`"
        + ("" if depth or not table.branches else ", or let pruning remove residual branches (`depth=True`)")
    )
