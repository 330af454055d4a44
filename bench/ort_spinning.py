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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim2deploy.deploy.layer_onnx import write_layer_onnx  # noqa: E402
from slim2deploy.prune.latency import LayerSpec  # noqa: E402


def session(path: Path, threads: int, spinning: bool) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def median_ms(sess: Any, x: np.ndarray, iterations: int) -> float:
    name = sess.get_inputs()[0].name
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="ONNX files to time instead of the conv probes (e.g. baseline and slim)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session (default 2)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--iterations", type=int, default=15, help="runs per session per round (default 15)")
    ap.add_argument("--widths", default="24,32,40,48,64", help="input widths of the 3x3 conv probes (to 64)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="slim2deploy-spin-") as tmp:
        if args.models:
            paths = [Path(m) for m in args.models]
            labels = [p.stem for p in paths]
            shapes = [[args.batch, *session(p, 1, False).get_inputs()[0].shape[1:]] for p in paths]
            what = "models"
        else:
            widths = [int(w) for w in args.widths.split(",")]
            layer = LayerSpec("probe", "conv", 64, [], 64, None, [3, 3], [1, 1], [1, 1], [1, 1], False, [7, 7])
            paths = [write_layer_onnx(layer, ci, 64, Path(tmp) / f"c{ci}.onnx") for ci in widths]
            labels = [f"c_in {ci}" for ci in widths]
            shapes = [[args.batch, ci, 7, 7] for ci in widths]
            what = "conv 3x3 c_in -> 64 on 7x7"
        inputs = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
        alone: dict[bool, list[float]] = {True: [], False: []}
        for path, x in zip(paths, inputs, strict=True):
            for spinning in (True, False):
                sess = session(path, args.threads, spinning)
                median_ms(sess, x, 10)
                alone[spinning].append(min(median_ms(sess, x, args.iterations) for _ in range(args.rounds)))
                del sess
        width = max(len(label) for label in labels)
        print(f"{what}, batch {args.batch}, {args.threads} threads, {len(paths)} sessions open when interleaved")
        print(f"{'spinning':<9} {'':<{width}} {'alone ms':>9} {'interleaved: round medians ms':>30} {'max/min':>8}")
        for spinning in (True, False):
            sessions = [session(p, args.threads, spinning) for p in paths]
            for s, x in zip(sessions, inputs, strict=True):
                median_ms(s, x, 10)
            rounds: list[list[float]] = [[] for _ in paths]
            for _ in range(args.rounds):
                for k, (s, x) in enumerate(zip(sessions, inputs, strict=True)):
                    rounds[k].append(median_ms(s, x, args.iterations))
            for label, ref, meds in zip(labels, alone[spinning], rounds, strict=True):
                span = f"{min(meds):.3f}..{max(meds):.3f}"
                ratio = max(meds) / min(meds)
                print(f"{'on' if spinning else 'off':<9} {label:<{width}} {ref:>9.3f} {span:>30} {ratio:>8.2f}")
            del sessions
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
