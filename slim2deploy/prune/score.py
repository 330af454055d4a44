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

from collections.abc import Callable

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
