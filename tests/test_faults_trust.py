"""Trust boundaries and faults: no file outside the output folder is touched, no output replaces what is not a
regular file, no pixels are silently wrong, no poisoned cache is trusted, and every fault ends in one line.

Each refusal: exit status 2, one error line, no traceback, and an unchanged snapshot of the folders involved
(the output folder and, where a path leads out of it, the folder it leads to). Most cases run the CLI's
``main`` in this process; the interrupts and the hangs run real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_refused, bench_script, run_cli, snapshot
from PIL import Image

TRAIN = ["train", "--arch", "vgg11", "--width", "0.125", "--epochs", "1", "--batch-size", "4"]
IMPORT = ["import", "--arch", "vgg11", "--width", "0.125", "--num-classes", "3", "--input-shape", "1,8,8", "--mean",
          "0.5", "--std", "0.25"]  # fmt: skip


def _images(folder: Path, classes: str = "ab", n: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(folder / c / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_checkpoint) -> dict[str, Path]:
    """A tiny checkpoint (1 x 8 x 8 inputs, 3 classes), its state_dict, an .npz of 3 classes, and a profiled
    latency table of the checkpoint (ort-cpu, batch 2)."""
    from slim2deploy.cli import main

    d = tmp_path_factory.mktemp("trust")
    rng = np.random.default_rng(0)
    np.savez(d / "ok.npz", x=rng.integers(0, 255, (48, 1, 8, 8)).astype(np.uint8), y=np.arange(48) % 3)
    ckpt = make_checkpoint(num_classes=3, input_shape=(1, 8, 8), meta={"mean": [0.5], "std": [0.25]})
    shutil.copyfile(ckpt, d / "model.pt")
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], d / "sd.pt")
    assert (
        main(["profile", "--model", str(d / "model.pt"), "--batch", "2", "--no-cache", "--out", str(d / "t.json")]) == 0
    )
    return {"root": d, "ckpt": d / "model.pt", "sd": d / "sd.pt", "npz": d / "ok.npz", "table": d / "t.json"}


@pytest.fixture
def work(base, tmp_path) -> dict[str, Path]:
    """``base`` copied into this test's own folder, with an ``outside`` folder beside it."""
    shutil.copytree(base["root"], tmp_path / "in")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_text("not the tool's to touch\n")
    return {k: tmp_path / "in" / v.relative_to(base["root"]) for k, v in base.items()} | {
        "root": tmp_path / "in",
        "outside": tmp_path / "outside",
        "victim": tmp_path / "outside" / "victim.txt",
        "tmp": tmp_path,
    }


def _bench(args: list[object], capsys) -> tuple[int, str, str]:
    try:
        status = bench_script("latency").main([str(a) for a in args])
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# ---- 1. outputs are regular files inside the folders the user named --------------------------------------------


def _make_special(kind: str, path: Path, victim: Path) -> None:
    if kind == "link to a file":
        path.symlink_to(victim)
    elif kind == "dangling link":
        path.symlink_to(victim.parent / "missing.json")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "device":
        try:  # the kind of node /dev/null is; creating one needs the right to, which a container may lack
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")


SPECIAL = {"link to a file": "a symbolic link to", "dangling link": "a symbolic link to", "fifo": "a FIFO",
           "socket": "a socket", "device": "a character device"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(SPECIAL))
@pytest.mark.parametrize("command", ["inspect --json", "prune --out", "bench/latency.py --json"])
def test_an_output_path_that_is_not_a_regular_file_is_refused(kind, command, work, cli, capsys):
    """The final rename would replace it with a file: the link, not its target; as root, /dev/null itself."""
    out = work["root"] / "out.json"
    _make_special(kind, out, work["victim"])
    before = snapshot(work["root"], work["outside"])
    if command == "inspect --json":
        result = cli("inspect", work["ckpt"], "--json", out)
    elif command == "prune --out":
        result = cli("prune", "--model", work["ckpt"], "--ratio", "0.5", "--out", out)
    else:
        result = _bench([work["ckpt"], "--json", out, "--iters", "2", "--rounds", "1", "--quiet"], capsys)
    line = assert_refused(result, SPECIAL[kind], before, work["root"], work["outside"])
    assert "not a regular file" in line


def test_an_output_replaced_by_a_link_while_it_is_written_is_left_alone(work):
    """``atomic_path`` checks again at the rename: a link put there after the checks is not replaced."""
    from slim2deploy.base.errors import SlimError
    from slim2deploy.base.files import atomic_path

    out = work["root"] / "late.json"
    with pytest.raises(SlimError, match="it is a symbolic link to .*victim.txt, not a regular file"):
        with atomic_path(out) as tmp:
            tmp.write_text("{}")
            before = snapshot(work["root"], work["outside"])
            out.symlink_to(work["victim"])
            before[str(out)] = f"link to {work['victim']}"
            del before[str(tmp)]  # the temporary file goes with the refusal
    assert snapshot(work["root"], work["outside"]) == before


@pytest.fixture(scope="module")
def built(base, tmp_path_factory) -> Path:
    from slim2deploy.cli import main

    out = tmp_path_factory.mktemp("built") / "b"
    args = ["build", "--model", base["ckpt"], "--ratio", "0.5", "--out", out, "--no-bench", "--engine", "off"]
    assert main([str(a) for a in args]) == 0
    return out


def _rebuild(base: dict[str, Path], out: Path) -> list[object]:
    return ["build", "--model", base["ckpt"], "--ratio", "0.5", "--out", out, "--no-bench", "--engine", "off"]


def test_a_build_output_replaced_by_a_link_is_refused_not_followed(base, built, work, cli):
    """report.json, which every build writes again, made a link to a file elsewhere: refused at the rename."""
    out = work["tmp"] / "b"
    shutil.copytree(built, out)
    (out / "report.json").unlink()
    (out / "report.json").symlink_to(work["victim"])
    before = snapshot(out, work["outside"])
    line = assert_refused(cli(*_rebuild(base, out)), "a symbolic link to", before, out, work["outside"])
    assert "report.json" in line


@pytest.mark.parametrize("planted", ["../outside/victim.txt", "{victim}", "sub/../../outside/victim.txt"])
def test_a_build_record_naming_a_file_outside_its_folder_never_deletes_it(planted, base, built, work, cli):
    """build.json is only a cache: an entry whose output name is not a plain file name is ignored, said so."""
    out = work["tmp"] / "b"
    shutil.copytree(built, out)
    state = json.loads((out / "build.json").read_text())
    digest = hashlib.sha256(work["victim"].read_bytes()).hexdigest()
    state["fp16:old"] = {"key": "k", "outputs": {planted.format(**work): digest}, "info": {}}
    (out / "build.json").write_text(json.dumps(state))
    before = snapshot(work["outside"])
    status, stdout, err = cli(*_rebuild(base, out))
    assert status == 0, err
    assert "ignoring malformed entries fp16:old" in stdout
    assert snapshot(work["outside"]) == before


@pytest.mark.parametrize("kind", ["link to a file", "fifo"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused(kind, base, built, work, cli):
    """OUT/.lock gets the pid written into it: through a planted link that would land in another file."""
    out = work["tmp"] / "b"
    shutil.copytree(built, out)
    _make_special(kind, out / ".lock", work["victim"])
    before = snapshot(out, work["outside"])
    assert_refused(cli(*_rebuild(base, out)), "not a lock file", before, out, work["outside"])


# ---- 3. advice about trust only where trust is the question ----------------------------------------------------


@pytest.mark.parametrize("content", ["random bytes", "short text", "truncated"])
@pytest.mark.parametrize("trust", [[], ["--trust-code"]])
def test_a_damaged_weights_file_is_called_damaged_never_pickled(content, trust, work, cli):
    weights = work["root"] / "w.pt"
    data = {
        "random bytes": np.random.default_rng(1).bytes(4096),
        "short text": b"these are not weights\n",
        "truncated": work["sd"].read_bytes()[:700],
    }[content]
    weights.write_bytes(data)
    before = snapshot(work["root"])
    args = [*IMPORT, "--weights", weights, "--out", work["root"] / "i.pt", *trust]
    line = assert_refused(cli(*args), "not a torch weights file", before, work["root"])
    assert "--trust-code" not in line and "pickled objects" not in line


@pytest.mark.parametrize("name", ["w.SAFETENSORS", "w.Safetensors", "w.bin"])
def test_safetensors_weights_are_known_by_their_content_and_any_case_of_suffix(name, work, cli):
    from safetensors.torch import save_file

    state = torch.load(work["sd"], weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, work["root"] / name)
    status, _, err = cli(*IMPORT, "--weights", work["root"] / name, "--out", work["root"] / "i.pt")
    assert status == 0, err
    loaded = torch.load(work["root"] / "i.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ---- 4. images decode by their real mode and depth, or are refused ---------------------------------------------

GRAY = (np.arange(48).reshape(6, 8) * 5 + 7).astype(np.uint8)  # 7..242, every value distinct


def _in_mode(mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image of mode ``mode`` holding GRAY, and the 8-bit gray values it must decode to."""
    g = GRAY.astype(np.float64)
    if mode == "1":
        return Image.fromarray(GRAY > 127).convert("1"), np.where(GRAY > 127, 255, 0)
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return Image.fromarray(GRAY).convert(mode), GRAY
    if mode in ("P", "PA"):
        palette = Image.fromarray(GRAY, "P")
        palette.putpalette([v for i in range(256) for v in (i, i, i)])
        return palette.convert("PA") if mode == "PA" else palette, GRAY
    wide = {
        "I;16": (g * 257).astype(np.uint16),
        "I 8-bit values": g.astype(np.int32),
        "I 16-bit values": (g * 257).astype(np.int32),
        "F in [0, 1]": (g / 255).astype(np.float32),
        "F in 0..255": g.astype(np.float32),
    }[mode]
    return Image.fromarray(wide), GRAY


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I 8-bit values", "I 16-bit values",
         "F in [0, 1]", "F in 0..255"]  # fmt: skip


def test_every_image_mode_decodes_to_its_8_bit_values(tmp_path):
    """Float TIFFs in [0, 1] are not black, 32-bit integer TIFFs of 0..255 are not divided by 257."""
    from slim2deploy.model.folder import open_rgb  # the one decoder of both folder loaders

    wrong = {}
    for i, mode in enumerate(MODES):
        img, want = _in_mode(mode)
        path = tmp_path / f"{i}.tif"
        img.save(path)
        got = np.asarray(open_rgb(path))
        if got.shape != (*GRAY.shape, 3) or not (np.abs(got.astype(int) - want[..., None]) <= 1).all():
            wrong[mode] = got[..., 0].ravel()[:4].tolist()
    assert not wrong, f"decoded wrongly (first pixels): {wrong}; want {GRAY.ravel()[:4].tolist()}"


def test_the_exif_orientation_is_applied(tmp_path):
    from slim2deploy.model.folder import open_rgb

    pixels = np.random.default_rng(2).integers(0, 255, (4, 6, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned left: shown turned 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif.tobytes())
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "turned.png")), np.rot90(pixels, k=-1))


BAD_PIXELS = {
    "I beyond 16 bits": (np.full((8, 8), 70000, np.int32), "32-bit integer pixels 70000..70000"),
    "I negative": (np.arange(64, dtype=np.int32).reshape(8, 8) - 5, "32-bit integer pixels -5..58"),
    "F beyond 0..255": (np.linspace(0, 1000, 64, dtype=np.float32).reshape(8, 8), "float pixels 0..1000"),
    "F NaN": (np.full((8, 8), np.nan, np.float32), "NaN or infinite pixels"),
}


@pytest.mark.parametrize("loader", [[], ["--stream", "--workers", "0"]])
@pytest.mark.parametrize("case", sorted(BAD_PIXELS))
def test_pixels_outside_every_documented_range_are_refused_naming_the_file(case, loader, tmp_path, cli):
    pixels, needle = BAD_PIXELS[case]
    data = _images(tmp_path / "data")
    Image.fromarray(pixels).save(data / "a" / "odd.tif")
    before = snapshot(tmp_path)
    line = assert_refused(cli(*TRAIN, "--data", data, "--out", tmp_path / "t.pt", *loader), needle, before, tmp_path)
    assert "odd.tif" in line


def test_an_image_named_with_a_newline_is_one_error_line(tmp_path, cli):
    data = _images(tmp_path / "data")
    (data / "a" / "bro\nken.png").write_bytes(b"not an image")
    before = snapshot(tmp_path)
    line = assert_refused(cli(*TRAIN, "--data", data, "--out", tmp_path / "t.pt"), "bro\\nken.png", before, tmp_path)
    assert "is not a readable image" in line


@pytest.mark.parametrize("loader", [[], ["--stream", "--workers", "0"]])
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(loader, tmp_path):
    """Opening a FIFO blocks until something writes to it: a real process, which must end by itself."""
    data = _images(tmp_path / "data")
    os.mkfifo(data / "b" / "pipe.png")
    before = snapshot(tmp_path)
    try:
        proc = run_cli(*TRAIN, "--data", str(data), "--out", str(tmp_path / "t.pt"), *loader, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the loader waited on the FIFO")
    assert_refused((proc.returncode, proc.stdout, proc.stderr), "pipe.png is named like an image but is a FIFO",
                   before, tmp_path)  # fmt: skip


def _class_folder_case(case: str, data: Path) -> None:
    if case == "empty":
        (data / "c").mkdir()
    elif case == "link to an empty folder":
        (data.parent / "nothing").mkdir()
        (data / "c").symlink_to(data.parent / "nothing")
    elif case == "link to its parent":
        (data / "c").symlink_to("..")
    elif case == "two names for one folder":
        (data / "c").symlink_to("a")


CLASS_CASES = {
    "empty": "the class folder {data}/c holds no images",
    "link to an empty folder": "the class folder {data}/c holds no images",
    "link to its parent": "the class folder {data}/c holds no images",
    "two names for one folder": "the class folders a and c under {data} are one folder",
}


@pytest.mark.parametrize("loader", [[], ["--stream", "--workers", "0"]])
@pytest.mark.parametrize("case", sorted(CLASS_CASES))
def test_a_class_folder_without_images_of_its_own_is_refused(case, loader, tmp_path, cli):
    """Each class folder is one output of the model: an empty or doubled one would be an output nothing teaches."""
    data = _images(tmp_path / "data")
    _class_folder_case(case, data)
    before = snapshot(tmp_path)
    needle = CLASS_CASES[case].format(data=data)
    assert_refused(cli(*TRAIN, "--data", data, "--out", tmp_path / "t.pt", *loader), needle, before, tmp_path)


def test_a_class_folder_that_is_a_link_to_images_is_read_as_a_class_by_every_count(tmp_path, cli):
    """Followed alike where the loader is chosen (the decoded size) and where images are read."""
    from slim2deploy.model.folder import decoded_bytes

    data = _images(tmp_path / "data")
    _images(tmp_path / "elsewhere", "c", seed=1)
    (data / "c").symlink_to(tmp_path / "elsewhere" / "c")
    assert decoded_bytes(data, None, None) == 3 * 6 * (3 * 8 * 8 * 4)
    for loader in ([], ["--stream", "--workers", "0"]):
        status, _, err = cli(*TRAIN, "--data", data, "--out", tmp_path / "t.pt", *loader)
        assert status == 0, err
        assert torch.load(tmp_path / "t.pt", weights_only=True)["meta"]["classes"] == ["a", "b", "c"]


@pytest.mark.parametrize("source", ["folder", "npz", "npz of labels 2 only", "finetune"])
def test_data_of_a_single_class_is_refused_for_training(source, work, cli):
    root = work["root"]
    x = np.random.default_rng(3).integers(0, 255, (40, 1, 8, 8)).astype(np.uint8)
    np.savez(root / "one.npz", x=x, y=np.full(40, 2 if "2" in source else 0))
    args = [*TRAIN, "--data", root / "one.npz", "--out", root / "t.pt"]
    if source == "folder":
        args = [*TRAIN, "--data", _images(root / "one", "a"), "--out", root / "t.pt"]
    elif source == "finetune":
        args = ["finetune", "--model", work["ckpt"], "--data", root / "one.npz", "--out", root / "f.pt",
                "--epochs", "1", "--batch-size", "4"]  # fmt: skip
    before = snapshot(root)
    assert_refused(cli(*args), "training images of one class only", before, root)


def _calib(path: Path, n: int) -> Path:
    np.savez(path, x=np.random.default_rng(4).standard_normal((n, 1, 8, 8)).astype(np.float32))
    return path


@pytest.mark.parametrize("n", [1, 2, 7])
def test_a_calibration_set_of_a_few_images_is_refused(n, work, cli):
    root = work["root"]
    calib = _calib(root / "few.npz", n)
    before = snapshot(root)
    args = ["export", "--model", work["ckpt"], "--out", root / "q.onnx", "--precision", "int8", "--calib", calib]
    assert_refused(cli(*args), f"{n} images, but a calibration set needs at least 8", before, root)
    args = ["calib", "--data", work["npz"], "--n", n, "--out", root / "c.npz"]
    assert_refused(cli(*args), f"a calibration set of {n} images", before, root)


# ---- 5. a poisoned cache or table is not trusted ---------------------------------------------------------------


def test_cached_cells_that_are_not_positive_milliseconds_are_timed_again(work, cli):
    cache, root = work["root"] / "cells", work["root"]
    args = ["profile", "--model", work["ckpt"], "--batch", "2", "--cache", cache]
    assert cli(*args, "--out", root / "a.json")[0] == 0
    (cached,) = cache.iterdir()
    data = json.loads(cached.read_text())
    poison = [-1.0, float("nan"), 0.0, "fast", None]
    for key, value in zip(sorted(data["cells"]), poison, strict=False):
        data["cells"][key] = value
    cached.write_text(json.dumps(data))
    status, _, err = cli(*args, "--out", root / "b.json")
    assert status == 0, err
    assert f"{len(poison)} cells in {cached} are not positive milliseconds; they are timed again" in err
    cells = [ms for layer in json.loads((root / "b.json").read_text())["layers"] for ms in layer["cells"].values()]
    assert cells and all(isinstance(ms, float) and ms > 0 for ms in cells)
    assert all(isinstance(v, float) and v > 0 for v in json.loads(cached.read_text())["cells"].values())


def _edited_table(table: Path, out: Path, edit) -> Path:
    data = json.loads(table.read_text())
    edit(data)
    out.write_text(json.dumps(data))
    return out


def _zero_cells(d):
    for layer in d["layers"]:
        layer["cells"] = dict.fromkeys(layer["cells"], 0.0)


TABLE_EDITS = {
    "all-zero cells": (_zero_cells, "layers[0].cells["),
    "no layers": (lambda d: d.update(layers=[]), "layers is empty"),
}


@pytest.mark.parametrize("case", sorted(TABLE_EDITS))
def test_a_table_of_zero_cells_or_no_layers_is_refused(case, work, cli):
    edit, needle = TABLE_EDITS[case]
    table = _edited_table(work["table"], work["root"] / "edited.json", edit)
    before = snapshot(work["root"])
    args = ["prune", "--model", work["ckpt"], "--speedup", "1.2", "--profile-batch", "2", "--table", table]
    line = assert_refused(cli(*args, "--out", work["root"] / "s.pt"), needle, before, work["root"])
    assert "profile the model again" in line


# ---- 6. no input is written over -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--out", "--plan-json", "--save-table"])
def test_prune_never_writes_over_its_table(flag, work, cli):
    args = ["prune", "--model", work["ckpt"], "--speedup", "1.2", "--profile-batch", "2", "--table", work["table"]]
    outputs = {"--out": work["root"] / "s.pt", flag: work["table"]}
    before = snapshot(work["root"])
    args += [str(a) for pair in outputs.items() for a in pair]
    assert_refused(cli(*args), f"{flag} {work['table']} is also an input", before, work["root"])


INPUT_CASES = {
    "calib --out is the --model": (["calib", "--data", "{npz}", "--n", "8", "--model", "{run}", "--out", "{run}"],
                                   "--out"),
    "train --out is the --weights": ([*TRAIN, "--data", "{npz}", "--weights", "{sd}", "--out", "{sd}"], "--out"),
    "train --history is the --resume": ([*TRAIN, "--data", "{npz}", "--resume", "{run}", "--out", "{root}/t.pt",
                                         "--epochs", "2", "--history", "{run}"], "--history"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_an_input_file_named_as_an_output_is_refused(case, work, cli):
    """The checkpoint is a real run (it can be resumed), named .npz so that calib would write its set there."""
    template, flag = INPUT_CASES[case]
    run = work["root"] / "run.npz"
    assert cli(*TRAIN, "--data", work["npz"], "--out", run)[0] == 0
    before = snapshot(work["root"])
    line = assert_refused(cli(*[a.format(**work, run=run) for a in template]), "is also an input", before, work["root"])
    assert f"error: {flag} " in line


# ---- 7. what used to end in a traceback --------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content,needle", [(DEEP.encode(), "nested deeper than 64 levels"),
                                            (b'{"version": 1, "meta": "\xff\xfe"}', "is not UTF-8 text")])  # fmt: skip
def test_a_table_nested_beyond_reason_or_not_utf8_is_refused(content, needle, work, cli):
    (work["root"] / "bad.json").write_bytes(content)
    before = snapshot(work["root"])
    args = ["prune", "--model", work["ckpt"], "--speedup", "1.2", "--profile-batch", "2", "--table"]
    assert_refused(cli(*args, work["root"] / "bad.json", "--out", work["root"] / "s.pt"), needle, before, work["root"])


def test_a_cell_cache_nested_beyond_reason_is_ignored_with_a_note(work, cli):
    cache = work["root"] / "cells"
    args = ["profile", "--model", work["ckpt"], "--batch", "2", "--cache", cache, "--out", work["root"] / "a.json"]
    assert cli(*args)[0] == 0
    (cached,) = cache.iterdir()
    cached.write_text(DEEP)
    status, _, err = cli(*args)
    assert status == 0 and "nested deeper than 64 levels" in err, err
    assert "ignoring it, the cells are timed again" in err
    assert json.loads(cached.read_text())["cells"]


def test_a_build_record_nested_beyond_reason_is_ignored_with_a_note(base, built, work, cli):
    out = work["tmp"] / "b"
    shutil.copytree(built, out)
    (out / "build.json").write_text(DEEP)
    status, stdout, err = cli(*_rebuild(base, out))
    assert status == 0 and "nested deeper than 64 levels" in stdout and "every stage runs again" in stdout, err
    assert json.loads((out / "build.json").read_text())["prune"]


def test_an_unwritable_default_cache_is_a_note_not_a_traceback(work, cli, monkeypatch):
    """A read-only home (here: ~/.cache a file, which root cannot write through either) after all the timing."""
    import slim2deploy.measure.targets as targets

    (work["tmp"] / "home").mkdir()
    (work["tmp"] / "home" / ".cache").write_text("a file where the cache folder would be")
    monkeypatch.setattr(targets, "DEFAULT_CACHE", work["tmp"] / "home" / ".cache" / "slim2deploy" / "latency")
    before = snapshot(work["tmp"] / "home")
    status, out, err = cli("profile", "--model", work["ckpt"], "--batch", "2", "--out", work["root"] / "t2.json")
    assert status == 0, err
    assert "timing without keeping the cells" in err and "wrote" in out
    assert snapshot(work["tmp"] / "home") == before


def _edit_checkpoint(src: Path, dst: Path, **changes) -> Path:
    payload = torch.load(src, weights_only=True)
    for key, value in changes.items():
        if key == "state":
            payload["state_dict"] = {**payload["state_dict"], **value}
        elif key == "plan_shape":
            payload["plan"]["input_shape"] = value
        else:
            payload[key] = value
    torch.save(payload, dst)
    return dst


def test_a_tensor_expanded_to_1e11_elements_is_refused_without_allocating(work, cli):
    expanded = torch.zeros(1).expand(10**11)
    ckpt = _edit_checkpoint(work["ckpt"], work["root"] / "x.pt", state={"features.0.weight": expanded})
    before = snapshot(work["root"])
    line = assert_refused(cli("inspect", ckpt), "repeats 1 stored values over 100,000,000,000 elements", before,
                          work["root"])  # fmt: skip
    assert "--trust-code" not in line


@pytest.mark.parametrize("command", ["inspect", "import --weights"])
def test_a_torch_file_larger_than_the_memory_is_refused_before_it_is_read(command, work, cli, monkeypatch):
    """torch files are stored uncompressed: one larger than the machine (here made smaller than the file)
    cannot be loaded."""
    import slim2deploy.base.environment as environment

    monkeypatch.setattr(environment, "physical_memory", lambda: work["sd"].stat().st_size // 2)
    before = snapshot(work["root"])
    if command == "inspect":
        args = ["inspect", work["ckpt"]]
    else:
        args = [*IMPORT, "--weights", work["sd"], "--out", work["root"] / "i.pt"]
    assert_refused(cli(*args), "loading it needs at least", before, work["root"])


@pytest.fixture
def pruned(work, cli) -> Path:
    assert cli("prune", "--model", work["ckpt"], "--ratio", "0.5", "--out", work["root"] / "s.pt")[0] == 0
    return work["root"] / "s.pt"


@pytest.mark.parametrize("shape", [[1, 3, 3], [3, 8, 8], [1, 100_000, 100_000]])
def test_a_plan_whose_input_shape_was_edited_is_refused(shape, pruned, work, cli):
    edited = _edit_checkpoint(pruned, work["root"] / "e.pt", plan_shape=shape)
    before = snapshot(work["root"])
    assert_refused(cli("inspect", edited), f"plan.input_shape {shape!r} differs", before, work["root"])


@pytest.mark.parametrize("which", ["unpruned", "pruned"])
def test_an_input_shape_whose_one_image_pass_cannot_fit_is_refused_before_it(which, pruned, work, cli, monkeypatch):
    """4096 x 4096 gray images: 64 MiB each, but the first convolution's output is 512 MiB; the machine is made
    256 MiB small. Measured on the meta device; the pass itself would take seconds."""
    import slim2deploy.base.environment as environment

    src = work["ckpt"] if which == "unpruned" else pruned
    big = _edit_checkpoint(src, work["root"] / "big.pt", input_shape=[1, 4096, 4096])
    if which == "pruned":
        big = _edit_checkpoint(big, big, plan_shape=[1, 4096, 4096])
    monkeypatch.setattr(environment, "physical_memory", lambda: 256 << 20)
    before = snapshot(work["root"])
    started = time.perf_counter()
    line = assert_refused(cli("inspect", big), "through the model needs at least", before, work["root"])
    assert "the checkpoint's input_shape [1, 4096, 4096]" in line and time.perf_counter() - started < 20


def test_an_input_shape_beyond_any_machine_is_refused_before_it(work, cli):
    huge = _edit_checkpoint(work["ckpt"], work["root"] / "huge.pt", input_shape=[1, 2_000_000, 2_000_000])
    before = snapshot(work["root"])
    assert_refused(cli("inspect", huge), "one image through the model needs at least", before, work["root"])


def test_latency_script_refuses_a_checkpoint_batch_beyond_memory_before_drawing_it(work, capsys):
    before = snapshot(work["root"])
    args = [work["ckpt"], "--batch", f"1,{10**10}", "--iters", "2", "--rounds", "1", "--quiet", "--no-rss"]
    line = assert_refused(
        _bench(args, capsys), f"--bench-batch {10**10}: one batch through model.pt", before, work["root"]
    )
    assert line.startswith("error: ") and "use a smaller --bench-batch" in line


def test_an_error_in_a_data_loading_worker_process_is_its_own_one_line(tmp_path, cli):
    data = _images(tmp_path / "data")
    (data / "b" / "broken.png").write_bytes(b"\x89PNG but not really")
    before = snapshot(tmp_path)
    stats = ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]  # given: no image is read in this process
    args = [*TRAIN, "--data", data, "--out", tmp_path / "t.pt", "--stream", "--workers", "1", *stats]
    line = assert_refused(cli(*args), "broken.png is not a readable image", before, tmp_path)
    assert "DataLoader worker" not in line


@pytest.fixture
def bounded_wait():
    """A reader blocked on a FIFO is interrupted after a minute instead of hanging the test run."""

    def expire(signum, frame):
        raise TimeoutError("the command waited on a FIFO")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


FIFO_INPUTS = {
    "checkpoint": (["inspect", "{fifo}"], "fifo.pt"),
    "weights": ([*IMPORT, "--weights", "{fifo}", "--out", "{root}/i.pt"], "fifo.pt"),
    "data": ([*TRAIN, "--data", "{fifo}", "--out", "{root}/t.pt"], "fifo.npz"),
    "calibration set": (["export", "--model", "{ckpt}", "--out", "{root}/q.onnx", "--precision", "int8", "--calib",
                         "{fifo}"], "fifo.npz"),
    "latency table": (["prune", "--model", "{ckpt}", "--speedup", "1.2", "--profile-batch", "2", "--table", "{fifo}",
                       "--out", "{root}/s.pt"], "fifo.json"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FIFO_INPUTS))
def test_an_input_file_that_is_a_fifo_is_refused_not_waited_on(case, work, cli, bounded_wait):
    template, name = FIFO_INPUTS[case]
    fifo = work["root"] / name
    os.mkfifo(fifo)
    before = snapshot(work["root"])
    args = [a.format(**work, fifo=fifo) for a in template]
    assert_refused(cli(*args), f"{fifo} is a FIFO (named pipe), not a regular file", before, work["root"])


# ---- 8. estimates and bounds ----------------------------------------------------------------------------------


def test_an_npz_that_expands_like_a_zip_bomb_is_refused_before_it_is_read(tmp_path, cli):
    """70 MB of zeros deflate to under 100 kB: refused from the zip directory, not after reading it all."""
    y = np.arange(1_100_000) % 3
    with open(tmp_path / "bomb.npz", "wb") as f:
        np.savez_compressed(f, x=np.zeros((1_100_000, 1, 8, 8), np.uint8), y=y)
    assert (tmp_path / "bomb.npz").stat().st_size < 5_000_000
    before = snapshot(tmp_path)
    args = [*TRAIN, "--data", tmp_path / "bomb.npz", "--out", tmp_path / "t.pt"]
    assert_refused(cli(*args), "x.npy expands", before, tmp_path)


def test_an_npz_member_declaring_more_than_it_holds_is_refused_before_allocating(tmp_path, cli):
    """numpy allocates what a member's header declares (here 1 TB) before it reads the 100 bytes there are."""
    header = tmp_path / "x.npy"
    with open(header, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**12,)})
        f.write(bytes(100))
    with zipfile.ZipFile(tmp_path / "lies.npz", "w") as z:
        z.write(header, "x.npy")
        with z.open("y.npy", "w") as member:
            np.save(member, np.arange(10) % 3)
    before = snapshot(tmp_path)
    args = [*TRAIN, "--data", tmp_path / "lies.npz", "--out", tmp_path / "t.pt"]
    assert_refused(cli(*args), "x.npy declares an array of 931.3 GiB but holds", before, tmp_path)


def test_the_onnx_memory_estimate_is_not_below_the_measured_peak(work, cli):
    """One small case of bench/onnx_memory.py (which measures more models and batches)."""
    from slim2deploy.deploy.onnx_info import memory_estimate
    from slim2deploy.measure.memory import peak_rss
    from slim2deploy.runtime.registry import open_runner

    assert cli("export", "--model", work["ckpt"], "--out", work["root"] / "m.onnx")[0] == 0
    estimate = memory_estimate(work["root"] / "m.onnx")
    assert estimate is not None
    for batch in (1, 4096):
        with open_runner(work["root"] / "m.onnx", backend="onnx", device="cpu", threads=1) as runner:
            measured = peak_rss(runner, batch)["ort_peak_rss"]
        assert measured <= estimate.at(batch), (batch, measured, estimate.at(batch))


# ---- 9. interrupts: SIGTERM cleans up as Ctrl-C does --------------------------------------------------------------


def _terminate_when(args: list[str], ready, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the command with TMPDIR=``tmp``; SIGTERM it as soon as ``ready()`` holds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"it ended before the moment to interrupt it: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _left(tmp: Path) -> list[str]:
    """What the process left in its TMPDIR. Not leftovers: torch's compile cache folder, and ``.ses``, which
    ONNX Runtime 1.32 writes there whenever it is imported (a session id, kept on purpose)."""
    return sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_") and p.name != ".ses")


def _one_line(proc: subprocess.CompletedProcess, line: str = "terminated") -> None:
    lines = [ln.rsplit("\r", 1)[-1] for ln in proc.stderr.splitlines()]  # progress bars redraw with \r
    assert proc.returncode == 128 + signal.SIGTERM and lines[-1:] == [line], proc.stderr
    assert "Traceback" not in proc.stderr


def _probing(tmp: Path):
    return lambda: any(p.name.startswith("slim2deploy-probe-") for p in tmp.iterdir())


def test_sigterm_while_profiling_removes_the_probes(work):
    tmp = work["tmp"] / "tmpdir"
    tmp.mkdir()
    args = [sys.executable, "-m", "slim2deploy", "profile", "--model", str(work["ckpt"]), "--batch", "2",
            "--no-cache", "--out", str(work["root"] / "p.json")]  # fmt: skip
    proc = _terminate_when(args, _probing(tmp), tmp)
    _one_line(proc)
    assert _left(tmp) == [] and not (work["root"] / "p.json").exists()


def test_sigterm_while_a_build_profiles_leaves_no_lock_and_no_empty_out(work):
    """The build made --out and had written nothing into it yet: the folder goes again, with its lock."""
    tmp, out = work["tmp"] / "tmpdir", work["tmp"] / "new" / "b"
    tmp.mkdir()
    args = [sys.executable, "-m", "slim2deploy", "build", "--model", str(work["ckpt"]), "--speedup", "1.5",
            "--profile-batch", "2", "--no-cache", "--out", str(out), "--no-bench", "--engine", "off"]  # fmt: skip
    proc = _terminate_when(args, lambda: (out / ".lock").exists() and _probing(tmp)(), tmp)
    _one_line(proc)
    assert _left(tmp) == [] and not (work["tmp"] / "new").exists()


def test_sigterm_while_training_on_a_streamed_folder_stops_the_workers_cleanly(tmp_path):
    """Each DataLoader worker has a temporary folder (pymp-*); killed, a worker leaves it behind.
    TMPDIR is short here: workers bind a Unix socket inside it, and a socket path has at most 107 bytes."""
    tmp = Path(tempfile.mkdtemp(prefix="s2d-", dir="/tmp"))
    try:
        data = _images(tmp_path / "data", n=40)
        args = [sys.executable, "-m", "slim2deploy", *TRAIN, "--epochs", "50", "--data", str(data), "--stream",
                "--workers", "2", "--out", str(tmp_path / "t.pt")]  # fmt: skip
        proc = _terminate_when(args, lambda: len([p for p in tmp.iterdir() if p.name.startswith("pymp-")]) >= 2, tmp)
        _one_line(proc)
        assert _left(tmp) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_sigterm_stops_the_latency_script_with_one_line(work):
    tmp = work["tmp"] / "tmpdir"
    tmp.mkdir()
    started = work["tmp"] / "started"
    args = [sys.executable, str(ROOT / "bench" / "latency.py"), str(work["ckpt"]), "--iters", "100000000",
            "--rounds", "1", "--warmup-s", "0", "--no-rss", "--json", str(work["root"] / "l.json")]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp)}
    with open(started, "w") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    deadline = time.monotonic() + 120
    while "rounds x" not in started.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    _one_line(subprocess.CompletedProcess(args, proc.returncode, "", started.read_text()))
    assert _left(tmp) == [] and not (work["root"] / "l.json").exists()
