#!/usr/bin/env python
"""Latency and throughput of ONNX models, TensorRT engines or slim2deploy checkpoints.

Run it on each target machine; models given together are measured interleaved in one run:

    python bench/latency.py slim.onnx --baseline baseline.onnx --batch 1,8,32,64,128 \\
        --json bench.json --markdown bench.md --plot bench.png

``.onnx`` runs on ONNX Runtime, ``.engine`` on TensorRT (needs cuda-python or pycuda), ``.pt``
checkpoints on torch (``--torch-mode eager|folded|compiled``). For ``.onnx`` and ``.engine`` only
numpy and the runtime are needed: torch is never imported. Works from a checkout without installing slim2deploy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim2deploy.base.errors import NeedsTrust, SlimError, one_line  # noqa: E402
from slim2deploy.base.files import check_outputs  # noqa: E402
from slim2deploy.base.interrupts import TERMINATED_STATUS, Terminated, sigterm_as_interrupt  # noqa: E402
from slim2deploy.cli.common import OnlyWhen, Parser, at_least, number, refuse_ignored_flags  # noqa: E402
from slim2deploy.measure.benchmark import benchmark  # noqa: E402
from slim2deploy.measure.tables import format_table, plot, write_json, write_markdown  # noqa: E402
from slim2deploy.runtime.ort import ORT_OPT_LEVELS  # noqa: E402
from slim2deploy.runtime.registry import COMPILE_MODES, TORCH_MODES, device_choices, runner_kind  # noqa: E402


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return values


def _runs(*kinds: str) -> Callable[[argparse.Namespace], bool]:
    """Whether some model given runs on one of these runtimes (options a runtime does not take are ignored)."""

    def check(args: argparse.Namespace) -> bool:
        models = [*args.models, *([args.baseline] if args.baseline else [])]
        return any(runner_kind(m) in kinds for m in models)

    return check


_TORCH = "to slim2deploy checkpoints (.pt), which run on torch"
ONLY_WHEN = (
    OnlyWhen(
        "--precision",
        _runs("torch"),
        f"{_TORCH}: an .onnx or .engine runs at the precision it was made with",
        "time the model exported at that precision ('slim2deploy export --precision fp16')",
    ),
    *(OnlyWhen(flag, _runs("torch"), _TORCH, "time a .pt checkpoint") for flag in ("--torch-mode", "--channels-last")),
    OnlyWhen(
        "--compile-mode",
        lambda a: a.torch_mode == "compiled",
        "with --torch-mode compiled",
        "add --torch-mode compiled",
    ),
    OnlyWhen("--ort-opt-level", _runs("onnx"), "to .onnx models (ONNX Runtime)", "time an .onnx model"),
    OnlyWhen("--ort-spinning", _runs("onnx"), "to .onnx models (ONNX Runtime)", "time an .onnx model"),
    OnlyWhen(
        "--cuda-graph", _runs("torch", "tensorrt"), "to torch checkpoints and TensorRT engines", "time one of those"
    ),
)


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help=".onnx, .engine or slim2deploy .pt files")
    p.add_argument("--baseline", type=Path, help="reference model: speed-ups and MACs ratios are against it")
    p.add_argument("--batch", type=_batches, default=[1], help="batch sizes, comma-separated (default: 1)")
    p.add_argument(
        "--warmup-s", type=number(at_least=0), default=1.0, help="warm-up time per model and batch (default: 1 s)"
    )
    p.add_argument("--iters", type=at_least(1), default=200, help="timed iterations per model and batch (default: 200)")
    p.add_argument(
        "--rounds", type=at_least(1), default=5, help="interleaved rounds the iterations are split into (default: 5)"
    )
    p.add_argument("--input-sets", type=at_least(1), default=3, help="random input sets rotated through (default: 3)")
    p.add_argument(
        "--backend",
        choices=device_choices(),
        default="auto",
        help="device / ONNX Runtime execution provider: auto (CUDA when available), cpu, cuda, tensorrt (the "
        "TensorRT EP for .onnx); .engine files always run on TensorRT",
    )
    p.add_argument(
        "--threads", type=at_least(1), help="CPU threads (ONNX Runtime intra-op / torch); default: runtime's own"
    )
    p.add_argument(
        "--ort-opt-level",
        choices=["auto", *ORT_OPT_LEVELS],
        default="auto",
        help="ONNX Runtime graph optimisation; auto (default): the level the file records (basic for "
        "TensorRT-bound int8 Q/DQ graphs), else all",
    )
    p.add_argument(
        "--ort-spinning",
        action="store_true",
        help="let ONNX Runtime's thread pools spin between runs (ORT's default, what one deployed session "
        "gets); off unless given, because the idle sessions of models timed together take the cores from the "
        "one being timed. One model only",
    )
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="torch checkpoints only")
    p.add_argument(
        "--torch-mode",
        choices=TORCH_MODES,
        default="eager",
        help="torch checkpoints: eager (as trained), folded (Conv+BN folded at load, as deployment runtimes "
        "do), compiled (folded, then torch.compile with inductor and frozen weights; compiles per batch size)",
    )
    p.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile preset for --torch-mode compiled (CUDA graphs: --cuda-graph)",
    )
    p.add_argument("--channels-last", action="store_true", help="torch checkpoints: channels_last memory format")
    p.add_argument("--cuda-graph", action="store_true", help="capture and replay CUDA graphs (torch CUDA, TensorRT)")
    p.add_argument("--no-rss", action="store_true", help="skip the separate-process peak memory of ONNX Runtime")
    p.add_argument("--json", help="write the full results as JSON")
    p.add_argument("--markdown", help="write the tables as Markdown")
    p.add_argument("--plot", help="write latency and throughput against batch as PNG")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run(args: argparse.Namespace, argv: list[str], parser: Parser) -> None:
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    refuse_ignored_flags(parser, argv, args, ONLY_WHEN)
    if args.iters < args.rounds:
        raise SlimError(f"--iters {args.iters} cannot be split into --rounds {args.rounds}; use --iters >= --rounds")
    inputs = [*args.models, *([args.baseline] if args.baseline else [])]
    distinct = {Path(m).resolve() for m in inputs}  # a baseline given as a model too is timed once
    if args.ort_spinning and len(distinct) > 1:
        raise SlimError(
            f"--ort-spinning times one model alone, not {len(distinct)}: timed together, the spinning thread "
            "pools of the sessions not running take the cores from the one being timed (bench/ort_spinning.py); "
            "give one model, or drop --ort-spinning"
        )
    check_outputs({"--json": args.json, "--markdown": args.markdown, "--plot": args.plot}, inputs=inputs)
    result = benchmark(
        args.models,
        baseline=args.baseline,
        batches=args.batch,
        warmup_s=args.warmup_s,
        iterations=args.iters,
        rounds=args.rounds,
        input_sets=args.input_sets,
        measure_rss=not args.no_rss,
        log=log,
        device=args.backend,
        threads=args.threads,
        opt_level=args.ort_opt_level,
        spinning=args.ort_spinning,
        precision=args.precision,
        mode=args.torch_mode,
        compile_mode=args.compile_mode,
        channels_last=args.channels_last,
        cuda_graph=args.cuda_graph,
    )
    print(format_table(result), end="")
    for path, write in ((args.json, write_json), (args.markdown, write_markdown), (args.plot, plot)):
        if path is not None:
            write(result, path)
            print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():  # kill cleans up as Ctrl-C does: sessions, temporary files
            run(args, argv, parser)
    except NeedsTrust as exc:
        print(
            f"error: {one_line(exc.path)} contains {exc.what}, which run code when loaded; latency.py does not "
            f"unpickle. Export it to ONNX with 'slim2deploy export --model {one_line(exc.path)} --trust-pickle "
            "--input-shape C,H,W --out model.onnx' and time the .onnx",
            file=sys.stderr,
        )
        return 2
    except SlimError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return TERMINATED_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
