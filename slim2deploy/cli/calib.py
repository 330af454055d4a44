"""slim2deploy calib: write a calibration set (.npz of preprocessed training images) for int8."""

from __future__ import annotations

import argparse


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
        help="'fashion-mnist', a folder of class sub-folders, or a .npz file (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--image-size", type=int, default=None, help="resize folder images to this square size")
    p.add_argument("--n", type=int, default=512, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which images are picked (default: %(default)s)")
    p.add_argument("--out", required=True, help="output .npz file")
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import check_outputs
    from slim2deploy.deploy.calib import load_calib, make_calib_set

    check_outputs({"--out": args.out}, inputs=[args.data])
    out = make_calib_set(args.data, args.n, args.out, args.data_dir, args.seed, image_size=args.image_size)
    x = load_calib(out)
    print(f"wrote {out}: {len(x)} images of {tuple(x.shape[1:])}, values in [{x.min():.3f}, {x.max():.3f}]")
    return 0
