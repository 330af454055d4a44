"""Generate an image folder (class sub-folders of JPEG/PNG files) and, optionally, a weights file.

    python bench/image_folder.py --out build/own/images --images 2000 --size 72 --classes 4
    python bench/image_folder.py --out build/own/images --images 2000 --size 72 \
        --weights build/own/resnet18.pth --arch resnet18 --torch-home build/own/torch

Each class is noise plus its own bright rectangle at a class-specific place (learnable in an
epoch), with sizes varying +-25% around ``--size`` so that resizing and cropping matter.
``--weights`` writes a state_dict of the torchvision model ``--arch`` trained on the folder for
``--train-epochs`` at ``--train-size`` pixels with ImageNet's normalisation (a stand-in for weights you
trained: what ``import`` assumes of torchvision weights); ``--train-epochs 0`` leaves it randomly
initialised. ``--torch-home`` also puts that file where torchvision's ``weights="DEFAULT"`` looks for
it, so ``--pretrained`` works offline.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def make_image_folder(root: Path, images: int, size: int, classes: int = 4, fmt: str = "jpg", seed: int = 0) -> int:
    """Write ``images`` files under ``root/<class>/``; returns how many were written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % classes
        h, w = (int(v) for v in rng.integers(int(size * 0.75), int(size * 1.25) + 1, 2))
        img = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
        top, left = (c // 2 % 2) * h // 2, (c % 2) * w // 2
        img[top : top + h // 2, left : left + w // 2, c % 3] += 150
        Image.fromarray(img).save(root / f"class{c}" / f"{i:06d}.{fmt}", quality=90)
    return images


def write_weights(
    path: Path, arch: str, torch_home: Path | None, folder: Path | None = None, epochs: int = 0, size: int = 32
) -> None:
    import tempfile

    import torch
    import torchvision

    torch.manual_seed(0)
    if folder is not None and epochs > 0:
        from slim2deploy.model.checkpoint import load_checkpoint
        from slim2deploy.model.loop import TrainConfig
        from slim2deploy.model.preprocess import IMAGENET
        from slim2deploy.pipeline.train import train_command

        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "trained.pt")
            cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.02, schedule="cosine")
            train_command(
                arch=f"torchvision:{arch}", width=None, data=str(folder), data_dir=None, image_size=size,
                limit_train=None, eval_limit=None, cfg=cfg, out=out, device="cpu", stats=IMAGENET,
            )  # fmt: skip
            state = load_checkpoint(out).state_dict
    else:
        state = torchvision.models.get_model(arch, weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    if torch_home is not None:
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        cache = torch_home / "hub" / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(state, cache / os.path.basename(url))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to fill with <class>/<image> files")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=72, help="typical image side in pixels")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--format", default="jpg", choices=["jpg", "png"])
    p.add_argument("--weights", type=Path, default=None, help="also write a torchvision state_dict here")
    p.add_argument("--arch", default="resnet18", help="torchvision model for --weights")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs --weights is trained on the folder (0: random)")
    p.add_argument("--train-size", type=int, default=32, help="image side --weights is trained at")
    p.add_argument("--torch-home", type=Path, default=None, help="also put --weights into this TORCH_HOME's cache")
    args = p.parse_args()
    n = make_image_folder(args.out, args.images, args.size, args.classes, args.format)
    print(f"wrote {n} images in {args.classes} classes under {args.out}")
    if args.weights:
        write_weights(args.weights, args.arch, args.torch_home, args.out, args.train_epochs, args.train_size)
        cached = f" and the {args.arch} cache entry under {args.torch_home}" if args.torch_home else ""
        print(f"wrote {args.weights}{cached}")


if __name__ == "__main__":
    main()
