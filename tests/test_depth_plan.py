"""Depth in the planner: which residual joins are removable and why the others are not, the branch records
in the plan (validated as data), and which groups a selection may empty."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batchnorm
from model_cases import rel_err, traced
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.depth import Const, Skip
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.select import Selection, WidthsSelector, select, select_channels
from slim2deploy.prune.summary import coverage_lines, summarize
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import rescore, trace_groups


def _cbr(cin: int, cout: int, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class _Net(nn.Module):
    """A stem, one block of the kind under test, a classifier."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem, self.block, self.fc = _cbr(3, 8), block, nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class _Nested(nn.Module):
    """An outer residual branch with another residual add inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.inner, self.c2 = _cbr(8, 8), nn.Sequential(_cbr(8, 8), _cbr(8, 8, act=False)), _cbr(8, 8, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        return x + self.c2(h + self.inner(h))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch, self.fuse = nn.Sequential(_cbr(8, 8), _cbr(8, 8)), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([x, self.branch(x)], 1))


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Sequential(_cbr(8, 8), nn.Conv2d(8, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(x))


class _FunctionalNorm(nn.Module):
    """A BatchNorm called functionally in the block's own forward; ``last``: with the layers after it."""

    def __init__(self, last: bool):
        super().__init__()
        self.last = last
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.w3 = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(h, self.mean, self.var, self.w, self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last:
            return x + F.conv2d(F.relu(self.norm(self.conv2(F.relu(self.conv1(x))))), self.w3)
        return x + self.bn2(self.conv2(F.relu(self.norm(self.conv1(x)))))


class _SharedNorm(nn.Module):
    """One BatchNorm module called twice inside the branch: its gamma cannot rank either use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.bn(self.conv1(F.relu(self.bn(x))))))


class _TwoBranches(nn.Module):
    """One add of two residual branches: removing both would leave it input-independent."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Sequential(_cbr(8, 8), _cbr(8, 8, False)), nn.Sequential(_cbr(8, 8), _cbr(8, 8, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _traced(block: nn.Module) -> tuple[nn.Module, torch.Tensor, PruningPlan]:
    torch.manual_seed(0)
    model = randomize_batchnorm(_Net(block), seed=3)
    x = torch.randn(2, 3, 8, 8)
    return model, x, trace_groups(model, x)


def _zeros_at(plan: PruningPlan, groups: list[int]) -> Selection:
    widths = tuple(0 if i in groups else g.size for i, g in enumerate(plan.groups))
    return Selection(WidthsSelector(widths), Rails.paper())


@pytest.mark.parametrize(
    ("block", "join", "why"),
    [
        (_Nested(), "add in block", "another residual add (add in block) lies inside it"),
        (_Concat(), "cat in block", "meets the network in cat in block, not in an add"),
        (_Gate(), "mul in block", "meets the network in mul in block, not in an add"),
        (_FunctionalNorm(last=True), "add in block", "taken after conv2d in block.conv2, which still depends"),
        (_SharedNorm(), "add in block", "no prunable BatchNorm-scored group lies only inside one of its operands"),
    ],
)
def test_joins_that_cannot_be_removed_say_why(block: nn.Module, join: str, why: str) -> None:
    model, x, plan = _traced(block)
    fixed = [b for b in plan.branches if not b.removable and b.join == join]
    assert fixed and why in fixed[0].reason  # type: ignore[operator]
    assert f"{join}: " in "\n".join(coverage_lines(plan))
    for i in fixed[0].groups:  # emptying such a group is refused, by the selection and by the plan's validation
        assert select(plan, _zeros_at(plan, [i])).groups[i].keep
        damaged = plan.to_dict()
        damaged["groups"][i]["keep"] = []
        with pytest.raises(SlimError, match="keeps no channel"):
            PruningPlan.from_dict(damaged)


def test_the_inner_branch_of_a_nested_pair_is_removable_and_goes_exactly() -> None:
    model, x, plan = _traced(_Nested())
    (inner,) = [b for b in plan.branches if b.removable]
    assert inner.const == ["block.inner"] and inner.skip == []  # the whole Sequential is the branch
    with torch.no_grad():
        model.block.inner[0][1].weight.zero_()
    slim = apply_plan(model, select(plan, _zeros_at(plan, inner.groups)))
    assert isinstance(slim.block.inner, Const)
    with torch.no_grad():
        assert rel_err(model(x), slim(x)) <= 1e-5


def test_functional_ops_left_between_replaced_modules_run_on_zeros_of_their_shape() -> None:
    """A BatchNorm called in the block's forward between two replaced convolutions still runs: the
    skipped convolution hands it zeros of one sample's shape (after the channel cut of another group)."""
    model, x, plan = _traced(_FunctionalNorm(last=False))
    (branch,) = [b for b in plan.branches if b.removable]
    assert branch.const == ["block.bn2"] and branch.skip == ["block.conv1", "block.conv2"]
    assert branch.gammas == [["block.w"]]
    with torch.no_grad():
        model.block.w.zero_()
    stem = next(i for i, g in enumerate(plan.groups) if "stem.1" in g.modules("bn"))
    widths = tuple(0 if i in branch.groups else 4 if i == stem else g.size for i, g in enumerate(plan.groups))
    with torch.no_grad():  # the stream's channels 4.. are zero: the block adds bn2's, which join them
        for bn in (model.stem[1], model.block.bn2):
            bn.weight[4:] = 0
            bn.bias[4:] = 0
    slim = apply_plan(model, select(rescore(plan, model), Selection(WidthsSelector(widths), Rails.paper())))
    assert isinstance(slim.block.conv1, Skip) and slim.block.conv1.shape == (8, 8, 8)
    with torch.no_grad():
        assert rel_err(model(x), slim(x)) <= 1e-5


def test_two_branches_of_one_add_are_never_both_removed() -> None:
    model, x, plan = _traced(_TwoBranches())
    both = [b for b in plan.branches if b.removable]
    assert len(both) == 2 and both[0].node == both[1].node
    chosen = select(plan, _zeros_at(plan, [i for b in both for i in b.groups]))
    assert len(chosen.removed_branches()) == 1
    with torch.no_grad():
        assert apply_plan(model, chosen)(x).shape == (2, 4)


@pytest.mark.parametrize("depth", [True, False])
def test_only_groups_inside_a_removable_branch_are_ever_emptied(depth: bool) -> None:
    for name in ("resnet20", "resnet164", "mobilenet_v2", "grouped_bottleneck_se", "dual_path", "densenet40"):
        _, _, structure = traced(name)
        removable = {i for b in structure.branches if b.removable for i in b.groups}
        zeros = Selection(WidthsSelector((0,) * len(structure.groups)), Rails(min_channels=2, round_to=2), depth=depth)
        plan = select(structure, zeros)
        emptied = {i for i, g in enumerate(plan.groups) if not g.keep}
        assert emptied <= removable if depth else not emptied
        assert len(plan.removed_branches()) == (len({b.node for b in structure.branches if b.removable}) * depth)
        for i, g in enumerate(plan.groups):
            if g.keep and g.prunable and g.pruned:
                assert len(g.keep) == Rails(min_channels=2, round_to=2).fit(g.size, 0), (name, i)


def _removed_plan() -> dict[str, Any]:
    _, _, structure = traced("resnet20")
    branch = next(b for b in structure.branches if b.removable)
    return select(structure, _zeros_at(structure, branch.groups[:1])).to_dict()


_DELETE = object()
EDITS = [
    (["branches", 0, "groups"], [10_000], "does not exist or lies in another branch"),
    (["branches", 1, "groups"], [2], "does not exist or lies in another branch"),
    (["branches", 0, "gammas"], [["layer1.0.conv1.weight"]], "are not BatchNorm weights of group"),
    (["branches", 0, "gammas"], [], "gamma lists for"),
    (["branches", 0, "const"], [], "do not match"),
    (["branches", 0, "shapes"], {}, "do not match"),
    (["branches", 0, "skip"], ["layer1.0.conv2"], "do not match"),
    (["branches", 0, "reason"], "edited", "cannot be removed"),
    (["branches", 0, "shapes", "layer1.0.conv2"], [0, 4], "integers >= 1"),
    (["branches", 0, "batched"], "no", "batched must be true or false"),
    (["branches", 0, "colour"], "red", "unknown field"),
    (["branches", 0, "node"], _DELETE, "lacks the field"),
    (["branches", 0], [], "branches must be a list of mappings"),
]


@pytest.mark.parametrize(("path", "value", "message"), EDITS, ids=[".".join(map(str, p)) for p, _, _ in EDITS])
def test_a_damaged_branch_entry_gets_one_clear_error(path: list[Any], value: Any, message: str) -> None:
    bad = copy.deepcopy(_removed_plan())
    target = bad
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(SlimError, match=message) as info:
        PruningPlan.from_json(json.dumps(bad))
    assert "edited or damaged" in str(info.value)


def test_branches_overlapping_or_naming_layers_the_model_lacks_are_refused() -> None:
    d = _removed_plan()
    d["branches"][1]["skip"].append("layer1")
    d["branches"][1]["shapes"]["layer1"] = [8, 16, 16]
    with pytest.raises(SlimError, match="overlaps"):
        PruningPlan.from_dict(d)
    d = _removed_plan()
    d["branches"][0]["const"] = ["layer1.0.conv9"]
    d["branches"][0]["shapes"] = {"layer1.0.conv9": [8, 16, 16], **{p: [8, 16, 16] for p in d["branches"][0]["skip"]}}
    with pytest.raises(SlimError, match="does not fit this model.*layer1.0.conv9"):
        apply_plan(traced("resnet20")[0], PruningPlan.from_dict(d))


def test_the_summary_counts_removed_blocks_and_the_layers_they_took() -> None:
    model, x, structure = traced("resnet20")
    plan = select_channels(structure, 0.5)
    first = next(b for b in structure.branches if b.removable)
    plan = select(structure, _zeros_at(structure, first.groups))
    text = summarize(plan, model, x)
    assert "blocks removed: 1 of 9 removable residual branches; conv/linear layers 22 -> 20" in text
    assert "removable residual branches: 9 of 9 joins" in text
