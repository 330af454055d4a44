"""Fault injection: every user mistake is one `error:` line, exit status 2, and nothing changed on disk.

Most cases call the CLI's ``main`` in this process (the same code the command runs; a subprocess
per case would cost seconds of start-up each); a few go through a real subprocess to show that no
traceback reaches the terminal and that a full disk is reported cleanly.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_refused, bench_script, run_cli
from helpers import snapshot as _snapshot

from slim2deploy.base.errors import SlimError
from slim2deploy.cli import main
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.prune.rebuild import model_from_checkpoint

KWARGS = {"in_channels": 1, "num_classes": 3, "width": 0.125}


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: enough for PIL to judge it a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_checkpoint) -> dict[str, Path]:
    """A tiny checkpoint, tiny datasets of every format, and broken variants of each."""
    d = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 1, 8, 8)).astype(np.uint8)
    y = rng.integers(0, 3, 64)
    f = {"dir": d / "adir", "file": d / "plain.txt"}
    f["dir"].mkdir()
    f["file"].write_text("not a folder\n")
    (d / "loop1").symlink_to("loop2")
    (d / "loop2").symlink_to("loop1")
    np.savez(d / "ok.npz", x=x, y=y)
    xf = x.astype(np.float32) / 255
    xf[5, 0, 1, 1] = np.nan
    bad_npz = {
        "count": {"x": x, "y": y[:40]},
        "negative": {"x": x, "y": np.where(y == 0, -1, y)},
        "float_labels": {"x": x, "y": y + 0.5},
        "nan": {"x": xf, "y": y},
        "split_count": {"x_train": x, "y_train": y, "x_val": x[:10], "y_val": y[:7]},
    }
    for name, arrays in bad_npz.items():
        np.savez(d / f"{name}.npz", **arrays)
    layout = {
        "channels_last": {"x": x.transpose(0, 2, 3, 1), "y": y},
        "one_image": {"x": x[:1], "y": y[:1]},
        "identical": {"x": np.repeat(x[:1], 64, 0), "y": y},
        "one_hot": {"x": x, "y": np.eye(3)[y]},
        "zero_size": {"x": np.zeros((64, 1, 0, 8), np.uint8), "y": y},
        "wide_ints": {"x": x.astype(np.int64) * 4, "y": y},
        "float_255": {"x": x.astype(np.float32), "y": y},
        "float_normalised": {"x": (x.astype(np.float32) / 255 - 0.5) / 0.25, "y": y},
    }
    for name, arrays in layout.items():
        np.savez(d / f"{name}.npz", **arrays)
    np.savez(d / "same_calib.npz", x=np.zeros((8, 1, 8, 8), np.float32))
    np.save(d / "single.npy", x)
    (d / "npy_as.npz").write_bytes((d / "single.npy").read_bytes())
    (d / "empty.npz").write_bytes(b"")
    whole = (d / "ok.npz").read_bytes()
    (d / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    for name, n_images, labels in (("idx_count", 30, rng.integers(0, 10, 20)), ("idx_label", 20, np.full(20, 12))):
        folder = d / name
        folder.mkdir()
        _idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (n_images, 28, 28)))
        _idx(folder / "train-labels-idx1-ubyte.gz", labels)
        _idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
        _idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    (d / "idx_corrupt").mkdir()
    gray = np.random.default_rng(5).integers(0, 4, (100, 28, 28)) * 64  # compressible: deflate codes, not stored
    _idx(d / "idx_corrupt" / "train-images-idx3-ubyte.gz", gray)
    whole = bytearray((d / "idx_corrupt" / "train-images-idx3-ubyte.gz").read_bytes())
    whole[2000:2100] = bytes(b ^ 0xFF for b in whole[2000:2100])  # damaged deflate data, intact gzip header
    (d / "idx_corrupt" / "train-images-idx3-ubyte.gz").write_bytes(bytes(whole))
    _idx(d / "idx_corrupt" / "train-labels-idx1-ubyte.gz", np.arange(100) % 10)
    from PIL import Image

    for name, junk in (("zero_byte", b""), ("garbage", b"\x89PNG but not really" * 10)):
        for c in ("a", "b"):
            (d / name / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(d / name / c / f"{i}.png")
        (d / name / "a" / "broken.png").write_bytes(junk)
    shutil.copytree(d / "garbage", d / "bomb", ignore=shutil.ignore_patterns("broken.png"))
    (d / "bomb" / "a" / "bomb.png").write_bytes(_png_header(15000, 15000))
    for split, classes in (("train", "ab"), ("val", "ac")):  # val/c would get train/b's label by position
        for c in classes:
            (d / "val_unknown" / split / c).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(d / "val_unknown" / split / c / f"{i}.png")
    f["ckpt"] = make_checkpoint(num_classes=3, input_shape=(1, 8, 8), meta={"mean": [0.5], "std": [0.25]},
                                path=d / "model.pt")  # fmt: skip
    model = model_from_checkpoint(load_checkpoint(f["ckpt"]))
    payload = torch.load(f["ckpt"], weights_only=True)
    state = payload["state_dict"]

    def damaged(key: str, value: float) -> dict[str, torch.Tensor]:
        tensor = state[key].clone()
        tensor.view(-1)[0] = value
        return {**state, key: tensor}

    torch.save(damaged("features.1.weight", float("nan")), d / "nan_weights.pt")
    as_int = {k: v.to(torch.int64) for k, v in state.items()}  # every gamma would load as 0: an all-zero model
    torch.save(as_int, d / "int_weights.pt")
    edits = {
        "unknown_kwarg": {"arch_kwargs": {**KWARGS, "bogus": 1}},
        "negative_shape": {"input_shape": [-1, 8, 8]},
        "classes_text": {"num_classes": "three"},
        "arch_number": {"arch": 5},
        "state_list": {"state_dict": [1, 2]},
        "meta_list": {"meta": [1]},
        "nan_gamma": {"state_dict": damaged("features.1.weight", float("nan"))},
        "nan_conv": {"state_dict": damaged("features.0.weight", float("nan"))},
        "inf_bias": {"state_dict": damaged("features.1.bias", float("inf"))},
        "negative_var": {"state_dict": damaged("features.1.running_var", -1.0)},
        "missing_tensor": {"state_dict": {k: v for k, v in state.items() if k != "features.0.weight"}},
        "extra_tensor": {"state_dict": {**state, "head.extra": torch.zeros(2)}},
        "wrong_shape": {"state_dict": {**state, "features.0.weight": torch.zeros(5, 1, 3, 3)}},
        "mean_text": {"meta": {**payload["meta"], "mean": "abc"}},
        "std_negative": {"meta": {**payload["meta"], "std": [-0.25]}},
        "std_zero": {"meta": {**payload["meta"], "std": [0]}},
        "std_nan": {"meta": {**payload["meta"], "std": [float("nan")]}},
        "mean_per_rgb": {"meta": {**payload["meta"], "mean": [0.5, 0.5, 0.5]}},
        "std_alone": {"meta": {"std": [0.25]}},
        "input_channels": {"input_shape": [3, 8, 8]},
        "classes_past_outputs": {"num_classes": 5},
        "more_names_than_classes": {"meta": {**payload["meta"], "classes": ["a", "b", "c", "d"]}},
        "int_state": {"state_dict": as_int},
        "newer_format": {"format": "slim2deploy.checkpoint/2"},
    }
    for name, change in edits.items():
        torch.save({**payload, **change}, d / f"{name}.pt")
    (d / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    torch.save(model.eval(), d / "pickled.pt")
    f["root"] = d
    return f


OUTPUT_CASES = {
    "prune --out folder": (["prune", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{dir}"], "is a folder"),
    "prune --plan-json folder, main output not written": (
        ["prune", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/slim.pt", "--plan-json", "{dir}"],
        "--plan-json",
    ),
    "prune --out equals --plan-json": (
        ["prune", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/s.pt", "--plan-json", "{root}/s.pt"],
        "same file",
    ),
    "export --out under a file": (["export", "--model", "{ckpt}", "--out", "{file}/x.onnx"], "not a folder"),
    "export --out is the input": (["export", "--model", "{ckpt}", "--out", "{ckpt}"], "is also an input"),
    "export --json folder": (["export", "--model", "{ckpt}", "--out", "{root}/x.onnx", "--json", "{dir}"], "--json"),
    "build --out is a file": (["build", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{file}"], "is a file"),
    "inspect --json folder": (["inspect", "--model", "{ckpt}", "--json", "{dir}"], "is a folder"),
    "inspect --plot is the checkpoint": (["inspect", "--model", "{ckpt}", "--plot", "{ckpt}"], "is also an input"),
    "train --out folder, before any epoch": (["train", "--data", "{root}/ok.npz", "--out", "{dir}"], "is a folder"),
    "train --history under a file": (
        ["train", "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--history", "{file}/h.json"],
        "--history",
    ),
    "train --out is the data": (["train", "--data", "{root}/ok.npz", "--out", "{root}/ok.npz"], "is also an input"),
    "finetune --out is the model": (
        ["finetune", "--model", "{ckpt}", "--data", "{root}/ok.npz", "--out", "{ckpt}"],
        "is also an input",
    ),
    "calib --out folder": (["calib", "--data", "{root}/ok.npz", "--n", "8", "--out", "{dir}"], "is a folder"),
    "prune --out with a trailing separator": (
        ["prune", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/x.pt/"],
        "ends in a path separator",
    ),
    "export --json with a trailing separator": (
        ["export", "--model", "{ckpt}", "--out", "{root}/x.onnx", "--json", "{root}/x.json/"],
        "--json",
    ),
    "export --out a symlink loop": (["export", "--model", "{ckpt}", "--out", "{root}/loop1"], "symbolic links"),
    "prune --out a name over 255 bytes": (
        ["prune", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/" + "a" * 300 + ".pt"],
        "File name too long",
    ),
    "train --out with a trailing separator": (
        ["train", "--data", "{root}/ok.npz", "--out", "{root}/t.pt/"],
        "ends in a path separator",
    ),
}

DATA_CASES = {
    "npz image/label count": ("count.npz", "64 images but 40 labels"),
    "npz val split count": ("split_count.npz", "10 images but 7 labels"),
    "npz negative label": ("negative.npz", ">= 0"),
    "npz float labels": ("float_labels.npz", "whole class indices"),
    "npz NaN image": ("nan.npz", "NaN"),
    "npy passed as npz": ("npy_as.npz", "single .npy array"),
    "empty npz": ("empty.npz", "not a readable .npz"),
    "truncated npz": ("truncated.npz", "not a readable .npz"),
    "zero-byte image": ("zero_byte", "broken.png is not a readable image"),
    "corrupt image": ("garbage", "broken.png is not a readable image"),
    "npz images channels-last": ("channels_last.npz", "channels-last (N, H, W, C = (64, 8, 8, 1))"),
    "npz of one image, split 90/10": ("one_image.npz", "needs at least 2"),
    "npz of identical images": ("identical.npz", "64 images that are all identical"),
    "npz one-hot labels": ("one_hot.npz", "y.argmax(axis=1)"),
    "val class folder unknown to training": ("val_unknown", "class folders c that"),
    "npz images with a zero-sized dimension": ("zero_size.npz", "(64, 1, 0, 8) have a dimension of size 0"),
    "npz integer pixels beyond 255": ("wide_ints.npz", "integer pixels must be 8-bit values 0..255, found 0..1016"),
    "npz float pixels 0..255": ("float_255.npz", "float images must lie in [0, 1], found 0..254; divide by 255"),
    "npz float pixels normalised": ("float_normalised.npz", "found -2..1.98431; scale them, un-normalised, to [0, 1]"),
}

CHECKPOINT_CASES = {
    "unknown architecture argument": ("unknown_kwarg.pt", "bogus"),
    "negative input shape": ("negative_shape.pt", "input_shape"),
    "class count as text": ("classes_text.pt", "num_classes"),
    "architecture not a name": ("arch_number.pt", "arch must be"),
    "state_dict not a dict": ("state_list.pt", "state_dict"),
    "meta not a dict": ("meta_list.pt", "meta must be"),
    "random bytes": ("random.pt", "corrupt or not a torch checkpoint"),
    "NaN BatchNorm weight": ("nan_gamma.pt", "'features.1.weight' (8,) holds NaN"),
    "NaN conv weight": ("nan_conv.pt", "'features.0.weight' (8, 1, 3, 3) holds NaN"),
    "infinite bias": ("inf_bias.pt", "'features.1.bias' (8,) holds infinity"),
    "negative running_var": ("negative_var.pt", "'features.1.running_var' (8,) has negative values"),
    "missing tensor": ("missing_tensor.pt", "missing: features.0.weight"),
    "unexpected tensor": ("extra_tensor.pt", "unexpected: head.extra"),
    "wrongly shaped tensor": ("wrong_shape.pt", "features.0.weight is (5, 1, 3, 3) but the model's is (8, 1, 3, 3)"),
    "mean as text": ("mean_text.pt", "meta.mean must be"),
    "negative std": ("std_negative.pt", "meta.std must be positive"),
    "zero std": ("std_zero.pt", "meta.std must be positive"),
    "NaN std": ("std_nan.pt", "meta.std must be"),
    "3 means for 1 channel": ("mean_per_rgb.pt", "meta.mean must be"),
    "std without mean": ("std_alone.pt", "meta has std but not mean"),
    "input_shape that the model does not take": ("input_channels.pt", "input_shape [3, 8, 8] does not fit"),
    "pickled module without trust": ("pickled.pt", "--trust-code"),
    "num_classes past the model's outputs": ("classes_past_outputs.pt", "num_classes 5 but its model vgg11 gives"),
    "more class names than classes": ("more_names_than_classes.pt", "meta.classes names 4 classes but num_classes"),
    "integer weights": ("int_state.pt", "wrong type: features.0.weight is int64 but the model's is float32"),
    "newer checkpoint format": ("newer_format.pt", "'slim2deploy.checkpoint/2', newer than"),
}

TRAIN = ["train", "--arch", "vgg11", "--width", "0.125", "--epochs", "1", "--batch-size", "16"]
CALIB = ["calib", "--data", "{root}/ok.npz", "--n", "8", "--out", "{root}/c.npz", "--model"]
IMPORT = ["import", "--arch", "vgg11", "--width", "0.125", "--num-classes", "3", "--input-shape", "1,8,8"]
DAMAGED_CASES = {
    "prune NaN gamma": (["prune", "--model", "{root}/nan_gamma.pt", "--ratio", "0.5", "--out", "{root}/s.pt"], "NaN"),
    "export NaN conv": (["export", "--model", "{root}/nan_conv.pt", "--out", "{root}/x.onnx"], "features.0.weight"),
    "export infinite bias": (["export", "--model", "{root}/inf_bias.pt", "--out", "{root}/x.onnx"], "infinity"),
    "prune negative running_var": (
        ["prune", "--model", "{root}/negative_var.pt", "--ratio", "0.5", "--out", "{root}/s.pt"],
        "running_var",
    ),
    "calib mean as text": ([*CALIB, "{root}/mean_text.pt"], "meta.mean"),
    "calib negative std": ([*CALIB, "{root}/std_negative.pt"], "meta.std"),
    "calib zero std": ([*CALIB, "{root}/std_zero.pt"], "meta.std"),
    "calib NaN std": ([*CALIB, "{root}/std_nan.pt"], "meta.std"),
    "calib 3 means for 1 channel": ([*CALIB, "{root}/mean_per_rgb.pt"], "meta.mean"),
    "finetune negative std": (
        ["finetune", "--model", "{root}/std_negative.pt", "--data", "{root}/ok.npz", "--out", "{root}/f.pt"],
        "meta.std",
    ),
    "import NaN weights": (
        [*IMPORT, "--weights", "{root}/nan_weights.pt", "--mean", "0.5", "--std", "0.25", "--out", "{root}/i.pt"],
        "'features.1.weight' (8,) holds NaN",
    ),
    "train from integer weights": (
        [*TRAIN, "--data", "{root}/ok.npz", "--weights", "{root}/int_weights.pt", "--out", "{root}/t.pt"],
        "features.0.weight is int64 but the model's is float32",
    ),
    "build a model whose num_classes is past its outputs, before any work": (
        [
            "build",
            "--model",
            "{root}/classes_past_outputs.pt",
            "--data",
            "{root}/ok.npz",
            "--ratio",
            "0.5",
            "--out",
            "{root}/b",
        ],
        "num_classes 5",
    ),
    "train from NaN weights": (
        [*TRAIN, "--data", "{root}/ok.npz", "--weights", "{root}/nan_weights.pt", "--out", "{root}/t.pt"],
        "'features.1.weight' (8,) holds NaN",
    ),
}
SLOW = ["--speedup", "0.5", "--no-cache", "--profile-batch", "2"]  # a speed-up below 1: a slow-down
RATIO_BUILD = ["build", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/b", "--no-bench"]
FLAG_CASES = {
    "opset too old": (["export", "--model", "{ckpt}", "--out", "{root}/x.onnx", "--opset", "5"], "13..20"),
    "opset too new": (["export", "--model", "{ckpt}", "--out", "{root}/x.onnx", "--opset", "99"], "13..20"),
    "build opset before any stage": (
        ["build", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/b", "--opset", "99"],
        "13..20",
    ),
    "build --save-table, which it would not write": (
        ["build", "--model", "{ckpt}", "--speedup", "1.5", "--out", "{root}/b", "--save-table", "{root}/t.json"],
        "latency-table.json",
    ),
    "unknown device": ([*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--device", "tpu"], "tpu"),
    "sparsity nan": ([*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--sparsity", "nan"], "--sparsity"),
    "sparsity inf": ([*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--sparsity", "inf"], "--sparsity"),
    "momentum 1": ([*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--momentum", "1"], "--momentum"),
    "weight decay nan": (
        [*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--weight-decay", "nan"],
        "--weight-decay",
    ),
    "image size 0": ([*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--image-size", "0"], "--image-size"),
    "input shape malformed": (["inspect", "--model", "{root}/pickled.pt", "--input-shape", "1,8"], "--input-shape"),
    "input shape channels last": (["inspect", "--model", "{root}/pickled.pt", "--input-shape", "8,8,1"], "1,8,8"),
    "pickled module without input shape": (
        ["inspect", "--model", "{root}/pickled.pt", "--trust-code"],
        "pass one as --input-shape",
    ),
    "input shape contradicts the checkpoint": (["inspect", "--model", "{ckpt}", "--input-shape", "3,8,8"], "differs"),
    "profile --speedup at or below 1": (["profile", "--model", "{ckpt}", "--out", "{root}/t.json", *SLOW], "--speedup"),
    "profile --speedup nan, before profiling": (
        ["profile", "--model", "{ckpt}", "--out", "{root}/t.json", "--speedup", "nan", "--no-cache"],
        "--speedup",
    ),
    "build --finetune-lr nan, before pruning": (
        [*RATIO_BUILD, "--finetune-epochs", "1", "--data", "{root}/ok.npz", "--finetune-lr", "nan"],
        "--finetune-lr",
    ),
    "prune --max-prune 0 names the flag": (
        ["prune", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/s.pt", "--max-prune", "0"],
        "--max-prune",
    ),
    "build --profile-batch 0, before the output folder is made": (
        ["build", "--model", "{ckpt}", "--speedup", "2", "--out", "{root}/b", "--profile-batch", "0", "--no-cache"],
        "--profile-batch",
    ),
    # sizes whose lower-bound estimate exceeds any machine's memory by far: refused before allocating
    "train --width huge": ([*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--width", "1000"], "--width"),
    "build --bench-batch huge": ([*RATIO_BUILD[:-1], "--bench-batch", f"1,{10**12}"], "--bench-batch"),
    "build --profile-batch huge, before the output folder": (
        ["build", "--model", "{ckpt}", "--speedup", "2", "--out", "{root}/b", "--profile-batch", str(10**12)],
        "--profile-batch",
    ),
    "profile --batch huge": (
        ["profile", "--model", "{ckpt}", "--out", "{root}/t.json", "--no-cache", "--profile-batch", str(10**12)],
        "--profile-batch",
    ),
    "train --width nan names the flag": (
        [*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--width", "nan"],
        "--width",
    ),
    "--mean/--std for 3 channels on 1-channel data": (
        [*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"],
        "(1, 8, 8) images (C, H, W) but the normalisation is for 3 channels",
    ),
    "training batch of 1 image": (
        [*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--batch-size", "1"],
        "batch of 1",
    ),
    "limit-val 0": (
        [*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt", "--eval-limit", "0"],
        "argument --eval-limit: must be at least",
    ),
    "finetune --epochs 0, before the data is read": (
        ["finetune", "--model", "{ckpt}", "--data", "{root}/truncated.npz", "--out", "{root}/f.pt", "--epochs", "0"],
        "argument --epochs: must be at least 1",
    ),
    "import --image-size 0": (
        [*IMPORT, "--image-size", "0", "--out", "{root}/i.pt"],
        "argument --image-size: must be at least",
    ),
    "import --image-size negative": (
        [*IMPORT, "--image-size", "-3", "--out", "{root}/i.pt"],
        "argument --image-size: must be at least",
    ),
    "import --image-size below the input": (
        [*IMPORT, "--image-size", "4", "--weights", "{root}/nan_weights.pt", "--out", "{root}/i.pt"],
        "--image-size 4 is smaller than the input's 8 pixels",
    ),
    "export --eval-n 0": (
        ["export", "--model", "{ckpt}", "--out", "{root}/x.onnx", "--eval-limit", "0"],
        "argument --eval-limit: must be at least",
    ),
    "profile --batch 0": (
        ["profile", "--model", "{ckpt}", "--out", "{root}/t.json", "--profile-batch", "0"],
        "argument --profile-batch: must be at least",
    ),
    "calib --workers -1": (
        ["calib", "--data", "{root}/val_unknown", "--n", "2", "--out", "{root}/c.npz", "--workers", "-1"],
        "argument --workers: must be at least",
    ),
    "calib --crop 0": (
        ["calib", "--data", "{root}/val_unknown", "--n", "2", "--out", "{root}/c.npz", "--crop", "0"],
        "argument --crop: must be at least",
    ),
}

EXPORT = ["export", "--model", "{ckpt}", "--out", "{root}/x.onnx"]
PRUNE = ["prune", "--model", "{ckpt}", "--out", "{root}/s.pt"]
BUILD = ["build", "--model", "{ckpt}", "--out", "{root}/b"]
NPZ_TRAIN = [*TRAIN, "--data", "{root}/ok.npz", "--out", "{root}/t.pt"]
# a flag that the other flags make ineffective: refused (cli.rules.OnlyWhen) before any work
IGNORED_FLAG_CASES = {
    "export --fp16-io at fp32": ([*EXPORT, "--fp16-io"], "--fp16-io applies only to fp16 exports"),
    "export --fp16-io abbreviated, at int8": ([*EXPORT, "--precision", "int8", "--fp16"], "--fp16-io applies only"),
    "export --data at fp32": ([*EXPORT, "--data", "{root}/ok.npz"], "--data applies only to int8"),
    "export --calib-method at fp16": (
        [*EXPORT, "--precision", "fp16", "--calib-method", "entropy"],
        "--calib-method applies only to int8",
    ),
    "export --int8-flavour at fp32": ([*EXPORT, "--int8-flavour", "cpu"], "--int8-flavour applies only to int8"),
    "export --eval-n without --eval-data": (
        [*EXPORT, "--precision", "int8", "--calib", "{root}/ok.npz", "--eval-limit", "10"],
        "--eval-limit applies only with --data",
    ),
    "export --data-dir with npz held-out data": (
        [
            *EXPORT,
            "--precision",
            "int8",
            "--calib",
            "{root}/ok.npz",
            "--data",
            "{root}/ok.npz",
            "--data-dir",
            "{dir}",
        ],
        "--data-dir applies only to --data fashion-mnist",
    ),
    "train --resume with another --arch": (
        ["train", "--resume", "{ckpt}", "--arch", "resnet20", "--data", "{root}/ok.npz", "--out", "{root}/t.pt"],
        "not --arch resnet20 (it has vgg11)",
    ),
    "train --resume with another --width": (
        ["train", "--resume", "{ckpt}", "--width", "0.5", "--data", "{root}/ok.npz", "--out", "{root}/t.pt"],
        "--width 0.5 (it has 0.125)",
    ),
    "train --resume with --weights": (
        [*NPZ_TRAIN, "--resume", "{ckpt}", "--weights", "{root}/nan_weights.pt"],
        "--weights applies only to a new run",
    ),
    "train --image-size with npz data": ([*NPZ_TRAIN, "--image-size", "16"], "--image-size applies only to image"),
    "train --data-dir with npz data": ([*NPZ_TRAIN, "--data-dir", "{dir}"], "--data-dir applies only to --data fash"),
    "train --sparsity-mode at --sparsity 0, default value typed": (
        [*NPZ_TRAIN, "--sparsity-mode", "subgradient"],
        "--sparsity-mode applies only with --sparsity above 0",
    ),
    "finetune --workers with npz data": (
        ["finetune", "--model", "{ckpt}", "--data", "{root}/ok.npz", "--out", "{root}/f.pt", "--workers", "2"],
        "--workers applies only to image folders",
    ),
    "calib --in-memory with npz data": (
        ["calib", "--data", "{root}/ok.npz", "--n", "8", "--out", "{root}/c.npz", "--in-memory"],
        "--in-memory applies only to image folders",
    ),
    "prune --table with --ratio": ([*PRUNE, "--ratio", "0.5", "--table", "{root}/t.json"], "--table applies only"),
    "prune --profile-batch with --ratio": (
        [*PRUNE, "--ratio", "0.5", "--profile-batch", "8"],
        "--profile-batch applies only to a latency budget",
    ),
    "prune --cache with --no-cache": (
        [*PRUNE, "--speedup", "1.5", "--cache", "{root}/cells", "--no-cache"],
        "--cache applies only when measured cells are kept",
    ),
    "prune --no-cache with --table": (
        [*PRUNE, "--speedup", "1.5", "--table", "{root}/t.json", "--no-cache"],
        "--no-cache applies only when layers are profiled",
    ),
    "profile --cache with --no-cache": (
        ["profile", "--model", "{ckpt}", "--out", "{root}/t.json", "--cache", "{root}/cells", "--no-cache"],
        "--cache applies only",
    ),
    "build --target with --ratio": ([*BUILD, "--ratio", "0.5", "--target", "torch-cpu"], "--target applies only"),
    "build --finetune-lr without fine-tuning": (
        [*BUILD, "--ratio", "0.5", "--finetune-lr", "0.1"],
        "--finetune-lr applies only to fine-tuning",
    ),
    "build --calib-method without int8": (
        [*BUILD, "--ratio", "0.5", "--calib-method", "entropy"],
        "--calib-method applies only to int8",
    ),
    "build --workspace-mib with --engine off": (
        [*BUILD, "--ratio", "0.5", "--engine", "off", "--workspace-mib", "64"],
        "--workspace-mib applies only to TensorRT engines",
    ),
    "build --bench-iterations with --no-bench": (
        [*BUILD, "--ratio", "0.5", "--no-bench", "--bench-iterations", "5"],
        "--bench-iterations applies only to the benchmark",
    ),
}


def _args(template: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in template]


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_bad_output_paths_are_refused_before_any_work(case, files, cli):
    template, needle = OUTPUT_CASES[case]
    before = _snapshot(files["root"])
    assert_refused(cli(*_args(template, files)), needle, before, files["root"])


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_corrupt_or_inconsistent_data_is_one_error(case, files, cli):
    name, needle = DATA_CASES[case]
    before = _snapshot(files["root"])
    out = files["root"] / "t.pt"
    assert_refused(cli(*TRAIN, "--data", files["root"] / name, "--out", out), needle, before, files["root"])


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.uint16, np.uint32])
def test_integer_pixels_within_0_255_read_as_uint8(dtype, files, tmp_path):
    """A careless astype keeps the pixel values: every data path divides them by 255 as for uint8."""
    from slim2deploy.model.data import load_dataset

    arrays = dict(np.load(files["root"] / "ok.npz"))
    np.savez(tmp_path / "wide.npz", x=arrays["x"].astype(dtype), y=arrays["y"])
    as_uint8, wide = load_dataset(str(files["root"] / "ok.npz")), load_dataset(str(tmp_path / "wide.npz"))
    assert torch.equal(as_uint8.x, wide.x) and as_uint8.mean == wide.mean and as_uint8.std == wide.std


@pytest.mark.parametrize("loader", [[], ["--stream", "--workers", "0"]])
def test_a_decompression_bomb_is_one_error_in_memory_and_streamed(loader, files, cli):
    before = _snapshot(files["root"])
    args = [*TRAIN, "--data", files["root"] / "bomb", "--out", files["root"] / "t.pt", *loader]
    assert_refused(cli(*args), "bomb.png is not a readable image (Image size (225000000 pixels)", before, files["root"])


@pytest.mark.parametrize(
    "name,needle",
    [
        ("idx_count", "30 images but 20 labels"),
        ("idx_label", "only 10 classes"),
        ("idx_corrupt", "train-images-idx3-ubyte.gz is not a readable IDX file"),
    ],
)
def test_inconsistent_idx_files_are_refused(name, needle, files, cli):
    before = _snapshot(files["root"])
    args = [*TRAIN, "--data", "fashion-mnist", "--data-dir", files["root"] / name, "--out", files["root"] / "t.pt"]
    assert_refused(cli(*args), needle, before, files["root"])


@pytest.mark.parametrize("name", ["npy_as.npz", "truncated.npz", "nan.npz"])
def test_bad_calibration_file_is_one_error(name, files, cli):
    before = _snapshot(files["root"])
    args = ["export", "--model", files["ckpt"], "--out", files["root"] / "q.onnx", "--precision", "int8"]
    assert_refused(cli(*args, "--calib", files["root"] / name), str(files["root"] / name), before, files["root"])


@pytest.mark.parametrize(
    "command",
    [
        ["export", "--model", "{ckpt}", "--out", "{root}/q.onnx", "--precision", "int8"],
        ["build", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/b", "--precision", "int8"],
    ],
)
def test_a_calibration_set_of_identical_images_is_refused(command, files, cli):
    """It gives int8 no activation ranges, and agreement measured on it would read 100%."""
    before = _snapshot(files["root"])
    line = assert_refused(
        cli(*_args(command, files), "--calib", files["root"] / "same_calib.npz"), "", before, files["root"]
    )
    assert "same_calib.npz has 8 images that are all identical" in line


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_edited_or_foreign_checkpoints_are_one_error(case, files, cli):
    name, needle = CHECKPOINT_CASES[case]
    before = _snapshot(files["root"])
    line = assert_refused(cli("inspect", "--model", files["root"] / name), needle, before, files["root"])
    if case != "pickled module without trust":
        assert "--trust-code" not in line  # never steer users into turning safety off for a damaged file


@pytest.mark.parametrize("case", sorted(DAMAGED_CASES))
def test_damaged_checkpoint_or_weights_are_refused_before_any_work(case, files, cli):
    template, needle = DAMAGED_CASES[case]
    before = _snapshot(files["root"])
    assert_refused(cli(*_args(template, files)), needle, before, files["root"])


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags_are_one_error(case, files, cli):
    template, needle = FLAG_CASES[case]
    before = _snapshot(files["root"])
    assert_refused(cli(*_args(template, files)), needle, before, files["root"])


def test_an_immutable_output_file_is_refused_before_any_work(files, cli):
    out = files["root"] / "locked.onnx"
    out.write_bytes(b"earlier export")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        out.unlink()
        pytest.skip("chattr +i needs root and a file system with inode flags")
    try:
        before = _snapshot(files["root"])
        args = ["export", "--model", files["ckpt"], "--out", out]
        assert_refused(cli(*args), "exists and cannot be replaced", before, files["root"])
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
        out.unlink()


def test_a_build_rerun_with_other_settings_removes_the_earlier_runs_other_outputs(files, cli, tmp_path):
    """Without it, slim.fp16.onnx of ratio 0.5 would stay beside the ratio-0.3 slim.onnx, as if of it."""
    args = ["build", "--model", files["ckpt"], "--out", tmp_path / "b", "--no-bench", "--engine", "off"]
    assert cli(*args, "--ratio", "0.5", "--precision", "fp32,fp16")[0] == 0
    assert (tmp_path / "b" / "slim.fp16.onnx").is_file()
    status, out, err = cli(*args, "--ratio", "0.3", "--precision", "fp32")
    assert status == 0, err
    assert "removed baseline.fp16.onnx, slim.fp16.onnx: written by an earlier build" in out
    left = {p.name for p in (tmp_path / "b").iterdir()}
    assert not {n for n in left if "fp16" in n}
    assert not [k for k in json.loads((tmp_path / "b" / "build.json").read_text()) if k.startswith("fp16")]


def test_a_build_rerun_keeps_an_earlier_output_the_user_changed_since(files, cli, tmp_path):
    """An output of the earlier settings that was edited since is the user's now: kept, and said so."""
    args = ["build", "--model", files["ckpt"], "--out", tmp_path / "b", "--no-bench", "--engine", "off"]
    assert cli(*args, "--ratio", "0.5", "--precision", "fp32,fp16")[0] == 0
    edited = tmp_path / "b" / "slim.fp16.onnx"
    edited.write_bytes(edited.read_bytes() + b"edited")
    status, out, err = cli(*args, "--ratio", "0.3", "--precision", "fp32")
    assert status == 0, err
    line = [ln for ln in out.splitlines() if "earlier build" in ln]
    assert line == [
        "removed baseline.fp16.onnx: written by an earlier build of other settings, not by this one; "
        "kept slim.fp16.onnx: written by an earlier build of other settings, but changed since"
    ]
    assert edited.read_bytes().endswith(b"edited") and not (tmp_path / "b" / "baseline.fp16.onnx").exists()
    assert "slim.fp16.onnx" not in (tmp_path / "b" / "build.json").read_text()  # no longer the build's


def test_build_engine_require_without_tensorrt_is_refused_before_any_work(files, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now fails, even on a GPU machine
    before = _snapshot(files["root"])
    assert_refused(cli(*_args(RATIO_BUILD, files), "--engine", "require"), "--engine require", before, files["root"])


def test_an_edited_build_json_redoes_those_stages_instead_of_crashing(files, cli, tmp_path):
    out = tmp_path / "b"
    args = ["build", "--model", files["ckpt"], "--ratio", "0.5", "--out", out, "--no-bench"]
    assert cli(*args)[0] == 0
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "build.json").read_text())
    state["export:slim"]["info"]["bytes"] = "big"  # a string where a number is
    del state["export:baseline"]["info"]["parity"]  # a key missing inside a stage
    (out / "build.json").write_text(json.dumps(state))
    status, stdout, err = cli(*args)
    assert status == 0 and stdout.count("runs again") == 2, err
    again = json.loads((out / "report.json").read_text())
    assert again["exports"]["slim"]["bytes"] == report["exports"]["slim"]["bytes"]
    assert again["exports"]["baseline"]["parity"] == report["exports"]["baseline"]["parity"]


@pytest.mark.parametrize("case", sorted(IGNORED_FLAG_CASES))
def test_flags_that_would_be_ignored_are_refused(case, files, cli):
    template, needle = IGNORED_FLAG_CASES[case]
    before = _snapshot(files["root"])
    line = assert_refused(cli(*_args(template, files)), needle, before, files["root"])
    assert "drop " in line  # the way out: drop the flag, or add what makes it apply


def test_diverging_training_stops_without_saving(files, cli):
    before = _snapshot(files["root"])
    args = [*TRAIN, "--data", files["root"] / "ok.npz", "--out", files["root"] / "t.pt", "--lr", "1e30"]
    assert_refused(cli(*args), "training diverged", before, files["root"])


FINETUNE_ONE_EPOCH = [
    "finetune",
    "--model",
    "{ckpt}",
    "--data",
    "{root}/ok.npz",
    "--out",
    "{root}/f.pt",
    "--epochs",
    "1",
]


@pytest.mark.parametrize(
    "command,needle",
    [
        # inputs near 1e30: every step's loss is finite, BatchNorm's running_var overflows (a file the loader refuses)
        ([*NPZ_TRAIN, "--mean", "0.5", "--std", "1e-30"], "'features.1.running_var' (8,) holds infinity"),
        ([*FINETUNE_ONE_EPOCH, "--batch-size", "16", "--lr", "1e4"], "The learning rate --lr (10000) is"),
    ],
)
def test_training_that_leaves_non_finite_tensors_saves_nothing(command, needle, files, cli):
    before = _snapshot(files["root"])
    line = assert_refused(cli(*_args(command, files)), "training diverged", before, files["root"])
    assert needle in line and "is likely too high" in line


def test_pickled_module_works_with_trust_and_input_shape(files, cli, tmp_path):
    pickled, trust = files["root"] / "pickled.pt", ["--trust-code", "--input-shape", "1,8,8"]
    status, out, err = cli("inspect", "--model", pickled, *trust)
    assert status == 0 and "features.1" in out, err
    slim = tmp_path / "slim.pt"
    status, out, err = cli("prune", "--model", pickled, *trust, "--ratio", "0.5", "--out", slim)
    assert status == 0, err
    with pytest.raises(SlimError, match="trust_code"):
        load_checkpoint(slim)  # the slim copy is pickled too: still needs the opt-in
    with pytest.warns(UserWarning):
        reloaded = load_checkpoint(slim, trust_code=True)
    assert reloaded.input_shape == (1, 8, 8) and reloaded.num_classes == 3 and reloaded.is_pruned
    table = tmp_path / "t.json"
    status, out, err = cli("profile", "--model", pickled, *trust, "--profile-batch", "2", "--no-cache", "--out", table)
    assert status == 0 and "latency steps up" in out, err
    status, out, err = cli("export", "--model", slim, "--trust-code", "--out", tmp_path / "slim.onnx")
    assert status == 0 and "parity" in out, err
    status, out, err = cli(
        "finetune", "--model", pickled, *trust, "--data", files["root"] / "ok.npz", "--epochs", "1",
        "--batch-size", "16", "--out", tmp_path / "ft.pt",
    )  # fmt: skip
    assert status == 0, err
    status, out, err = cli("build", "--model", pickled, "--trust-code", "--ratio", "0.5", "--out", tmp_path / "b")
    assert status == 2 and "one by one" in err


@pytest.fixture(scope="module")
def table16(files, make_checkpoint) -> Path:
    """A real latency table (ort-cpu, batch 2) of a model that differs from ``files['ckpt']`` only in its
    16x16 input: the same channel counts, so only what the table records tells them apart."""
    big = make_checkpoint(num_classes=3, input_shape=(1, 16, 16), path=files["root"] / "model16.pt")
    table = files["root"] / "t16.json"
    assert main(["profile", "--model", str(big), "--profile-batch", "2", "--no-cache", "--out", str(table)]) == 0
    return table


TABLE_CASES = {
    "a table of the same channels at another input size": (
        ["prune", "--model", "{ckpt}", "--speedup", "1.2", "--profile-batch", "2", "--out", "{root}/s.pt"],
        "profiled for vgg11 on 1x16x16 inputs, not for this model (vgg11 on 1x8x8)",
    ),
    "a table measured at another batch": (
        ["prune", "--model", "{root}/model16.pt", "--speedup", "1.2", "--out", "{root}/s.pt"],
        "--profile-batch 2 (this run: 64)",
    ),
    "a table measured on another target": (
        ["prune", "--model", "{root}/model16.pt", "--speedup", "1.2", "--profile-batch", "2", "--target", "torch-cpu",
         "--out", "{root}/s.pt"],
        "--target ort-cpu (this run: torch-cpu)",
    ),
    "build with a table of another input size, before --out is made": (
        ["build", "--model", "{ckpt}", "--speedup", "1.2", "--profile-batch", "2", "--out", "{root}/b"],
        "1x16x16",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_a_latency_table_for_another_model_or_setting_is_refused(case, files, table16, cli):
    template, needle = TABLE_CASES[case]
    before = _snapshot(files["root"])
    line = assert_refused(cli(*_args(template, files), "--table", table16), needle, before, files["root"])
    assert "slim2deploy profile" in line


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--input-sets", "0"], "--input-sets"),
        (["--bench-iterations", "0"], "--bench-iterations"),
        (["--bench-rounds", "0"], "--bench-rounds"),
        (["--bench-warmup-s", "nan"], "--bench-warmup-s"),
        (["--json", "{dir}"], "is a folder"),
        (["--json", "{root}/l.json/"], "ends in a path separator"),
    ],
)
def test_latency_script_refuses_bad_flags(extra, needle, files, capsys):
    before = _snapshot(files["root"])
    try:
        status = bench_script("latency").main([str(files["ckpt"]), *_args(extra, files), "--quiet"])
    except SystemExit as exc:
        status = int(exc.code or 0)
    assert_refused((status, "", capsys.readouterr().err), needle, before, files["root"])


@pytest.mark.parametrize(
    "model,extra,needle",
    [
        ("m.onnx", ["--torch-precision", "fp16"], "--torch-precision applies only to slim2deploy checkpoints"),
        ("m.onnx", ["--channels-last"], "--channels-last applies only"),
        ("m.engine", ["--torch-mode", "folded"], "--torch-mode applies only"),
        ("{ckpt}", ["--compile-mode", "max-autotune"], "--compile-mode applies only with --torch-mode compiled"),
        ("{ckpt}", ["--ort-opt-level", "basic"], "--ort-opt-level applies only to .onnx"),
        ("m.onnx", ["--cuda-graph"], "--cuda-graph applies only"),
    ],
)
def test_latency_script_refuses_flags_no_model_takes(model, extra, needle, files, capsys):
    before = _snapshot(files["root"])
    status = bench_script("latency").main([*_args([model], files), *extra, "--quiet"])
    assert_refused((status, "", capsys.readouterr().err), needle, before, files["root"])


def test_latency_script_refuses_a_baseline_of_another_input_shape(files, table16, capsys):
    """model16 takes 1x16x16 inputs, the checkpoint 1x8x8: a speed-up between them is not one."""
    before = _snapshot(files["root"])
    args = [str(files["ckpt"]), "--baseline", str(files["root"] / "model16.pt"), "--quiet", "--no-rss"]
    status = bench_script("latency").main([*args, "--bench-iterations", "1", "--bench-rounds", "1"])
    line = assert_refused((status, "", capsys.readouterr().err), "[1, 8, 8] but the baseline", before, files["root"])
    assert "[1, 16, 16]" in line


def test_latency_script_refuses_an_onnx_input_with_a_zero_dimension(files, cli, capsys, tmp_path):
    import onnx

    assert cli("export", "--model", files["ckpt"], "--out", tmp_path / "m.onnx")[0] == 0
    graph = onnx.load(tmp_path / "m.onnx")
    graph.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 0
    onnx.save(graph, tmp_path / "zero.onnx")
    before = _snapshot(tmp_path)
    status = bench_script("latency").main(
        [str(tmp_path / "zero.onnx"), "--quiet", "--no-rss", "--bench-iterations", "1", "--bench-rounds", "1"]
    )
    assert_refused((status, "", capsys.readouterr().err), "a dimension that is not positive", before, tmp_path)


def test_latency_script_does_not_advise_a_flag_it_lacks(files, capsys):
    status = bench_script("latency").main(
        [str(files["root"] / "pickled.pt"), "--quiet", "--no-rss", "--bench-iterations", "1", "--bench-rounds", "1"]
    )
    line = capsys.readouterr().err.strip()
    assert status == 2 and "slim2deploy export" in line and "--input-shape" in line
    assert "pass --trust-code" not in line


def test_engine_without_tensorrt_is_a_clean_error(tmp_path, monkeypatch):
    from slim2deploy.deploy.engine import compile_engine

    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"placeholder: the engine check comes first")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now raises ModuleNotFoundError
    with pytest.raises(SlimError, match="TensorRT is not installed"):
        compile_engine(onnx_file, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


# ---- real subprocesses: what reaches the terminal ----------------------------------------------


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_full_disk_is_one_error_and_leaves_no_temp_file(command, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = {
        "prune": ["prune", "--model", str(files["ckpt"]), "--ratio", "0.5", "--out", str(out / "slim.pt")],
        "inspect": ["inspect", "--model", str(files["ckpt"]), "--plot", str(out / "g.png")],
    }[command]
    proc = subprocess.run(
        [sys.executable, "-m", "slim2deploy", *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "could not write" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "--model", "{root}/random.pt"],
        ["prune", "--model", "{root}/nan_gamma.pt", "--ratio", "0.5", "--out", "{root}/s.pt"],
        [*CALIB, "{root}/mean_text.pt"],
        ["export", "--model", "{ckpt}", "--out", "{root}/x.onnx", "--opset", "99"],
        ["train", "--data", "{root}/truncated.npz", "--out", "{root}/t.pt"],
    ],
)
def test_real_command_prints_one_line_and_no_traceback(args, files):
    before = _snapshot(files["root"])
    proc = run_cli(*_args(args, files))
    assert_refused((proc.returncode, proc.stdout, proc.stderr), "", before, files["root"])


def test_a_one_image_npz_prints_only_the_error_line(files):
    """No torch warning (std() of an empty split) before the error: the user sees one line."""
    before = _snapshot(files["root"])
    proc = run_cli(*TRAIN, "--data", str(files["root"] / "one_image.npz"), "--out", str(files["root"] / "t.pt"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "one_image.npz has 1 image" in proc.stderr and _snapshot(files["root"]) == before


@pytest.fixture(scope="module")
def misfit(files) -> dict[str, Path]:
    """Data that is fine on its own but not for the model (3 classes, 1 x 8 x 8), and inputs placed where outputs go."""
    d, rng = files["root"], np.random.default_rng(2)
    x = rng.integers(0, 255, (32, 1, 8, 8)).astype(np.uint8)
    np.savez(d / "ten_classes.npz", x=x, y=np.arange(32) % 10)
    np.savez(d / "rgb.npz", x=x.repeat(3, 1), y=np.arange(32) % 3)
    np.savez(d / "rgb_2x2.npz", x=x.repeat(3, 1)[:, :, :2, :2], y=np.arange(32) % 3)
    np.savez(d / "huge_label.npz", x=x, y=np.where(np.arange(32) == 0, 2**40, np.arange(32) % 3))
    calib = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    np.savez(d / "calib_ok.npz", x=calib)
    np.savez(d / "calib_other.npz", x=calib, mean=np.zeros(1, np.float32), std=np.ones(1, np.float32))
    (d / "inbuild").mkdir()
    (d / "inbuild" / "m.pt").write_bytes(files["ckpt"].read_bytes())
    torch.save(load_checkpoint(files["ckpt"]).state_dict, d / "sd.pt")
    return {**files, "calib": d / "calib_ok.npz"}


INT8 = ["export", "--model", "{ckpt}", "--out", "{root}/q.onnx", "--precision", "int8", "--calib", "{calib}"]
MISFIT_CASES = {
    "finetune on data with more classes than the model": (
        ["finetune", "--model", "{ckpt}", "--data", "{root}/ten_classes.npz", "--out", "{root}/f.pt", "--epochs", "1"],
        "10 classes",
    ),
    "finetune on 3-channel data": (
        ["finetune", "--model", "{ckpt}", "--data", "{root}/rgb.npz", "--out", "{root}/f.pt", "--epochs", "1"],
        "(3, 8, 8) images",
    ),
    "build evaluating on data with more classes": (
        ["build", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/b", "--data", "{root}/ten_classes.npz"],
        "10 classes",
    ),
    "build on 3-channel data": (
        ["build", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/b", "--data", "{root}/rgb.npz"],
        "(3, 8, 8) images",
    ),
    "export int8 evaluated on 3-channel data": ([*INT8, "--data", "{root}/rgb.npz"], "(3, 8, 8) images"),
    "export int8 evaluated on other classes": ([*INT8, "--data", "{root}/ten_classes.npz"], "10 classes"),
    "calib for a model from 3-channel data": (
        ["calib", "--model", "{ckpt}", "--data", "{root}/rgb.npz", "--n", "8", "--out", "{root}/c.npz"],
        "(3, 8, 8)",
    ),
    "train a model on images smaller than its first kernel": (
        [
            "train",
            "--arch",
            "torchvision:squeezenet1_0",
            "--data",
            "{root}/rgb_2x2.npz",
            "--out",
            "{root}/t.pt",
            "--batch-size",
            "8",
        ],
        "the model does not run on (3, 2, 2) images (C, H, W): Calculated padded input size",
    ),
    "export int8 with a calibration set normalised for another model": (
        [*INT8[:-1], "{root}/calib_other.npz"],
        "calib_other.npz records mean [0.] but the model's mean is [0.5]",
    ),
    "build int8 with a calibration set normalised for another model": (
        [*RATIO_BUILD, "--precision", "int8", "--calib", "{root}/calib_other.npz"],
        "re-make it with 'slim2deploy calib'",
    ),
    "a label that is no class index": (
        [*TRAIN, "--data", "{root}/huge_label.npz", "--out", "{root}/t.pt"],
        "at most 100,000 classes",
    ),
    "build --model inside --out": (
        ["build", "--model", "{root}/inbuild/m.pt", "--ratio", "0.5", "--out", "{root}/inbuild"],
        "inside the output folder",
    ),
    "import --out is the weights": (
        [
            "import",
            "--arch",
            "vgg11",
            "--width",
            "0.125",
            "--num-classes",
            "3",
            "--input-shape",
            "1,8,8",
            "--weights",
            "{root}/sd.pt",
            "--out",
            "{root}/sd.pt",
        ],
        "is also an input",
    ),  # fmt: skip
    "profile --cache is a file": (
        ["profile", "--model", "{ckpt}", "--out", "{root}/t.json", "--cache", "{file}"],
        "--cache",
    ),
    "prune --save-table with --ratio": (
        ["prune", "--model", "{ckpt}", "--ratio", "0.5", "--out", "{root}/s.pt", "--save-table", "{root}/t.json"],
        "--save-table",
    ),
    "negative seed": (
        ["calib", "--data", "{root}/ok.npz", "--n", "8", "--out", "{root}/c.npz", "--seed", "-1"],
        "seed",
    ),
    "zero runtime threads": (
        ["profile", "--model", "{ckpt}", "--out", "{root}/t.json", "--profile-threads", "0"],
        "--profile-threads",
    ),
}


@pytest.mark.parametrize("case", sorted(MISFIT_CASES))
def test_data_and_paths_that_do_not_fit_the_model_are_one_error(case, misfit, cli):
    template, needle = MISFIT_CASES[case]
    before = _snapshot(misfit["root"])
    assert_refused(cli(*_args(template, misfit)), needle, before, misfit["root"])


def test_folder_data_whose_class_folders_are_not_the_models_classes_is_refused(tmp_path, cli, make_checkpoint):
    """A model trained on folders a, b, c fine-tuned on folders a, c: c would be labelled as b."""
    from PIL import Image

    meta = {"mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b", "c"]}
    ckpt = make_checkpoint(num_classes=3, input_shape=(3, 8, 8), meta=meta)
    rng = np.random.default_rng(3)
    for c in ("a", "c"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    before = _snapshot(tmp_path)
    args = [
        "finetune",
        "--model",
        ckpt,
        "--data",
        tmp_path / "data",
        "--out",
        tmp_path / "f.pt",
        "--epochs",
        "1",
        "--batch-size",
        "4",
    ]
    assert_refused(cli(*args), "class folders a, c but the model's classes are a, b, c", before, tmp_path)
