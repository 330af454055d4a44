"""Image folders read lazily through a DataLoader, for sets that do not fit in memory.

``load_data`` picks the loader: the in-memory ``data.Dataset`` for small sources (Fashion-MNIST,
``.npz``, small folders), where one tensor is fastest, and ``FolderData`` for a folder whose
decoded float32 images would take more than ``STREAM_ABOVE_BYTES`` (or with ``stream=True``).
The choice is made once per folder, for the train and val splits alike, so both are
preprocessed the same way.

``FolderData`` decodes each image when a batch needs it, with the ImageNet-style transforms
(train: random-resized crop to ``crop`` + horizontal flip; eval: resize the shorter side to
``image_size``, center crop ``crop``) and the per-channel normalisation of the training split.
Augmentation draws come from (seed, epoch, image index), not from a worker's random state, so a
run repeats exactly whatever the number of workers or processes. Under torchrun a
``DistributedSampler`` gives rank r the images r, r + world, ... of the epoch's permutation, so
step k of the N ranks together covers exactly the global batch k of one process with N times
the batch size: N processes compute what one computes (``fit`` syncs BatchNorm statistics).
"""

from __future__ import annotations

import atexit
import math
import os
import re
import sys
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from slim2deploy.base.errors import SlimError, one_line
from slim2deploy.model.data import Dataset, Stats, check_stats, load_dataset
from slim2deploy.model.images import TINY_SIDE, center_view, check_crop_fits, note_tiny, open_rgb, scan_folder

STREAM_ABOVE_BYTES = 1 << 30
STATS_SAMPLE = 256  # images the normalisation of a streamed folder is estimated from
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults


def _crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop, as torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif ratio > RRC_RATIO[1]:
        w, h = int(round(height * RRC_RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class FolderData(torch.utils.data.Dataset):
    """A folder split as a map-style dataset; items are (index, epoch) with epoch < 0 for no augmentation."""

    files: list[Path]
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    crop: int
    name: str = ""
    seed: int = 0
    workers: int = 0
    meta: dict[str, object] = field(default_factory=dict)
    _loaders: dict[tuple[int, bool, bool, int, int], DataLoader] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return 3, self.crop, self.crop

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n: int | None) -> FolderData:
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise SlimError(f"a subset needs at least one image, got {n}")
        return FolderData(**{**self.__dict__, "files": self.files[:n], "labels": self.labels[:n], "_loaders": {}})

    def pixels(self, index: int, epoch: int = -1) -> torch.Tensor:
        """Image ``index`` as float C x H x W in [0, 1]: augmented for ``epoch`` >= 0, else the eval view."""
        from torchvision.transforms import functional as TF

        img = open_rgb(self.files[index])
        if epoch >= 0:
            rng = np.random.default_rng([self.seed, epoch, index])
            top, left, h, w = _crop_box(img.width, img.height, rng)
            img = TF.resized_crop(img, top, left, h, w, [self.crop, self.crop], antialias=True)
            if rng.random() < 0.5:
                img = TF.hflip(img)
        else:
            img = center_view(img, self.image_size, self.crop)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = item
        x = self.pixels(index, epoch)
        m = torch.tensor(self.mean).view(-1, 1, 1)
        s = torch.tensor(self.std).view(-1, 1, 1)
        return (x - m) / s, int(self.labels[index])

    def stack(self, indices: Iterable[int]) -> np.ndarray:
        """The eval view of the chosen images, normalised, as one float32 N x C x H x W array."""
        return np.stack([self[(int(i), -1)][0].numpy() for i in indices]).astype(np.float32)

    def batches(
        self, batch_size: int, *, shuffle: bool, epoch: int = 0, augment: bool = False, rank: int = 0, world: int = 1
    ) -> Batches:
        """This rank's batches of one epoch (the module docstring says which images each rank gets).

        The DataLoader is made once per configuration and kept, so its workers persist across epochs
        (until ``close``).
        """
        key = (batch_size, shuffle, augment, rank, world)
        if key not in self._loaders:
            _WITH_WORKERS[id(self)] = self
            sampler: DistributedSampler[int] = DistributedSampler(
                self, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=shuffle
            )
            self._loaders[key] = DataLoader(
                self,
                batch_size=batch_size,
                sampler=_WithEpoch(sampler),
                drop_last=shuffle,
                num_workers=self.workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=self.workers > 0,
                worker_init_fn=_worker_init,
            )
        loader = self._loaders[key]
        assert isinstance(loader.sampler, _WithEpoch)
        loader.sampler.set_epoch(epoch, augment)
        return Batches(loader)

    def close(self) -> None:
        """Stop the worker processes of this split's loaders (they are made again when asked for).

        Dropping the last reference to a DataLoader shuts its persistent workers down in order: each
        leaves its loop and removes its own temporary folder (``pymp-*``). Left to the interpreter's
        exit, torch skips that and the workers are killed, which leaves the folders behind.
        """
        self._loaders.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaders": {}}  # workers get the data, not the loaders


_WITH_WORKERS: weakref.WeakValueDictionary[int, FolderData] = weakref.WeakValueDictionary()


@atexit.register  # registered after torch's own exit hook, so it runs first, while workers can still be stopped
def close_loaders() -> None:
    """Stop the workers of every streamed folder (they start again when batches are asked for).

    A pipeline calls this when a stage ends: left to the garbage collector, the workers of a dataset no
    longer used are stopped wherever it happens to run, and inside an import torch waited 5 s for each
    (measured: 20 of a build's 35 s on a 96-image folder).
    """
    for ds in list(_WITH_WORKERS.values()):
        ds.close()


# torch re-raises an error of a worker process in the main one as "Caught T in DataLoader worker process N."
# followed by the worker's whole traceback; the user is owed the error's own line
_FROM_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")


class Batches:
    """A DataLoader's batches; an error raised in a worker process reaches the caller as one SlimError
    with the worker's own message, not torch's wrapper and the worker's traceback."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.loader
        except Exception as exc:
            if not _FROM_WORKER.match(str(exc)):
                raise
            raise SlimError(worker_message(str(exc))) from None


def worker_message(text: str) -> str:
    """The message of the error a worker raised, from torch's re-raised text of it (see ``Batches``)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith("Traceback (most recent call last):")]
    tail = lines[starts[-1] + 1 :] if starts else lines[1:]
    first = next((i for i, line in enumerate(tail) if not line.startswith(" ")), 0)  # after the frames
    kind, _, message = " ".join(tail[first:]).partition(": ")
    if kind.rsplit(".", 1)[-1] == SlimError.__name__:
        return message
    return f"a data loading worker failed: {kind.rsplit('.', 1)[-1]}: {message}"


class _WithEpoch(Sampler[tuple[int, int]]):
    """Pairs each index with the epoch whose augmentation it gets (-1: none); iterated in the main process."""

    def __init__(self, inner: DistributedSampler[int]):
        self.inner, self.epoch = inner, -1

    def set_epoch(self, epoch: int, augment: bool) -> None:
        self.inner.set_epoch(epoch)
        self.epoch = epoch if augment else -1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, self.epoch) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training threads
    sys.excepthook = _worker_excepthook


def _worker_excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """What a worker's own threads report (errors reading images come through the main process, ``Batches``).
    The thread that hands tensors over loses its connection when the main process is interrupted, which
    says why itself; anything else is one line."""
    if not issubclass(kind, ConnectionError | EOFError):
        print(f"a data loading worker failed: {kind.__name__}: {one_line(str(value))}", file=sys.stderr)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _estimate_stats(ds: FolderData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    picks = np.unique(np.linspace(0, len(ds) - 1, min(STATS_SAMPLE, len(ds))).astype(int))
    x = torch.stack([ds.pixels(int(i)) for i in picks])
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-6) for v in x.std(dim=(0, 2, 3)))
    return mean, std


def decoded_bytes(root: Path, image_size: int | None, crop: int | None) -> int:
    """What the whole folder would take as one float32 tensor (the in-memory loader's layout): both splits,
    listed as the loaders list them (``images.scan_folder``: links to class folders followed)."""
    files = scan_folder(root, "train")[0]
    if (root / "train").is_dir() == (root / "val").is_dir():  # train/ + val/, or one folder split 90/10
        files += scan_folder(root, "val")[0]
    side = crop or image_size
    if side is None:
        first = open_rgb(files[0])
        return len(files) * 3 * first.width * first.height * 4
    return len(files) * 3 * side * side * 4


def open_folder(
    root: Path,
    split: str,
    *,
    image_size: int | None = None,
    crop: int | None = None,
    stats: Stats = None,
    seed: int = 0,
    workers: int | None = None,
) -> FolderData:
    """A streaming view of ``split`` of an image folder; ``stats`` = the training normalisation."""
    files, labels, classes = scan_folder(root, split)
    if (image_size is not None and image_size < 1) or (crop is not None and crop < 1):
        raise SlimError(f"`image_size` and `crop` must be positive, got {image_size} and {crop}")
    if crop is None and image_size is None:
        first = open_rgb(files[0])
        image_size = min(first.width, first.height)
    crop = crop or image_size
    image_size = image_size or crop
    assert crop is not None and image_size is not None
    check_crop_fits(image_size, crop)
    if crop < TINY_SIDE:  # only then is an image opened, for scale
        note_tiny(root, crop, open_rgb(files[0]))
    n_workers = default_workers() if workers is None else workers
    if n_workers < 0:
        raise SlimError(f"`workers` must be >= 0, got {n_workers}")
    ds = FolderData(files, labels, classes, (0.0,), (1.0,), image_size, crop, f"folder:{root}", seed, n_workers)
    check_stats(stats, ds.input_shape, str(root))
    ds.mean, ds.std = stats if stats is not None else _estimate_stats(ds)
    ds.meta = {"loader": "stream", "image_size": image_size, "crop": crop}
    return ds


AnyData = Dataset | FolderData


def load_data(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int | None = None,
    stats: Stats = None,
    *,
    stream: bool | None = None,
    crop: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> AnyData:
    """``data.load_dataset``, or a ``FolderData`` for a folder that streams (``stream=None``: by size).

    ``crop`` (also recorded by ``import`` for the model's input size) is ignored for non-folder sources.
    """
    path = Path(name.split(":", 1)[1] if name.startswith("folder:") else name)
    if not path.is_dir():
        if stream:
            raise SlimError(f"`stream` is for image folders; {name!r} is not a folder")
        return load_dataset(name, split, data_dir, image_size, stats)  # --crop only shapes folder images
    if stream is None:
        stream = decoded_bytes(path, image_size, crop) > STREAM_ABOVE_BYTES
    if not stream:
        return load_dataset(name, split, data_dir, image_size, stats, crop=crop)
    return open_folder(path, split, image_size=image_size, crop=crop, stats=stats, seed=seed, workers=workers)


def check_fits(
    ds: AnyData, input_shape: Sequence[int], num_classes: int | None, source: str, classes: Sequence[str] | None = None
) -> AnyData:
    """Data for a model that exists: its images must be the model's input and its labels the model's
    classes (a label past the last output is an IndexError deep in training, or 0% accuracy).

    ``classes``, the model's class names (its checkpoint's ``meta["classes"]``), must match an image
    folder's class folders index by index: labels are numbered by folder name, so a folder lacking
    one of the model's classes would shift every later class onto the wrong output. Models named
    only by numbers (imported ones, .npz-trained ones) have no names to compare.
    """
    # meta is free-form: anything but a list of names (an edited checkpoint) is not compared
    names = list(classes) if isinstance(classes, list) and all(isinstance(c, str) for c in classes) else []
    named = names != [str(i) for i in range(len(names))]
    if named and ds.name.startswith("folder:") and list(ds.classes) != names[: len(ds.classes)]:
        raise SlimError(
            f"{source} has class folders {', '.join(ds.classes)} but the model's classes are {', '.join(names)}: "
            "its labels would mean other classes; give data with the model's class folders"
        )
    if tuple(ds.input_shape) != tuple(input_shape):
        raise SlimError(
            f"{source} has {tuple(ds.input_shape)} images (C, H, W) but the model takes {tuple(input_shape)}; "
            "give data of the model's own kind (a folder's images are resized to the model's size unless "
            "`image_size` says otherwise: leave it out)"
        )
    if num_classes is not None and ds.num_classes > num_classes:
        raise SlimError(
            f"{source} has {ds.num_classes} classes (labels up to {ds.num_classes - 1}) but the model has "
            f"{num_classes} outputs; give data labelled with the model's classes 0..{num_classes - 1}"
        )
    return ds


def labels_of(ds: AnyData) -> np.ndarray:
    """The labels of a data set, without decoding a streamed folder's images."""
    return ds.y.numpy() if isinstance(ds, Dataset) else np.asarray(ds.labels)


def majority_share(ds: AnyData) -> float:
    """Top-1 of always answering the most common class of ``ds``: what a model that learnt nothing scores."""
    labels = labels_of(ds)
    return float(np.bincount(labels.astype(np.int64)).max() / len(labels)) if len(labels) else 0.0


def check_classes_to_learn(ds: AnyData, source: str) -> None:
    """Training data must hold images of at least two classes: with one, every prediction is right whatever
    the model does (accuracy 1.000), and nothing is learnt."""
    present = np.unique(labels_of(ds))
    if len(present) < 2:
        name = ds.classes[int(present[0])] if len(present) and int(present[0]) < len(ds.classes) else "?"
        raise SlimError(
            f"{source} has training images of one class only ({name}): a model learns nothing from it (its "
            "accuracy would read 1.000 whatever it does); give images of at least two classes"
        )


def describe(ds: AnyData) -> str:
    """One line saying which loader is used and what holding the set in memory would cost."""
    size = len(ds) * math.prod(ds.input_shape) * 4
    if isinstance(ds, FolderData):
        return (
            f"data: streaming {len(ds)} images from {ds.name.removeprefix('folder:')} with {ds.workers} workers "
            f"(decoded they would take {size / 2**30:.2f} GiB)"
        )
    return f"data: {len(ds)} images of {ds.name or 'the dataset'} in memory ({size / 2**20:.0f} MiB)"


def sample_arrays(ds: AnyData, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as numpy arrays: everything for in-memory data, the first ``n`` images of a streamed folder."""
    if isinstance(ds, Dataset):
        return ds.x.numpy(), ds.y.numpy()
    idx = range(min(len(ds), n or len(ds)))
    return ds.stack(idx), ds.labels[: len(idx)]
