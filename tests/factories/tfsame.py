"""A user's own model as a pip package might ship it: a factory that is a classmethod, its own argument name
for the class count, and a Conv2d subclass that pads TF-style ("same") inside its forward, as EfficientNet-Lite
ports do -- the convolution runs on a bigger input than the module receives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SameConv2d(nn.Conv2d):
    """Pads like TensorFlow's 'same' (asymmetric where it must be) before a convolution without padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn_act(conv: nn.Module, c: int, act: bool = True) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(c), *([nn.ReLU6()] if act else []))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        h = c * expand
        self.pw = _bn_act(nn.Conv2d(c, h, 1, bias=False), h)
        self.dw = _bn_act(SameConv2d(h, h, 3, groups=h, bias=False), h)
        self.pwl = _bn_act(nn.Conv2d(h, c, 1, bias=False), c, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwl(self.dw(self.pw(x)))


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = _bn_act(SameConv2d(3, width, 3, stride=2, bias=False), width)
        self.block1 = InvertedResidual(width, 2)
        self.down = _bn_act(SameConv2d(width, 2 * width, 3, stride=2, bias=False), 2 * width)
        self.block2 = InvertedResidual(2 * width, 2)
        self.head = _bn_act(nn.Conv2d(2 * width, 64, 1, bias=False), 64)
        self.fc = nn.Linear(64, classes)

    @classmethod
    def create(cls, num_classes: int = 10) -> TinyNet:
        return cls(classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block2(self.down(self.block1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
