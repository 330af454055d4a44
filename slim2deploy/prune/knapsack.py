"""Exact multiple-choice knapsack: one choice per group, most value within a cost budget (no torch).

Solved by building the Pareto frontier of (cost, value) over the groups one at a time: a partial
solution that costs more and is worth no more than another is dropped, and so is one over the
budget. What is left is exact (no discretisation of the costs); the frontier stays small
because a group offers a dozen or so kept counts and most combinations are dominated.
"""

from __future__ import annotations

from collections.abc import Sequence

Choice = tuple[float, float]  # (cost, value)


def solve_mckp(choices: Sequence[Sequence[Choice]], budget: float) -> list[int] | None:
    """Index of the chosen option per group maximising total value with total cost <= budget.

    None when even the cheapest option of every group together exceeds the budget. Among equally
    valuable solutions the cheapest is returned.
    """
    eps = 1e-9 * max(1.0, abs(budget))
    # frontier entries: (cost, value, parent entry in the previous frontier, option index)
    frontiers: list[list[tuple[float, float, int, int]]] = [[(0.0, 0.0, -1, -1)]]
    for options in choices:
        candidates = [
            (cost + c, value + v, parent, j)
            for parent, (cost, value, _, _) in enumerate(frontiers[-1])
            for j, (c, v) in enumerate(options)
            if cost + c <= budget + eps
        ]
        if not candidates:
            return None
        candidates.sort(key=lambda e: (e[0], -e[1]))
        frontier: list[tuple[float, float, int, int]] = []
        for entry in candidates:
            if not frontier or entry[1] > frontier[-1][1]:
                frontier.append(entry)
        frontiers.append(frontier)
    best = max(range(len(frontiers[-1])), key=lambda i: (frontiers[-1][i][1], -frontiers[-1][i][0]))
    picked: list[int] = []
    for frontier in reversed(frontiers[1:]):
        _, _, parent, j = frontier[best]
        picked.append(j)
        best = parent
    return picked[::-1]


def staircase(counts: Sequence[int], costs: Sequence[float], tol: float) -> list[tuple[int, float]]:
    """A group's (kept count, cost) options as a staircase, larger counts winning ties.

    Costs are made non-decreasing in the count (a wider layer measured faster than a narrower
    one means the narrower one is worth no more than it), then counts whose cost is within
    ``tol`` (relative to the step they join) of the next larger count's step are given that
    step's cost -- measurement noise, not a real difference -- and dropped, since the larger
    count keeps more for the same time (if 40 and 48 cost the same, keep 48).
    """
    pairs = sorted(zip(counts, costs, strict=True))
    level = [c for _, c in pairs]
    for i in range(len(level) - 2, -1, -1):
        level[i] = min(level[i], level[i + 1])
    kept: list[tuple[int, float]] = []
    step = None
    for i in range(len(pairs) - 1, -1, -1):
        if step is not None and level[i] >= step * (1.0 - tol):
            continue
        step = level[i]
        kept.append((pairs[i][0], step))
    return kept[::-1]
