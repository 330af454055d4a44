"""slim2deploy calib: write a calibration set (.npz of preprocessed training images) for int8."""

from __future__ import annotations

import argparse

from slim2deploy.cli.common import DATA_RULES, add_stream_args, seed_value

ONLY_WHEN = DATA_RULES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "calib",
        help="make an int8 calibration set from a dataset",
        description="Pick N training images (random, stratified by label, seeded), preprocess them exactly "
        "as training does, and write them to an .npz file (x: float32 N x C x H x W, y: labels). "
        "See calib/README.md.",
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist', a folder of class sub-folders, or a .npz file",
    )
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="folder images: in memory, resize to this square size; streamed, resize the shorter side to it",
    )
    add_stream_args(p)
    p.add_argument("--n", type=int, default=512, help="number of images")
    p.add_argument("--seed", type=seed_value, default=0, help="which images are picked")
    p.add_argument(
        "--model",
        default=None,
        metavar="CKPT",
        help="take the normalisation and folder preprocessing from this checkpoint (e.g. pretrained weights' "
        "ImageNet statistics) instead of computing them from the data",
    )
    p.add_argument("--out", required=True, help="output .npz file")
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import check_outputs
    from slim2deploy.deploy.calib import load_calib, make_calib_set
    from slim2deploy.model.checkpoint import load_checkpoint
    from slim2deploy.pipeline.train import data_options

    check_outputs({"--out": args.out}, inputs=[args.data, args.model])
    ckpt = load_checkpoint(args.model) if args.model else None
    meta = ckpt.meta if ckpt else {}
    stats = (tuple(meta["mean"]), tuple(meta["std"])) if "mean" in meta else None
    opts = data_options(meta, args.image_size, args.stream, args.crop)
    out = make_calib_set(
        args.data,
        args.n,
        args.out,
        args.data_dir,
        args.seed,
        image_size=opts["image_size"],
        stats=stats,
        stream=opts["stream"],
        crop=opts["crop"],
        input_shape=ckpt.input_shape if ckpt else None,
    )
    x = load_calib(out)
    print(f"wrote {out}: {len(x)} images of {tuple(x.shape[1:])}, values in [{x.min():.3f}, {x.max():.3f}]")
    return 0
