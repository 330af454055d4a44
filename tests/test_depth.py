"""Depth: a residual branch whose group is emptied goes whole, exactly, in torch and in ONNX, on every
residual family (pre- and post-activation ResNets, bottlenecks, grouped and inverted residuals with and
without squeeze-excite, torchvision and timm), and a pruned checkpoint without it rebuilds exactly."""

from __future__ import annotations

import copy
import functools
import random
from pathlib import Path

import onnx
import pytest
import third_party_cases as tp
import torch
from model_cases import randomize_batchnorm, rel_err
from torch import nn

from slim2deploy.deploy.export import export_onnx
from slim2deploy.model.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint
from slim2deploy.model.zoo import create_model
from slim2deploy.pipeline.inspect import inspect_checkpoint
from slim2deploy.pipeline.prune import prune_checkpoint
from slim2deploy.prune.depth import Const, Skip
from slim2deploy.prune.plan import Branch, PruningPlan
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.rebuild import rebuild
from slim2deploy.prune.select import Selection, WidthsSelector, by_ratio, select
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import rescore, trace_groups
from slim2deploy.runtime.ort import ort_session

# name -> (zoo name or None for third-party code, kwargs, input side)
ARCHS: dict[str, tuple[str | None, dict, int]] = {
    "resnet20": ("resnet20", {"width": 0.5}, 16),
    "resnet56": ("resnet56", {"width": 0.25}, 12),
    "resnet164": ("resnet164", {"width": 0.25}, 12),
    "tv_resnet18": ("torchvision:resnet18", {}, 32),
    "tv_resnet50": ("torchvision:resnet50", {}, 32),
    "tv_mobilenet_v2": ("torchvision:mobilenet_v2", {}, 32),
    "tv_efficientnet_b0": ("torchvision:efficientnet_b0", {}, 32),
    "tv_resnext50_32x4d": ("torchvision:resnext50_32x4d", {}, 32),
    "grouped_bottleneck_se": (None, {}, 32),
    "timm_resnet10t": ("timm:resnet10t", {}, 32),
    "timm_mobilenetv3_small_050": ("timm:mobilenetv3_small_050", {}, 32),
}
HEAVY = {"tv_resnet50", "tv_efficientnet_b0", "tv_resnext50_32x4d"}


def _build(name: str) -> nn.Module:
    arch, kwargs, _ = ARCHS[name]
    if arch is None:
        return tp.ResNeXtLike(se=True)
    return create_model(arch, num_classes=10, **kwargs)


@functools.cache
def _traced(name: str) -> tuple[nn.Module, torch.Tensor, PruningPlan]:
    """(model with random BatchNorm statistics, input, traced plan); callers deep-copy the model."""
    torch.manual_seed(0)
    model = randomize_batchnorm(_build(name), seed=1)
    side = ARCHS[name][2]
    x = torch.randn(2, 3, side, side)  # batches of 1 and 2 only: every new shape costs oneDNN a compilation
    return model, x, trace_groups(model, x[:1])


def _conv_calls(model: nn.Module, x: torch.Tensor) -> int:
    """How many convolutions run in a forward pass (each is one Conv node of the ONNX graph)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return len(calls)


def _zero(model: nn.Module, gammas: list[str], beta: bool) -> None:
    with torch.no_grad():
        for fqn in gammas:
            model.get_parameter(fqn).zero_()
            if beta:
                model.get_parameter(fqn.removesuffix("weight") + "bias").zero_()


def _emptying(traced: PruningPlan, gi: int) -> Selection:
    return Selection(WidthsSelector(tuple(0 if i == gi else g.size for i, g in enumerate(traced.groups))), Rails())


def _convs(model: nn.Module, paths: list[str]) -> int:
    return sum(isinstance(m, nn.Conv2d) for p in paths for m in model.get_submodule(p).modules())


def _cases() -> list:
    return [
        pytest.param(n, beta, marks=[pytest.mark.slow] if n in HEAVY else []) for n in ARCHS for beta in (True, False)
    ]


@pytest.mark.parametrize(("name", "beta"), _cases())
def test_a_branch_with_one_zeroed_batchnorm_is_removed_exactly_in_torch_and_onnx(
    name: str, beta: bool, tmp_path: Path
) -> None:
    base, x, traced = _traced(name)
    branch = random.Random(name).choice([b for b in traced.branches if b.removable])
    gi, gammas = branch.groups[0], branch.gammas[0]
    assert len(gammas) == 1  # one BatchNorm of the branch; beta=False: only its gammas are zero
    model = copy.deepcopy(base)
    _zero(model, gammas, beta)
    plan = select(rescore(traced, model), _emptying(traced, gi))
    assert plan.removed_branches() == [branch] and plan.groups[gi].keep == []

    slim = apply_plan(model, plan)

    assert all(isinstance(slim.get_submodule(p), Const) for p in branch.const)
    assert all(isinstance(slim.get_submodule(p), Skip) for p in branch.skip)
    more = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for inputs in (x, more, more[:1]):
            assert rel_err(model(inputs), slim(inputs)) <= 1e-5
    assert _conv_calls(slim, x[:1]) == _conv_calls(model, x[:1]) - _convs(model, branch.modules())
    if beta:
        return  # ONNX once per model, where the constant is not zero
    result = export_onnx(slim, x[:1], tmp_path / "slim.onnx")
    with torch.no_grad():
        want = model(more).numpy()
    got = ort_session(result.path).run(None, {"input": more.numpy()})[0]
    assert rel_err(torch.from_numpy(want), torch.from_numpy(got)) <= 1e-5
    assert result.op_counts["Conv"] == _conv_calls(slim, x[:1])  # the branch's Conv nodes are gone
    graph = onnx.load(result.path).graph
    inits = {t.name for t in graph.initializer}
    assert any(n.op_type == "Add" and any(i in inits for i in n.input) for n in graph.node), "no folded constant"


def test_a_ratio_with_depth_removes_branches_below_the_threshold_and_keeps_the_rest_whole() -> None:
    """resnet164's bottleneck branches have two groups; a branch goes when all channels of either are
    under the global threshold; its other group stays whole, and depth=False keeps everything."""
    base, x, traced = _traced("resnet164")
    model = copy.deepcopy(base)
    removable = [b for b in traced.branches if b.removable]
    chosen = random.Random(0).sample(removable, 3)
    for k, b in enumerate(chosen):
        _zero(model, b.gammas[k % 2], beta=k == 0)
    scored = rescore(traced, model)
    zeros = sum(s == 0 for g in scored.groups if g.prunable for s in g.scores or [])
    ratio = zeros / scored.prunable_channels * 0.5

    plan = select(scored, by_ratio(ratio))
    without = select(scored, by_ratio(ratio, depth=False))

    assert plan.threshold == 0.0 and {b.node for b in plan.removed_branches()} == {b.node for b in chosen}
    for k, b in enumerate(chosen):
        emptied, other = b.groups[k % 2], b.groups[1 - k % 2]
        assert plan.groups[emptied].keep == [] and not plan.groups[other].pruned
    assert not without.removed_branches() and all(g.keep for g in without.groups)
    assert plan.selection is not None and plan.selection["depth"] is True
    assert without.selection is not None and without.selection["depth"] is False
    slim = apply_plan(model, plan)
    with torch.no_grad():
        assert rel_err(model(x), slim(x)) <= 1e-5


@pytest.mark.parametrize("name", ["resnet20", "tv_resnet18", "timm_mobilenetv3_small_050"])
def test_a_pruned_checkpoint_without_a_branch_rebuilds_exactly(name: str, tmp_path: Path) -> None:
    """Structure from arch + plan only: a fresh model, the plan replayed, the constants from the state_dict."""
    base, x, traced = _traced(name)
    arch, kwargs, side = ARCHS[name]
    assert arch is not None
    model = copy.deepcopy(base)
    branch = [b for b in traced.branches if b.removable][-1]
    _zero(model, branch.gammas[0], beta=False)
    plan = PruningPlan.from_json(select(rescore(traced, model), _emptying(traced, branch.groups[0])).to_json())
    slim = apply_plan(model, plan)
    path = tmp_path / "slim.pt"
    save_checkpoint(
        checkpoint_for(slim, arch, {**kwargs, "num_classes": 10}, (3, side, side), 10, {}, plan.to_dict()), path
    )

    rebuilt = rebuild(load_checkpoint(path)).model

    assert any(k.endswith(".value") for k in rebuilt.state_dict())
    assert isinstance(rebuilt.get_submodule(branch.const[0]), Const)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), slim(x))
        assert rel_err(model(x), rebuilt(x)) <= 1e-5


def test_the_prune_stage_removes_a_dead_block_and_inspect_reports_it(tmp_path: Path) -> None:
    kwargs = {"width": 0.5, "num_classes": 10}
    model = randomize_batchnorm(create_model("resnet20", **kwargs), seed=2)
    plan = trace_groups(model, torch.zeros(1, 3, 16, 16))
    branch = next(b for b in plan.branches if b.join == "add in layer2.1")
    _zero(model, branch.gammas[0], beta=True)
    src, dst = tmp_path / "sparse.pt", tmp_path / "slim.pt"
    save_checkpoint(checkpoint_for(model, "resnet20", kwargs, (3, 16, 16), 10), src)

    pruned, table = prune_checkpoint(src, dst, by_ratio(0.01))

    assert [b.join for b in pruned.removed_branches()] == ["add in layer2.1"]
    assert "blocks removed: 1 of 9 removable residual branches" in table
    assert "layer2.1.conv1" in table and "->-" in table.replace(" ", "")
    info = inspect_checkpoint(load_checkpoint(dst))
    assert info.removed_blocks == ["add in layer2.1"] and "removed    1 residual block(s)" in info.table()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(model.eval()(x), rebuild(load_checkpoint(dst)).model(x)) <= 1e-5


def test_a_plan_made_before_depth_or_without_branches_still_loads() -> None:
    _, _, traced = _traced("resnet20")
    old = select(traced, by_ratio(0.5)).to_dict()
    del old["branches"]
    plan = PruningPlan.from_dict(old)
    assert plan.branches == [] and plan.removed_branches() == []
    assert Selection.from_dict({"selector": {"kind": "ratio", "ratio": 0.5}}).depth is False
    assert Selection.from_dict(by_ratio(0.5).to_dict()) == by_ratio(0.5)


def test_branch_records_round_trip_through_json() -> None:
    _, _, traced = _traced("tv_resnet18")
    again = PruningPlan.from_json(traced.to_json())
    assert again.branches == traced.branches and all(isinstance(b, Branch) for b in again.branches)
    assert all(b.batched for b in again.branches)  # torchvision adds the stream into the branch in place
