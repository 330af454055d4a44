"""How a model's inputs are read: one normalisation rule, and the data an existing model takes.

**The normalisation rule** (``starting_stats``), the same for ``train``, ``import`` and every source of weights:

1. ``mean``/``std`` given by the user win;
2. a slim2deploy checkpoint carries its own (every one records what it was trained with);
3. weights trained elsewhere (a weights file, a library's pretrained weights, ``import``) were trained with
   their library's convention: torchvision's ImageNet mean/std, timm's per-model ``pretrained_cfg``; for a zoo
   model or a ``package.module:factory`` there is no library to ask, so 3-channel inputs get ImageNet's, the
   convention nearly every model trained on photographs uses, and other channel counts are estimated (4.);
4. a model trained from scratch: estimated from the training data (Fashion-MNIST: its standard values).

Every run that reads data says which one it uses (``describe_stats``).

**Data for an existing model** (``data_for``): a checkpoint records how its training read images
(``meta["preprocess"]``: streamed or in memory, the resize and the crop), so ``finetune``, ``calib``,
``export`` and ``build`` read a folder exactly that way without repeating the flags, with the checkpoint's
normalisation; what they read is checked to be the model's own kind (input shape, classes).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import Checkpoint
from slim2deploy.model.folder import AnyData, FolderData, check_fits, load_data
from slim2deploy.model.zoo import pretrained_stats, split_name

Stats = tuple[tuple[float, ...], tuple[float, ...]]
IMAGENET: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def starting_stats(
    arch: str, *, weights: bool, given: Stats | None = None, channels: int | None = 3
) -> tuple[Stats | None, str]:
    """(mean, std) a new run or an import starts with, and where it comes from (the module docstring's rule);
    None: estimate it from the training data. ``channels``: the inputs' (None: unknown, taken as 3)."""
    if given is not None:
        return given, "given"
    if not weights:
        return None, "estimated from the training data"
    library = split_name(arch)[0]
    if library:
        try:
            return pretrained_stats(arch), f"{library}'s convention for weights of this model"
        except SlimError:  # a timm model without a pretrained configuration: the common convention below
            pass
    if channels not in (None, 3):
        return None, f"estimated from the training data ({channels}-channel inputs have no common convention)"
    return IMAGENET, (
        "ImageNet's, the convention for weights trained elsewhere; give `mean` and `std` if yours were trained "
        "with others"
    )


def _npz_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of an .npz's images (``x_train``, else ``x``), read from the array's header alone; None for
    anything unreadable (the loader then says what is wrong with the file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            member = next((f"{k}.npy" for k in ("x_train", "x") if f"{k}.npy" in names), None)
            if member is None:
                return None
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, _ = read(f)  # the header only, no data
                return tuple(int(d) for d in shape)
    except Exception:  # noqa: BLE001 - damaged, truncated or foreign: the loader's own checks explain it
        return None


def channels_of(data: str) -> int | None:
    """The channel count of a dataset's images, without reading it whole (None where it cannot tell cheaply):
    Fashion-MNIST is grey, a folder decodes to RGB, an .npz says in its array."""
    if data == "fashion-mnist":
        return 1
    path = Path(data.split(":", 1)[1] if data.startswith(("folder:", "npz:")) else data)
    if path.is_dir():
        return 3
    if path.suffix == ".npz" and path.is_file():
        shape = _npz_shape(path)
        if shape is not None:
            return 1 if len(shape) == 3 else int(shape[1]) if len(shape) == 4 else None
    return None


def describe_stats(stats: Stats, source: str) -> str:
    """One line for the start of a run that reads data."""
    mean, std = (",".join(f"{v:.4g}" for v in values) for values in stats)
    return f"normalisation: mean {mean}, std {std} ({source})"


def data_options(
    meta: dict[str, Any],
    image_size: int | None = None,
    stream: bool | None = None,
    crop: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Data options for a later stage: what the user gave, else how the checkpoint's training read its data."""
    pre = meta.get("preprocess") or {}
    if not isinstance(pre, dict):
        pre = {}
    return {
        "image_size": image_size if image_size is not None else pre.get("image_size"),
        "stream": stream if stream is not None else pre.get("stream"),
        "crop": crop if crop is not None else pre.get("crop"),
        "seed": seed,
        "workers": workers,
    }


def data_for(
    ckpt: Checkpoint,
    data: str,
    split: str,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    stream: bool | None = None,
    crop: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> AnyData:
    """``split`` of ``data`` as ``ckpt``'s model takes it: its preprocessing (unless overridden), its
    normalisation, checked to fit its input shape and classes; the first ``limit`` images."""
    opts = data_options(ckpt.meta, image_size, stream, crop, seed, workers)
    _, h, w = ckpt.input_shape
    if opts["image_size"] is None and opts["crop"] is None and h == w:
        opts["image_size"] = h  # nothing recorded (a model trained on IDX or .npz data): a folder takes its size
    size = opts.pop("image_size")
    ds = load_data(data, split, data_dir, size, ckpt.stats, **opts).subset(limit)
    return check_fits(ds, ckpt.input_shape, ckpt.num_classes, data, ckpt.meta.get("classes"))


def preprocess_meta(ds: AnyData) -> dict[str, Any]:
    """What a checkpoint records so that later stages read the data the same way."""
    if isinstance(ds, FolderData):
        return {"stream": True, "image_size": ds.image_size, "crop": ds.crop}
    sizes = {k: ds.meta.get(k) for k in ("image_size", "crop")}
    return {"stream": False, **{k: v for k, v in sizes.items() if isinstance(v, int)}}
