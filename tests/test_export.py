"""ONNX export: fp32 parity with torch, folded and clean graphs, one file, and clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import randomize_batchnorm, run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.export import FP32_RTOL, export_onnx, fuse_conv_bn_nodes, graph_leftovers, load_onnx
from slim2deploy.measure.compare import check_parity, run_all
from slim2deploy.model.zoo import create_model
from slim2deploy.runtime.ort import OrtRunner, ort_session

MODELS = [
    ("vgg11", {"in_channels": 1, "width": 0.125}, (1, 28, 28)),
    ("resnet20", {"width": 0.25}, (3, 32, 32)),
    ("densenet40", {"width": 0.25}, (3, 32, 32)),
    ("torchvision:resnet18", {}, (3, 32, 32)),
    ("torchvision:mobilenet_v2", {"width_mult": 0.25}, (3, 32, 32)),
]


@pytest.mark.parametrize("name, kwargs, shape", MODELS, ids=[m[0] for m in MODELS])
def test_fp32_parity_folded_clean_single_file(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name, **kwargs))
    path = tmp_path / "m.onnx"
    result = export_onnx(model, torch.randn(1, *shape), path)
    x = np.random.default_rng(0).standard_normal((5, *shape)).astype(np.float32)
    report = check_parity(model, path, x)
    assert report.ok and report.max_rel <= FP32_RTOL, report.summary()
    assert report.top1_agreement == 1.0
    proto = onnx.load(str(path))
    assert graph_leftovers(proto) == []
    assert result.input_shape[0] == "batch" and result.opset == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # one self-contained file
    assert result.bytes == path.stat().st_size and len(result.sha256) == 64
    # dynamic batch: another batch size runs and matches
    assert check_parity(model, path, x[:3]).ok


def test_static_batch_and_dynamo_exporter(tmp_path):
    model = randomize_batchnorm(create_model("vgg11", in_channels=1, width=0.125))
    result = export_onnx(model, torch.randn(4, 1, 28, 28), tmp_path / "s.onnx", dynamic_batch=False)
    assert result.input_shape == [4, 1, 28, 28]
    x = np.random.default_rng(1).standard_normal((6, 1, 28, 28)).astype(np.float32)
    assert check_parity(model, result.path, x).ok  # the runner pads the last static batch
    dyn = export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "d.onnx", exporter="dynamo")
    assert dyn.exporter == "dynamo" and dyn.opset >= 18
    assert check_parity(model, dyn.path, x).ok


def _conv_bn_graph(rng: np.random.Generator) -> onnx.ModelProto:
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    bn = [rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")] + [
        numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(bn, ["g", "beta", "mu", "var"], strict=True)
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mu", "var"], ["y"], epsilon=1e-3),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 5, 5])],
        inits,
    )
    # IR 8 (what opset 17 came with): older ONNX Runtime releases refuse the onnx package's newest IR
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_fuse_conv_bn_nodes_keeps_outputs_and_removes_bn(tmp_path_factory, seed):
    folder = tmp_path_factory.mktemp("fuse")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    model = _conv_bn_graph(rng)
    onnx.save(model, str(folder / "before.onnx"))
    assert graph_leftovers(model) != []
    assert fuse_conv_bn_nodes(model) == 1
    onnx.save(model, str(folder / "after.onnx"))
    assert [n.op_type for n in model.graph.node] == ["Conv"] and graph_leftovers(model) == []
    with OrtRunner(folder / "before.onnx", "cpu", "disable") as before_runner:
        before = run_all(before_runner, x)
    with OrtRunner(folder / "after.onnx", "cpu", "disable") as after_runner:
        after = run_all(after_runner, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_parity_gate_fails_with_errors_shown(tmp_path):
    model = randomize_batchnorm(create_model("vgg11", in_channels=1, width=0.125))
    path = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx").path
    with torch.no_grad():
        model.classifier.bias.add_(0.01)  # the file no longer computes what the model computes
    report = check_parity(model, path, np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32))
    assert not report.ok and report.max_abs == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(SlimError, match=r"max abs error 0\.01.*max rel error"):
        report.raise_if_failed()


def test_truncated_onnx_is_one_clear_error(tmp_path):
    model = create_model("vgg11", in_channels=1, width=0.125).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(1, 1, 28, 28), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for call in (
        lambda: load_onnx(path),
        lambda: ort_session(path),
        lambda: check_parity(model, path, np.zeros((1, 1, 28, 28), np.float32)),
    ):
        with pytest.raises(SlimError, match="truncated or not a valid ONNX model"):
            call()


@pytest.fixture
def checkpoint(make_checkpoint):
    return make_checkpoint(bn_seed=0)  # vgg11 at width 0.125: 1x28x28 inputs, 10 classes


def test_export_command_each_precision(tmp_path, checkpoint):
    calib = tmp_path / "cal.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32))
    for precision, extra in [("fp32", ["--static-batch", "2"]), ("fp16", []), ("int8", ["--calib", str(calib)])]:
        out = tmp_path / f"{precision}.onnx"
        res = run_main("export", "--model", str(checkpoint), "--out", str(out), "--precision", precision, *extra)
        assert res.returncode == 0, res.stderr
        assert "wrote" in res.stdout and load_onnx(out) is not None
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert precision == "fp32" or meta["slim2deploy.precision"].startswith(precision)


def test_export_command_errors_are_one_line_and_write_nothing(tmp_path, checkpoint):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 3, 32, 32), np.float32))
    cases = [
        (["--precision", "int4"], "unknown precision"),
        (["--precision", "int8"], "needs a calibration set"),
        (["--precision", "int8", "--calib", str(wrong)], "the model takes (1, 28, 28)"),
    ]
    for extra, message in cases:
        out = tmp_path / "m.onnx"
        res = run_main("export", "--model", str(checkpoint), "--out", str(out), *extra)
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def test_checker_failure_without_a_message_is_one_error(tmp_path, monkeypatch):
    def reject(*args: object, **kwargs: object) -> None:
        raise Exception()  # noqa: TRY002 - what third-party code can raise: no type, no message

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(SlimError, match=r"the exported graph fails onnx.checker \(Exception\)$"):
        export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", simplify=False)
    assert not (tmp_path / "m.onnx").exists()
