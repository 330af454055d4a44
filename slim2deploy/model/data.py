"""Datasets held in memory as normalised float32 tensors, and a tiny batch iterator.

Sources (``--data``):
- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/`` by default, ``--data-dir`` to override).
- a directory of images: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or class folders
  directly, split 90/10 by a fixed seed); labels follow the training class folders by name.
  Each image is resized to ``image_size`` square, or, with ``crop`` (``import`` records one), its
  shorter side to ``image_size`` and the center ``crop`` kept: the streamed loader's eval view.
- a ``.npz`` file with ``x_train, y_train, x_val, y_val`` (or ``x, y``, split 90/10); ``x`` is
  N x C x H x W (or N x H x W), uint8 in [0, 255] (or any integer dtype within 0..255) or float
  already scaled to [0, 1]; anything else is refused (``check_pixels``).

Everything is small enough to sit in memory, which keeps the training loop simple and makes
distributed sharding and augmentation exactly reproducible (see ``batches``).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slim2deploy.base.environment import physical_memory
from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import check_input_file
from slim2deploy.base.formats import binary_size
from slim2deploy.model.images import center_view, check_crop_fits, note_tiny, open_rgb, scan_folder, split_90_10

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


# a member expanding more than this many times over its compressed size is a zip bomb, not images: real
# pixels deflate a few times, constant arrays (which check_varied refuses anyway) about 1000 times
NPZ_MAX_RATIO = 200
NPZ_RATIO_ABOVE = 64 << 20  # a smaller member is never refused for its ratio: it fits anyway


def read_npz(path: Path, what: str = "data set") -> dict[str, np.ndarray]:
    """All arrays of an .npz file, read now, so a truncated or foreign file is one SlimError; what it would
    expand to is bounded from its zip directory and array headers before any array is read."""
    check_input_file(path, f".npz {what}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise SlimError(f"{path} holds a single .npy array, not an .npz archive of named arrays ({what})")
        with loaded:
            assert loaded.zip is not None  # open until the block ends
            _check_npz_sizes(loaded.zip, path, what)
            return {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise SlimError(f"{path} is not a readable .npz {what} ({exc or type(exc).__name__}); re-create it") from exc


def _check_npz_sizes(archive: zipfile.ZipFile, path: Path, what: str) -> None:
    """Refuse an archive whose members expand past the memory, past ``NPZ_MAX_RATIO`` (a decompression
    bomb), or declare arrays larger than the bytes they hold (numpy would allocate the declared size)."""
    infos = archive.infolist()
    total, ram = sum(i.file_size for i in infos), physical_memory()
    if ram is not None and total > ram:
        raise SlimError(
            f"{path} expands to {binary_size(total)}, more than this machine's {binary_size(ram)} of memory; "
            f"use a smaller {what}"
        )
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > NPZ_RATIO_ABOVE and ratio > NPZ_MAX_RATIO:
            raise SlimError(
                f"{path}: {info.filename} expands {ratio:.0f}-fold, to {binary_size(info.file_size)}: refused unread "
                "as a decompression bomb (images compress a few times); if it is real data, save it with np.savez"
            )
        if not info.filename.endswith(".npy"):
            continue
        with archive.open(info) as member:
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if fmt.read_magic(member) == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(member)
        declared = math.prod(shape) * dtype.itemsize
        if declared > info.file_size:
            raise SlimError(
                f"{path}: {info.filename} declares an array of {binary_size(declared)} but holds "
                f"{binary_size(info.file_size)}; the file is damaged: re-create it"
            )


def _read_idx(path: Path) -> np.ndarray:
    check_input_file(path, "IDX file")
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
        "'apt-get install -y dataset-fashion-mnist' or point `data_dir` at a folder with the IDX files."
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
        idx = split_90_10(len(labels["all"]), split, path)
        x, y = arrays["x"][idx], labels["all"][idx]
    else:
        part = "train" if split == "train" else "val"
        x, y = arrays[names[part][0]], labels[part]
    xt, mean, std = _normalise(x, stats, str(path))
    return Dataset(xt, torch.from_numpy(y), [str(i) for i in range(n_classes)], mean, std, f"npz:{path}")


def _image_folder(root: Path, split: str, image_size: int | None, stats: Stats, crop: int | None = None) -> Dataset:
    """A folder decoded once: each image resized to ``image_size`` square, or with ``crop`` its shorter side
    resized to ``image_size`` (default ``crop``) and the center ``crop`` kept, as a streamed folder's eval view."""
    files, labels, classes = scan_folder(root, split)
    base = files[0].parent.parent
    side = crop or image_size
    if crop is not None:
        image_size = image_size or crop
        check_crop_fits(image_size, crop)
    arrays: list[np.ndarray] = []
    for path in files:
        rgb = open_rgb(path)
        if not arrays and side is not None:
            note_tiny(root, side, rgb)
        if crop is not None and image_size is not None:
            rgb = center_view(rgb, image_size, crop)
        elif image_size:
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
    if crop is not None:
        meta["crop"] = crop
    return Dataset(x, torch.from_numpy(y), classes, mean, std, f"folder:{root}", meta)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int | None = None,
    stats: Stats = None,
    *,
    crop: int | None = None,
) -> Dataset:
    """Load ``split`` ("train" or "val"/"test") of a dataset named as in the module docstring.

    ``stats`` = (mean, std) per channel fixes the normalisation; pass the training split's
    (stored in every checkpoint's metadata) when loading evaluation or calibration data.
    Without it, Fashion-MNIST uses its standard values and other sources their own statistics.
    """
    if split not in ("train", "val", "test"):
        raise SlimError(f"split must be train, val or test, got {split!r}")
    if (image_size is not None and image_size < 1) or (crop is not None and crop < 1):
        raise SlimError(f"`image_size` and `crop` must be at least 1 pixel, got {image_size} and {crop}")
    if name == "fashion-mnist":
        return _fashion_mnist(split, data_dir, stats)
    path = Path(name.split(":", 1)[1] if name.startswith(("npz:", "folder:")) else name)
    if path.suffix == ".npz":
        if not path.exists():
            raise SlimError(f"no such file: {path}")
        return _npz(path, split, stats)
    if path.is_dir():
        return _image_folder(path, split, image_size, stats, crop)
    if not path.exists():
        raise SlimError(
            f"no such folder or file: {path} (data is 'fashion-mnist', a folder of class sub-folders or a .npz file)"
        )
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
