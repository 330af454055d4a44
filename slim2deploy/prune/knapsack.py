"""Exact multiple-choice knapsack: one choice per group, most value within a cost budget (no torch).

Solved by building the Pareto frontier of (cost, value) over the groups one at a time: a partial
solution that costs more and is worth no more than another is dropped, and so is one over the
budget. What is left is exact (no discretisation of the costs); the frontier stays small enough
(most combinations are dominated), and is built with numpy array operations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Choice = tuple[float, float]  # (cost, value)


def solve_mckp(choices: Sequence[Sequence[Choice]], budget: float) -> list[int] | None:
    """Index of the chosen option per group maximising total value with total cost <= budget.

    None when even the cheapest option of every group together exceeds the budget. Among equally
    valuable solutions the cheapest is returned.
    """
    eps = 1e-9 * max(1.0, abs(budget))
    # the frontier as arrays (a residual branch's options are its groups' combinations: thousands of
    # partial solutions times dozens of options per group), and per group each entry's parent and option
    cost, value = np.zeros(1), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for options in choices:
        c = np.array([o[0] for o in options], dtype=float)
        v = np.array([o[1] for o in options], dtype=float)
        costs, values = (cost[:, None] + c).ravel(), (value[:, None] + v).ravel()
        fits = np.flatnonzero(costs <= budget + eps)
        if not fits.size:
            return None
        order = fits[np.lexsort((-values[fits], costs[fits]))]  # by cost, the more valuable first
        ranked = values[order]
        better = ranked > np.maximum.accumulate(np.concatenate(([-np.inf], ranked[:-1])))
        kept = order[better]  # each worth more than everything cheaper
        cost, value = costs[kept], values[kept]
        back.append((kept // len(options), kept % len(options)))
    best = len(value) - 1  # the frontier rises in value with cost: the last entry is worth most, cheapest so
    picked: list[int] = []
    for parents, option in reversed(back):
        picked.append(int(option[best]))
        best = int(parents[best])
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
