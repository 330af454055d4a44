"""Image folders: which files are images, which folders are classes, and how an image file becomes pixels.

Both folder loaders (``data`` in memory, ``folder`` streamed) list a folder with ``scan_folder`` and
decode every image with ``open_rgb``, so they read the same files the same way.

Listing: class folders are the sub-folders of ``DIR/train`` (or ``DIR``), sorted by name; hidden ones
are not classes. A class folder may be a link to a folder (it is followed); two class names leading to
one folder, or a class folder holding no image, are refused: each class is one output of the model,
and an empty or duplicated one would silently be an output nothing teaches. A file named like an image
that is not a regular file (a FIFO would block the reader forever) is refused before anything is read.

Decoding, by the file's real mode and depth, into 8-bit RGB (the loaders divide by 255, giving the
documented 0..1 range): 1-bit, gray, palette and colour modes (``1 L LA P PA RGB RGBA CMYK`` ...) as
Pillow converts them (alpha dropped); 16-bit gray (``I;16*``) scaled by 1/257; 32-bit integer gray
(``I``) read as 8-bit values when they lie within 0..255, as 16-bit ones within 0..65535, refused
otherwise; float gray (``F``) scaled by 255 when within [0, 1], kept within 0..255, refused otherwise
(NaN included). The EXIF orientation is applied first, as every viewer shows the image.
"""

from __future__ import annotations

import os
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import check_input_file, file_kind

# what a folder loader reads (Pillow opens each as a still image; a GIF's first frame); other files are
# skipped with one note saying how many, hidden files (".DS_Store", "._x.png") silently
IMAGE_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
_NOTED: set[tuple[Path, str]] = set()  # (folder, note) already printed: one note per folder and process
# Pillow modes of 8 bits per channel, which it converts to RGB itself
_EIGHT_BIT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def split_90_10(n: int, split: str, source: object) -> np.ndarray:
    """The indices of ``split`` of ``n`` items split 90/10 by a fixed seed (train: the 90)."""
    if n < 2:  # one image cannot be both trained on and held out: one split would be empty
        raise SlimError(f"{source} has {n} image; splitting it into train and val needs at least 2")
    order = np.random.default_rng(0).permutation(n)
    cut = max(1, n // 10)
    return order[cut:] if split == "train" else order[:cut]


def class_folders(base: Path) -> list[str]:
    """The class folders under ``base``, sorted; hidden ones (``.ipynb_checkpoints``, ``.git``) are not
    classes: as the first folders by name they would take label 0 and shift every real class by one."""
    folders = [d.name for d in base.iterdir() if d.is_dir()]
    classes = sorted(name for name in folders if not name.startswith("."))
    hidden = sorted(set(folders) - set(classes))
    if hidden:
        folders_text = f"folder{'s' * (len(hidden) > 1)} {', '.join(hidden)}"
        note_once(base, f"note: {base}: hidden {folders_text} not read as classes")
    if not classes:
        raise SlimError(f"{base} has no class sub-folders; expected {base}/<class>/<image files>")
    same: dict[str, str] = {}
    for name in classes:
        real = os.path.realpath(base / name)
        if real in same:
            raise SlimError(
                f"the class folders {same[real]} and {name} under {base} are one folder ({real}): its images "
                "would be two classes at once; remove the link"
            )
        same[real] = name
    return classes


def scan_folder(root: Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, labels, classes) of ``split``, without opening an image (see the module docstring).

    Labels are numbered by the training split's class folders whatever the split, so a class keeps
    its index in val/ even where val/ lacks another class; a val/ class unknown to training has no
    output of the model and is refused.
    """
    train_base = root / "train" if (root / "train").is_dir() else root
    classes = class_folders(train_base)
    base = train_base
    if split != "train" and train_base != root:
        if not (root / "val").is_dir():
            raise SlimError(f"{root} has train/ but no val/ folder")
        base = root / "val"
        unknown = sorted(set(class_folders(base)) - set(classes))
        if unknown:
            raise SlimError(
                f"{base} has class folders {', '.join(unknown)} that {train_base} lacks; labels follow the "
                f"training classes ({', '.join(classes)}): rename or remove those folders"
            )
    files: list[tuple[Path, int]] = []
    skipped = Counter[str]()
    for c in class_folders(base):
        found = len(files)
        with os.scandir(base / c) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                suffix = os.path.splitext(entry.name)[1].lower()
                if suffix in IMAGE_EXTENSIONS and not entry.is_file():  # d_type: no stat per file
                    raise SlimError(
                        f"{entry.path} is named like an image but is {file_kind(entry.path) or 'not a file'}; "
                        "remove or rename it"
                    )
                if suffix in IMAGE_EXTENSIONS:
                    files.append((Path(entry.path), classes.index(c)))
                elif entry.is_file():
                    skipped[suffix or "no extension"] += 1
        if len(files) == found:
            raise SlimError(
                f"the class folder {base / c} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): every class "
                "folder is one output of the model; add its images or remove the folder"
            )
    _note_skipped(base, skipped)
    if base == root:
        files = [files[i] for i in split_90_10(len(files), split, root)]
    else:  # listed class after class, a prefix (`limit_train`, `eval_limit`) would hold the first classes only
        files = _round_robin(files)
    return [p for p, _ in files], np.array([i for _, i in files], dtype=np.int64), classes


def _round_robin(files: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """(file, label) pairs reordered one class at a time in turn (each class in its own order), so that every
    prefix of the list holds the classes in proportion."""
    rank = Counter[int]()
    keyed = []
    for path, label in files:
        keyed.append((rank[label], label, path))
        rank[label] += 1
    return [(path, label) for _, label, path in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _note_skipped(base: Path, skipped: Counter[str]) -> None:
    """One stderr line per folder naming the files a loader does not read, by extension."""
    if not skipped:
        return
    n = sum(skipped.values())
    kinds = ", ".join(f"{ext}: {count}" for ext, count in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    reads = ", ".join(sorted(IMAGE_EXTENSIONS))
    files = f"{n} file{'s' * (n != 1)}"
    note_once(base, f"note: skipped {files} under {base} that are not images ({kinds}); the loader reads {reads}")


TINY_SIDE = 8  # pixels: below this a resize leaves a model almost nothing to see


def note_tiny(base: Path, side: int, first: Any) -> None:
    """One stderr warning when a folder's images are shrunk to fewer than ``TINY_SIDE`` pixels a side (a typo'd
    size trains without error, at chance): ``first`` is the folder's first image, for scale."""
    if side < TINY_SIDE and min(first.width, first.height) > side:
        note_once(
            base,
            f"warning: the images under {base} are shrunk to {side}x{side} pixels, too few for a model to learn "
            "from; was that size meant?",
        )


def note_once(base: Path, note: str) -> None:
    """Print ``note`` about the folder ``base`` to stderr, once per process."""
    if (base, note) not in _NOTED:
        _NOTED.add((base, note))
        print(note, file=sys.stderr)


def open_rgb(path: Path) -> Any:
    """An image file as an upright 8-bit RGB PIL image (see the module docstring for each mode)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    check_input_file(path, "image")
    try:
        with Image.open(path) as opened:
            return _to_rgb8(ImageOps.exif_transpose(opened), path)
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        struct.error,
        Image.DecompressionBombError,
    ) as exc:  # what Pillow raises for a damaged file or damaged EXIF data
        raise SlimError(f"{path} is not a readable image ({exc}); remove or replace it") from exc


def check_crop_fits(image_size: int, crop: int) -> None:
    """A center ``crop`` must fit in the image its shorter side was resized to (both folder loaders)."""
    if crop > image_size:
        raise SlimError(f"`crop` {crop} is larger than `image_size` {image_size}; the center crop must fit")


def center_view(img: Any, image_size: int, crop: int) -> Any:
    """The evaluation view of an image: its shorter side resized to ``image_size``, then the center
    ``crop`` x ``crop`` (ImageNet-style; both folder loaders read images this way when a crop is set)."""
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(img, image_size, antialias=True), [crop, crop])


def _to_rgb8(img: Any, path: Path) -> Any:
    from PIL import Image

    if img.mode in _EIGHT_BIT:
        return img.convert("RGB")
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        gray = values / 257.0
    elif img.mode == "I":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise SlimError(
                f"{path} holds 32-bit integer pixels {low}..{high}, neither 8-bit (0..255) nor 16-bit (0..65535) "
                "values; save it as an 8- or 16-bit image"
            )
        gray = values / (1.0 if high <= 255 else 257.0)
    elif img.mode == "F":
        if not np.isfinite(values).all():
            raise SlimError(f"{path} holds NaN or infinite pixels; fix or remove the image")
        least, most = float(values.min()), float(values.max())
        if least < 0 or most > 255:
            raise SlimError(
                f"{path} holds float pixels {least:g}..{most:g}, neither in [0, 1] nor in 0..255; save it scaled "
                "to one of them (an 8-bit image, best)"
            )
        gray = values * (255.0 if most <= 1 else 1.0)
    else:
        raise SlimError(f"{path} is an image of mode {img.mode}, which is not read; save it as 8- or 16-bit")
    return Image.fromarray(np.round(gray).astype(np.uint8), "L").convert("RGB")
