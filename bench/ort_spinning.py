#!/usr/bin/env python
"""Why slim2deploy's ONNX Runtime sessions run without thread-pool spinning.

Every measurement in slim2deploy (``bench/latency.py``, ``profile``, the closed loop of
``--speedup``) keeps several sessions open and times them interleaved. With ONNX Runtime's
default (``session.intra_op.allow_spinning`` = 1) the idle sessions' pool threads busy-wait and
take cores from the session being timed. This prints, for single convolutions (the cells of a
latency table) timed interleaved, the spread of the per-round medians with spinning on and off,
and the median of each cell timed alone (one session open, spinning on and off) as the reference:

    python bench/ort_spinning.py --threads 2 --rounds 6

Needs numpy, onnx and onnxruntime (no torch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from slim2deploy.deploy.layer_onnx import write_layer_onnx
from slim2deploy.measure.benchmark import measure
from slim2deploy.prune.latency import LayerSpec
from slim2deploy.runtime.ort import OrtRunner


def round_medians(paths: list[Path], args: argparse.Namespace, spinning: bool) -> list[list[float]]:
    """Per model, its round medians (ms) when ``paths`` are timed together, interleaved, the way every
    slim2deploy measurement times them (``measure.benchmark.measure``)."""
    runners = [OrtRunner(p, device="cpu", threads=args.threads, spinning=spinning) for p in paths]
    try:
        for r in runners:
            r.activate()
        results = measure(
            runners, [args.batch], warmup_s=0.2, iterations=args.iterations * args.rounds, rounds=args.rounds
        )
    finally:
        for r in runners:
            r.deactivate()
    return [batches[0].round_medians_ms for batches, _ in results]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="ONNX files to time instead of the conv probes (e.g. baseline and slim)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session (default 2)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--iterations", type=int, default=15, help="runs per session per round (default 15)")
    ap.add_argument("--widths", default="24,32,40,48,64", help="input widths of the 3x3 conv probes (to 64)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slim2deploy-spin-") as tmp:
        if args.models:
            paths = [Path(m) for m in args.models]
            labels = [p.stem for p in paths]
            what = "models"
        else:
            widths = [int(w) for w in args.widths.split(",")]
            layer = LayerSpec("probe", "conv", 64, [], 64, None, [3, 3], [1, 1], [1, 1], [1, 1], False, [7, 7])
            paths = [write_layer_onnx(layer, ci, 64, Path(tmp) / f"c{ci}.onnx") for ci in widths]
            labels = [f"c_in {ci}" for ci in widths]
            what = "conv 3x3 c_in -> 64 on 7x7"
        alone = {spin: [min(round_medians([p], args, spin)[0]) for p in paths] for spin in (True, False)}
        width = max(len(label) for label in labels)
        print(f"{what}, batch {args.batch}, {args.threads} threads, {len(paths)} sessions open when interleaved")
        print(f"{'spinning':<9} {'':<{width}} {'alone ms':>9} {'interleaved: round medians ms':>30} {'max/min':>8}")
        for spinning in (True, False):
            together = round_medians(paths, args, spinning)
            for label, ref, meds in zip(labels, alone[spinning], together, strict=True):
                span = f"{min(meds):.3f}..{max(meds):.3f}"
                ratio = max(meds) / min(meds)
                print(f"{'on' if spinning else 'off':<9} {label:<{width}} {ref:>9.3f} {span:>30} {ratio:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
