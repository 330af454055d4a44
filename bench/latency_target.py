"""Pruning to a latency target on ONNX Runtime CPU: predicted against measured, and the speed-up.

    python bench/latency_target.py [--speedup 2] [--batch 64] [--models demo,resnet56] [--cache DIR] [--approximate]
                                   [--no-depth]

For each model: ``prune_to_budget`` (profile on ort-cpu, select, cut, closed loop), then the
unpruned and the slim ONNX graphs measured interleaved with ``measure.benchmark.time_pair`` (the
engine of ``bench/latency.py``). ``demo`` is ``demo/vgg11-w0.25-sparse.pt``; ``resnet56`` is the
zoo model at width 1.0 and 28x28x1 with BatchNorm gamma drawn sparse (half of every layer near
zero, the rest uniform in [0.2, 1]), as the DESIGN's GPU measurements were made. Prints one row
per model: MACs ratio, the closed loop's tries, predicted and measured slim latency, the
predicted speed-up (table: unpruned / predicted; the table's milliseconds are from profiling time,
so on a machine whose load changes compare speed-ups, not milliseconds), the loop's measured
speed-up, and the benchmark's interleaved speed-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from slim2deploy.measure.benchmark import time_pair
from slim2deploy.measure.targets import make_target
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.stats import count_macs
from slim2deploy.pipeline.budget import prune_to_budget
from slim2deploy.pipeline.import_model import sparse_like_checkpoint
from slim2deploy.pipeline.profile import checkpoint_artifact
from slim2deploy.prune.goal import by_budget
from slim2deploy.prune.latency import DEFAULT_MARGIN
from slim2deploy.prune.rails import DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO, Rails
from slim2deploy.prune.rebuild import model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def sparse_resnet56(path: Path, seed: int = 0) -> Path:
    meta = {"dataset": "fashion-mnist"}
    return sparse_like_checkpoint("resnet56", path, (1, 28, 28), seed=seed, meta=meta, in_channels=1, num_classes=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--models", default="demo,resnet56")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=None, help="layer cell cache (default: a fresh temporary one)")
    p.add_argument("--iterations", type=int, default=200, help="benchmark iterations per model")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--min-channels", type=int, default=DEFAULT_MIN_CHANNELS, help="rails: fewest channels kept")
    p.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, help="rails: kept counts a multiple of this")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="aim this fraction under the goal")
    p.add_argument(
        "--approximate",
        action="store_true",
        help="also prune groups read raw by another layer (resnet56's stage 1-2 residual streams)",
    )
    p.add_argument("--no-depth", action="store_true", help="prune width only (never remove a residual branch)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="latency-target-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            src = ROOT / "demo" / "vgg11-w0.25-sparse.pt" if name == "demo" else sparse_resnet56(work / f"{name}.pt")
            budget = by_budget(
                Rails(min_channels=args.min_channels, round_to=args.round_to),
                depth=not args.no_depth,
                speedup=args.speedup,
                batch=args.batch,
                threads=args.threads,
                cache=args.cache or str(work / "cache"),
                margin=args.margin,
            )
            started = time.perf_counter()
            slim = work / f"{name}-slim.pt"
            result = prune_to_budget(
                src, slim, budget, exact=not args.approximate, log=lambda s, n=name: print(f"  [{n}] {s}", flush=True)
            )
            seconds = time.perf_counter() - started
            ort = make_target("ort-cpu")
            base_onnx = checkpoint_artifact(src, ort, work, name)
            slim_onnx = checkpoint_artifact(slim, ort, work, f"{name}-slim")
            comp = time_pair(
                base_onnx,
                slim_onnx,
                batches=[args.batch],
                iterations=args.iterations,
                rounds=args.rounds,
                threads=args.threads,
                device="cpu",
                measure_rss=False,
            )
            speed = comp.speedups[0]
            base_ms = comp.model("baseline").at(args.batch).latency.median_ms  # type: ignore[union-attr]
            slim_ms = comp.model("slim").at(args.batch).latency.median_ms  # type: ignore[union-attr]
            x = torch.zeros(1, *load_checkpoint(src).input_shape)
            macs = count_macs(model_from_checkpoint(load_checkpoint(slim)), x) / count_macs(
                model_from_checkpoint(load_checkpoint(src)), x
            )
            c = result.chosen
            blocks = f"{len(result.plan.removed_branches())}/{sum(b.removable for b in result.plan.branches)}"
            rows.append(
                f"| {name} | {macs:.3f} | {blocks} | {len(result.tries)} | {seconds:.0f} | {c['predicted_ms']:.3f} | "
                f"{c['measured_ms']:.3f} | {c['predicted_speedup']:.2f}x | "
                f"{c['baseline_ms'] / c['measured_ms']:.2f}x | {base_ms:.3f} | {slim_ms:.3f} | {speed.speedup:.2f}x |"
            )
            print(rows[-1], flush=True)
    approx = (", --approximate" if args.approximate else "") + f", rails {args.min_channels}/{args.round_to}"
    approx += f", margin {args.margin:g}" + (", --no-depth" if args.no_depth else "")
    print(f"\nORT CPU, batch {args.batch}, --speedup {args.speedup}{approx}, threads {args.threads or 'default'}")
    print(
        "| model | MACs ratio | blocks removed | tries | prune s | predicted ms | loop measured ms | "
        "predicted speed-up | loop speed-up | bench baseline ms | bench slim ms | bench speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
