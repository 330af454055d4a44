"""Calibration sets: a small, fixed sample of preprocessed training inputs for int8 calibration.

Format (see ``calib/README.md``): an ``.npz`` file with ``x``, float32 N x C x H x W, preprocessed
exactly as the model's training inputs, and optionally ``y`` (int64 labels), ``mean`` and ``std``
(the per-channel normalisation that produced ``x``, for the record).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_path
from slim2deploy.model.data import Dataset, Stats, check_layout, check_varied, read_npz
from slim2deploy.model.folder import labels_of, load_data

# Preprocessed (normalised) inputs sit within a few units of zero; raw 0..255 pixels do not.
PLAUSIBLE_ABS_MAX = 50.0
# Fewer images are refused: minmax takes each activation's extremes over the set and percentile/entropy a
# histogram of it, so ranges from 1-2 images are those images' own outliers, and int8 clips what other inputs
# reach. 8 is a floor, not a recommendation (the calib command makes 512 by default).
MIN_CALIB_IMAGES = 8


def stratified_indices(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices drawn at random with each class represented in proportion to its frequency."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    # hand out the rounding remainder to the classes with the largest fractional share
    remainder = n - int(quota.sum())
    frac = counts / counts.sum() * n - quota
    quota[np.argsort(-frac, kind="stable")[:remainder]] += 1
    picked = [
        rng.choice(np.flatnonzero(y == c), size=min(q, cnt), replace=False)
        for c, q, cnt in zip(classes, quota, counts, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def make_calib_set(
    dataset_name: str,
    n: int,
    out: str | Path,
    data_dir: str | None = None,
    seed: int = 0,
    *,
    image_size: int | None = None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    stream: bool | None = None,
    crop: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> Path:
    """Write ``n`` training images of ``dataset_name`` (stratified by label, seeded) to ``out``.

    ``stats`` = (mean, std) must be the model's training normalisation for sources whose
    statistics are computed from the data (folders, .npz); Fashion-MNIST uses its standard values.
    A streamed folder is not decoded whole: the labels come from the folder names and only the
    ``n`` picked images are read, in their evaluation view (resize + center crop).
    """

    if n <= 0:
        raise SlimError(f"a calibration set needs at least one image, got --n {n}")
    if n < MIN_CALIB_IMAGES:
        raise SlimError(
            f"a calibration set of {n} images gives int8 the ranges of those images alone; use --n 8 or more"
        )
    out = Path(out)
    if out.suffix != ".npz":
        raise SlimError(f"calibration sets are .npz files; name the output like {out.with_suffix('.npz')}")
    if stream is None and crop is not None and Path(dataset_name.removeprefix("folder:")).is_dir():
        stream = True  # a crop gives both loaders one view; streamed, only the n picked images are decoded
    ds = load_data(dataset_name, "train", data_dir, image_size, stats, stream=stream, crop=crop)
    if n > len(ds):
        raise SlimError(f"{dataset_name} has only {len(ds)} training images; ask for at most that many (--n)")
    y = labels_of(ds)
    idx = stratified_indices(y, n, seed)
    arrays = {
        "x": (ds.x.numpy()[idx] if isinstance(ds, Dataset) else ds.stack(idx)).astype(np.float32),
        "y": y[idx].astype(np.int64),
        "mean": np.asarray(ds.mean, dtype=np.float32),
        "std": np.asarray(ds.std, dtype=np.float32),
    }
    check_calib(arrays["x"], input_shape, dataset_name)  # before writing: no unusable set on disk
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return out


def load_calib(path: str | Path, input_shape: tuple[int, int, int] | None = None, stats: Stats = None) -> np.ndarray:
    """Read ``x`` from a calibration set and check it fits a model taking ``input_shape`` = (C, H, W)
    whose inputs are normalised with ``stats`` = (mean, std)."""
    path = Path(path)
    if not path.exists():
        raise SlimError(f"no such calibration set: {path} (make one with 'slim2deploy calib')")
    arrays = read_npz(path, "calibration set")
    if "x" not in arrays:
        raise SlimError(f"{path} has no array 'x' (it has {sorted(arrays)}); see calib/README.md")
    x = check_calib(arrays["x"], input_shape, str(path))
    if stats is not None:
        check_recorded_stats(arrays, stats, path)
    return x


def check_recorded_stats(
    arrays: dict[str, np.ndarray], stats: tuple[Sequence[float], Sequence[float]], path: Path
) -> None:
    """A set whose recorded mean/std differ from the model's was normalised for another model: int8 ranges
    measured on it are off, and the accuracy drop is silent. A set that records none cannot be checked."""
    for name, own in zip(("mean", "std"), stats, strict=True):
        if name not in arrays:
            continue
        try:
            recorded = np.asarray(arrays[name], dtype=np.float64).ravel()
            same = recorded.shape == (len(own),) and bool(np.allclose(recorded, own, rtol=1e-4, atol=1e-6))
        except (TypeError, ValueError):  # a mean that is no numbers
            same = False
        if not same:
            raise SlimError(
                f"{path} records {name} {np.array2string(np.asarray(arrays[name]), precision=4)} but the model's "
                f"{name} is {[round(v, 4) for v in own]}: it was normalised for another model; re-make it with "
                "'slim2deploy calib'"
            )


def check_calib(
    x: np.ndarray, input_shape: tuple[int, int, int] | None = None, source: str = "calibration set"
) -> np.ndarray:
    """Validate calibration inputs: float32, N x C x H x W matching ``input_shape``, finite, varied, normalised."""
    if x.dtype != np.float32:
        raise SlimError(
            f"{source}: x has dtype {x.dtype}, but calibration inputs must be float32 preprocessed exactly "
            "like the training inputs; re-create it with 'slim2deploy calib'"
        )
    if x.ndim != 4 or len(x) == 0:
        raise SlimError(f"{source}: x must be N x C x H x W with N >= 1, got shape {x.shape}")
    check_layout(x.shape, source)
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise SlimError(
            f"{source}: images are {tuple(x.shape[1:])} (C, H, W) but the model takes {tuple(input_shape)}; "
            "use a calibration set made from the model's own dataset"
        )
    if not np.isfinite(x).all():
        raise SlimError(f"{source}: x contains NaN or infinite values; re-create it")
    peak = float(np.abs(x).max())
    if peak > PLAUSIBLE_ABS_MAX:
        raise SlimError(
            f"{source}: values reach {peak:.1f}, which looks like raw pixels rather than normalised inputs; "
            "calibration data must be preprocessed like the training data (see calib/README.md)"
        )
    if len(x) < MIN_CALIB_IMAGES:
        raise SlimError(
            f"{source}: {len(x)} images, but a calibration set needs at least {MIN_CALIB_IMAGES}: int8 ranges "
            "from so few are those images' own; make a larger one with 'slim2deploy calib'"
        )
    # identical images give int8 no activation ranges, and agreement measured on them is 100% whatever
    check_varied(x, source)
    return x
