"""The zoo's own architectures: the CIFAR-style networks of the Network Slimming paper (VGG with BatchNorm,
pre-activation ResNets, DenseNet-40), each taking ``in_channels``, ``num_classes`` and a width multiplier
``width``, initialised as the paper's code does. Found by name through ``zoo.create_model``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """Conv3x3-BN-ReLU stacks with max-pools, global average pool, one Linear (as the official code)."""

    def __init__(self, cfg: list[int | str], in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = _scaled(int(v), width)
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class PreActBasic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        out = planes * self.expansion
        self.downsample = nn.Conv2d(cin, out, 1, stride, bias=False) if stride != 1 or cin != out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Conv2d(cin, out, 1, stride, bias=False) if stride != 1 or cin != out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images: three stages of 16/32/64 planes (x width)."""

    def __init__(
        self, depth: int, bottleneck: bool = False, in_channels: int = 3, num_classes: int = 10, width: float = 1.0
    ):
        super().__init__()
        block: type[PreActBasic] | type[PreActBottleneck] = PreActBottleneck if bottleneck else PreActBasic
        per_stage = (depth - 2) // (9 if bottleneck else 6)
        planes = [_scaled(p, width) for p in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        cin = planes[0]
        stages = []
        for i, p in enumerate(planes):
            blocks = []
            for j in range(per_stage):
                blocks.append(block(cin, p, 2 if (i > 0 and j == 0) else 1))
                cin = p * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """DenseNet (BN-ReLU-Conv3x3 layers, 1x1 transitions), as used in the Network Slimming paper."""

    def __init__(
        self, depth: int = 40, growth: int = 12, in_channels: int = 3, num_classes: int = 10, width: float = 1.0
    ):
        super().__init__()
        per_block = (depth - 4) // 3
        g = _scaled(growth, width)
        c = 2 * g
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for i in range(3):
            for _ in range(per_block):
                blocks.append(DenseLayer(c, g))
                c += g
            if i < 2:
                blocks.append(Transition(c, c))
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.features(self.conv1(x)))))
        return self.fc(torch.flatten(x, 1))


def init_weights(model: nn.Module) -> nn.Module:
    """The official Network Slimming initialisation: Kaiming convs, BatchNorm gamma = 0.5, beta = 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def _vgg(name: str) -> Callable[..., nn.Module]:
    return lambda **kw: init_weights(VGG(VGG_CFGS[name], **kw))


def _resnet(depth: int, bottleneck: bool = False) -> Callable[..., nn.Module]:
    return lambda **kw: init_weights(PreActResNet(depth, bottleneck, **kw))


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{name: _vgg(name) for name in VGG_CFGS},
    "resnet20": _resnet(20),
    "resnet56": _resnet(56),
    "resnet164": _resnet(164, bottleneck=True),
    "densenet40": lambda **kw: init_weights(DenseNet(40, 12, **kw)),
}
