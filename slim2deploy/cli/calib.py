"""slim2deploy calib: write a calibration set (.npz of preprocessed training images) for int8."""

from __future__ import annotations

import argparse

from slim2deploy.cli.flags import add_data_dir_arg, add_seed_arg, add_stream_args, add_trust_arg
from slim2deploy.cli.parser import at_least
from slim2deploy.cli.rules import DATA_RULES

ONLY_WHEN = DATA_RULES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "calib",
        help="make an int8 calibration set from a dataset",
        description="Pick N training images (random, stratified by label, seeded), preprocess them exactly "
        "as the model's training did (with --model: its normalisation, resize and crop), and write them to an "
        ".npz file (x: float32 N x C x H x W, y: labels). See calib/README.md.",
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist', a folder of class sub-folders, or a .npz file",
    )
    add_data_dir_arg(p)
    p.add_argument(
        "--image-size",
        type=at_least(1),
        default=None,
        help="folder images: in memory without a crop, resize to this square size; streamed or with a crop (--crop, "
        "or one the checkpoint records), resize the shorter side to it before the center crop "
        "(default: what --model records)",
    )
    add_stream_args(p)
    p.add_argument("--n", type=at_least(1), default=512, help="number of images")
    add_seed_arg(p, "which images are picked")
    p.add_argument(
        "--model",
        default=None,
        metavar="CKPT",
        help="take the normalisation and folder preprocessing from this checkpoint (e.g. pretrained weights' "
        "ImageNet statistics) instead of computing them from the data",
    )
    p.add_argument("--out", required=True, help="output .npz file")
    add_trust_arg(p, input_shape_flag=False)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import check_outputs
    from slim2deploy.deploy.calib import load_calib, make_calib_set
    from slim2deploy.model.checkpoint import load_checkpoint
    from slim2deploy.model.preprocess import data_options

    check_outputs({"--out": args.out}, inputs=[args.data, args.model])
    ckpt = load_checkpoint(args.model, trust_code=args.trust_code) if args.model else None
    meta = ckpt.meta if ckpt else {}
    opts = data_options(meta, args.image_size, args.stream, args.crop)
    if ckpt is not None and opts["image_size"] is None and opts["crop"] is None:
        opts["image_size"] = ckpt.input_shape[1]  # nothing recorded: a folder is resized to what the model takes
    out = make_calib_set(
        args.data,
        args.n,
        args.out,
        args.data_dir,
        args.seed,
        image_size=opts["image_size"],
        stats=ckpt.stats if ckpt else None,
        stream=opts["stream"],
        crop=opts["crop"],
        input_shape=ckpt.input_shape if ckpt else None,
    )
    x = load_calib(out)
    print(f"wrote {out}: {len(x)} images of {tuple(x.shape[1:])}, values in [{x.min():.3f}, {x.max():.3f}]")
    return 0
