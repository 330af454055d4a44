"""slim2deploy export: a checkpoint to one checked ONNX file at fp32, fp16 or int8 (Q/DQ)."""

from __future__ import annotations

import argparse
import json

from slim2deploy.cli.common import OnlyWhen, add_trust_arg, at_least

ONLY_WHEN = (
    OnlyWhen("--fp16-io", lambda a: a.precision == "fp16", "to fp16 exports", "add --precision fp16"),
    *(
        OnlyWhen(flag, lambda a: a.precision == "int8", "to int8 exports", "add --precision int8")
        for flag in ("--calib-method", "--int8-flavour", "--eval-data")
    ),
    OnlyWhen("--eval-n", lambda a: a.eval_data is not None, "with --eval-data", "add --eval-data"),
    OnlyWhen(
        "--data-dir",
        lambda a: a.eval_data == "fashion-mnist",
        "to --eval-data fashion-mnist",
        "add --eval-data fashion-mnist",
    ),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (fp32, fp16 or calibrated int8 Q/DQ), parity-checked",
        description="Export to ONNX with Conv+BN folded, onnx.checker and shape inference, and a parity "
        "gate against torch on ONNX Runtime (fp32: 1e-4 relative; fp16: 1e-2). int8 writes an explicit "
        "Q/DQ graph calibrated on --calib and reports top-1 agreement with fp32.",
    )
    p.add_argument("--model", required=True, help="a slim2deploy checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 or int8")
    p.add_argument("--fp16-io", action="store_true", help="fp16 graph inputs and outputs (default: fp32 I/O)")
    p.add_argument("--calib", default=None, metavar="NPZ", help="calibration set for int8 (see calib/README.md)")
    p.add_argument(
        "--calib-method",
        default="minmax",
        choices=["minmax", "entropy", "percentile"],
        help="how activation ranges are chosen",
    )
    p.add_argument(
        "--int8-flavour",
        default="tensorrt",
        choices=["tensorrt", "cpu"],
        help="tensorrt: symmetric S8S8 Q/DQ for TensorRT; cpu: U8S8 reduce_range for ONNX Runtime on CPUs",
    )
    p.add_argument("--static-batch", type=int, default=None, metavar="N", help="fixed batch size (default: dynamic)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    p.add_argument("--eval-data", default=None, help="dataset for int8 agreement (its test split), e.g. fashion-mnist")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--eval-n", type=at_least(1), default=1000, help="held-out images for int8 agreement")
    p.add_argument("--json", default=None, metavar="FILE", help="also write what was measured as JSON")
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import atomic_write_text, check_outputs
    from slim2deploy.deploy.calib import load_calib
    from slim2deploy.deploy.export import check_opset
    from slim2deploy.deploy.precision import check_precision
    from slim2deploy.model.checkpoint import load_checkpoint, with_input_shape
    from slim2deploy.pipeline.export import export_precision
    from slim2deploy.prune.rebuild import model_from_checkpoint

    check_outputs({"--out": args.out, "--json": args.json}, inputs=[args.model, args.calib, args.eval_data])
    check_precision(args.precision)
    check_opset(args.opset)
    ckpt = with_input_shape(load_checkpoint(args.model, trust_pickle=args.trust_pickle), args.input_shape, args.model)
    model = model_from_checkpoint(ckpt, trust_code=args.trust_pickle)
    calib_x = load_calib(args.calib, ckpt.input_shape, ckpt.stats) if args.calib else None
    eval_x = eval_y = None
    if args.eval_data and args.precision == "int8":
        from slim2deploy.model.data import load_dataset
        from slim2deploy.model.folder import check_fits

        stats = ckpt.stats
        held_out = load_dataset(args.eval_data, "test", args.data_dir, stats=stats).subset(args.eval_n)
        check_fits(held_out, ckpt.input_shape, ckpt.num_classes, args.eval_data, ckpt.meta.get("classes"))
        eval_x, eval_y = held_out.x.numpy(), held_out.y.numpy()
    report = export_precision(
        model,
        ckpt.input_shape,
        args.out,
        precision=args.precision,
        calib_x=calib_x,
        calib_method=args.calib_method,
        flavour=args.int8_flavour,
        static_batch=args.static_batch,
        opset=args.opset,
        eval_x=eval_x,
        eval_y=eval_y,
        fp16_io=args.fp16_io,
    )
    exp = report.export
    print(f"wrote {exp['path']} ({exp['bytes'] / 1e6:.2f} MB, opset {exp['opset']}, {exp['exporter']} exporter)")
    if report.parity:
        p = report.parity
        print(
            f"parity: max abs {p['max_abs']:.3g}, max rel {p['max_rel']:.3g}, top-1 agreement {p['top1_agreement']:.2%}"
        )
    if report.agreement:
        a = report.agreement
        where = "held-out images" if eval_x is not None else "calibration images (pass --eval-data for held-out)"
        line = f"int8 {report.int8['flavour'] if report.int8 else ''}: top-1 agreement {a['top1_agreement']:.2%} "
        line += f"on {a['n']} {where}"
        if a["accuracy"] is not None:
            line += f", accuracy {a['accuracy']:.2%} (fp32 {a['reference_accuracy']:.2%})"
        print(line)
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
    return 0
