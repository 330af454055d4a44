"""Model code written the way third-party repositories write it (timm ports, TF re-implementations,
research code), for the planner-coverage tests: TF-style "same" padding, grouped convolutions,
squeeze-excite, mixed depthwise convolutions that split channels by a size list, dual-path blocks.

Each class is a structure, not a named architecture; the tests expect the planner to follow all
of them with one general rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_act(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class Conv2dSame(nn.Conv2d):
    """TensorFlow's "SAME" padding, computed from the input size and padded with F.pad (timm-style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TFMBConv(nn.Module):
    """Inverted residual of a TF EfficientNet port: pad-then-depthwise, squeeze-excite, projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4, zero_pad_module: bool = False):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn_act(cin, mid)
        if zero_pad_module:  # the other common spelling: an nn.ZeroPad2d in front of an unpadded conv
            self.pad: nn.Module = nn.ZeroPad2d((0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1))
            self.dw: nn.Module = nn.Conv2d(mid, mid, 3, stride, 0, groups=mid, bias=False)
        else:
            self.pad = nn.Identity()
            self.dw = Conv2dSame(mid, mid, 3, stride, 0, groups=mid, bias=False)
        self.bn, self.act = nn.BatchNorm2d(mid), nn.SiLU()
        self.se = SqueezeExcite(mid, max(4, cin // 4))
        self.project = _conv_bn_act(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.dw(self.pad(self.expand(x)))))
        y = self.project(self.se(y))
        return x + y if self.residual else y


class TFEfficientNetLike(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = _conv_bn_act(3, 16, 3, 2)
        self.stem[0].padding = (0, 0)
        self.blocks = nn.Sequential(
            TFMBConv(16, 16, 1),
            TFMBConv(16, 24, 2),
            TFMBConv(24, 24, 1, zero_pad_module=True),
            TFMBConv(24, 40, 2, zero_pad_module=True),
        )
        self.head = _conv_bn_act(40, 96)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(self.stem_pad(x))))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


class ResNeXtBlock(nn.Module):
    """Post-activation bottleneck with a grouped 3x3 convolution, optionally squeeze-excite."""

    def __init__(self, cin: int, width: int, cout: int, groups: int, stride: int = 1, se: bool = False):
        super().__init__()
        self.conv1 = _conv_bn_act(cin, width)
        self.conv2 = _conv_bn_act(width, width, 3, stride, groups=groups)
        self.conv3 = _conv_bn_act(width, cout, act=False)
        self.se: nn.Module = SqueezeExcite(cout, cout // 4) if se else nn.Identity()
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = _conv_bn_act(cin, cout, 1, stride, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.se(self.conv3(self.conv2(self.conv1(x)))) + self.down(x))


class ResNeXtLike(nn.Module):
    def __init__(self, se: bool = False, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_act(3, 32, 3, 2)
        self.layers = nn.Sequential(
            ResNeXtBlock(32, 64, 64, groups=8, se=se),
            ResNeXtBlock(64, 64, 64, groups=8, se=se),
            ResNeXtBlock(64, 96, 128, groups=4, stride=2, se=se),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class MixedConv(nn.Module):
    """Depthwise convolutions of several kernel sizes on chunks of the channels (MixConv, timm-style)."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (3, 5, 7)):
        super().__init__()
        base = channels // len(kernels)
        self.splits = [channels - base * (len(kernels) - 1)] + [base] * (len(kernels) - 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False) for c, k in zip(self.splits, kernels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], 1)


class MixNetLike(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_act(3, 24, 3, 2)
        blocks = []
        for cin, cout in ((24, 24), (24, 32)):
            blocks.append(
                nn.Sequential(
                    _conv_bn_act(cin, cin * 3),
                    MixedConv(cin * 3),
                    nn.BatchNorm2d(cin * 3),
                    nn.SiLU(),
                    _conv_bn_act(cin * 3, cout, act=False),
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn_act(32, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.blocks[0](x)
        x = self.head(self.blocks[1](x))
        return self.fc(x.mean((2, 3)))


class BnActConv(nn.Sequential):
    """Pre-activation unit of the dual-path networks: BatchNorm, ReLU, then the convolution."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        )


class DualPathBlock(nn.Module):
    """A residual add on the first ``num_1x1_c`` channels and a dense concatenation on the rest."""

    def __init__(self, cin: int, num_1x1_a: int, num_3x3_b: int, num_1x1_c: int, inc: int, groups: int, proj: bool):
        super().__init__()
        self.num_1x1_c, self.inc = num_1x1_c, inc
        self.proj = BnActConv(cin, num_1x1_c + 2 * inc, 1) if proj else None
        self.a = BnActConv(cin, num_1x1_a, 1)
        self.b = BnActConv(num_1x1_a, num_3x3_b, 3, groups=groups)
        self.c = BnActConv(num_3x3_b, num_1x1_c + inc, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.proj(x) if self.proj is not None else x
        x_s1, x_s2 = xs[:, : self.num_1x1_c], xs[:, self.num_1x1_c :]
        out1, out2 = torch.split(self.c(self.b(self.a(x))), (self.num_1x1_c, self.inc), dim=1)
        return torch.cat([x_s1 + out1, torch.cat([x_s2, out2], dim=1)], dim=1)


class DPNLike(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(
            DualPathBlock(32, 32, 32, 48, 16, groups=4, proj=True),
            DualPathBlock(48 + 48, 32, 32, 48, 16, groups=4, proj=False),
            DualPathBlock(48 + 64, 32, 32, 48, 16, groups=4, proj=False),
        )
        self.bn = nn.BatchNorm2d(48 + 80)
        self.fc = nn.Linear(48 + 80, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean((2, 3)))
