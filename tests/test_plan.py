"""The plan: coupled groups found in the traced graph, the global threshold and the rails."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import CASES, HEAVY, rel_err, traced
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.select import plan_pruning, select_channels
from slim2deploy.prune.summary import summarize
from slim2deploy.prune.surgery import apply_plan

PAPER = {"min_channels": 1, "max_prune": 1.0, "round_to": 1}
RATIOS = [round(0.1 * i, 1) for i in range(1, 10)]


def _group_of(plan: PruningPlan, tensor: str, role: str):
    return next(g for g in plan.groups if any(m.tensor == tensor and m.role == role for m in g.members))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ratio=st.floats(0.05, 0.7))
def test_paper_mode_keeps_exactly_the_channels_above_the_global_quantile(seed: int, ratio: float) -> None:
    """Up to ratio 0.7, a layer of this VGG (32 channels or more) with every channel under the threshold, of
    which the rails would keep one, is too rare to meet."""
    gen = torch.Generator().manual_seed(seed)
    model = create_model("vgg11", width=0.5).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
    x = torch.randn(1, 3, 28, 28)
    pooled = torch.cat([bn.weight.detach().abs() for bn in bns]).sort().values
    threshold = pooled[int(len(pooled) * ratio)].item()

    plan = plan_pruning(model, x, ratio, **PAPER)

    assert plan.threshold == pytest.approx(threshold)
    names = {id(m): n for n, m in model.named_modules()}
    for bn in bns:
        group = _group_of(plan, f"{names[id(bn)]}.weight", "bn")
        assert group.keep == (bn.weight.detach().abs() > threshold).nonzero().flatten().tolist()


def _check_rails(plan: PruningPlan) -> None:
    """The rails hold for every group that stays; a group is emptied only inside a removable residual
    branch, when none of its channels scores above the threshold (depth), and the branch's other
    groups then stay whole."""
    removed = plan.removed_branches()
    inside = {i for b in removed for i in b.groups}
    for i, g in enumerate(plan.groups):
        if not g.keep:
            assert i in inside and g.prunable and max(g.scores or [0.0]) <= plan.threshold
            continue
        if i in inside:
            assert not g.pruned
            continue
        assert g.keep == sorted(set(g.keep)) and all(0 <= k < g.size for k in g.keep)
        if not g.prunable:
            assert not g.pruned
            continue
        if not g.pruned:
            continue
        kept, scores = len(g.keep), g.scores or []
        assert kept >= min(plan.min_channels, g.size)
        assert g.size - kept <= math.floor(plan.max_prune * g.size + 1e-9)
        assert kept % plan.round_to == 0
        assert {k for k, s in enumerate(scores) if s > plan.threshold} <= set(g.keep)
        assert max(scores[k] for k in g.removed) <= min(scores[k] for k in g.keep)


RAILS = st.fixed_dictionaries(
    {
        "min_channels": st.sampled_from([1, 2, 8, 16]),
        "max_prune": st.sampled_from([1.0, 0.9, 0.5]) | st.floats(0.05, 1.0),
        "round_to": st.sampled_from([1, 4, 8, 32]),
    }
)


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=25, deadline=None)
@given(rails=RAILS, ratio=st.floats(0.01, 0.99))
def test_random_rails_always_hold(name: str, rails: dict, ratio: float) -> None:
    _, _, structure = traced(name)
    _check_rails(select_channels(structure, ratio, **rails))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in CASES])
def test_ratio_sweep_never_empties_a_group_or_crashes(name: str) -> None:
    model, x, structure = traced(name)
    for ratio in RATIOS:
        _check_rails(select_channels(structure, ratio))
        plan = select_channels(structure, ratio, **PAPER)
        _check_rails(plan)
        if ratio not in ((0.9,) if name in HEAVY else (0.1, 0.5, 0.9)):
            continue  # cutting is what costs; every plan above was checked
        with torch.no_grad():
            out = apply_plan(model, plan)(x)
        assert out.shape == (x.shape[0], 10) and torch.isfinite(out).all()


def test_groups_follow_residual_adds_concats_flatten_and_depthwise_convs() -> None:
    _, _, resnet = traced("resnet18")
    stream = _group_of(resnet, "bn1.weight", "bn")
    assert set(stream.modules("bn")) == {"bn1", "layer1.0.bn2", "layer1.1.bn2"}
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(stream.modules("in"))
    _, _, densenet = traced("densenet40")
    grown = _group_of(densenet, "features.0.conv.weight", "out")
    starts = {m.module: m.start for m in grown.members if m.role == "bn"}
    assert len(starts) > 5 and len(set(starts.values())) == 1  # the same slice of every later concat
    _, _, vgg = traced("vgg11_bn")  # 1x1 features, adaptive pool to 7x7, flatten: 49 features per channel
    (fc_in,) = [m for g in vgg.groups for m in g.members if m.tensor == "classifier.0.weight" and m.role == "in"]
    assert fc_in.block == 49
    _, _, mobilenet = traced("mobilenet_v3_small")
    se = _group_of(mobilenet, "features.4.block.1.0.weight", "through")  # the depthwise conv
    assert "features.4.block.2.fc2" in se.modules("out") and se.prunable


@pytest.mark.parametrize(
    ("name", "why"),
    [("shufflenet_v2_x1_0", "view in stage2.0")],
)
def test_channels_it_cannot_follow_are_listed_unprunable(name: str, why: str) -> None:
    model, x, structure = traced(name)
    plan = select_channels(structure, 0.5)
    reasons = [r for _, r in plan.unprunable()]
    assert any(why in r for r in reasons)
    assert any(g.pruned for g in plan.groups)
    assert "unprunable groups" in summarize(plan, model, x)


class _ChannelSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.softmax(self.bn1(self.conv1(x)), dim=1)  # mixes channels: must not be pruned
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_an_op_that_mixes_channels_makes_its_group_unprunable() -> None:
    model = _ChannelSoftmax().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = plan_pruning(model, x, 0.5, **PAPER)
    first = _group_of(plan, "bn1.weight", "bn")
    assert not first.prunable and "softmax" in first.reasons[0] and "the top-level forward" in first.reasons[0]
    assert _group_of(plan, "bn2.weight", "bn").pruned
    with torch.no_grad():
        assert apply_plan(model, plan)(x).shape == (2, 4)


def test_a_model_without_batchnorm_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    plan = plan_pruning(model, x, 0.5)
    assert plan.removed_channels == 0 and plan.threshold is None
    with torch.no_grad():
        assert rel_err(model(x), apply_plan(model, plan)(x)) == 0


def test_plan_round_trips_through_json_and_prints_a_table() -> None:
    model, x, structure = traced("resnet20")
    plan = select_channels(structure, 0.4, **PAPER)
    again = PruningPlan.from_json(plan.to_json())
    assert again == plan
    text = summarize(plan, model, x)
    assert "total" in text and "layer1.0.conv1" in text and "params -" in text


@pytest.mark.parametrize(
    "bad",
    [
        {"ratio": 0.0},
        {"ratio": 1.0},
        {"ratio": -0.2},
        {"ratio": 1.5},
        {"ratio": "0.5"},
        {"min_channels": 0},
        {"max_prune": 0.0},
        {"max_prune": 1.2},
        {"round_to": 0},
    ],
)
def test_bad_ratio_or_rails_are_refused(bad: dict) -> None:
    _, _, structure = traced("vgg11")
    args = {"ratio": 0.5, **bad}
    with pytest.raises(SlimError):
        select_channels(structure, args.pop("ratio"), **args)
    with pytest.raises(SlimError):
        plan_pruning(
            nn.Conv2d(3, 3, 1),
            torch.zeros(1, 3, 4, 4),
            0.5 if "ratio" not in bad else bad["ratio"],
            **{k: v for k, v in bad.items() if k != "ratio"},
        )
