"""Your own model, first try: the paths from "my pretrained model and my image folder" to shipped files,
through the real CLI, without repeating what a checkpoint already records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, run_main, write_image_folder

pytestmark = pytest.mark.slow

FACTORY = "factories.tfsame:TinyNet.create"  # a classmethod taking num_classes, padding inside its convolutions
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
QUICK_BENCH = ["--bench-batch", "2", "--bench-iterations", "6", "--bench-rounds", "2", "--bench-warmup-s", "0"]


def cli(*args: object) -> str:
    """The command in this process (the refusal below runs the real one in a child)."""
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("own") / "images", 96, 40)


def test_a_factory_model_with_padding_inside_goes_through_every_command(folder, tmp_path):
    from factories.tfsame import TinyNet

    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    torch.save(TinyNet.create(num_classes=4).state_dict(), weights)
    model = tmp_path / "tiny.pt"
    refused = run_cli(
        "import", "--arch", FACTORY, "--weights", weights, "--input-shape", "3,32,32", "--out", model, env=ENV
    )
    assert refused.returncode == 2 and "--trust-code" in refused.stderr and not model.exists()
    said = cli("import", "--arch", FACTORY, "--weights", weights, "--input-shape", "3,32,32", "--trust-code",
               "--out", model)  # fmt: skip
    assert "normalisation: mean 0.485,0.456,0.406" in said  # the one rule: ImageNet's for weights from elsewhere
    table = tmp_path / "table.json"
    cli("profile", "--model", model, "--trust-code", "--profile-batch", "2", "--no-cache", "--out", table)
    layers = {layer["name"]: layer for layer in json.loads(table.read_text())["layers"]}
    # the stem pads 32x32 to 33x33 inside its forward: profiled at the size the convolution really sees
    assert layers["stem.0"]["in_hw"] == [33, 33] and layers["stem.0"]["padding"] == [0, 0]
    out = tmp_path / "build"
    cli("build", "--model", model, "--trust-code", "--ratio", "0.5", "--data", folder, "--eval-limit", "24",
        "--precision", "fp32,fp16", *QUICK_BENCH, "--out", out)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["slim"]["macs"] < report["baseline"]["macs"]
    timed = {m["name"] for m in report["benchmark"]["models"]}
    assert timed == {"baseline", "slim", "slim.fp16", "baseline.fp16"}  # every precision against fp32


def test_own_torchvision_weights_and_a_folder_ship_int8_for_the_cpu(folder, tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), weights)
    model, calib = tmp_path / "r18.pt", tmp_path / "calib.npz"
    cli("import", "--arch", "torchvision:resnet18", "--weights", weights, "--input-shape", "3,32,32", "--out", model)
    cli("calib", "--model", model, "--data", folder, "--n", "32", "--out", calib)
    out = tmp_path / "build"
    said = cli("build", "--model", model, "--ratio", "0.3", "--data", folder, "--eval-limit", "24",
               "--precision", "fp32,int8", "--calib", calib, *QUICK_BENCH, "--out", out)  # fmt: skip
    assert "int8 flavour: cpu" in said  # no TensorRT here: the graph ONNX Runtime runs fast
    report = json.loads((out / "report.json").read_text())
    assert report["int8_flavour"] == "cpu" and report["accuracy"] is not None
    assert {"slim.int8", "baseline.int8"} <= {m["name"] for m in report["benchmark"]["models"]}


def test_a_model_trained_on_a_resized_folder_needs_no_size_flag_afterwards(folder, tmp_path):
    model = tmp_path / "vgg.pt"
    cli("train", "--arch", "vgg11", "--width", "0.125", "--data", folder, "--image-size", "24", "--in-memory",
        "--epochs", "1", "--batch-size", "16", "--out", model)  # fmt: skip
    assert torch.load(model, weights_only=True)["meta"]["preprocess"] == {"stream": False, "image_size": 24}
    slim, tuned = tmp_path / "slim.pt", tmp_path / "tuned.pt"
    cli("prune", "--model", model, "--ratio", "0.5", "--out", slim)
    cli("finetune", "--model", slim, "--data", folder, "--epochs", "1", "--batch-size", "16", "--out", tuned)
    cli("calib", "--model", model, "--data", folder, "--n", "16", "--out", tmp_path / "c.npz")
    cli("export", "--model", tuned, "--data", folder, "--precision", "int8", "--calib", tmp_path / "c.npz",
        "--out", tmp_path / "t.onnx")  # fmt: skip
    cli("train", "--model", model, "--data", folder, "--epochs", "1", "--batch-size", "16", "--sparsity", "1e-4",
        "--out", tmp_path / "sparse.pt")  # fmt: skip
    cli("build", "--model", tmp_path / "sparse.pt", "--ratio", "0.5", "--data", folder, "--no-bench",
        "--out", tmp_path / "b")  # fmt: skip
