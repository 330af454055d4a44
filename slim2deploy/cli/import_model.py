"""slim2deploy import: turn an existing model + weights into a slim2deploy checkpoint."""

from __future__ import annotations

import argparse

from slim2deploy.cli.flags import add_source_args, add_trust_arg, stats_from_args
from slim2deploy.cli.parser import at_least, input_shape, number


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "import",
        help="make a checkpoint from a torchvision/timm/zoo model and its weights (a file or pretrained)",
        description="Build ARCH, load its weights (--weights FILE or the library's --pretrained ones), check it "
        "runs on --input-shape and write a slim2deploy checkpoint that prune, export, build and the "
        "benchmarks take directly. Loading a file reports missing and unexpected keys.",
    )
    p.add_argument(
        "--arch",
        required=True,
        help="torchvision:NAME, timm:NAME, a zoo name or package.module:factory (with --trust-code; called as "
        "factory(num_classes=N, in_channels=C) with the arguments it takes; a class or Class.classmethod works too)",
    )
    p.add_argument(
        "--input-shape",
        type=input_shape,
        required=True,
        metavar="C,H,W",
        help="the model's input, e.g. 3,224,224",
    )
    p.add_argument(
        "--num-classes",
        type=at_least(1),
        default=None,
        help="class count; when it differs from the weights', only the classifier is re-initialised "
        "(default: the weights')",
    )
    p.add_argument("--width", type=number(above=0), default=None, help="width multiplier of zoo models")
    p.add_argument(
        "--image-size",
        type=at_least(1),
        default=None,
        help="evaluation resize of the shorter side before the center crop to H (default: H)",
    )
    p.add_argument("--out", required=True, help="checkpoint to write")
    add_source_args(p)
    add_trust_arg(p, input_shape_flag=False)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import check_outputs
    from slim2deploy.pipeline.import_model import import_model

    check_outputs({"--out": args.out}, inputs=[args.weights])

    out, report = import_model(
        args.arch,
        args.out,
        args.input_shape,
        weights=args.weights,
        pretrained=args.pretrained,
        num_classes=args.num_classes,
        width=args.width,
        stats=stats_from_args(args),
        image_size=args.image_size,
        trust_code=args.trust_code,
        log=args._parser.say,
    )
    if report is not None:
        print(report.summary())
    print(f"wrote {out}")
    return 0
