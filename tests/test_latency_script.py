"""bench/latency.py as users run it: a subprocess, and on a Python that has no torch at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT, SAMPLE, export_tiny, run_bench

SCRIPT = ROOT / "bench" / "latency.py"
FAST = ["--bench-warmup-s", "0.05", "--bench-iterations", "12", "--bench-rounds", "3", "--threads", "1"]


def run_script(*args: str, python: str = sys.executable, extra: list[str] | None = None, cwd: Path | None = None):
    # the checkout on PYTHONPATH, as the script's docstring tells a machine without slim2deploy installed
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [python, *(extra or []), str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd or ROOT,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("script")
    return export_tiny(d / "baseline.onnx", 16)[0], export_tiny(d / "slim.onnx", 8)[0]


def test_script_prints_table_and_writes_reports(models, tmp_path):
    base, slim = models
    out = tmp_path / "r"
    proc = run_script(
        str(slim),
        "--baseline",
        str(base),
        "--bench-batch",
        "1,4",
        *FAST,
        "--json",
        str(out / "r.json"),
        "--markdown",
        str(out / "r.md"),
        "--plot",
        str(out / "r.png"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "1.00x (base)" in proc.stdout and "samples/s" in proc.stdout
    assert "batch 4: warm-up" in proc.stderr
    data = json.loads((out / "r.json").read_text())
    assert [m["name"] for m in data["models"]] == ["baseline", "slim"]
    assert {s["batch"] for s in data["speedups"]} == {1, 4}
    assert (out / "r.md").read_text().startswith("## Latency")
    assert (out / "r.png").stat().st_size > 1000


def test_script_errors_are_one_line(tmp_path):
    proc = run_bench("latency", str(tmp_path / "missing.onnx"), *FAST)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: no such model file")
    proc = run_bench("latency", str(tmp_path / "x.onnx"), "--bench-batch", "0,4")
    assert proc.returncode == 2 and "expected positive whole numbers" in proc.stderr


def test_script_never_imports_torch(models):
    """-X importtime lists every module the interpreter imported, torch would show up there."""
    base, slim = models
    proc = run_script(str(slim), "--baseline", str(base), *FAST, "--no-rss", extra=["-X", "importtime"])
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "onnxruntime" in imported and "slim2deploy.measure.benchmark" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def _torch_free_venv() -> Path:
    """A venv with only numpy and onnxruntime, built once and reused across test sessions."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    venv = Path(tempfile.gettempdir()) / f"slim2deploy-notorch-venv-{tag}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists() and python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "numpy", "onnxruntime"], capture_output=True, text=True, timeout=600
    )
    if pip.returncode != 0:
        pytest.skip(f"cannot install numpy + onnxruntime into a fresh venv: {pip.stderr.strip()[-300:]}")
    (venv / ".complete").write_text("numpy onnxruntime\n")
    return python


@pytest.mark.slow
def test_script_runs_on_onnx_in_a_venv_without_torch(models, tmp_path):
    python = _torch_free_venv()
    check = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert check.returncode != 0, "the test venv must not have torch"
    base, slim = models
    proc = run_script(
        str(slim),
        "--baseline",
        str(base),
        "--bench-batch",
        "1,2",
        *FAST,
        "--json",
        str(tmp_path / "r.json"),
        python=str(python),
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["environment"]["torch"] is None
    slim_result = data["models"][1]
    # without onnx installed MACs are unknown, but timings and the process memory are there
    assert slim_result["size"]["memory"]["ort_peak_rss"] > 0
    assert len(slim_result["batches"]) == 2 and data["speedups"][0]["speedup"] > 0


def test_script_runs_a_checkpoint_folded_and_offers_the_registrys_devices(tmp_path, make_checkpoint):
    from slim2deploy.runtime.registry import TORCH_MODES, device_choices

    ckpt = make_checkpoint()  # vgg11: 1x28x28 inputs
    out = tmp_path / "r.json"
    proc = run_bench("latency", str(ckpt), *FAST, "--device", "cpu", "--torch-mode", "folded", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    runner = json.loads(out.read_text())["models"][0]["runner"]
    assert runner["backend"] == "torch" and runner["options"]["mode"] == "folded"
    assert runner["options"]["folded_conv_bn"] == 8  # every conv of VGG-11 is followed by its BatchNorm
    usage = run_bench("latency", "--help").stdout
    assert "{" + ",".join(device_choices()) + "}" in usage and "{" + ",".join(TORCH_MODES) + "}" in usage


@pytest.mark.parametrize("share", [2.0, 0.5])
def test_a_batch_too_large_for_the_memory_is_refused_before_the_session(models, tmp_path, share):
    """--batch N on an .onnx: refused when one tensor of the batch alone exceeds the memory: the input
    (share 2: twice the memory) or, where the input would fit (share 0.5), an activation of the graph
    that onnx shape inference sizes. Nothing is written."""
    base, _ = models
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    batch = int(share * ram / (4 * SAMPLE[0] * SAMPLE[1] * SAMPLE[2]))
    out = tmp_path / "r.json"
    proc = run_bench("latency", str(base), "--bench-batch", f"1,{batch}", *FAST, "--json", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: --bench-batch {batch}: one batch through")
    assert "use a smaller --bench-batch" in proc.stderr and "batch 1: warm-up" not in proc.stderr
    assert not out.exists()


def test_ort_spinning_is_for_one_model_alone(models, tmp_path):
    """ONNX Runtime sessions run without thread-pool spinning (interleaved sessions would take each
    other's cores); --ort-spinning turns ORT's default back on for one model timed alone, recorded in
    the JSON, and is refused for models timed together."""
    base, slim = models
    for flags, spinning in (([], False), (["--ort-spinning"], True)):
        out = tmp_path / f"spin{spinning}.json"
        proc = run_bench("latency", str(slim), *FAST, "--no-rss", *flags, "--json", str(out))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(out.read_text())["models"][0]["runner"]["options"]["spinning"] is spinning
    proc = run_bench("latency", slim, "--baseline", base, *FAST, "--ort-spinning", "--json", tmp_path / "x.json")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--ort-spinning times one model alone, not 2" in lines[0]
    assert not (tmp_path / "x.json").exists()
