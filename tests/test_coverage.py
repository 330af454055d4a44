"""Planner coverage: how much of a model the planner can prune, shown in the open, on real model code.

The exactness and ONNX parity of every case in ``model_cases.CASES`` (third-party structures
included) are checked in test_surgery.py; here: the prunable share, and every torchvision
classifier traced, planned and cut.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from helpers import run_main
from model_cases import THIRD_PARTY, traced
from torch import nn
from torch.nn import functional as F

from slim2deploy.prune.rails import Rails
from slim2deploy.prune.select import Selection, WidthsSelector, select, select_channels
from slim2deploy.prune.summary import summarize
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups


def _share(name: str) -> float:
    prunable, scored = traced(name)[2].coverage()
    return prunable / scored


@pytest.mark.parametrize("name", sorted(THIRD_PARTY | {"regnet_x_400mf", "efficientnet_b0", "mobilenet_v3_small"}))
def test_third_party_structures_are_almost_all_prunable(name: str) -> None:
    assert _share(name) >= 0.9
    model, x, structure = traced(name)
    plan = select_channels(structure, 0.5)
    text = summarize(plan, model, x)
    assert "BatchNorm-scored channels" in text and plan.removed_channels > 0


def test_a_grouped_convolution_keeps_its_groups_and_loses_the_same_channels_in_each() -> None:
    model, x, structure = traced("grouped_bottleneck")
    halves = WidthsSelector(tuple(g.size // 2 for g in structure.groups))
    slim = apply_plan(model, select(structure, Selection(halves, Rails.paper())))
    conv = slim.layers[0].conv2[0]  # 64 -> 64 channels in 8 groups of 8
    assert (conv.groups, conv.in_channels, conv.out_channels) == (8, 32, 32)
    assert tuple(conv.weight.shape[:2]) == (32, 4)


def test_a_split_by_sizes_updates_the_sizes_its_module_holds() -> None:
    model, x, structure = traced("mixed_depthwise_split")
    plan = select_channels(structure, 0.6, min_channels=1, max_prune=1.0, round_to=1)
    slim = apply_plan(model, plan)
    mixed = slim.blocks[1][1]
    assert sum(mixed.splits) == slim.blocks[1][2].num_features < sum(model.blocks[1][1].splits)
    assert [c.in_channels for c in mixed.convs] == mixed.splits


class _Padded(nn.Module):
    """conv-bn-relu, a pad, then a 1x1 conv; ``pad`` is (amounts, mode)."""

    def __init__(self, amounts: tuple[int, ...], mode: str):
        super().__init__()
        self.amounts, self.mode = amounts, mode
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16 + sum(amounts[4:]), 16, 1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(torch.relu(self.bn1(self.conv1(x))), self.amounts, mode=self.mode)
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


@pytest.mark.parametrize(
    ("amounts", "mode", "prunable", "fold"),
    [
        ((1, 1, 1, 1), "constant", True, False),  # zeros stay zero, but a constant channel gets a zero border
        ((0, 1, 2, 0), "replicate", True, True),  # copies of the edge: a constant stays constant
        ((1, 1, 1, 1), "reflect", True, True),
        ((0, 0, 0, 0, 1, 1), "constant", False, False),  # pads the channels: their indices shift
    ],
)
def test_padding_passes_channels_through_unless_it_pads_the_channels(amounts, mode, prunable, fold) -> None:
    plan = trace_groups(_Padded(amounts, mode).eval(), torch.randn(2, 3, 8, 8))
    group = next(g for g in plan.groups if "bn1" in g.modules("bn"))
    assert group.prunable == prunable
    if not prunable:
        assert "pads the channel dimension" in group.reasons[0] and "pad in the top-level forward" in group.reasons[0]
    else:
        (reader,) = [m for m in group.members if m.role == "in"]
        assert reader.fold == fold


def test_inspect_reports_the_prunable_share_and_why_the_rest_is_not(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("resnet164", width=0.25, num_classes=4)
    proc = run_main("inspect", "--model", str(ckpt), "--json", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr
    assert "BatchNorm-scored channels" in proc.stdout and "unprunable groups" in proc.stdout
    cov = json.loads((tmp_path / "m.json").read_text())["coverage"]
    assert 0 < cov["prunable_channels"] < cov["scored_channels"]
    assert any("without a BatchNorm" in u["reason"] for u in cov["unprunable"])  # pre-activation shortcuts


# Genuinely unprunable structures (README, "What the planner cannot prune"), as the lowest share
# of BatchNorm-scored channels each family reaches; every other classifier with BatchNorm: >= 90%.
MIN_SHARE = {"shufflenet": 0.45}  # channel shuffle: a reshape that spreads channels over two dimensions (49-62%)
NO_BATCHNORM = ("alexnet", "convnext", "squeezenet", "swin", "vit", "vgg11", "vgg13", "vgg16", "vgg19")
# 145M-644M parameters: random initialisation alone takes minutes and gigabytes on two cores
HUGE = {"regnet_y_32gf", "regnet_y_128gf", "vit_l_16", "vit_l_32", "vit_h_14"}


# One model per family runs by default (the smallest, and ShuffleNet's lowest share); the other
# sizes repeat the same structures and add minutes: SLIM2DEPLOY_ALL_CLASSIFIERS=1 runs all of them.
FAMILIES = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x1_5", "squeezenet1_0", "swin_t",
    "swin_v2_t", "vgg11", "vgg11_bn", "vit_b_32", "wide_resnet50_2",
}  # fmt: skip


def _classifiers() -> list:
    names = torchvision.models.list_models(module=torchvision.models)
    skip_huge = pytest.mark.skipif(
        not os.environ.get("SLIM2DEPLOY_HUGE_MODELS"), reason="set SLIM2DEPLOY_HUGE_MODELS=1 to include it"
    )
    skip_size = pytest.mark.skipif(
        not os.environ.get("SLIM2DEPLOY_ALL_CLASSIFIERS"),
        reason="another size of a family tested here; set SLIM2DEPLOY_ALL_CLASSIFIERS=1 to include it",
    )
    params = []
    for n in names:
        marks = [pytest.mark.slow]
        marks += ([skip_huge] if n in HUGE else []) + ([] if n in FAMILIES else [skip_size])
        params.append(pytest.param(n, marks=marks))
    return params


def test_every_family_has_a_representative() -> None:
    """A family new in torchvision (or a renamed model) is not left out of the default run."""
    names = torchvision.models.list_models(module=torchvision.models)
    assert FAMILIES <= set(names), sorted(FAMILIES - set(names))

    def family(n: str) -> str:
        return (
            n.split("_")[0].rstrip("0123456789") + ("_v2" if "_v2" in n else "") + ("_bn" if n.endswith("_bn") else "")
        )

    missing = {family(n) for n in names} - {family(n) for n in FAMILIES}
    assert not missing, f"no representative for {sorted(missing)}: add one to FAMILIES"


@pytest.mark.parametrize("name", _classifiers())
def test_every_torchvision_classifier_is_planned_cut_and_runs(name: str) -> None:
    kw: dict = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    # ViT and MaxViT are built for 224 px; Swin pads to its windows (64 px: half the time); Inception needs 75
    side = 224 if name.startswith(("vit", "maxvit")) else 75 if name == "inception_v3" else 64
    x = torch.randn(1, 3, side, side)
    structure = trace_groups(model, x)
    prunable, scored = structure.coverage()
    if name.startswith(NO_BATCHNORM) and not name.endswith("_bn"):
        assert scored == 0
        return
    floor = next((v for k, v in MIN_SHARE.items() if name.startswith(k)), 0.9)
    assert prunable >= floor * scored, [r for _, r in structure.unprunable()][:5]
    plan = select_channels(structure, 0.5)
    with torch.no_grad():
        assert apply_plan(model, plan)(x).shape == (1, 10)  # apply_plan's self-check ran too
