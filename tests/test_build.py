"""`slim2deploy build` end to end on the embedded demo model, in a subprocess, and its failure modes."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, needs_fashion_mnist, run_cli, run_main

DEMO = ROOT / "demo" / "vgg11-w0.25-sparse.pt"
CALIB = ROOT / "calib" / "fashion-mnist-512.npz"
# every file the README lists for a CPU build with --precision fp32,fp16,int8
EXPECTED = [
    "slim.pt",
    "plan.json",
    "baseline.onnx",
    "slim.onnx",
    "baseline.fp16.onnx",
    "slim.fp16.onnx",
    "baseline.int8.onnx",
    "slim.int8.onnx",
    "benchmark.json",
    "benchmark.md",
    "benchmark.png",
    "report.json",
    "report.md",
    "build.json",
]
FAST = ["--bench-iterations", "5", "--bench-rounds", "2", "--bench-warmup-s", "0"]
# accuracy and precision agreement on the first 2000 of the 10k test images: the thresholds below hold
# there with a wide margin, and evaluating all 10k (torch and ONNX Runtime, every re-run) cost ~1 min
EVAL_LIMIT = 2000


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _demo_args(out: Path, eval_limit: int = EVAL_LIMIT) -> list[str]:
    """The README's demo build (all precisions) into ``out``, with a short benchmark."""
    # 300 held-out images are a coarse measure (one image is 0.33 points): a wider allowance than the default
    return ["build", "--model", str(DEMO), "--ratio", "0.5", "--out", str(out), "--max-drop", "3",
            "--precision", "fp32,fp16,int8", "--calib", str(CALIB), "--eval-limit", str(eval_limit), *FAST]  # fmt: skip


def _build_demo(out: Path):
    return run_cli(*_demo_args(out))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "demo"
    proc = _build_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@needs_fashion_mnist
@pytest.mark.slow
def test_build_produces_every_listed_file_and_a_sane_report(built):
    out, proc = built
    for name in EXPECTED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for i in range(1, 8):
        assert f"[{i}/7]" in proc.stdout
    assert "TensorRT engines: skipped" in proc.stdout  # one line, no TensorRT here
    report = json.loads((out / "report.json").read_text())
    assert report["slim"]["macs"] < 0.6 * report["baseline"]["macs"]
    assert report["slim"]["params"] < report["baseline"]["params"]
    # the demo model is sparse-trained: removing half the channels costs little before fine-tuning
    acc = report["accuracy"]  # no --data: evaluated on the checkpoint's own dataset, no fine-tuning
    assert acc["baseline"] > 0.85 and acc["after_surgery"] > acc["baseline"] - 0.02, acc
    assert acc["after_finetune"] is None and acc["within_allowance"] is True
    # int8 (TensorRT flavour, judged at ORT BASIC) agrees with fp32 on >= 98% of held-out images
    assert report["precision"]["slim.int8"]["top1_agreement"] >= 0.98
    assert report["precision"]["slim.fp16"]["top1_agreement"] >= 0.99
    assert {v["n"] for v in report["precision"].values()} == {EVAL_LIMIT}
    md = (out / "report.md").read_text()
    assert "| MACs / image |" in md and "Latency" in md


@needs_fashion_mnist
@pytest.mark.slow
def test_rerun_skips_unchanged_stages_and_redoes_damaged_outputs(built):
    out, _ = built
    (out / "slim.onnx").write_bytes((out / "slim.onnx").read_bytes()[:1000])  # truncate one artifact
    proc = run_main(*_demo_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prune     unchanged, skipped" in proc.stdout
    assert "baseline.onnx unchanged, skipped" in proc.stdout
    assert "slim.onnx:" in proc.stdout  # the truncated file was rebuilt, not trusted
    assert (out / "slim.onnx").stat().st_size > 100_000


@needs_fashion_mnist
@pytest.mark.slow
def test_other_eval_data_redoes_the_precision_numbers(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    proc = run_main(*_demo_args(out, eval_limit=300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prune     unchanged, skipped" in proc.stdout
    assert "slim.onnx unchanged, skipped" in proc.stdout  # its parity inputs did not change
    for name in ("baseline.fp16.onnx", "slim.int8.onnx"):
        assert f"{name} unchanged, skipped" not in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert {v["n"] for v in report["precision"].values()} == {300}


@needs_fashion_mnist
@pytest.mark.slow
def test_a_malformed_build_json_entry_redoes_that_stage_only(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    state = json.loads((out / "build.json").read_text())
    (out / "build.json").write_text(json.dumps({**state, "bench": []}))
    proc = run_main(*_demo_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ignoring malformed entries bench" in proc.stdout
    assert "prune     unchanged, skipped" in proc.stdout and "bench     unchanged" not in proc.stdout


@needs_fashion_mnist
@pytest.mark.slow
def test_two_builds_into_one_out_never_mix(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "slim2deploy", "build", "--model", str(DEMO), "--ratio", "0.5", "--out", str(out),
         "--no-bench", "--eval-limit", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    lock = out / ".lock"
    while not (lock.exists() and lock.read_text() == str(first.pid)):  # the first build holds the folder
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.05)
    second = run_cli("build", "--model", str(DEMO), "--ratio", "0.3", "--out", str(out), "--no-bench")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and "another build is writing to" in second.stderr, second.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["selection"]["selector"] == {"kind": "ratio", "ratio": 0.5}
    assert json.loads((out / "plan.json").read_text())["ratio"] == 0.5


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize("case", ["ratio", "precision", "calib_shape", "int8_without_calib", "corrupt_model"])
def test_bad_input_is_one_clear_error_and_leaves_artifacts_intact(built, tmp_path, case):
    out, _ = built
    before = _snapshot(out)
    args = ["build", "--model", str(DEMO), "--ratio", "0.5", "--out", str(out), *FAST]
    if case == "ratio":
        args[4] = "1.5"
        needle = "--ratio: must be a finite number > 0 and < 1"
    elif case == "precision":
        args += ["--precision", "fp32,fp8"]
        needle = "fp8"
    elif case == "calib_shape":
        bad = tmp_path / "bad.npz"
        np.savez(bad, x=np.zeros((8, 3, 32, 32), np.float32))
        args += ["--precision", "int8", "--calib", str(bad)]
        needle = "(3, 32, 32)"
    elif case == "int8_without_calib":
        args += ["--precision", "int8"]
        needle = "--calib"
    else:
        broken = tmp_path / "broken.pt"
        broken.write_bytes(DEMO.read_bytes()[:5000])
        args[2] = str(broken)
        needle = "truncated"
    proc = run_main(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert _snapshot(out) == before


def test_truncated_onnx_is_one_clear_error(tmp_path):
    """bench/latency.py (the tool users run on target machines) on a damaged ONNX file."""
    bad = tmp_path / "slim.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04" + os.urandom(200))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "latency.py"), str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "slim.onnx" in proc.stderr
