"""Latency and throughput of ONNX models, TensorRT engines or slim2deploy checkpoints (``bench/latency.py``).

Run it on each target machine; models given together are measured interleaved in one run:

    python bench/latency.py slim.onnx --baseline baseline.onnx --bench-batch 1,8,32,64,128 \\
        --json bench.json --markdown bench.md --plot bench.png

``.onnx`` runs on ONNX Runtime, ``.engine`` on TensorRT (needs cuda-python or pycuda), ``.pt``
checkpoints on torch (``--torch-mode eager|folded|compiled``). For ``.onnx`` and ``.engine`` only
numpy and the runtime are needed: torch is never imported (this module imports nothing heavy). The same
tool is ``python -m slim2deploy.cli.latency``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from slim2deploy.base.errors import NeedsTrust, SlimError, one_line
from slim2deploy.base.files import check_outputs
from slim2deploy.base.interrupts import TERMINATED_STATUS, Terminated, sigterm_as_interrupt
from slim2deploy.cli.parser import HelpFormatter, Parser, at_least, number, positive_ints
from slim2deploy.cli.rules import OnlyWhen, refuse_ignored_flags
from slim2deploy.measure.benchmark import benchmark
from slim2deploy.measure.tables import format_table, plot, write_json, write_markdown
from slim2deploy.runtime.ort import ORT_OPT_LEVELS
from slim2deploy.runtime.registry import COMPILE_MODES, TORCH_MODES, device_choices, runner_kind


def _runs(*kinds: str) -> Callable[[argparse.Namespace], bool]:
    """Whether some model given runs on one of these runtimes (options a runtime does not take are ignored)."""

    def check(args: argparse.Namespace) -> bool:
        models = [*args.models, *([args.baseline] if args.baseline else [])]
        return any(runner_kind(m) in kinds for m in models)

    return check


_TORCH = "to slim2deploy checkpoints (.pt), which run on torch"
ONLY_WHEN = (
    OnlyWhen(
        "--torch-precision",
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


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The commands' help (defaults once, deprecated spellings hidden), the module docstring as written."""


def build_parser() -> Parser:
    p = Parser(prog="latency.py", description=__doc__, formatter_class=_Formatter)
    p.add_argument("models", nargs="+", type=Path, help=".onnx, .engine or slim2deploy .pt files")
    p.add_argument("--baseline", type=Path, help="reference model: speed-ups and MACs ratios are against it")
    p.add_argument(
        "--bench-batch", type=positive_ints, default=(1,), deprecated=("--batch",), help="batch sizes to time"
    )
    p.add_argument(
        "--bench-warmup-s",
        type=number(at_least=0),
        default=1.0,
        deprecated=("--warmup-s",),
        help="warm-up seconds per model and batch",
    )
    p.add_argument(
        "--bench-iterations",
        type=at_least(1),
        default=200,
        deprecated=("--iters",),
        help="timed iterations per batch and round",
    )
    p.add_argument("--bench-rounds", type=at_least(1), default=5, deprecated=("--rounds",), help="interleaved rounds")
    p.add_argument("--input-sets", type=at_least(1), default=3, help="random input sets rotated through")
    p.add_argument(
        "--device",
        choices=device_choices(),
        default="auto",
        deprecated=("--backend",),
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
    p.add_argument(
        "--torch-precision",
        choices=["fp32", "fp16"],
        default="fp32",
        deprecated=("--precision",),
        help="what torch checkpoints compute in",
    )
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
    if args.bench_iterations < args.bench_rounds:
        raise SlimError(
            f"--bench-iterations {args.bench_iterations} cannot be split into --bench-rounds {args.bench_rounds}; "
            "use --bench-iterations >= --bench-rounds"
        )
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
        batches=args.bench_batch,
        warmup_s=args.bench_warmup_s,
        iterations=args.bench_iterations,
        rounds=args.bench_rounds,
        input_sets=args.input_sets,
        measure_rss=not args.no_rss,
        log=log,
        device=args.device,
        threads=args.threads,
        opt_level=args.ort_opt_level,
        spinning=args.ort_spinning,
        precision=args.torch_precision,
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
    parser.note_deprecated(argv)
    try:
        with sigterm_as_interrupt():  # kill cleans up as Ctrl-C does: sessions, temporary files
            run(args, argv, parser)
    except NeedsTrust as exc:
        print(
            f"error: {one_line(exc.path)} contains {exc.what}, which run code when loaded; latency.py does not "
            f"unpickle. Export it to ONNX with 'slim2deploy export --model {one_line(exc.path)} --trust-code "
            "--input-shape C,H,W --out model.onnx' and time the .onnx",
            file=sys.stderr,
        )
        return 2
    except SlimError as exc:
        print(f"error: {one_line(parser.in_flags(str(exc)))}", file=sys.stderr)
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
