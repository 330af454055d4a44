"""The runner interface on real backends: ONNX Runtime and torch on this CPU; TensorRT refuses cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SAMPLE, export_tiny
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.runtime.ort import OrtRunner
from slim2deploy.runtime.registry import open_runner, runner_kind
from slim2deploy.runtime.torch import TorchRunner
from slim2deploy.runtime.trt import TrtRunner


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    d = tmp_path_factory.mktemp("onnx")
    return {"base": export_tiny(d / "base.onnx", 16), "slim": export_tiny(d / "slim.onnx", 8)}


def test_ort_runner_matches_torch_and_reports_metadata(onnx_pair):
    path, model = onnx_pair["base"]
    x = np.random.default_rng(0).standard_normal((5, *SAMPLE)).astype(np.float32)
    with OrtRunner(path, device="cpu", opt_level="basic", threads=1) as runner:
        info = runner.info
        assert info.input_name == "input" and info.sample_shape == SAMPLE
        assert (info.min_batch, info.max_batch, info.device) == (1, None, "cpu")
        assert info.options["providers"] == ["CPUExecutionProvider"]
        # sessions timed interleaved must not busy-wait while another runs (bench/ort_spinning.py)
        opts = runner._session.get_session_options()
        for pool in ("intra_op", "inter_op"):
            assert opts.get_session_config_entry(f"session.{pool}.allow_spinning") == "0"
        assert info.options["spinning"] is False
        out = runner.infer(x)
        assert np.array_equal(out, runner.infer({"input": x}))
        assert runner.last_compute_ms is None  # CPU: no separate device time
    with OrtRunner(path, device="cpu", threads=1, spinning=True) as alone:  # ORT's default, for one model alone
        opts = alone._session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert alone.info.options["spinning"] is True
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert not runner.is_active


def test_ort_runner_rejects_bad_feeds(onnx_pair):
    path, _ = onnx_pair["slim"]
    runner = OrtRunner(path, device="cpu")
    with pytest.raises(SlimError, match="not active"):
        runner.infer(np.zeros((1, *SAMPLE), np.float32))
    with runner:
        with pytest.raises(SlimError, match="expects input of shape"):
            runner.infer(np.zeros((1, 3, 8, 8), np.float32))
        with pytest.raises(SlimError, match="named 'input'"):
            runner.infer({"x": np.zeros((1, *SAMPLE), np.float32)})
        # float64 input is converted to the model's float32, not rejected
        assert runner.infer(np.zeros((2, *SAMPLE))).shape == (2, 10)


def test_static_batch_model_limits_batch_range(tmp_path):
    path, _ = export_tiny(tmp_path / "static.onnx", 4, static_batch=4)
    with OrtRunner(path, device="cpu") as runner:
        assert (runner.info.min_batch, runner.info.max_batch) == (4, 4)
        assert runner.supports_batch(4) and not runner.supports_batch(1)
        with pytest.raises(SlimError, match="supports batch 4..4"):
            runner.infer(np.zeros((1, *SAMPLE), np.float32))


def test_ort_runner_errors_are_clear(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07not a model")
    with pytest.raises(SlimError, match="cannot load"):
        OrtRunner(broken, device="cpu").activate()
    with pytest.raises(SlimError, match="no such model"):
        OrtRunner(tmp_path / "missing.onnx").activate()
    with pytest.raises(SlimError, match="optimisation level"):
        OrtRunner(broken, opt_level="max")
    with pytest.raises(SlimError, match="has no TensorrtExecutionProvider"):
        path, _ = export_tiny(tmp_path / "ok.onnx", 4)
        import onnxruntime

        if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("this ONNX Runtime has the TensorRT provider")
        OrtRunner(path, device="tensorrt").activate()


@pytest.fixture
def checkpoint_path(make_checkpoint) -> Path:
    return make_checkpoint()  # vgg11 at width 0.125: 1x28x28 inputs, 10 classes


def test_torch_runner_cpu_matches_model_and_counts_costs(checkpoint_path):
    model = model_from_checkpoint(load_checkpoint(checkpoint_path))
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    for channels_last in (False, True):
        with TorchRunner(checkpoint_path, device="cpu", channels_last=channels_last, threads=1) as runner:
            assert runner.info.sample_shape == (1, 28, 28)
            out = runner.infer(x)
            assert runner.params == count_params(model)
            assert runner.macs == count_macs(model, torch.zeros(1, 1, 28, 28))
            assert runner.memory() == {}
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_torch_runner_refuses_gpu_only_options_on_cpu(checkpoint_path):
    with pytest.raises(SlimError, match="need the cuda device"):
        TorchRunner(checkpoint_path, device="cpu", precision="fp16").activate()
    with pytest.raises(SlimError, match="fp32 or fp16"):
        TorchRunner(checkpoint_path, precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(SlimError, match="no CUDA GPU"):
            TorchRunner(checkpoint_path, device="cuda").activate()


def test_open_runner_picks_backend_by_file_type(tmp_path, checkpoint_path, onnx_pair):
    assert isinstance(open_runner(onnx_pair["base"][0]), OrtRunner)
    assert isinstance(open_runner(checkpoint_path), TorchRunner)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    assert isinstance(open_runner(engine), TrtRunner)
    assert runner_kind("x.plan") == "tensorrt"
    with pytest.raises(SlimError, match="cannot tell how to run"):
        open_runner(tmp_path / "model.tflite")
    with pytest.raises(SlimError, match="GPU only"):
        open_runner(engine, device="cpu")


def test_trt_runner_fails_with_one_clear_error_without_gpu(tmp_path):
    """No GPU/TensorRT here: activation must say so as a SlimError, never a raw ImportError."""
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(SlimError):
        TrtRunner(engine).activate()
