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

The alternative, ``gamma-out``, weighs |gamma| by how strongly the layers that read the channel use
it: the norm of each reader's weights on that input channel, relative to the reader's average input
channel (so the factor is about 1 for a typical channel, whatever the layer's weight scale, and gamma
stays comparable across layers, the premise of one global threshold), averaged over the readers. A
channel whose gamma is large but whose readers all but ignore it ranks low. A zero gamma stays zero,
so what is exact under |gamma| (a removed channel's constant folded into the next bias, a removed
branch) stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.importance import GAMMA, GAMMA_OUT, NAMES
from slim2deploy.prune.plan import Group, Member

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


def gamma_times_reader_norm(model: nn.Module, group: Group) -> list[float] | None:
    """``max_abs_gamma`` times the channel's relative weight norm in the layers that read it (module docstring);
    |gamma| alone where no layer reads the group through a weight."""
    gammas = max_abs_gamma(model, group)
    if gammas is None:
        return None
    factors = [f for m in group.members if m.role == "in" and (f := _reader_factor(model, m, group.size)) is not None]
    if not factors:
        return gammas
    mean = torch.stack(factors).mean(dim=0)
    return (torch.tensor(gammas) * mean).tolist()


def _reader_factor(model: nn.Module, member: Member, size: int) -> torch.Tensor | None:
    """Per group channel: the norm of the reader's weights on its input indices over the norm a typical input
    index of the reader carries (same number of indices); None for a reader whose weights are all zero."""
    w = model.get_parameter(member.tensor).detach().float().cpu()
    per_index = w.pow(2).sum(dim=[d for d in range(w.dim()) if d != member.dim])
    typical = per_index.mean()
    if typical <= 0:
        return None
    index = member.start + torch.arange(size)[:, None] * member.block + torch.arange(member.block)[None, :]
    channels = per_index[index].sum(dim=1)
    return (channels / (typical * member.block)).sqrt()


IMPORTANCE: dict[str, ScoreFn] = {GAMMA: max_abs_gamma, GAMMA_OUT: gamma_times_reader_norm}
assert tuple(IMPORTANCE) == NAMES


def importance_score(name: str) -> ScoreFn:
    """The score function an ``importance`` name stands for."""
    if name not in IMPORTANCE:
        raise SlimError(f"`importance` {name!r} is not one of {', '.join(IMPORTANCE)}")
    return IMPORTANCE[name]


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
        "the model was not sparse-trained (or not for long enough), so gamma says little about which channels "
        "matter and pruning removes them almost at random; sparse-train it until a share of its gammas is near "
        "zero (an L1 penalty on gamma: the paper's 1e-4 to 1e-5 over tens of epochs, more for a short run; "
        "inspect shows the share) and fine-tune after pruning"
    )
