"""Models shared by the plan and surgery tests: zoo nets, torchvision classifiers, third-party model code.

Each is traced once per test session (tracing dominates the cost) with random BatchNorm
statistics, so that BatchNorm is not the identity and scores differ.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import onnxruntime as ort
import third_party_cases as tp
import torch
import torchvision
from helpers import randomize_batchnorm
from torch import nn

from slim2deploy.model.zoo import create_model
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.trace import trace_groups


def _tv(name: str, **kw: object) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kw)


# name -> (factory, input side); torchvision nets at 64x64 keep the spatial sizes sane
CASES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "vgg11": (lambda: create_model("vgg11", width=0.25), 28),
    "resnet20": (lambda: create_model("resnet20", width=0.5), 28),
    "resnet164": (lambda: create_model("resnet164", width=0.25), 28),
    "densenet40": (lambda: create_model("densenet40", width=0.5), 28),
    "resnet18": (_tv("resnet18"), 64),
    "resnet50": (_tv("resnet50"), 64),
    "vgg11_bn": (_tv("vgg11_bn"), 32),
    "densenet121": (_tv("densenet121"), 64),
    "mobilenet_v2": (_tv("mobilenet_v2"), 64),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64),
    "efficientnet_b0": (_tv("efficientnet_b0"), 64),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 64),
    "shufflenet_v2_x1_0": (_tv("shufflenet_v2_x1_0"), 64),
    "mnasnet0_5": (_tv("mnasnet0_5"), 64),
    "googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), 64),
    # third-party model code (tests/third_party_cases.py): structures, not named architectures
    "tf_same_pad_mbconv": (tp.TFEfficientNetLike, 32),
    "grouped_bottleneck": (tp.ResNeXtLike, 32),
    "grouped_bottleneck_se": (lambda: tp.ResNeXtLike(se=True), 32),
    "mixed_depthwise_split": (tp.MixNetLike, 32),
    "dual_path": (tp.DPNLike, 32),
}
THIRD_PARTY = {
    "tf_same_pad_mbconv",
    "grouped_bottleneck",
    "grouped_bottleneck_se",
    "mixed_depthwise_split",
    "dual_path",
}
ZOO = {"vgg11", "resnet20", "resnet164", "densenet40"}
# big enough that one pass through them costs seconds on two cores
HEAVY = {"vgg11_bn", "densenet121", "resnet50", "efficientnet_b0"}


@functools.cache
def traced(name: str) -> tuple[nn.Module, torch.Tensor, PruningPlan]:
    """(model, input, traced plan); callers must not modify the model (deep-copy it)."""
    torch.manual_seed(0)
    factory, side = CASES[name]
    model = randomize_batchnorm(factory(), seed=1)
    x = torch.randn(2, 3, side, side)
    return model, x, trace_groups(model, x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def onnx_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    buf = io.BytesIO()
    try:  # the TorchScript exporter is several times faster, but cannot do every op (vgg's 1x1 -> 7x7 pool)
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], opset_version=17)
    except torch.onnx.errors.OnnxExporterError:
        buf = io.BytesIO(
            torch.onnx.export(
                model, (x,), dynamo=True, input_names=["x"], verbose=False
            ).model_proto.SerializeToString()
        )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
