"""Scores: how much each channel of a group matters, as one number per channel.

A score function takes the model and a traced group and returns one float per channel of the
group, or ``None`` when it cannot score it (then the group is not pruned). ``trace_groups`` and
``rescore`` take one; a selector (``prune.select``) then turns scores into kept channels.

The default is the paper's: |gamma|, the largest over the group's BatchNorms. A channel is
removed from every BatchNorm in the group at once, so it is only unimportant if it is
unimportant to all of them; the maximum keeps a channel that any reader weighs heavily (the
mean would let many near-zero readers outvote one that depends on it). A grouped convolution's
coupled channels are one channel of the group with one BatchNorm entry per convolution group,
so the maximum runs over all of those too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from slim2deploy.prune.plan import Group

ScoreFn = Callable[[nn.Module, Group], "list[float] | None"]


def max_abs_gamma(model: nn.Module, group: Group) -> list[float] | None:
    """|gamma| per channel, the maximum over every BatchNorm entry of the group; None without one."""
    gammas = [m for m in group.members if m.role == "bn"]
    if not gammas:
        return None
    best = torch.zeros(group.size)
    for m in gammas:
        w = model.get_parameter(m.tensor).detach().float().abs().cpu()
        best = torch.maximum(best, w[m.start : m.start + group.size])
    return best.tolist()


NEAR_ZERO = 1e-2  # |gamma| below this: a channel sparse training switched off (gamma starts at 0.5 or 1)
SPARSE_SHARE = 0.05  # below this share of near-zero gammas, the model was not sparse-trained


def gamma_warning(groups: Sequence[Group]) -> str | None:
    """A warning when the gammas that rank the prunable channels carry no signal: almost none is near zero,
    as in a model that was never sparse-trained. Pruning by gamma then removes channels almost at random."""
    scores = [s for g in groups if g.prunable for s in g.scores or []]
    if not scores:
        return None
    share = sum(abs(s) < NEAR_ZERO for s in scores) / len(scores)
    if share >= SPARSE_SHARE:
        return None
    return (
        f"only {share:.1%} of the BatchNorm gammas that rank the prunable channels are near zero (< {NEAR_ZERO:g}): "
        "the model was not sparse-trained, so gamma says little about which channels matter and pruning removes "
        "them almost at random; sparse-train it first ('slim2deploy train --model CKPT --sparsity 1e-4 ...') and "
        "fine-tune after pruning"
    )
