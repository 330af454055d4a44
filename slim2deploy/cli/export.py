"""slim2deploy export: a checkpoint to checked ONNX files at fp32, fp16 and/or int8 (Q/DQ)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from slim2deploy.cli.flags import add_data_dir_arg, add_eval_limit_arg, add_trust_arg
from slim2deploy.cli.parser import at_least, names
from slim2deploy.cli.rules import OnlyWhen

if TYPE_CHECKING:
    from slim2deploy.pipeline.export import PrecisionExport

ONLY_WHEN = (
    OnlyWhen("--fp16-io", lambda a: "fp16" in a.precision, "to fp16 exports", "add fp16 to --precision"),
    *(
        OnlyWhen(flag, lambda a: "int8" in a.precision, "to int8 exports", "add int8 to --precision")
        for flag in ("--calib-method", "--int8-flavour", "--data")
    ),
    OnlyWhen("--eval-limit", lambda a: a.data is not None, "with --data", "add --data"),
    OnlyWhen("--data-dir", lambda a: a.data == "fashion-mnist", "to --data fashion-mnist", "add --data fashion-mnist"),
)


def add_precision_args(g: argparse._ActionsContainer, default: tuple[str, ...]) -> None:
    """--precision, --calib, --calib-method, --int8-flavour (export and build)."""
    g.add_argument("--precision", type=names, default=default, help="comma-separated: fp32, fp16, int8")
    g.add_argument("--calib", default=None, metavar="NPZ", help="calibration set for int8 (see calib/README.md)")
    g.add_argument(
        "--calib-method",
        default="minmax",
        choices=["minmax", "entropy", "percentile"],
        help="how int8 activation ranges are chosen",
    )
    g.add_argument(
        "--int8-flavour",
        default="auto",
        choices=["auto", "tensorrt", "cpu"],
        help="tensorrt: symmetric S8S8 Q/DQ for TensorRT; cpu: U8S8 reduce-range, what ONNX Runtime runs fast on "
        "CPUs; auto: tensorrt where TensorRT engines are built here, else cpu",
    )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (fp32, fp16, calibrated int8 Q/DQ), parity-checked",
        description="Export to ONNX with Conv+BN folded, onnx.checker and shape inference, and a parity "
        "gate against torch on ONNX Runtime (fp32: 1e-4 relative; fp16: 1e-2). int8 writes an explicit "
        "Q/DQ graph calibrated on --calib and reports top-1 agreement with fp32. With several precisions the "
        "first is written to --out and each other one beside it (slim.onnx -> slim.fp16.onnx).",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="a slim2deploy checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output .onnx file")
    add_precision_args(p, ("fp32",))
    p.add_argument("--fp16-io", action="store_true", help="fp16 graph inputs and outputs (default: fp32 I/O)")
    p.add_argument(
        "--static-batch", type=at_least(1), default=None, metavar="N", help="fixed batch size (default: dynamic)"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    p.add_argument(
        "--data",
        default=None,
        deprecated=("--eval-data",),
        help="held-out data for int8 agreement and accuracy (its val/test split), read as the checkpoint records",
    )
    add_data_dir_arg(p)
    add_eval_limit_arg(p, default=1000, deprecated=("--eval-n",))
    p.add_argument("--json", default=None, metavar="FILE", help="also write what was measured as JSON")
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import atomic_write_text, check_outputs
    from slim2deploy.pipeline.export import export_checkpoint, precision_outputs

    files = precision_outputs(args.out, args.precision)
    check_outputs(
        {**{f"--out ({p})": path for p, path in files.items()}, "--json": args.json},
        inputs=[args.model, args.calib, args.data],
    )
    reports = export_checkpoint(
        args.model,
        args.out,
        precisions=args.precision,
        calib=args.calib,
        calib_method=args.calib_method,
        int8_flavour=args.int8_flavour,
        data=args.data,
        data_dir=args.data_dir,
        eval_limit=args.eval_limit,
        static_batch=args.static_batch,
        opset=args.opset,
        fp16_io=args.fp16_io,
        trust_code=args.trust_code,
        input_shape=args.input_shape,
        log=args._parser.say,
    )
    for report in reports.values():
        _print(report, args.data is not None)
    if args.json:
        dicts = {p: r.to_dict() for p, r in reports.items()}
        atomic_write_text(args.json, json.dumps(next(iter(dicts.values())) if len(dicts) == 1 else dicts, indent=2))
    return 0


def _print(report: PrecisionExport, held_out: bool) -> None:
    exp = report.export
    print(f"wrote {exp['path']} ({exp['bytes'] / 1e6:.2f} MB, opset {exp['opset']}, {exp['exporter']} exporter)")
    parity = report.parity
    if parity:
        print(
            f"parity: max abs {parity['max_abs']:.3g}, max rel {parity['max_rel']:.3g}, "
            f"top-1 agreement {parity['top1_agreement']:.2%}"
        )
    a = report.agreement
    if a:
        int8 = report.int8
        where = "held-out images" if held_out else "calibration images (pass --data for held-out)"
        line = f"int8 {int8['flavour'] if int8 else ''}: top-1 agreement {a['top1_agreement']:.2%} "
        line += f"on {a['n']} {where}"
        if a["accuracy"] is not None:
            line += f", accuracy {a['accuracy']:.2%} (fp32 {a['reference_accuracy']:.2%})"
        print(line)
