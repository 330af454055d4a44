#!/usr/bin/env python
"""ONNX Runtime's peak host memory against the estimate that bench/latency.py checks a batch with.

    python bench/onnx_memory.py
    python bench/onnx_memory.py --models vgg11,densenet40 --batches 1,64,512 --threads 2

For each model (built untrained and exported here to ONNX with a dynamic batch) and batch: the
estimate (``deploy.onnx_info.memory_estimate(path).at(batch)``: ONNX Runtime's floor, the weights
and the graph's live activations) beside the peak resident memory of a fresh process that opens
the model with the benchmark's own runner and runs that batch (``measure.memory.peak_rss``), and
their ratio. The estimate is meant never to be below the peak: the script exits 1 if it is. A
measurement of memory, not of time: it runs fine on a busy machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from slim2deploy.deploy.export import export_onnx
from slim2deploy.deploy.onnx_info import memory_estimate
from slim2deploy.measure.memory import peak_rss
from slim2deploy.model.zoo import create_model
from slim2deploy.runtime.registry import open_runner

# name -> (how to build it, its input C x H x W)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "vgg11": (lambda: create_model("vgg11", in_channels=3, num_classes=10), (3, 32, 32)),
    "resnet20": (lambda: create_model("resnet20", in_channels=3, num_classes=10), (3, 32, 32)),
    "densenet40": (lambda: create_model("densenet40", in_channels=3, num_classes=10), (3, 32, 32)),
    "mobilenet_v2": (lambda: create_model("torchvision:mobilenet_v2", num_classes=10), (3, 96, 96)),
    "resnet18": (lambda: create_model("torchvision:resnet18", num_classes=10), (3, 64, 64)),
    "efficientnet_b0": (lambda: create_model("torchvision:efficientnet_b0", num_classes=10), (3, 64, 64)),
}


def _names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"models are some of {', '.join(MODELS)}, got {text!r}")
    return names


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batches are positive integers, comma-separated, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_names, default=list(MODELS), help="comma-separated (default: all)")
    p.add_argument("--batches", type=_batches, default=[1, 32, 256], help="comma-separated (default: 1,32,256)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    args = p.parse_args(argv)
    below = 0
    print(f"{'model':<16}{'input':>10}{'batch':>7}{'estimate MiB':>14}{'peak MiB':>10}{'peak/estimate':>15}")
    with tempfile.TemporaryDirectory(prefix="onnx-memory-") as tmp:
        for name in args.models:
            make, shape = MODELS[name]
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(make().eval(), torch.zeros(1, *shape), path)
            estimate = memory_estimate(path)
            assert estimate is not None, f"no estimate for {name}"
            for batch in args.batches:
                with open_runner(path, backend="onnx", device="cpu", threads=args.threads) as runner:
                    peak = peak_rss(runner, batch)["ort_peak_rss"]
                est = estimate.at(batch)
                below += peak > est
                size = "x".join(map(str, shape[1:]))
                row = f"{name:<16}{size:>10}{batch:>7}{est / 2**20:>14.0f}{peak / 2**20:>10.0f}{peak / est:>15.2f}"
                print(row + ("  BELOW THE PEAK" if peak > est else ""), flush=True)
    print("the estimate is never below the measured peak" if not below else f"{below} estimates below the peak")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
