"""Datasets held in memory as normalised float32 tensors, and a tiny batch iterator.

Sources (``--data``):
- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/`` by default, ``--data-dir`` to override).
- a directory of images: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or class folders
  directly, split 90/10 by a fixed seed); labels follow the training class folders by name.
- a ``.npz`` file with ``x_train, y_train, x_val, y_val`` (or ``x, y``, split 90/10); ``x`` is
  N x C x H x W (or N x H x W), uint8 in [0, 255] (or any integer dtype within 0..255) or float
  already scaled to [0, 1]; anything else is refused (``check_pixels``).

Everything is small enough to sit in memory, which keeps the training loop simple and makes
distributed sharding and augmentation exactly reproducible (see ``batches``).
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim2deploy.base.errors import SlimError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# what a folder loader reads (Pillow opens each as a still image; a GIF's first frame); other files are
# skipped with one note saying how many, hidden files (".DS_Store", "._x.png") silently
IMAGE_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
_NOTED: set[tuple[Path, str]] = set()  # (folder, note) already printed: one note per folder and process


@dataclass
class Dataset:
    """Normalised images ``x`` (N x C x H x W float32) with labels ``y`` (N int64)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    meta: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n: int | None) -> Dataset:
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise SlimError(f"a subset needs at least one image, got {n}")
        return Dataset(self.x[:n], self.y[:n], self.classes, self.mean, self.std, self.name, self.meta)


Stats = tuple[tuple[float, ...], tuple[float, ...]] | None


MAX_CLASSES = 100_000  # a label is a class index: 2**40 would be a classifier of 2**40 outputs


def check_arrays(x: np.ndarray, y: np.ndarray, source: str, num_classes: int | None = None) -> np.ndarray:
    """Validate images and labels of any source before use; returns the labels as int64.

    Every format goes through here, so a mismatch, a bad label or a non-finite pixel is one
    SlimError instead of a silently wrong model (a float label cast to 0, a NaN checkpoint).
    """
    if x.ndim not in (3, 4):
        raise SlimError(f"{source}: images must be N x C x H x W or N x H x W, got shape {x.shape}")
    check_layout(x.shape, source)
    if y.ndim != 1:
        hint = "; one-hot rows? pass y.argmax(axis=1)" if y.ndim == 2 and len(y) == len(x) else ""
        raise SlimError(f"{source}: labels must be a 1-D array of class indices, got shape {y.shape}{hint}")
    if len(x) != len(y):
        raise SlimError(f"{source}: {len(x)} images but {len(y)} labels; every image needs exactly one label")
    if len(y) == 0:
        raise SlimError(f"{source}: no images")
    if 0 in x.shape:
        raise SlimError(f"{source}: images of shape {x.shape} have a dimension of size 0; every image needs pixels")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise SlimError(f"{source}: images have dtype {x.dtype}; use uint8 pixels or float values in [0, 1]")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise SlimError(f"{source}: images contain NaN or infinite values; fix or drop those images")
    check_pixels(x, source)
    check_varied(x, source)
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise SlimError(f"{source}: labels must be whole class indices 0, 1, 2, ..., got non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise SlimError(f"{source}: labels have dtype {y.dtype}; use integer class indices")
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise SlimError(f"{source}: labels must be class indices >= 0, found {low}")
    if high >= MAX_CLASSES:
        raise SlimError(
            f"{source}: label {high}; labels are class indices 0..K-1 (at most {MAX_CLASSES:,} classes): renumber them"
        )
    if num_classes is not None and high >= num_classes:
        raise SlimError(f"{source}: label {high} but only {num_classes} classes (indices 0..{num_classes - 1})")
    return y.astype(np.int64)


def check_pixels(x: np.ndarray, source: str) -> None:
    """One pixel rule for every source (see ``to_unit``): integers are 8-bit values 0..255, floats lie in [0, 1].

    Integers of any dtype within 0..255 are the same numbers as uint8 and are read as such (an
    ``astype(np.int64)`` changes nothing). Anything else would be a guess: 0..255 floats used as
    they are give a model 255 times the inputs it was trained for, silently (46% instead of 92%).
    """
    low, high = x.min().item(), x.max().item()
    if np.issubdtype(x.dtype, np.integer):
        if low < 0 or high > 255:
            raise SlimError(
                f"{source}: integer pixels must be 8-bit values 0..255, found {low}..{high}; "
                "scale them to 0..255 and cast to uint8"
            )
    elif low < 0 or high > 1:
        looks_8bit = low >= 0 and high <= 255
        hint = "divide by 255 (or cast to uint8)" if looks_8bit else "scale them, un-normalised, to [0, 1]"
        raise SlimError(f"{source}: float images must lie in [0, 1], found {low:g}..{high:g}; {hint}")


def to_unit(x: np.ndarray) -> torch.Tensor:
    """Pixels that passed ``check_pixels`` as float32 in [0, 1]: integers are divided by 255, floats kept."""
    if np.issubdtype(x.dtype, np.integer):
        return torch.from_numpy(x.astype(np.float32)) / 255.0
    return torch.from_numpy(x.astype(np.float32))


def check_layout(shape: tuple[int, ...], source: str) -> None:
    """Refuse 4-D images that look channels-last: read as N x C x H x W they would be garbage (H as channels).

    Images have 1, 3 or 4 channels (gray, RGB, RGBA) in practice. N x C x H x W data with those
    channel counts is never refused; what is refused would otherwise be images 1, 3 or 4 pixels wide
    with some other channel count. Transposing instead would be a guess the user cannot see.
    """
    if len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        raise SlimError(
            f"{source}: images look channels-last (N, H, W, C = {tuple(shape)}); "
            "store them as N x C x H x W (x.transpose(0, 3, 1, 2))"
        )


def check_varied(x: np.ndarray, source: str) -> None:
    """Refuse images that are all the same (or a single constant image): nothing can be learnt, measured
    or calibrated from them, yet every check on them passes (agreement 100%, accuracy of one class)."""
    first = x[:1]
    if (x == first).all() and (len(x) > 1 or first.min() == first.max()):
        what = "is one constant image" if len(x) == 1 else f"has {len(x)} images that are all identical"
        raise SlimError(
            f"{source} {what}: nothing can be learnt, measured or calibrated from it; use real, varied images"
        )


def read_npz(path: Path, what: str = "data set") -> dict[str, np.ndarray]:
    """All arrays of an .npz file, read now, so a truncated or foreign file is one SlimError."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise SlimError(f"{path} holds a single .npy array, not an .npz archive of named arrays ({what})")
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise SlimError(f"{path} is not a readable .npz {what} ({exc or type(exc).__name__}); re-create it") from exc


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError, zlib.error) as exc:  # zlib.error: damaged .gz contents
        raise SlimError(f"{path} is not a readable IDX file ({exc}); reinstall dataset-fashion-mnist") from exc


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise SlimError(
        f"Fashion-MNIST not found: no {stem}(.gz) in {root}. Install it with "
        "'apt-get install -y dataset-fashion-mnist' or point --data-dir at a folder with the IDX files."
    )


def check_stats(stats: Stats, shape: tuple[int, ...], source: str) -> None:
    """The normalisation (--mean/--std, or a checkpoint's) has one value per image channel; broadcast
    against images of another channel count it would silently make, say, 1-channel images 3-channel."""
    if stats is not None and len(stats[0]) != shape[0]:
        raise SlimError(
            f"{source} has {tuple(shape)} images (C, H, W) but the normalisation is for {len(stats[0])} channels "
            f"(mean {stats[0]}); give one `mean`/`std` value per channel, or data of the model's own kind"
        )


def _normalise(x: np.ndarray, stats: Stats, source: str) -> tuple[torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    t = to_unit(x)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise SlimError(f"images must be N x C x H x W or N x H x W, got shape {tuple(t.shape)}")
    check_stats(stats, tuple(t.shape[1:]), source)
    if stats is not None:
        mean, std = stats
    else:
        mean = tuple(float(v) for v in t.mean(dim=(0, 2, 3)))
        std = tuple(max(float(v), 1e-6) for v in t.std(dim=(0, 2, 3)))
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (t - m) / s, mean, std


def _fashion_mnist(split: str, data_dir: str | None, stats: Stats) -> Dataset:
    root = Path(data_dir or os.environ.get("SLIM2DEPLOY_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    y = check_arrays(images, labels, f"Fashion-MNIST {split} in {root}", len(FASHION_MNIST_CLASSES))
    x, mean, std = _normalise(images, stats or (FASHION_MNIST_MEAN, FASHION_MNIST_STD), f"Fashion-MNIST in {root}")
    return Dataset(x, torch.from_numpy(y), FASHION_MNIST_CLASSES, mean, std, "fashion-mnist")


def _split_90_10(n: int, split: str, source: object) -> np.ndarray:
    if n < 2:  # one image cannot be both trained on and held out: one split would be empty
        raise SlimError(f"{source} has {n} image; splitting it into train and val needs at least 2")
    order = np.random.default_rng(0).permutation(n)
    cut = max(1, n // 10)
    return order[cut:] if split == "train" else order[:cut]


def _npz(path: Path, split: str, stats: Stats) -> Dataset:
    arrays = read_npz(path)
    if all(k in arrays for k in ("x_train", "y_train", "x_val", "y_val")):
        names = {"train": ("x_train", "y_train"), "val": ("x_val", "y_val")}
    elif "x" in arrays and "y" in arrays:
        names = {"all": ("x", "y")}
    else:
        raise SlimError(f"{path} needs arrays x_train/y_train/x_val/y_val or x/y; it has {sorted(arrays)}")
    labels = {part: check_arrays(arrays[xk], arrays[yk], f"{path} ({xk}, {yk})") for part, (xk, yk) in names.items()}
    # the class count comes from every split in the file, so train and val agree on it
    n_classes = max(int(v.max()) for v in labels.values()) + 1
    if "all" in names:
        idx = _split_90_10(len(labels["all"]), split, path)
        x, y = arrays["x"][idx], labels["all"][idx]
    else:
        part = "train" if split == "train" else "val"
        x, y = arrays[names[part][0]], labels[part]
    xt, mean, std = _normalise(x, stats, str(path))
    return Dataset(xt, torch.from_numpy(y), [str(i) for i in range(n_classes)], mean, std, f"npz:{path}")


def _class_folders(base: Path) -> list[str]:
    """The class folders under ``base``, sorted; hidden ones (``.ipynb_checkpoints``, ``.git``) are not
    classes: as the first folders by name they would take label 0 and shift every real class by one."""
    folders = [d.name for d in base.iterdir() if d.is_dir()]
    classes = sorted(name for name in folders if not name.startswith("."))
    hidden = sorted(set(folders) - set(classes))
    if hidden:
        folders_text = f"folder{'s' * (len(hidden) > 1)} {', '.join(hidden)}"
        _note_once(base, f"note: {base}: hidden {folders_text} not read as classes")
    if not classes:
        raise SlimError(f"{base} has no class sub-folders; expected {base}/<class>/<image files>")
    return classes


def scan_folder(root: Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, labels, classes) of ``split``, without opening an image; same layout rules as ``data``.

    Labels are numbered by the training split's class folders whatever the split, so a class keeps
    its index in val/ even where val/ lacks another class; a val/ class unknown to training has no
    output of the model and is refused.
    """
    train_base = root / "train" if (root / "train").is_dir() else root
    classes = _class_folders(train_base)
    base = train_base
    if split != "train" and train_base != root:
        if not (root / "val").is_dir():
            raise SlimError(f"{root} has train/ but no val/ folder")
        base = root / "val"
        unknown = sorted(set(_class_folders(base)) - set(classes))
        if unknown:
            raise SlimError(
                f"{base} has class folders {', '.join(unknown)} that {train_base} lacks; labels follow the "
                f"training classes ({', '.join(classes)}): rename or remove those folders"
            )
    files, skipped = [], Counter[str]()
    for c in _class_folders(base):
        for p in sorted((base / c).iterdir()):
            if p.name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((p, classes.index(c)))
            elif p.is_file():
                skipped[p.suffix.lower() or "no extension"] += 1
    _note_skipped(base, skipped)
    if not files:
        raise SlimError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {base}")
    if base == root:
        files = [files[i] for i in _split_90_10(len(files), split, root)]
    return [p for p, _ in files], np.array([i for _, i in files], dtype=np.int64), classes


def _note_skipped(base: Path, skipped: Counter[str]) -> None:
    """One stderr line per folder naming the files a loader does not read, by extension."""
    if not skipped:
        return
    n = sum(skipped.values())
    kinds = ", ".join(f"{ext}: {count}" for ext, count in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    reads = ", ".join(sorted(IMAGE_EXTENSIONS))
    files = f"{n} file{'s' * (n != 1)}"
    _note_once(base, f"note: skipped {files} under {base} that are not images ({kinds}); the loader reads {reads}")


def _note_once(base: Path, note: str) -> None:
    """Print ``note`` about the folder ``base`` to stderr, once per process."""
    if (base, note) not in _NOTED:
        _NOTED.add((base, note))
        print(note, file=sys.stderr)


def open_rgb(path: Path) -> Any:
    """An image file as an 8-bit RGB PIL image, whatever its mode; every folder loader reads through here.

    16-bit grayscale PNGs open as mode I;16 (or I) with values up to 65535, which ``convert`` clips
    at 255 (nearly every pixel white): they are scaled to 8 bits first, so they land in the same
    0..1 range as 8-bit images.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            if opened.mode.startswith("I"):
                wide = np.asarray(opened).astype(np.float64) / 257.0
                return Image.fromarray(np.clip(np.round(wide), 0, 255).astype(np.uint8), "L").convert("RGB")
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SlimError(f"{path} is not a readable image ({exc}); remove or replace it") from exc


def _image_folder(root: Path, split: str, image_size: int | None, stats: Stats) -> Dataset:
    files, labels, classes = scan_folder(root, split)
    base = files[0].parent.parent
    arrays = []
    for path in files:
        rgb = open_rgb(path)
        if image_size:
            rgb = rgb.resize((image_size, image_size))
        arrays.append(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise SlimError(
            f"images under {base} have different sizes {sorted(shapes)[:3]}...; give `image_size` to resize them"
        )
    images = np.stack(arrays)
    y = check_arrays(images, labels, str(base), len(classes))
    x, mean, std = _normalise(images, stats, str(base))
    meta: dict[str, object] = {"image_size": image_size} if image_size else {}
    return Dataset(x, torch.from_numpy(y), classes, mean, std, f"folder:{root}", meta)


def load_dataset(
    name: str, split: str = "train", data_dir: str | None = None, image_size: int | None = None, stats: Stats = None
) -> Dataset:
    """Load ``split`` ("train" or "val"/"test") of a dataset named as in the module docstring.

    ``stats`` = (mean, std) per channel fixes the normalisation; pass the training split's
    (stored in every checkpoint's metadata) when loading evaluation or calibration data.
    Without it, Fashion-MNIST uses its standard values and other sources their own statistics.
    """
    if split not in ("train", "val", "test"):
        raise SlimError(f"split must be train, val or test, got {split!r}")
    if image_size is not None and image_size < 1:
        raise SlimError(f"`image_size` must be at least 1 pixel, got {image_size}")
    if name == "fashion-mnist":
        return _fashion_mnist(split, data_dir, stats)
    path = Path(name.split(":", 1)[1] if name.startswith(("npz:", "folder:")) else name)
    if path.suffix == ".npz":
        if not path.exists():
            raise SlimError(f"no such file: {path}")
        return _npz(path, split, stats)
    if path.is_dir():
        return _image_folder(path, split, image_size, stats)
    raise SlimError(f"unknown data {name!r}: use 'fashion-mnist', a folder of class sub-folders, or a .npz file")


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random pad-and-crop (shift by up to ``pad`` pixels, zero fill) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    idx_c = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    return padded[idx_n, idx_c, rows, cols]


def batches(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    do_augment: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches; under data parallelism, each rank gets its slice of every global batch.

    The global batch is ``batch_size * world`` images, chosen and augmented identically on every
    rank from (seed, epoch), so N processes see exactly what one process with the same global batch
    sees. A trailing partial global batch is dropped when training (``shuffle``), kept otherwise.
    """
    n = len(ds)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    global_bs = batch_size * world
    stop = (n // global_bs) * global_bs if shuffle else n
    for start in range(0, stop, global_bs):
        idx = order[start : start + global_bs]
        x = ds.x[idx]
        if do_augment:
            x = augment(x, g)
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        if world > 1:
            x, yb = x[lo:hi], ds.y[idx][lo:hi]
        else:
            yb = ds.y[idx]
        if len(yb):
            yield x, yb
