"""`slim2deploy build` refuses bad flags, bad --out folders and a busy --out before doing any work."""

from __future__ import annotations

import os
import re
import signal
import stat
from pathlib import Path

import pytest
from helpers import ROOT, hold_lock, run_cli, run_main

from slim2deploy.base.errors import SlimError
from slim2deploy.pipeline.build import validate

DEMO = ROOT / "demo" / "vgg11-w0.25-sparse.pt"
BAD_FLAGS = {  # refused by argparse, the flag named
    "bench_iterations": (["--bench-iterations", "0"], "--bench-iterations"),
    "bench_rounds": (["--bench-rounds", "-1"], "--bench-rounds"),
    "bench_batch": (["--bench-batch", "8,0"], "--bench-batch"),
    "engine_batch": (["--engine-batch", "0,64"], "--engine-batch"),
    "workspace": (["--workspace-mib", "0"], "--workspace-mib"),
    "eval_limit": (["--eval-limit", "0"], "--eval-limit"),
    "limit_train": (["--limit-train", "0"], "--limit-train"),
    "threads": (["--threads", "0"], "--threads"),
}
BAD_SETTINGS = {  # what validate() refuses in a BuildConfig made in Python, the parameter named
    "bench_iterations": ({"bench_iterations": 0}, "`bench_iterations` must be at least 1"),
    "bench_batches": ({"bench_batches": (8, 0)}, "`bench_batch` must be positive"),
    "engine_batches": ({"engine_batches": (0, 64)}, "`engine_batch` must be positive"),
    "workspace": ({"workspace_mib": 0}, "workspace must be a positive"),
    "opt_level": ({"builder_opt_level": 9}, "optimisation level must be 0..5"),
    "eval_limit": ({"eval_limit": 0}, "`eval_limit` must be at least 1"),
    "finetune_without_data": ({"finetune_epochs": 2}, "fine-tuning needs `data`"),
    "int8_without_calib": ({"precisions": ("fp32", "int8")}, "int8 needs a calibration set: `calib`"),
    "flavour": ({"int8_flavour": "gpu"}, "unknown int8 flavour"),
}


def _one_error(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "[1/7]" not in proc.stdout  # no stage started


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_argparse_refuses_each_bad_flag_by_name(case: str, capsys) -> None:
    from slim2deploy.cli import main

    flags, needle = BAD_FLAGS[case]
    with pytest.raises(SystemExit) as exited:
        main(["build", "--model", str(DEMO), "--ratio", "0.5", *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_validate_refuses_each_bad_setting_by_its_parameter(case: str) -> None:
    from slim2deploy.pipeline.build import BuildConfig
    from slim2deploy.prune.select import by_ratio

    settings, needle = BAD_SETTINGS[case]
    with pytest.raises(SlimError, match=re.escape(needle)):
        validate(BuildConfig(model=str(DEMO), selection=by_ratio(0.5), **settings))


@pytest.mark.parametrize("case", ["bench_iterations", "eval_limit"])
def test_bad_flags_are_refused_before_the_output_folder_is_touched(tmp_path: Path, case: str) -> None:
    flags, needle = BAD_FLAGS[case]
    out = tmp_path / "out"
    _one_error(run_cli("build", "--model", str(DEMO), "--ratio", "0.5", "--out", str(out), *flags), needle)
    assert not out.exists()


def test_an_out_that_is_a_file_or_under_a_file_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "report.md"
    afile.write_text("keep me")
    for out, needle in ((afile, "is a file"), (afile / "sub", str(afile))):
        _one_error(run_main("build", "--model", str(DEMO), "--ratio", "0.5", "--out", str(out)), needle)
    assert afile.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        _one_error(run_main("build", "--model", str(DEMO), "--ratio", "0.5", "--out", str(out)), "cannot")
    finally:
        out.chmod(stat.S_IRWXU)


def test_a_build_into_a_locked_out_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "slim.onnx").write_bytes(b"from the first build")
    holder = hold_lock(out)  # a second real process, as a running build would hold it
    try:
        proc = run_main("build", "--model", str(DEMO), "--ratio", "0.5", "--out", str(out), "--no-bench")
        _one_error(proc, f"another build is writing to {out} (pid {holder.pid})")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "slim.onnx"]
    assert (out / "slim.onnx").read_bytes() == b"from the first build"


def test_a_finetune_batch_size_whose_images_exceed_the_memory_is_refused_before_pruning(
    tmp_path: Path, make_checkpoint
) -> None:
    """The fine-tune batch is checked before the prune stage: its images alone (a lower bound for any
    slim model) must fit in memory. A streamed folder of tiny files, read at a large size, has enough."""
    import numpy as np
    from PIL import Image

    from slim2deploy.base.environment import physical_memory

    side, ram = 2048, physical_memory()
    assert ram is not None
    meta = {"mean": [0.5] * 3, "std": [0.25] * 3, "preprocess": {"stream": True, "image_size": side, "crop": side}}
    model = make_checkpoint(width=0.0625, input_shape=(3, side, side), num_classes=2, meta=meta)
    first = tmp_path / "one.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(first)
    n = 2 * ram // (3 * side * side * 4) + 2  # images enough for one batch of twice the memory
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(n // 2 + 1):
            os.link(first, tmp_path / "data" / c / f"{i}.png")
    out = tmp_path / "out"
    args = ["--model", str(model), "--ratio", "0.5", "--out", str(out), "--no-bench", "--engine", "off"]
    flags = ["--finetune-epochs", "1", "--data", str(tmp_path / "data"), "--batch-size", str(10 * n)]
    _one_error(run_main("build", *args, *flags), "--batch-size")
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["build", "--model", str(DEMO), "--ratio", "0.5", "--out", "{tmp}/b", "--bench-batch", f"1,{10**12}"],
        ["profile", "--model", str(DEMO), "--out", "{tmp}/t.json", "--no-cache", "--profile-batch", str(10**12)],
        ["prune", "--model", str(DEMO), "--speedup", "2", "--out", "{tmp}/s.pt", "--profile-batch", str(10**12)],
    ],
)
def test_a_batch_check_reuses_the_forward_pass_that_checked_the_checkpoint(tmp_path: Path, capsys, command) -> None:
    """Rebuilding the model runs it once on one image (to check the checkpoint); the batch checks reuse
    what that pass measured instead of running the model again. The refusal itself is unchanged."""
    import torch

    from slim2deploy.cli import main

    passes = []

    def whole_model(module: torch.nn.Module, _inputs: object, _out: object) -> None:
        if type(module).__name__ == "VGG":
            passes.append(module)

    handle = torch.nn.modules.module.register_module_forward_hook(whole_model)
    try:
        status = main([a.replace("{tmp}", str(tmp_path)) for a in command])
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert status == 2 and "one batch through the model needs at least" in err, err
    assert len(passes) == 1
    assert not list(tmp_path.iterdir())


def test_build_reads_the_finetuning_data_once(tmp_path: Path, monkeypatch, capsys, make_checkpoint) -> None:
    """build reads the training split before pruning (to check it and the batch) and fine-tunes on that
    same data; reading it again in the fine-tune stage decoded a whole image folder twice."""
    import numpy as np
    from PIL import Image

    from slim2deploy.cli import main
    from slim2deploy.model import preprocess

    meta = {"mean": [0.5] * 3, "std": [0.25] * 3}
    model = make_checkpoint(width=0.0625, input_shape=(3, 32, 32), num_classes=2, meta=meta)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / c / f"{i}.png")
    splits: list[str] = []
    real = preprocess.load_data

    def counted(name, split, *args, **kw):
        splits.append(split)
        return real(name, split, *args, **kw)

    monkeypatch.setattr(preprocess, "load_data", counted)
    out = tmp_path / "out"
    args = ["--model", str(model), "--ratio", "0.5", "--out", str(out), "--no-bench", "--engine", "off"]
    flags = ["--finetune-epochs", "1", "--data", str(tmp_path / "data"), "--batch-size", "4", "--precision", "fp32"]
    flags += ["--max-drop", "100"]  # random pixels: nothing to keep
    status = main(["build", *args, *flags])
    assert status == 0, capsys.readouterr().err
    assert (out / "slim-finetuned.pt").is_file()
    assert splits.count("train") == 1, splits
