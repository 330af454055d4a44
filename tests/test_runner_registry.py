"""The runtime registry, the one ONNX Runtime session factory and its level hint, the torch modes,
and parity/agreement as two runners compared."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import ROOT, SAMPLE, export_tiny, randomize_batchnorm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.export import ORT_LEVEL_KEY
from slim2deploy.measure.compare import check_agreement, check_parity, run_all
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.runtime.ort import OrtRunner, onnx_metadata
from slim2deploy.runtime.registry import RUNTIMES, device_choices, open_runner, runner_kind
from slim2deploy.runtime.torch import TorchRunner, fuse_conv_bn

ZOO = [
    ("vgg11", {"in_channels": 1, "width": 0.125}, (1, 28, 28)),
    ("resnet20", {"width": 0.25}, (3, 32, 32)),  # pre-activation: only conv1 -> bn2 inside a block folds
    ("torchvision:mobilenet_v2", {"width_mult": 0.25}, (3, 32, 32)),
]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory):
    return export_tiny(tmp_path_factory.mktemp("rt") / "tiny.onnx", 8)


def _with_metadata(src, dst, meta: dict[str, str]):
    model = onnx.load(str(src))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dst))
    return dst


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(text, text, max_size=5))
def test_metadata_reader_agrees_with_onnx(tmp_path_factory, tiny_onnx, meta):
    path = _with_metadata(tiny_onnx[0], tmp_path_factory.mktemp("meta") / "m.onnx", meta)
    assert onnx_metadata(path) == {p.key: p.value for p in onnx.load(str(path)).metadata_props} == meta


def test_every_session_honours_the_files_level_hint(tmp_path, tiny_onnx):
    path, model = tiny_onnx
    hinted = _with_metadata(path, tmp_path / "hinted.onnx", {ORT_LEVEL_KEY: "basic"})
    with OrtRunner(hinted, device="cpu") as runner:
        assert runner.info.options["opt_level"] == "basic"
    with OrtRunner(hinted, device="cpu", opt_level="all") as runner:  # an explicit level wins
        assert runner.info.options["opt_level"] == "all"
    with OrtRunner(path, device="cpu") as runner:
        assert runner.info.options["opt_level"] == "all"
    x = np.random.default_rng(0).standard_normal((5, *SAMPLE)).astype(np.float32)
    assert check_agreement(hinted, path, x).ort_optimization == "basic"
    assert check_parity(model, hinted, x).ok
    bad = _with_metadata(path, tmp_path / "bad.onnx", {ORT_LEVEL_KEY: "fastest"})
    with pytest.raises(SlimError, match="optimisation level 'fastest'"):
        OrtRunner(bad, device="cpu").activate()


def test_registry_maps_files_to_runners_and_devices(tmp_path, tiny_onnx):
    for kind, runtime in RUNTIMES.items():
        for suffix in runtime.suffixes:
            assert runner_kind(f"model{suffix.upper()}") == kind
        assert runtime.runner_class().kind == kind
        assert set(runtime.devices) <= set(device_choices())
    runner = open_runner(tiny_onnx[0], device="cpu", mode="folded", precision="fp16", opt_level="basic")
    assert isinstance(runner, OrtRunner) and runner.opt_level == "basic"  # torch options are ignored
    with pytest.raises(SlimError, match="unknown runtime"):
        open_runner(tiny_onnx[0], backend="tflite")
    with pytest.raises(SlimError, match="needs backend="):
        open_runner(nn.Linear(2, 2))


def test_opening_an_onnx_file_never_imports_torch(tiny_onnx):
    code = (
        "import sys, numpy as np\n"
        "from slim2deploy.runtime.registry import open_runner\n"
        f"with open_runner({str(tiny_onnx[0])!r}, device='cpu') as r:\n"
        "    r.infer(np.zeros((1, *r.info.sample_shape), np.float32))\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')], 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name, kwargs, shape", ZOO, ids=[m[0] for m in ZOO])
def test_folding_matches_eager_and_removes_only_foldable_batchnorms(name, kwargs, shape):
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name, **kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, pairs = fuse_conv_bn(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert pairs > 0 and len(left) == len(bns) - pairs
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched


def test_a_conv_feeding_a_residual_add_keeps_its_batchnorm_apart():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + self.conv2(y)  # conv's output has two users: folding bn into it is wrong

    model = randomize_batchnorm(Block())
    folded, pairs = fuse_conv_bn(model)
    x = torch.randn(2, 4, 6, 6)
    assert pairs == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    path = make_checkpoint("resnet20", width=0.25, input_shape=(3, 32, 32), bn_seed=0)
    return path, model_from_checkpoint(load_checkpoint(path))


def test_torch_modes_from_a_checkpoint_agree(checkpoint):
    path, model = checkpoint
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for mode, channels_last in (("eager", False), ("folded", False), ("folded", True)):
        runner = open_runner(path, backend="torch", device="cpu", mode=mode, channels_last=channels_last, threads=1)
        with runner:
            assert runner.info.options["mode"] == mode
            assert (runner.info.options["folded_conv_bn"] > 0) == (mode == "folded")
            np.testing.assert_allclose(runner.infer(x), ref, rtol=1e-4, atol=1e-5)
            assert runner.costs()[1] == "torch"


def test_torch_runner_takes_an_in_memory_model_and_leaves_it_alone(checkpoint):
    _, model = checkpoint
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with TorchRunner(model, mode="folded", channels_last=True, input_shape=(3, 32, 32)) as runner:
        assert runner.name == "in-memory torch model" and runner.path is None
        out = run_all(runner, x, batch_size=2)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns
    assert next(model.parameters()).is_contiguous()  # not switched to channels_last
    with torch.no_grad():
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(SlimError, match="needs input_shape"):
        TorchRunner(model)
    with pytest.raises(SlimError, match="unknown torch mode"):
        TorchRunner(model, mode="jit", input_shape=(3, 32, 32))


def test_parity_and_agreement_take_runners(tmp_path, tiny_onnx):
    path, model = tiny_onnx
    x = np.random.default_rng(2).standard_normal((70, *SAMPLE)).astype(np.float32)  # more than one batch
    reference = TorchRunner(model, mode="folded", input_shape=SAMPLE)
    report = check_parity(reference, path, x)
    assert report.ok and report.n == 70 and not reference.is_active
    with OrtRunner(path, device="cpu") as candidate:
        agree = check_agreement(candidate, reference, x, np.zeros(70, dtype=np.int64))
        assert candidate.is_active  # a runner the caller activated stays active
    assert agree.top1_agreement == 1.0 and agree.accuracy == agree.reference_accuracy
    with torch.no_grad():
        model[0].bias.add_(1.0)
    assert not check_parity(model, path, x).ok


@pytest.mark.slow
def test_compiled_mode_runs_on_the_cpu_and_matches_eager():
    torch.manual_seed(0)
    model = randomize_batchnorm(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    )
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    with TorchRunner(model, mode="compiled", input_shape=(1, 6, 6)) as runner:
        out = runner.infer(x)
        assert runner.info.options["compile_mode"] == "default" and runner.info.options["folded_conv_bn"] == 1
        np.testing.assert_allclose(runner.infer(x), out)
    with torch.no_grad():
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
