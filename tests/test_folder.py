"""The streaming image-folder loader: lazy, repeatable, and the same global batches under torchrun."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.calib import make_calib_set, stratified_indices
from slim2deploy.model import folder
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.data import Dataset
from slim2deploy.model.folder import FolderData, describe, load_data, scan_folder
from slim2deploy.model.preprocess import preprocess_meta

CLASSES = 4


def make_folder(root, per_class, seed=0, size=(20, 30)):
    """Class folders of RGB PNGs of varied sizes, each class with its own bright quadrant."""
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(size[0], size[1], 2)
            img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
            r, q = (c // 2) * h // 2, (c % 2) * w // 2
            img[r : r + h // 2, q : q + w // 2] += 140
            Image.fromarray(img).save(root / f"c{c}" / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder") / "imgs", per_class=30)


def _sorted_rows(x, y):
    key = x.flatten(1).double() @ torch.linspace(1, 2, x[0].numel(), dtype=torch.double)
    order = torch.argsort(key)
    return x[order], y[order]


def test_two_ranks_together_get_exactly_the_global_batch_of_one(images):
    ds = load_data(str(images), "train", image_size=18, crop=16, stream=True, workers=0, seed=5)
    assert isinstance(ds, FolderData) and ds.input_shape == (3, 16, 16)
    for epoch in (0, 1):
        whole = list(ds.batches(8, shuffle=True, epoch=epoch, augment=True))
        ranks = [list(ds.batches(4, shuffle=True, epoch=epoch, augment=True, rank=r, world=2)) for r in (0, 1)]
        assert len(whole) == len(ranks[0]) == len(ranks[1]) == len(ds) // 8
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks, strict=True):
            a, b = _sorted_rows(x, y), _sorted_rows(torch.cat([x0, x1]), torch.cat([y0, y1]))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    first, second = (next(iter(ds.batches(8, shuffle=True, epoch=e, augment=True)))[0] for e in (0, 1))
    assert not torch.equal(first, second)  # a new permutation and new crops every epoch


def test_workers_do_not_change_what_is_read(images):
    kw = {"image_size": 18, "crop": 16, "stream": True, "seed": 1}
    serial = load_data(str(images), "train", workers=0, **kw)
    parallel = load_data(str(images), "train", workers=2, **kw)
    for epoch in (0, 1):  # the second epoch reuses the persistent workers
        a = list(serial.batches(16, shuffle=True, epoch=epoch, augment=True))
        b = list(parallel.batches(16, shuffle=True, epoch=epoch, augment=True))
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


def test_eval_view_is_resize_then_center_crop_normalised_with_the_training_statistics(images):
    train = load_data(str(images), "train", image_size=24, crop=20, stream=True, workers=0)
    val = load_data(str(images), "val", image_size=24, crop=20, stream=True, stats=(train.mean, train.std))
    assert isinstance(val, FolderData) and val.mean == train.mean and len(val) + len(train) == 4 * 30
    x, y = next(iter(val.batches(len(val), shuffle=False)))
    assert torch.equal(y, torch.from_numpy(val.labels))
    with Image.open(val.files[0]) as img:
        rgb = img.convert("RGB")
    scale = 24 / min(rgb.size)
    w, h = round(rgb.width * scale), round(rgb.height * scale)
    assert max(w, h) >= 24 and min(w, h) == 24
    raw = x[0] * torch.tensor(val.std).view(3, 1, 1) + torch.tensor(val.mean).view(3, 1, 1)
    assert raw.shape == (3, 20, 20) and float(raw.min()) > -1e-5 and float(raw.max()) < 1 + 1e-5
    assert np.allclose(val.stack([0])[0], x[0].numpy(), atol=1e-6)


def test_the_loader_is_chosen_by_size_and_said(images, monkeypatch):
    small = load_data(str(images), "train", image_size=16)
    assert isinstance(small, Dataset) and "in memory" in describe(small)
    monkeypatch.setattr(folder, "STREAM_ABOVE_BYTES", 1000)
    big = load_data(str(images), "train", image_size=16, workers=0)
    assert isinstance(big, FolderData) and "streaming" in describe(big)
    assert isinstance(load_data(str(images), "train", image_size=16, stream=False), Dataset)
    for stream in (True, False):
        with pytest.raises(SlimError, match="larger than `image_size`"):
            load_data(str(images), "train", image_size=16, crop=20, stream=stream, workers=0)


def test_a_small_folder_with_a_crop_is_decoded_once_into_the_streamed_eval_view(images):
    """A crop (``import`` records one) no longer forces streaming: a folder that fits in memory is decoded
    once, each image as the streamed loader's eval view (shorter side resized, center crop), and a checkpoint
    records the crop so later stages read it the same way."""
    held = load_data(str(images), "train", image_size=18, crop=16)
    assert isinstance(held, Dataset) and held.input_shape == (3, 16, 16)
    kw = {"image_size": 18, "crop": 16, "stream": True, "workers": 0}
    streamed = load_data(str(images), "train", stats=(held.mean, held.std), **kw)
    assert isinstance(streamed, FolderData)
    assert np.allclose(held.x[:5].numpy(), streamed.stack(range(5)), atol=1e-6)
    assert preprocess_meta(held) == {"stream": False, "image_size": 18, "crop": 16}
    squashed = load_data(str(images), "train", image_size=16)  # no crop: the whole image resized, not cropped
    assert squashed.input_shape == (3, 16, 16) and not np.allclose(squashed.x[:5].numpy(), held.x[:5].numpy())


@pytest.mark.parametrize("stream", [True, None])  # None: a crop (import records one) streams a calibration set
def test_calib_from_a_streamed_folder_reads_only_the_images_it_picks(tmp_path, stream):
    root = make_folder(tmp_path / "imgs", per_class=12, seed=3)
    files, labels, _ = scan_folder(root, "train")
    n = 8
    picked = stratified_indices(labels, n, seed=0)
    # a corrupt image the sample does not pick: decoding the whole folder would fail on it
    victim = next(i for i in range(len(files)) if i not in set(picked))
    files[victim].write_bytes(b"not a png")
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    out = make_calib_set(str(root), n, tmp_path / "c.npz", stats=stats, image_size=18, crop=16, stream=stream)
    with np.load(out) as z:
        x, y = z["x"], z["y"]
    assert x.shape == (n, 3, 16, 16) and x.dtype == np.float32
    assert np.array_equal(y, labels[picked]) and len(set(y.tolist())) == CLASSES  # stratified: every class
    ds = load_data(str(root), "train", image_size=18, crop=16, stream=True, stats=stats)
    assert isinstance(ds, FolderData) and np.array_equal(x, ds.stack(picked))


def test_torchrun_two_processes_train_what_one_does_on_a_streamed_folder(tmp_path, images):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = [
        "train", "--arch", "vgg11", "--width", "0.125", "--sparsity", "1e-3", "--seed", "3", "--data", str(images),
        "--stream", "--image-size", "18", "--crop", "16", "--workers", "1", "--epochs", "1", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "slim2deploy", *common, "--batch-size", "16", "--out", str(one)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert "data: streaming" in single.stderr + single.stdout
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "slim2deploy", *common, "--batch-size", "8", "--out", str(two)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert b.meta["world_size"] == 2 and b.meta["preprocess"] == {"stream": True, "image_size": 18, "crop": 16}
    worst = max(float((a.state_dict[k].float() - b.state_dict[k].float()).abs().max()) for k in a.state_dict)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("stream", [False, True])
def test_16_bit_png_is_read_in_its_real_range_not_clipped(tmp_path, stream):
    """A 16-bit grayscale PNG (mode I;16) lands in the same 0..1 range as 8-bit images: convert("RGB")
    alone clips it at 255, so nearly every pixel would be white."""
    rng = np.random.default_rng(0)
    wide = {}
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 65536, (8, 8)).astype(np.uint16)
            Image.fromarray(pixels).save(tmp_path / c / f"{i}.png")
            wide[tmp_path / c / f"{i}.png"] = pixels
    assert Image.open(next(iter(wide))).mode.startswith("I")  # a real 16-bit file, as PIL reads it
    ds = load_data(str(tmp_path), "train", stats=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), stream=stream, workers=0)
    files, _, _ = scan_folder(tmp_path, "train")
    x = torch.stack([ds.pixels(i) for i in range(len(ds))]) if stream else ds.x
    expected = torch.stack([torch.from_numpy(wide[f] / 65535.0).float().expand(3, 8, 8) for f in files])
    assert torch.allclose(x, expected, atol=1 / 255)


def test_val_labels_follow_the_training_classes_by_name(tmp_path):
    """val/ without one of train/'s classes keeps each class's own index; a class unknown to train/ is refused."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", "abc"), ("val", "c")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(
                    tmp_path / split / c / f"{i}.png"
                )
    for stream in (False, True):
        val = load_data(str(tmp_path), "val", stream=stream, workers=0)
        labels = val.y.tolist() if isinstance(val, Dataset) else val.labels.tolist()
        assert val.classes == ["a", "b", "c"] and labels == [2, 2]
    (tmp_path / "val" / "d").mkdir()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(tmp_path / "val" / "d" / "0.png")
    with pytest.raises(SlimError, match="class folders d that .*train lacks"):
        load_data(str(tmp_path), "val")


def test_every_listed_format_is_read_and_other_files_are_named_in_one_note(tmp_path):
    """PNG, JPEG, BMP, GIF, TIFF and WebP images are all read; a text or JSON file beside them is skipped
    with one note by extension, a hidden file (macOS '._x.png' junk included) silently."""
    from helpers import run_cli

    rng = np.random.default_rng(0)
    formats = [".png", ".jpg", ".bmp", ".gif", ".tif", ".tiff", ".webp"]
    for c in ("a", "b"):
        d = tmp_path / "data" / "train" / c
        d.mkdir(parents=True)
        for i, ext in enumerate(formats):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(d / f"{i}{ext}")
        (d / "._0.png").write_bytes(b"AppleDouble, not a PNG")
        (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "data" / "train" / "a" / "labels.txt").write_text("a\n")
    (tmp_path / "data" / "train" / "b" / "notes.txt").write_text("b\n")
    (tmp_path / "data" / "train" / "b" / "meta.json").write_text("{}")
    out = tmp_path / "c.npz"
    n = 2 * len(formats)
    proc = run_cli("calib", "--data", str(tmp_path / "data"), "--n", str(n), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: skipped 3 files under "), proc.stderr
    assert "that are not images (.txt: 2, .json: 1); the loader reads .bmp, .gif" in notes[0]
    assert np.load(out)["x"].shape == (n, 3, 8, 8)


def test_hidden_folders_are_not_classes(tmp_path, capsys):
    """A '.ipynb_checkpoints' (or '.git') folder beside the class folders is not a class: as the first
    folder by name it would take label 0 and shift every real class by one. One note says so; data
    with only hidden folders is still 'no class sub-folders'."""
    rng = np.random.default_rng(0)
    for c in (".ipynb_checkpoints", "a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    for stream in (False, True):
        ds = load_data(str(tmp_path / "data"), "train", stream=stream, workers=0)
        labels = ds.y.tolist() if isinstance(ds, Dataset) else ds.labels.tolist()
        assert ds.classes == ["a", "b"] and sorted(set(labels)) == [0, 1] and ds.num_classes == 2
    notes = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert notes == [f"note: {tmp_path / 'data'}: hidden folder .ipynb_checkpoints not read as classes"]
    # the in-memory / streaming choice counts only what is read: 20 images of 3x8x8 float32
    assert folder.decoded_bytes(tmp_path / "data", 8, None) == 20 * 3 * 8 * 8 * 4
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / ".git").mkdir()
    with pytest.raises(SlimError, match="has no class sub-folders"):
        load_data(str(tmp_path / "only"), "train")


def test_a_build_stage_stops_the_workers_it_started_when_it_ends(images, tmp_path):
    """Left to the garbage collector, persistent workers are stopped wherever it runs: inside an import
    torch waited 5 s for each. A build stops them when the stage that used them ends."""
    from slim2deploy.base.cache import StageCache
    from slim2deploy.pipeline.build_inputs import BuildResult
    from slim2deploy.pipeline.build_stages import Run

    ds = load_data(str(images), "train", image_size=18, crop=16, stream=True, workers=2)
    started = []

    def work():
        assert len(list(ds.batches(8, shuffle=True, epoch=0, augment=True))) == len(ds) // 8
        started.extend(loader._iterator._workers for loader in ds._loaders.values())
        return {}

    run = Run(None, tmp_path, None, StageCache(tmp_path / "build.json", print), print, BuildResult(tmp_path))
    run.cached("finetune", "finetune", "key", [], work, "unchanged")
    workers = [w for ws in started for w in ws]
    assert len(workers) == 2 and not any(w.is_alive() for w in workers) and ds._loaders == {}
    assert len(list(ds.batches(8, shuffle=False))) == -(-len(ds) // 8)  # and start again when asked


def test_a_train_val_layout_is_listed_class_by_class_in_turn_so_a_prefix_holds_every_class(tmp_path):
    """`limit_train` and `eval_limit` take the first images: listed class after class they would be the first
    classes only (and a model would be judged on one class)."""
    make_folder(tmp_path / "tv" / "train", per_class=3)
    make_folder(tmp_path / "tv" / "val", per_class=2, seed=1)
    for split, per_class in (("train", 3), ("val", 2)):
        files, labels, _ = scan_folder(tmp_path / "tv", split)
        assert list(labels[:CLASSES]) == list(range(CLASSES)) and len(files) == CLASSES * per_class
        assert sorted(np.bincount(labels)) == [per_class] * CLASSES
        assert all(f.parent.name == f"c{y}" for f, y in zip(files, labels, strict=True))
    held = load_data(str(tmp_path / "tv"), "val", image_size=16).subset(CLASSES)
    assert sorted(held.y.tolist()) == list(range(CLASSES))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("layout", ["flat", "train-val"])
def test_a_size_too_small_to_learn_from_is_warned_once_by_either_loader(tmp_path, capsys, stream, layout):
    root = tmp_path / f"tiny{stream}"
    if layout == "flat":
        make_folder(root, per_class=4)
    else:
        make_folder(root / "train", per_class=3)
        make_folder(root / "val", per_class=2)
    for split in ("train", "val"):
        load_data(str(root), split, image_size=2, stream=stream, workers=0)
    assert capsys.readouterr().err.count("shrunk to 2x2 pixels, too few for a model to learn from") == 1
    load_data(str(root), "train", image_size=8, stream=stream, workers=0)
    assert "warning" not in capsys.readouterr().err
