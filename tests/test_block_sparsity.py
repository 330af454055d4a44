"""The block-level penalty (--sparsity-block): a group lasso on each removable residual branch's gammas."""

import json

import pytest
import torch
from helpers import assert_refused, snapshot, torchrun
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from slim2deploy.model import sparsity
from slim2deploy.model.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint
from slim2deploy.model.data import Dataset
from slim2deploy.model.loop import TrainConfig, fit
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.trace import branch_groups


@st.composite
def _layers_and_groups(draw):
    """BatchNorm layers with random gammas and betas, and disjoint groups over some of their channels."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    gamma = st.floats(-2, 2, allow_nan=False, width=32)
    model = nn.Sequential(*(nn.BatchNorm2d(n) for n in sizes))
    with torch.no_grad():
        for bn in model:
            bn.weight.copy_(torch.tensor(draw(st.lists(gamma, min_size=bn.num_features, max_size=bn.num_features))))
            bn.bias.copy_(torch.randn(bn.num_features))
    count = draw(st.integers(1, 4))
    channels: list[dict[str, list[int]]] = [{} for _ in range(count)]
    for i, n in enumerate(sizes):
        for c in range(n):
            k = draw(st.integers(-1, count - 1))  # -1: in no group
            if k >= 0:
                channels[k].setdefault(f"{i}.weight", []).append(c)
    return model, [sparsity.GammaGroup(f"g{k}", ch) for k, ch in enumerate(channels) if ch]


@settings(max_examples=100, deadline=None)
@given(_layers_and_groups(), st.floats(1e-3, 3.0), st.floats(1e-3, 3.0))
def test_group_step_zeroes_small_groups_exactly_and_shrinks_the_rest_by_the_right_factor(case, step, lam):
    model, groups = case
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsity.group_proximal_step(model, step, lam, groups)
    after = dict(model.named_parameters())
    touched: dict[str, set[int]] = {}
    for g in groups:
        old = torch.cat([before[n][idx] for n, idx in g.channels.items()]).double()
        new = g.values(model).double()
        norm, cut = float(old.norm()), step * lam
        if norm <= cut * (1 - 1e-6):
            assert (new == 0).all(), (norm, cut, new)
        elif norm >= cut * (1 + 1e-6):
            assert torch.allclose(new, old * (1 - cut / norm), rtol=1e-5, atol=1e-7)
            assert bool((new * old >= 0).all())  # scaled as one vector: no sign flips
        for n, idx in g.channels.items():
            touched.setdefault(n, set()).update(idx)
    for name, value in before.items():
        free = [c for c in range(value.numel()) if c not in touched.get(name, set())]
        assert torch.equal(after[name].detach()[free], value[free]), name  # betas and ungrouped gammas


def test_lambda_zero_or_no_groups_changes_nothing():
    model = create_model("resnet20", in_channels=1, num_classes=4, width=0.25)
    groups = branch_groups(model, torch.zeros(1, 1, 16, 16))
    before = [p.detach().clone() for p in model.parameters()]
    sparsity.group_proximal_step(model, 1.0, 0.0, groups)
    sparsity.group_proximal_step(model, 1.0, 10.0, [])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_branch_groups_are_the_groups_inside_removable_branches():
    model = create_model("resnet20", in_channels=1, num_classes=10, width=0.5)
    groups = branch_groups(model, torch.zeros(1, 1, 28, 28))
    # a pre-activation basic block: its residual branch's one inner group is bn2 (the stream's bn1 is shared)
    assert [g.name for g in groups] == [f"add in layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    bns = dict(sparsity.bn_layers(model))
    for g in groups:
        ((name, idx),) = g.channels.items()
        assert name.endswith(".bn2.weight") and idx == list(range(bns[name.removesuffix(".weight")].num_features))
    assert (
        branch_groups(create_model("vgg11", in_channels=1, num_classes=10, width=0.125), torch.zeros(1, 1, 28, 28))
        == []
    )


def _blobs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    for c, (r, q) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
        x[y == c, :, r : r + 8, q : q + 8] += 1.0
    return Dataset(x, y, ["a", "b", "c", "d"], (0.0,), (1.0,), "blobs")


@pytest.mark.parametrize("amp", [False, True])
def test_fit_empties_whole_groups_and_leaves_other_gammas_alone(amp):
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=4, width=0.25)
    groups = branch_groups(model, torch.zeros(1, 1, 16, 16))
    # bf16 autocast is slow on a CPU: fewer steps, a stronger pull
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.1, sparsity_block=0.4 if amp else 0.2, amp=amp, seed=1)
    fit(model, _blobs(128 if amp else 256), None, cfg, progress=False, blocks=groups)
    assert any((g.values(model) == 0).all() for g in groups)
    grouped = {name for g in groups for name in g.channels}
    others = [bn.weight for name, bn in sparsity.bn_layers(model) if f"{name}.weight" not in grouped]
    assert others and all((w != 0).all() for w in others)  # the stream's BatchNorms are not penalised


def test_train_records_it_and_prune_removes_the_emptied_branches_exactly(tmp_path, blobs_npz, cli):
    out, slim = tmp_path / "sparse.pt", tmp_path / "slim.pt"
    common = ["--arch", "resnet20", "--width", "0.25", "--data", str(blobs_npz), "--batch-size", "32"]
    common += ["--limit-train", "256", "--epochs", "1", "--sparsity-block", "0.3", "--sparsity-warmup", "0.2"]
    status, _, err = cli("train", *common, "--out", str(out))
    assert status == 0, err
    ckpt = load_checkpoint(out)
    assert ckpt.meta["train_config"]["sparsity_block"] == 0.3
    model = model_from_checkpoint(ckpt).eval()
    emptied = [g.name for g in branch_groups(model, torch.zeros(1, 1, 16, 16)) if (g.values(model) == 0).all()]
    assert emptied
    # the threshold at 0.3 is 0: what goes is what the penalty emptied, so the slim model computes the same
    status, printed, err = cli("prune", "--model", str(out), "--ratio", "0.3", "--out", str(slim))
    assert status == 0, err
    pruned = load_checkpoint(slim)
    plan = PruningPlan.from_dict(pruned.plan)
    assert plan.threshold == 0.0
    assert [b.join for b in plan.removed_branches()] == emptied
    assert f"blocks removed: {len(emptied)} of 9" in printed
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model_from_checkpoint(pruned).eval()(x), model(x), atol=1e-4)


def test_a_model_without_removable_branches_is_refused(tmp_path, blobs_npz, cli):
    before = snapshot(tmp_path)
    status, out, err = cli(
        "train", "--arch", "vgg11", "--width", "0.125", "--data", str(blobs_npz), "--sparsity-block", "1e-3",
        "--out", str(tmp_path / "x.pt"),
    )  # fmt: skip
    assert_refused((status, out, err), "has none", before, tmp_path)


def test_torchrun_and_resume_match_one_uninterrupted_process(tmp_path, blobs_npz, cli):
    common = ["--arch", "resnet20", "--width", "0.25", "--data", str(blobs_npz), "--device", "cpu", "--seed", "3"]
    common += ["--sparsity-block", "0.2", "--sparsity", "1e-3", "--sparsity-mode", "proximal", "--limit-train", "256"]
    one, two, full, resumed = (tmp_path / f"{n}.pt" for n in ("one", "two", "full", "resumed"))
    for args in (
        ["--epochs", "1", "--batch-size", "32", "--out", str(one)],
        ["--epochs", "2", "--batch-size", "32", "--out", str(full)],
        ["--epochs", "2", "--batch-size", "32", "--resume", str(one), "--out", str(resumed)],
    ):
        status, _, err = cli("train", *common, *args)
        assert status == 0, err
    proc = torchrun("train", *common, "--epochs", "1", "--batch-size", "16", "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b, tol in ((one, two, 1e-4), (full, resumed, 1e-6)):
        wa, wb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
        worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
        assert worst < tol, (a.name, b.name, worst)
    # and the penalty acted: some branch group is exactly 0
    model = model_from_checkpoint(load_checkpoint(full))
    assert any((g.values(model) == 0).all() for g in branch_groups(model, torch.zeros(1, 1, 16, 16)))


def test_inspect_shows_each_removable_block_and_plots_its_gammas(tmp_path, cli):
    kwargs = {"width": 0.5, "num_classes": 10, "in_channels": 1}
    model = create_model("resnet20", **kwargs)
    bns = dict(model.named_modules())
    with torch.no_grad():
        bns["layer1.1.bn2"].weight.zero_()  # exactly empty: removing the block changes nothing
        bns["layer2.0.bn2"].weight.fill_(3e-3)  # under a threshold at 1e-2
        bns["layer3.2.bn2"].weight[:-1] = 0.0  # one channel keeps it
    src = tmp_path / "m.pt"
    save_checkpoint(checkpoint_for(model, "resnet20", kwargs, (1, 16, 16), 10), src)
    status, out, err = cli("inspect", "--model", src, "--json", tmp_path / "m.json", "--plot", tmp_path / "m.png")
    assert status == 0, err
    rows = {line[:15]: line[15:].split(maxsplit=3) for line in out.splitlines() if line.startswith("add in layer")}
    assert rows["add in layer1.1"] == ["8", "0.00e+00", "100.0%", "exact"]
    assert rows["add in layer2.0"] == ["16", "3.00e-03", "100.0%", "< 1e-2"]
    assert rows["add in layer3.2"] == ["32", "5.00e-01", "96.9%", "no"]
    assert "2 of 9 removable at a global threshold of 1e-2 now" in out
    blocks = {b["block"]: b for b in json.loads((tmp_path / "m.json").read_text())["blocks"]}
    assert blocks["add in layer2.0"]["count"] == 16 and len(blocks["add in layer2.0"]["gammas"]) == 16
    assert Image.open(tmp_path / "m.png").size[0] > 0
    # pruned at a threshold that takes the two: they are listed as removed, the other seven remain
    slim = tmp_path / "slim.pt"
    assert cli("prune", "--model", src, "--ratio", "0.25", "--out", slim)[0] == 0
    status, out, _ = cli("inspect", "--model", slim)
    assert "removed    2 residual block(s): add in layer1.1, add in layer2.0" in out
    assert "0 of 7 removable at a global threshold of 1e-2 now" in out
