import copy

import pytest
import torch
import torch.nn.functional as F

from slim2deploy.model import sparsity
from slim2deploy.model.data import Dataset
from slim2deploy.model.loop import TrainConfig, fit
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.trace import prunable_masks


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["vgg11", "resnet20", "densenet40"])
def test_subgradient_is_plain_gradient_plus_lambda_sign_gamma(arch):
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=10, width=0.25)
    with torch.no_grad():  # make signs of gamma mixed, including exact zeros
        for _, bn in sparsity.bn_layers(model):
            bn.weight.copy_(torch.randn_like(bn.weight))
            bn.weight[::5] = 0.0
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain = _grads(model, x, y)
    _grads(model, x, y)
    lam = 3e-4
    sparsity.add_l1_subgradient(model, lam)
    names = {f"{n}.weight" for n, _ in sparsity.bn_layers(model)}
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name in names:
            assert torch.equal(p.grad, plain[name] + lam * torch.sign(p.detach()))
        else:  # convs, linears and BatchNorm betas are untouched
            assert torch.equal(p.grad, plain[name]), name


def test_proximal_step_soft_thresholds_gamma_only():
    model = create_model("vgg11", in_channels=1, num_classes=10, width=0.125)
    with torch.no_grad():
        for _, bn in sparsity.bn_layers(model):
            bn.weight.copy_(torch.linspace(-1, 1, bn.weight.numel()))
            bn.bias.fill_(0.3)
    before = copy.deepcopy(model)
    sparsity.proximal_step(model, lr=0.1, lam=2.0)  # threshold 0.2
    for (_, a), (_, b) in zip(sparsity.bn_layers(before), sparsity.bn_layers(model), strict=True):
        expected = torch.sign(a.weight) * torch.clamp(a.weight.abs() - 0.2, min=0)
        assert torch.allclose(b.weight, expected)
        assert torch.equal(a.bias, b.bias)
        assert (b.weight == 0).sum() >= (a.weight.abs() <= 0.2).sum()


def test_warmup_ramps_lambda():
    assert sparsity.warmed_up(1e-3, 0.0, 2.0) == 0.0
    assert sparsity.warmed_up(1e-3, 1.0, 2.0) == pytest.approx(5e-4)
    assert sparsity.warmed_up(1e-3, 5.0, 2.0) == 1e-3
    assert sparsity.warmed_up(1e-3, 0.0, 0.0) == 1e-3


def _blobs(n=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    x[:, :, :8, :8] += (y == 0).float().view(-1, 1, 1, 1)
    x[:, :, 8:, 8:] += (y == 1).float().view(-1, 1, 1, 1)
    x[:, :, :8, 8:] += (y == 2).float().view(-1, 1, 1, 1)
    return Dataset(x, y, ["a", "b", "c", "d"], (0.0,), (1.0,), "blobs")


@pytest.mark.parametrize("mode,amp", [("subgradient", False), ("proximal", False), ("subgradient", True)])
def test_sparse_training_drives_gammas_to_zero_far_more_than_baseline(mode, amp):
    ds = _blobs()
    shares = {}
    for name, value in (("baseline", 0.0), ("sparse", 5e-2)):
        torch.manual_seed(0)
        model = create_model("vgg11", in_channels=1, num_classes=4, width=0.125)
        cfg = TrainConfig(
            epochs=4, batch_size=32, lr=0.1, schedule="cosine", sparsity=value, sparsity_mode=mode, amp=amp, seed=1
        )
        fit(model, ds, None, cfg, progress=False)
        shares[name] = sparsity.small_gamma_share(model, 1e-2)
    assert shares["baseline"] < 0.05
    assert shares["sparse"] > shares["baseline"] + 0.3, shares


def test_prunable_scope_penalises_only_channels_the_surgery_can_remove():
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10, width=0.5)
    masks = prunable_masks(model, torch.zeros(1, 1, 28, 28))
    # inside a block, bn2 sits between two convs: prunable; a stage's residual stream read by a
    # shortcut convolution (bn1 of the first block of layer2) is not
    assert masks["layer1.0.bn2.weight"].all()
    assert not masks["layer2.0.bn1.weight"].any()
    loose = prunable_masks(model, torch.zeros(1, 1, 28, 28), exact=False)  # what prune --approximate removes
    assert loose["layer2.0.bn1.weight"].all() and loose["layer1.0.bn2.weight"].all()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain = _grads(model, x, y)
    _grads(model, x, y)
    sparsity.add_l1_subgradient(model, 1e-2, masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        expected = plain[name] + 1e-2 * torch.sign(params[name].detach()) * mask
        assert torch.equal(params[name].grad, expected), name
    before = {n: p.detach().clone() for n, p in params.items()}
    sparsity.proximal_step(model, lr=1.0, lam=10.0, masks=masks)  # threshold 10: every penalised gamma -> 0
    for name, mask in masks.items():
        after = params[name].detach()
        assert torch.equal(after[~mask], before[name][~mask]), name
        assert (after[mask] == 0).all(), name
