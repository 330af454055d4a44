"""Depth: a residual branch whose group is emptied goes whole, exactly, in torch and in ONNX, on every
residual family (pre- and post-activation ResNets, bottlenecks, grouped and inverted residuals with and
without squeeze-excite, torchvision and timm), and a pruned checkpoint without it rebuilds exactly."""

from __future__ import annotations

import copy
import functools
import pickle
import random
from pathlib import Path

import onnx
import pytest
import third_party_cases as tp
import torch
from helpers import randomize_batchnorm
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import rel_err
from torch import nn

from slim2deploy.base.errors import SlimError
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


def _convs(model: nn.Module, paths: list[str] | None = None) -> int:
    """Convolution modules (in ``paths``): each runs once here, and is one Conv node of the ONNX graph."""
    roots = [model] if paths is None else [model.get_submodule(p) for p in paths]
    return sum(isinstance(m, nn.Conv2d) for r in roots for m in r.modules())


def _zero(model: nn.Module, gammas: list[str], beta: bool) -> None:
    with torch.no_grad():
        for fqn in gammas:
            model.get_parameter(fqn).zero_()
            if beta:
                model.get_parameter(fqn.removesuffix("weight") + "bias").zero_()


def _emptying(traced: PruningPlan, gi: int) -> Selection:
    return Selection(WidthsSelector(tuple(0 if i == gi else g.size for i, g in enumerate(traced.groups))), Rails())


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
    assert _convs(slim) == _convs(model) - _convs(model, branch.modules()) < _convs(model)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # apply_plan checked its own input
    with torch.no_grad():
        want = model(other)
        assert rel_err(want, slim(other)) <= 1e-5
        assert rel_err(want[:1], slim(other[:1])) <= 1e-5  # a batch of one: no broadcast at the join
    if beta:
        return  # ONNX once per model, where the constant is not zero
    result = export_onnx(slim, x[:1], tmp_path / "slim.onnx")
    got = ort_session(result.path).run(None, {"input": other.numpy()})[0]
    assert rel_err(want, torch.from_numpy(got)) <= 1e-5
    assert result.op_counts["Conv"] == _convs(slim)  # the branch's Conv nodes are gone
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
    # its blocks' one ReLU module also runs after the add: not the branch's to replace
    assert all(p.endswith(("conv1", "conv2", "bn1", "bn2")) for b in again.branches for p in b.modules())


@pytest.mark.parametrize("name", ["resnet20", "tv_resnet18", "tv_mobilenet_v2", "timm_resnet10t"])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_branches_and_channels_removed_together_stay_exact(name: str, seed: int) -> None:
    """Property: several branches (gamma, or gamma and beta, zero in all of one of their groups' BatchNorms)
    and zeroed channels of the other groups, all under one global threshold at zero, go in one plan. (A seed,
    not st.randoms(): the channels drawn per group would make Hypothesis' smallest input very large.)"""
    rng = random.Random(seed)
    base, x, traced = _traced(name)
    removable = [b for b in traced.branches if b.removable]
    model = copy.deepcopy(base)
    chosen = rng.sample(removable, rng.randint(1, min(3, len(removable))))
    inside = {i for b in chosen for i in b.groups}
    emptied = [rng.choice(b.groups) for b in chosen]
    with torch.no_grad():
        for gi in emptied:
            _zero(model, [m.tensor for m in traced.groups[gi].members if m.role == "bn"], beta=rng.random() < 0.5)
        for i, g in enumerate(traced.groups):
            if g.prunable and i not in inside:
                gone = rng.sample(range(g.size), g.size // 3)
                bns = {m.module for m in g.members if m.role == "bn"}
                for m in g.members:
                    if m.module in bns and (m.role == "bn" or m.tensor.endswith(".bias")):
                        model.get_parameter(m.tensor)[m.indices(gone)] = 0
    scored = rescore(traced, model)
    zeros = sum(s == 0 for g in scored.groups if g.prunable for s in g.scores or [])
    plan = select(scored, by_ratio(zeros / scored.prunable_channels * rng.uniform(0.3, 0.9), Rails.paper()))

    slim = apply_plan(model, plan)

    assert {b.node for b in plan.removed_branches()} == {b.node for b in chosen}
    assert plan.removed_channels > sum(traced.groups[gi].size for gi in emptied)
    with torch.no_grad():
        assert rel_err(model(x), slim(x)) <= 1e-5


def test_conv_bn_folding_for_torch_runtimes_traces_through_the_replaced_modules() -> None:
    """runtime.torch folds Conv+BN with torch.fx: Skip and Const are recorded as calls, so the batch a
    branch's constant is filled to (torchvision adds into it in place) stays the input's."""
    from slim2deploy.runtime.torch import fuse_conv_bn

    base, x, traced = _traced("tv_resnet18")
    branch = [b for b in traced.branches if b.removable][2]
    assert branch.batched
    slim = apply_plan(base, select(traced, _emptying(traced, branch.groups[0])))
    folded, pairs = fuse_conv_bn(slim)
    assert pairs > 0
    batch = torch.randn(4, *x.shape[1:])
    with torch.no_grad():
        assert rel_err(slim(batch), folded(batch)) <= 1e-5


def test_a_model_with_a_removed_branch_says_it_takes_its_input_size_only() -> None:
    """The constant of a removed branch is a full spatial map (padding makes its borders differ), so the
    slim model runs at the plan's input size only: another size is refused with why, not a broadcasting error."""
    base, x, traced = _traced("resnet20")
    branch = [b for b in traced.branches if b.removable][0]
    model = copy.deepcopy(base)
    _zero(model, branch.gammas[0], False)  # beta stays: a constant that padding makes non-uniform
    slim = apply_plan(model, select(rescore(traced, model), _emptying(traced, branch.groups[0])))
    value = slim.get_submodule(branch.const[0]).value
    assert value.shape[-2:] == x.shape[-2:] and not torch.equal(value, value[..., :1, :1].expand_as(value))
    with torch.no_grad():
        assert slim(x).shape == (2, 10)
        with pytest.raises(SlimError, match=r"takes 3x16x16 inputs only, got 3x24x24: .* 1 removed residual .*depth"):
            slim(torch.randn(2, 3, 24, 24))
        assert model(torch.randn(2, 3, 24, 24)).shape == (2, 10)  # the unpruned model takes it
        for clone in (copy.deepcopy(slim), pickle.loads(pickle.dumps(slim))):  # the check travels with the model
            assert torch.equal(clone(x), slim(x))
            with pytest.raises(SlimError, match="inputs only"):
                clone(torch.randn(1, 3, 24, 24))
