"""fp16 and int8 graphs on ONNX Runtime: parity, Q/DQ placement per flavour, calibration methods, accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import needs_fashion_mnist, randomize_batchnorm
from onnx import numpy_helper

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.export import FP16_RTOL, export_onnx, load_onnx
from slim2deploy.deploy.precision import activation_scales, quantize_int8, to_fp16
from slim2deploy.measure.compare import check_agreement, check_parity
from slim2deploy.model.zoo import create_model
from slim2deploy.pipeline.export import export_precision
from slim2deploy.runtime.ort import ort_session


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [("resnet20", {"width": 0.25}, (3, 32, 32)), ("torchvision:mobilenet_v2", {"width_mult": 0.25}, (3, 32, 32))],
)
def test_fp16_parity_within_documented_tolerance(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name, **kwargs))
    fp32 = export_onnx(model, torch.randn(1, *shape), tmp_path / "m.onnx").path
    x = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
    for keep_io in (True, False):
        out = to_fp16(fp32, tmp_path / f"h{keep_io}.onnx", keep_io_fp32=keep_io)
        report = check_parity(model, out, x, rtol=FP16_RTOL, atol=1e-4)
        assert report.ok and report.max_rel > 1e-6, report.summary()  # fp16 really computed, within tolerance
        io_type = ort_session(out).get_inputs()[0].type
        assert io_type == ("tensor(float)" if keep_io else "tensor(float16)")
        inits = load_onnx(out).graph.initializer
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 16, 3, padding=1),
            torch.nn.ReLU(),
        )
        self.fc = torch.nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained for a few hundred steps on Fashion-MNIST (~80% accuracy), exported to fp32."""
    from slim2deploy.deploy.calib import stratified_indices
    from slim2deploy.model.data import load_dataset

    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("int8") / "fp32.onnx"
    export_onnx(model, torch.randn(1, 1, 28, 28), path)
    calib = train.x.numpy()[stratified_indices(train.y.numpy(), 256, seed=0)]
    return model, path, calib, test.x[:1000].numpy(), test.y[:1000].numpy()


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@needs_fashion_mnist
def test_int8_tensorrt_flavour_places_symmetric_qdq_on_conv_inputs_and_weights(tmp_path, trained):
    model, fp32, calib, x, y = trained
    out = quantize_int8(fp32, tmp_path / "trt.onnx", calib, flavour="tensorrt").path
    graph = load_onnx(out)
    producer = {o: n for n in graph.graph.node for o in n.output}
    for conv in [n for n in graph.graph.node if n.op_type in ("Conv", "Gemm")]:
        act, weight = producer[conv.input[0]], producer[conv.input[1]]
        assert act.op_type == weight.op_type == "DequantizeLinear"
        w_scale = _init(graph, weight.input[1])
        assert w_scale.ndim == 1 and w_scale.size > 1  # per-channel weights
        for dq in (act, weight):
            zp = _init(graph, dq.input[2])
            assert zp.dtype == np.int8 and not zp.any()  # symmetric S8S8
        if len(conv.input) > 2:  # TensorRT has no int32 bias DQ: biases stay float
            assert producer.get(conv.input[2]) is None
    assert not any(
        n.op_type == "QuantizeLinear" and producer.get(n.input[0], n).op_type == "Conv" for n in graph.graph.node
    )
    report = check_agreement(out, fp32, x, y)
    assert report.ort_optimization == "basic"
    assert report.top1_agreement >= 0.97, report.summary()
    assert abs(report.accuracy - report.reference_accuracy) <= 0.02


@needs_fashion_mnist
def test_int8_cpu_flavour_is_u8s8_and_agrees(tmp_path, trained):
    model, fp32, calib, x, y = trained
    out = quantize_int8(fp32, tmp_path / "cpu.onnx", calib, flavour="cpu").path
    graph = load_onnx(out)
    zps = [_init(graph, n.input[2]) for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.uint8 for z in zps)
    report = check_agreement(out, fp32, x, y)
    assert report.ort_optimization == "all" and report.top1_agreement >= 0.97, report.summary()


@needs_fashion_mnist
def test_calibration_methods_give_different_scales(tmp_path, trained):
    _, fp32, calib, x, _ = trained
    scales = {
        m: activation_scales(quantize_int8(fp32, tmp_path / f"{m}.onnx", calib, method=m).path)
        for m in ("minmax", "entropy", "percentile")
    }
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    for method in ("entropy", "percentile"):
        # both clip outliers, so no range exceeds MinMax's and at least one is clearly tighter
        ratios = np.array([scales[method][k] / scales["minmax"][k] for k in scales["minmax"]])
        assert (ratios <= 1 + 1e-6).all() and ratios.min() < 0.95, (method, ratios)
    assert scales["entropy"] != scales["percentile"]
    assert check_agreement(tmp_path / "entropy.onnx", fp32, x).top1_agreement >= 0.9


def test_precision_errors_are_clear(tmp_path):
    model = create_model("vgg11", in_channels=1, width=0.125).eval()
    with pytest.raises(SlimError, match="unknown precision 'int4'"):
        export_precision(model, (1, 28, 28), tmp_path / "m.onnx", precision="int4")
    with pytest.raises(SlimError, match="needs a calibration set"):
        export_precision(model, (1, 28, 28), tmp_path / "m.onnx", precision="int8")
    fp32 = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "f.onnx").path
    calib = np.zeros((4, 1, 28, 28), np.float32)
    with pytest.raises(SlimError, match="unknown calibration method"):
        quantize_int8(fp32, tmp_path / "q.onnx", calib, method="mse")
    with pytest.raises(SlimError, match="unknown int8 flavour"):
        quantize_int8(fp32, tmp_path / "q.onnx", calib, flavour="gpu")
    with pytest.raises(SlimError, match="the model takes"):
        quantize_int8(fp32, tmp_path / "q.onnx", np.zeros((4, 3, 28, 28), np.float32))
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "q.onnx").exists()
