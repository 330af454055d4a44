"""The TensorRT code path run end to end against a fake ``tensorrt`` and CUDA binding (tests/fakes).

The fakes follow the documented API (see tests/fakes/README.md): the real compile_engine,
load_engine, manifest checks, TrtRunner and ``slim2deploy build --engine require`` run through
them, so what only type-checking covered before now runs on every CPU.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ROOT, bench_script, needs_fashion_mnist, run_cli
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import sha256_file
from slim2deploy.deploy import engine
from slim2deploy.deploy.engine import (
    GPU_EXTRA,
    EngineOptions,
    batch_profile,
    compile_engine,
    engine_available,
    load_engine,
    manifest_path,
    parser_error_message,
    read_manifest,
)

FAKES = ROOT / "tests" / "fakes"
H100 = ("NVIDIA H100 80GB HBM3", "9.0")
FAKED = ("tensorrt", "cuda")  # top-level packages the fakes replace


def _faked(name: str) -> bool:
    return name.split(".")[0] in FAKED


@pytest.fixture
def fake_trt(monkeypatch):
    """``use(version, gpu)`` imports the fakes as ``tensorrt`` and ``cuda`` (again, if the settings changed)."""
    saved = {n: m for n, m in sys.modules.items() if _faked(n)}
    monkeypatch.syspath_prepend(str(FAKES))

    def use(version: str = "10.13.0.35", gpu: tuple[str, str] | None = H100):
        monkeypatch.setenv("FAKE_TENSORRT_VERSION", version)
        monkeypatch.setenv("FAKE_CUDA_DEVICE", ";".join(gpu) if gpu else "none")
        for name in [n for n in sys.modules if _faked(n)]:
            del sys.modules[name]
        monkeypatch.setattr(engine._Logger, "instance", None)  # a logger of the previous fake
        trt = importlib.import_module("tensorrt")
        assert Path(trt.__file__).is_relative_to(FAKES) and trt.__version__ == version
        return trt

    yield use
    for name in [n for n in sys.modules if _faked(n)]:
        del sys.modules[name]
    sys.modules.update(saved)


def tiny_onnx(path: Path, batch: int | str = "N", shape: tuple[int, int, int] = (1, 8, 8), extra=()) -> Path:
    """conv -> relu -> global pool -> flatten -> gemm (3 classes), plus ``extra`` nodes writing extra outputs."""
    c, h, w = shape
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, c, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.b"),
        numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], name="/conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="/relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="/pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="/flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["output"], name="/fc", transB=1),
        *extra,
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, c, h, w])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3])]
    outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in extra for o in n.output]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("slim.test", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---- compile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.13.0.35", "11.0.0.8"])
def test_compile_writes_engine_manifest_and_timing_cache(fake_trt, tmp_path, version):
    trt = fake_trt(version)
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    options = EngineOptions(min_batch=2, max_batch=16, opt_level=4, workspace_mib=64, timing_cache=str(cache))
    manifest = compile_engine(onnx_file, tmp_path / "m.engine", options)

    data = (tmp_path / "m.engine").read_bytes()
    assert read_manifest(tmp_path / "m.engine") == manifest
    assert manifest.tensorrt_version == version
    assert (manifest.gpu_name, manifest.compute_capability) == H100
    assert manifest.precision == "fp32" and manifest.input_name == "input"
    assert manifest.profile == {"min": [2, 1, 8, 8], "opt": [16, 1, 8, 8], "max": [16, 1, 8, 8]}
    assert manifest.onnx_sha256 == sha256_file(onnx_file) and manifest.onnx_path == str(onnx_file)
    assert manifest.engine_sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.build_options == options.to_dict() and manifest.params == 4 * 9 + 4 + 12 + 3
    assert manifest.host["driver"] == "13.0"
    # what TensorRT was asked to build: strongly typed on 10 (the flag) and on 11 (always), no precision flags
    built = trt.describe_engine(data)
    assert built["strongly_typed"] and built["builder_optimization_level"] == 4
    assert built["workspace"] == 64 << 20
    assert built["io"][0]["profile"] == [[2, 1, 8, 8], [16, 1, 8, 8], [16, 1, 8, 8]]
    # the timing cache was written, for this GPU and TensorRT
    config = trt.Builder(trt.Logger()).create_builder_config()
    assert config.set_timing_cache(config.create_timing_cache(cache.read_bytes()), False)
    assert not _leftovers(tmp_path)


def test_network_flags_match_the_fake_release(fake_trt):
    for version, expected in (("10.13.0.35", 1 << 1), ("11.0.0.8", 0)):
        trt = fake_trt(version)
        flag = int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        flags = engine.network_flags(trt.__version__, flag)
        assert flags == expected
        assert trt.Builder(trt.Logger()).create_network(flags) is not None


def test_recompiling_replaces_engine_and_manifest_together(fake_trt, tmp_path):
    fake_trt()
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    first = compile_engine(onnx_file, tmp_path / "m.engine", EngineOptions(max_batch=4))
    second = compile_engine(onnx_file, tmp_path / "m.engine", EngineOptions(max_batch=8))
    assert first.profile["max"][0] == 4 and second.profile["max"][0] == 8
    assert read_manifest(tmp_path / "m.engine") == second
    assert load_engine(tmp_path / "m.engine").manifest == second


# ---- errors while compiling ----------------------------------------------------------------------
def test_parser_errors_are_one_error_listing_every_node(fake_trt, tmp_path):
    fake_trt()
    extra = [
        helper.make_node("Unique", ["f"], ["u"], name="/dedupe"),
        helper.make_node("Mystery", ["f"], ["m"], name="/custom", domain="slim.test"),
    ]
    onnx_file = tiny_onnx(tmp_path / "m.onnx", extra=extra)
    (tmp_path / "m.engine").write_bytes(b"the previous engine")
    with pytest.raises(SlimError) as refused:
        compile_engine(onnx_file, tmp_path / "m.engine")
    msg = str(refused.value)
    assert msg.startswith(f"TensorRT cannot parse {onnx_file} (2 errors)") and "\n" not in msg
    assert "node 5 '/dedupe' (Unique)" in msg and "node 6 '/custom' (Mystery)" in msg
    assert (tmp_path / "m.engine").read_bytes() == b"the previous engine"
    assert not manifest_path(tmp_path / "m.engine").exists() and not _leftovers(tmp_path)


def test_a_file_that_is_not_onnx_is_a_parser_error_about_the_model(fake_trt, tmp_path):
    fake_trt()
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not an ONNX file \xff\xff\xff")
    with pytest.raises(SlimError, match=r"cannot parse .*m.onnx \(1 error\): the model: "):
        compile_engine(bad, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_fixed_batch_that_the_profile_does_not_fit_names_the_batch(fake_trt, tmp_path):
    fake_trt()
    onnx_file = tiny_onnx(tmp_path / "fixed.onnx", batch=4)
    with pytest.raises(SlimError) as refused:
        compile_engine(onnx_file, tmp_path / "fixed.engine", EngineOptions(min_batch=1, max_batch=64))
    msg = str(refused.value)
    assert "fixed batch of 4 but the profile asks for 1..64" in msg and "`engine_batch` 4" in msg
    assert "{" not in msg
    assert not (tmp_path / "fixed.engine").exists()
    manifest = compile_engine(onnx_file, tmp_path / "fixed.engine", EngineOptions(min_batch=4, max_batch=4))
    assert manifest.batch_range == (4, 4)


@given(
    st.lists(st.integers(-1, 64), min_size=1, max_size=5),
    st.integers(1, 64),
    st.integers(1, 64),
)
def test_batch_profile_is_a_profile_or_an_error_that_shows_its_numbers(dims, lo, hi):
    lo, hi = min(lo, hi), max(lo, hi)
    try:
        shapes = batch_profile(tuple(dims), EngineOptions(min_batch=lo, max_batch=hi), "m.onnx")
    except SlimError as exc:
        msg = str(exc)
        assert "{" not in msg and "m.onnx" in msg
        assert any(d < 0 for d in dims[1:]) or (dims[0] >= 0 and f"fixed batch of {dims[0]}" in msg)
        return
    assert all(d >= 0 for d in dims[1:]) and (dims[0] < 0 or dims[0] == lo == hi)
    assert [s[0] for s in shapes.values()] == [lo, hi, hi]
    assert all(s[1:] == dims[1:] for s in shapes.values())


def test_a_build_tensorrt_cannot_finish_is_one_error(fake_trt, tmp_path, capfd):
    fake_trt()
    onnx_file = tiny_onnx(tmp_path / "big.onnx", shape=(3, 32, 32))  # 64 x 3x32x32 needs more than 1 MiB
    with pytest.raises(SlimError, match="failed to build an engine from big.onnx; see its log above"):
        compile_engine(onnx_file, tmp_path / "big.engine", EngineOptions(max_batch=64, workspace_mib=1))
    assert "[TRT] [E]" in capfd.readouterr().err  # TensorRT's own log says why
    assert not (tmp_path / "big.engine").exists()


def test_timing_cache_from_another_gpu_is_replaced(fake_trt, tmp_path):
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    options = EngineOptions(max_batch=4, timing_cache=str(cache))
    fake_trt(gpu=("NVIDIA A100-SXM4-80GB", "8.0"))
    compile_engine(onnx_file, tmp_path / "a100.engine", options)
    trt = fake_trt()
    with pytest.warns(UserWarning, match="made for another GPU or TensorRT; starting a new one"):
        compile_engine(onnx_file, tmp_path / "h100.engine", options)
    config = trt.Builder(trt.Logger()).create_builder_config()
    assert config.set_timing_cache(config.create_timing_cache(cache.read_bytes()), False)  # now H100's


def test_damaged_timing_cache_is_replaced(fake_trt, tmp_path):
    trt = fake_trt()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"half a timing cache")
    with pytest.warns(UserWarning, match="damaged"):
        compile_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", EngineOptions(timing_cache=str(cache)))
    config = trt.Builder(trt.Logger()).create_builder_config()
    assert config.set_timing_cache(config.create_timing_cache(cache.read_bytes()), False)


# ---- load ----------------------------------------------------------------------------------------
@pytest.fixture
def built(fake_trt, tmp_path):
    """An engine built on the fake H100 with TensorRT 10.13."""
    fake_trt()
    path = tmp_path / "m.engine"
    compile_engine(tiny_onnx(tmp_path / "m.onnx"), path, EngineOptions(min_batch=1, max_batch=8))
    return path


def test_load_checks_the_manifest_and_deserializes(built):
    loaded = load_engine(built)
    assert loaded.manifest == read_manifest(built)
    engine_ = loaded.engine
    names = [engine_.get_tensor_name(i) for i in range(engine_.num_io_tensors)]
    assert names == ["input", "output"]
    lo, opt, hi = engine_.get_tensor_profile_shape("input", 0)
    assert (tuple(lo), tuple(opt), tuple(hi)) == ((1, 1, 8, 8), (8, 1, 8, 8), (8, 1, 8, 8))


def test_load_refuses_an_engine_changed_after_its_manifest(built):
    data = bytearray(built.read_bytes())
    data[-5] ^= 0xFF
    built.write_bytes(bytes(data))
    with pytest.raises(SlimError, match="does not match its manifest"):
        load_engine(built)
    # unchecked, TensorRT itself refuses the damaged engine: still one SlimError
    with pytest.raises(SlimError, match="could not deserialize"):
        load_engine(built, check=False)


def test_load_refuses_another_tensorrt_release(built, fake_trt):
    fake_trt("10.8.0.43")
    with pytest.raises(SlimError) as refused:
        load_engine(built)
    msg = str(refused.value)
    assert "built with TensorRT 10.13.0.35 and this is TensorRT 10.8.0.43" in msg and "Rebuild" in msg
    with pytest.raises(SlimError, match="TensorRT 10.8.0.43 could not deserialize"):
        load_engine(built, check=False)
    fake_trt("10.13.0.99")  # another build of the same release loads it
    assert load_engine(built).manifest is not None


def test_load_refuses_another_gpu_architecture_and_warns_on_another_gpu_of_the_same(built, fake_trt):
    fake_trt(gpu=("NVIDIA A100-SXM4-80GB", "8.0"))
    with pytest.raises(SlimError, match=r"compute capability 9.0 \(NVIDIA H100 80GB HBM3\) and this GPU is 8.0"):
        load_engine(built)
    fake_trt(gpu=("NVIDIA H200", "9.0"))
    with pytest.warns(UserWarning, match="tuned on NVIDIA H100 80GB HBM3, running on NVIDIA H200"):
        loaded = load_engine(built)
    assert loaded.engine is not None


def test_load_without_a_manifest_warns_and_loads(built):
    manifest_path(built).unlink()
    with pytest.warns(UserWarning, match="not checked"):
        assert load_engine(built).manifest is None


# ---- availability --------------------------------------------------------------------------------
def test_availability_says_what_is_missing_and_what_to_install(fake_trt, tmp_path, monkeypatch):
    trt = fake_trt()
    assert engine_available() == (True, f"TensorRT {trt.__version__} on {H100[0]} (compute capability 9.0)")
    fake_trt(gpu=None)
    ok, reason = engine_available()
    assert not ok and "TensorRT 10.13.0.35 is installed but no CUDA GPU is visible" in reason

    # what `make` installs for mypy, tensorrt-stubs, leaves a 'tensorrt' package without the library
    placeholder = tmp_path / "site"
    (placeholder / "tensorrt").mkdir(parents=True)
    (placeholder / "tensorrt" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(placeholder))
    del sys.modules["tensorrt"]
    ok, reason = engine_available()
    assert not ok and reason.startswith("TensorRT is not installed here (the 'tensorrt' package present is type stubs")
    assert reason.endswith(f"on a GPU machine: {GPU_EXTRA}") and "slim2deploy[gpu]" in GPU_EXTRA
    (tmp_path / "m.engine").write_bytes(b"an engine")
    with pytest.raises(SlimError, match="cannot load .*TensorRT is not installed here"):
        load_engine(tmp_path / "m.engine")

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable at all
    assert engine_available() == (False, f"TensorRT is not installed here; on a GPU machine: {GPU_EXTRA}")


def test_parser_error_without_a_node_names_the_model():
    msg = parser_error_message("m.onnx", [{"node": -1, "desc": "not a model"}])
    assert "(1 error): the model: not a model." in msg


# ---- run: TrtRunner on the fake CUDA ---------------------------------------------------------------
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_trt_runner_gives_onnxruntime_s_outputs(fake_trt, tmp_path, cuda_graph):
    import onnxruntime as ort

    from slim2deploy.runtime.registry import open_runner
    from slim2deploy.runtime.trt import TrtRunner

    fake_trt()
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    compile_engine(onnx_file, tmp_path / "m.engine", EngineOptions(min_batch=1, max_batch=8))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    with TrtRunner(tmp_path / "m.engine", cuda_graph=cuda_graph) as runner:
        info = runner.info
        assert (info.min_batch, info.max_batch, info.sample_shape, info.precision) == (1, 8, (1, 8, 8), "fp32")
        assert info.options["cuda_graph"] is cuda_graph and info.options["tensorrt"] == "10.13.0.35"
        for batch in (3, 8, 3, 1):  # shape changes, and a replay of an earlier shape's graph
            x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
            expected = session.run(None, {"input": x})[0]
            np.testing.assert_allclose(runner.infer(x), expected, rtol=1e-5, atol=1e-6)
            assert runner.last_compute_ms is not None and runner.last_compute_ms >= 0
        with pytest.raises(SlimError, match="supports batch 1..8, got 9"):
            runner.infer(np.zeros((9, 1, 8, 8), np.float32))
        assert runner.memory()["io_buffer_bytes"] == 8 * (64 + 3) * 4
        assert runner.costs() == ({"params": 55, "macs": 4 * 9 * 64 + 12}, "engine manifest")
    assert isinstance(open_runner(tmp_path / "m.engine"), TrtRunner)


# ---- the command line ----------------------------------------------------------------------------
@needs_fashion_mnist
@pytest.mark.slow
def test_cli_build_engine_require_compiles_both_engines(tmp_path):
    out = tmp_path / "b"
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKES), str(ROOT)]),
        "FAKE_TENSORRT_VERSION": "10.13.0.35",
        "FAKE_CUDA_DEVICE": ";".join(H100),
    }
    proc = run_cli(
        "build", "--model", str(ROOT / "demo" / "vgg11-w0.25-sparse.pt"), "--ratio", "0.5", "--out", str(out),
        "--engine", "require", "--engine-batch", "1,8", "--no-bench", "--max-drop", "5", "--eval-limit", "200", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in ("baseline", "slim"):
        assert f"[5/7] engines   {name}.engine compiled" in proc.stdout
        manifest = read_manifest(out / f"{name}.engine")
        assert manifest is not None and report["engines"][f"{name}.engine"] == manifest.to_dict()
        assert manifest.onnx_sha256 == sha256_file(out / f"{name}.onnx")
        assert manifest.engine_sha256 == sha256_file(out / f"{name}.engine")
        assert manifest.profile == {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [8, 1, 28, 28]}
    assert report["engines"]["slim.engine"]["macs"] < report["engines"]["baseline.engine"]["macs"]
    assert (out / "timing.cache").is_file() and not _leftovers(out)


def test_latency_script_times_an_engine_against_its_onnx(fake_trt, tmp_path, capsys):
    latency = bench_script("latency")
    fake_trt()
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    compile_engine(onnx_file, tmp_path / "m.engine", EngineOptions(max_batch=8))
    args = [str(tmp_path / "m.engine"), "--baseline", str(onnx_file), "--bench-batch", "1,8", "--cuda-graph"]
    args += ["--bench-warmup-s", "0", "--bench-iterations", "3", "--bench-rounds", "1", "--no-rss", "--quiet"]
    args += ["--json", str(tmp_path / "r.json")]
    assert latency.main(args) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["environment"]["tensorrt"] == "10.13.0.35"
    assert result["environment"]["gpu"]["gpu_name"] == H100[0]
    engine_row = next(m for m in result["models"] if m["path"] == str(tmp_path / "m.engine"))
    assert engine_row["runner"]["backend"] == "tensorrt" and engine_row["size"]["cost_source"] == "engine manifest"
    assert [b["batch"] for b in engine_row["batches"]] == [1, 8]
    assert all(b["compute"]["iterations"] == 3 for b in engine_row["batches"])  # device events around the engine
