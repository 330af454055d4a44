"""TensorRT engine logic that runs without TensorRT: manifests, mismatch checks, policy, flags, mypy."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ROOT
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.engine import (
    EngineManifest,
    EngineOptions,
    check_engine_file,
    compile_engine,
    engine_available,
    manifest_mismatches,
    manifest_path,
    network_flags,
    onnx_precision,
    parser_error_message,
    read_manifest,
    resolve_engine_policy,
)

HERE = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def manifest(**overrides: object) -> EngineManifest:
    fields = {
        "tensorrt_version": "10.13.0.35",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "precision": "fp16",
        "input_name": "input",
        "profile": {"min": [1, 3, 32, 32], "opt": [64, 3, 32, 32], "max": [64, 3, 32, 32]},
        "onnx_sha256": "ab" * 32,
        "onnx_path": "slim.fp16.onnx",
        "engine_sha256": "cd" * 32,
        "build_options": EngineOptions(max_batch=64).to_dict(),
        "build_time_s": 12.5,
        "built_at": "2025-01-01T00:00:00Z",
        "params": 1000,
        "macs": 20000,
    }
    fields.update(overrides)
    return EngineManifest(**fields)  # type: ignore[arg-type]


def test_manifest_round_trips_through_json(tmp_path):
    m = manifest()
    again = EngineManifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    assert again.batch_range == (1, 64)
    engine = tmp_path / "slim.engine"
    manifest_path(engine).write_text(json.dumps(m.to_dict()))
    assert manifest_path(engine).name == "slim.engine.json"
    assert read_manifest(engine) == m
    assert read_manifest(tmp_path / "other.engine") is None


def test_damaged_manifests_are_reported(tmp_path):
    d = manifest().to_dict()
    del d["compute_capability"], d["onnx_sha256"]
    with pytest.raises(SlimError, match="lacks compute_capability, onnx_sha256"):
        EngineManifest.from_dict(d)
    with pytest.raises(SlimError, match="not a slim2deploy engine manifest"):
        EngineManifest.from_dict({**manifest().to_dict(), "format": "something/2"})
    engine = tmp_path / "x.engine"
    manifest_path(engine).write_text("{truncated")
    with pytest.raises(SlimError, match="not valid JSON"):
        read_manifest(engine)


def test_matching_environment_has_no_problems():
    assert manifest_mismatches(manifest(), HERE) == ([], [])
    # the fourth component is a build number: the same release loads the engine
    assert manifest_mismatches(manifest(tensorrt_version="10.13.0.1"), HERE) == ([], [])
    # unknown parts of the environment are not held against the engine
    assert manifest_mismatches(manifest(), {"tensorrt_version": None, "gpu_name": None}) == ([], [])


def test_other_tensorrt_release_is_explained():
    problems, _ = manifest_mismatches(manifest(tensorrt_version="10.8.0.43"), HERE)
    assert len(problems) == 1
    assert "TensorRT 10.8.0.43" in problems[0] and "TensorRT 10.13.0.35" in problems[0]


def test_other_gpu_architecture_is_a_problem_same_architecture_a_note():
    problems, notes = manifest_mismatches(manifest(gpu_name="NVIDIA A100", compute_capability="8.0"), HERE)
    assert len(problems) == 1 and "8.0" in problems[0] and "9.0" in problems[0] and not notes
    problems, notes = manifest_mismatches(manifest(gpu_name="NVIDIA H200"), HERE)
    assert not problems and len(notes) == 1 and "H200" in notes[0] and "H100" in notes[0]


@given(
    st.tuples(st.integers(10, 12), st.integers(0, 20), st.integers(0, 5)),
    st.tuples(st.integers(10, 12), st.integers(0, 20), st.integers(0, 5)),
    st.sampled_from(["7.5", "8.0", "8.6", "8.9", "9.0"]),
    st.sampled_from(["7.5", "8.0", "8.6", "8.9", "9.0"]),
)
def test_mismatch_iff_release_or_architecture_differs(built, running, cc_built, cc_running):
    m = manifest(tensorrt_version=".".join(map(str, built)) + ".7", compute_capability=cc_built)
    env = {**HERE, "tensorrt_version": ".".join(map(str, running)) + ".9", "compute_capability": cc_running}
    problems, _ = manifest_mismatches(m, env)
    assert len(problems) == (built != running) + (cc_built != cc_running)


def _engine_with_manifest(tmp_path: Path, **overrides: object) -> tuple[Path, bytes]:
    engine = tmp_path / "slim.engine"
    data = b"serialized engine bytes"
    engine.write_bytes(data)
    m = manifest(engine_sha256=hashlib.sha256(data).hexdigest(), **overrides)
    manifest_path(engine).write_text(json.dumps(m.to_dict()))
    return engine, data


def test_load_check_explains_mismatch_and_tampering(tmp_path):
    engine, data = _engine_with_manifest(tmp_path, compute_capability="8.6", gpu_name="NVIDIA A10")
    with pytest.raises(SlimError) as exc:
        check_engine_file(engine, data, HERE)
    msg = str(exc.value)
    assert "compute capability 8.6" in msg and "Rebuild" in msg and str(engine) in msg
    engine, data = _engine_with_manifest(tmp_path)
    assert check_engine_file(engine, data, HERE) is not None
    with pytest.raises(SlimError, match="does not match its manifest"):
        check_engine_file(engine, data + b"x", HERE)
    manifest_path(engine).unlink()
    with pytest.warns(UserWarning, match="not checked"):
        assert check_engine_file(engine, data, HERE) is None


def test_network_flags_by_tensorrt_version():
    assert network_flags("10.13.0.35", 1) == 1 << 1  # STRONGLY_TYPED is bit 1 in TensorRT 10
    assert network_flags("11.0.0.1", None) == 0  # always strongly typed, the flag is gone
    with pytest.raises(SlimError, match="too old"):
        network_flags("8.6.1.6", 1)
    with pytest.raises(SlimError, match="lacks"):
        network_flags("10.0.0", None)


def test_parser_errors_are_listed_per_node():
    msg = parser_error_message(
        "slim.onnx",
        [
            {"node": 3, "node_name": "/features/conv3", "operator": "Conv", "desc": "weights must be initializers"},
            {"node": 9, "node_name": "", "operator": "NonZero", "desc": "unsupported operator"},
        ],
    )
    assert "2 errors" in msg
    assert "node 3 '/features/conv3' (Conv): weights must be initializers" in msg
    assert "node 9 (NonZero): unsupported operator" in msg


def test_engine_options_profile():
    assert EngineOptions.from_batches([8, 1, 64]).profile() == (1, 64, 64)
    assert EngineOptions(min_batch=1, opt_batch=8, max_batch=32).profile() == (1, 8, 32)
    assert EngineOptions.from_dict(EngineOptions(opt_level=5).to_dict()).opt_level == 5
    for bad in ({"min_batch": 8, "max_batch": 4}, {"opt_level": 6}, {"workspace_mib": 0}):
        with pytest.raises(SlimError):
            EngineOptions(**bad)  # type: ignore[arg-type]


needs_no_tensorrt = pytest.mark.skipif(engine_available()[0], reason="TensorRT and a GPU are present")


@needs_no_tensorrt
def test_engine_policy_without_tensorrt(tmp_path):
    ok, reason = engine_available()
    assert not ok and "TensorRT" in reason and "\n" not in reason
    build, message = resolve_engine_policy("auto")
    assert not build and message.startswith("TensorRT engines: skipped") and "\n" not in message
    assert resolve_engine_policy("off") == (False, "TensorRT engines: off (`engine=off`)")
    with pytest.raises(SlimError, match="`engine=require`: cannot compile TensorRT engines here"):
        resolve_engine_policy("require")
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(SlimError, match="cannot compile m.engine"):
        compile_engine(onnx_file, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_engine_policy_with_tensorrt_present_builds():
    assert resolve_engine_policy("require", available=(True, "TensorRT 10.13 on H100"))[0]
    assert resolve_engine_policy("auto", available=(True, "TensorRT 10.13 on H100"))[0]
    with pytest.raises(SlimError, match="auto, require, off"):
        resolve_engine_policy("sometimes")


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # older ORT: IR <= 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_precision_is_read_from_the_graph(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])
    fp32 = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    assert onnx_precision(_save(fp32, tmp_path / "fp32.onnx")) == "fp32"

    w16 = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float16), "w")
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["x16", "w"], ["y16"]),
        helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
    ]
    fp16 = helper.make_graph(nodes, "g", [x], [y], [w16])
    assert onnx_precision(_save(fp16, tmp_path / "fp16.onnx")) == "fp16"

    wq = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    int8 = helper.make_graph(nodes, "g", [x], [y], [wq, scale, zero])
    assert onnx_precision(_save(int8, tmp_path / "int8.onnx")) == "int8"


# ---------------------------------------------------------------------------------------------
# mypy against tensorrt-stubs
# ---------------------------------------------------------------------------------------------
def _fix_stub_def(line: str) -> str:
    """tensorrt-stubs 10.13 has two kinds of invalid ``def`` lines; make them parse."""
    line = re.sub(r"\bin: ", "in_: ", line)  # a parameter named after the keyword 'in'
    try:
        ast.parse(line.strip() + " ...")
        return line
    except SyntaxError:
        pass
    head, rest = line.split("(", 1)
    params, tail = rest.rsplit(")", 1)
    parts, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    seen_default, fixed = False, []
    for p in parts:  # a parameter without a default after one with a default
        if "=" in p:
            seen_default = True
        elif seen_default and ":" in p and not p.strip().startswith("*"):
            p += " = ..."
        fixed.append(p)
    return head + "(" + ",".join(fixed) + ")" + tail


def usable_tensorrt_stubs(dest: Path) -> Path | None:
    """Copy tensorrt-stubs into ``dest`` in a form mypy reads; None if they are not installed.

    As shipped, the stubs are ignored by mypy (no py.typed: ``import tensorrt`` becomes Any, so a
    plain ``mypy`` run checks nothing) and two lines do not parse. Copied to a MYPYPATH
    directory with those lines fixed, mypy checks our calls against the real signatures.
    """
    try:
        import tensorrt_stubs  # noqa: F401
    except ImportError:
        return None
    site = Path(tensorrt_stubs.__file__).resolve().parents[1]
    for pkg in ("tensorrt", "tensorrt_bindings"):
        (dest / pkg).mkdir(parents=True, exist_ok=True)
        for stub in (site / pkg).glob("*.pyi"):
            lines = [_fix_stub_def(l) if l.lstrip().startswith("def ") else l for l in stub.read_text().splitlines()]
            text = "\n".join(lines) + "\n"
            ast.parse(text)
            target = dest / pkg / stub.name
            if not target.exists() or target.read_text() != text:
                target.write_text(text)
    return dest


@pytest.mark.slow
def test_engine_and_runtime_are_mypy_clean_against_tensorrt_stubs(tmp_path):
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slim2deploy-tests"
    stubs = usable_tensorrt_stubs(cache / "tensorrt-stubs")  # a fixed place, so mypy's cache stays valid
    if stubs is None:
        pytest.skip("tensorrt-stubs not installed")
    cache = cache / "mypy"
    config = tmp_path / "mypy.ini"
    # the stubs' own errors (e.g. a module attribute named 'bool') are theirs, not ours. Neither file
    # uses torch, torchvision, onnxscript or matplotlib, which slim2deploy's other modules import: not
    # following them saves analysing ~1,600 files on a cold cache (~25 s); `make lint` checks them
    config.write_text(
        "[mypy]\nignore_missing_imports = True\npython_version = 3.11\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\nignore_errors = True\n"
        "[mypy-torch,torch.*,torchvision,torchvision.*,onnxscript,onnxscript.*,matplotlib,matplotlib.*]\n"
        "follow_imports = skip\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(cache)]
        + ["--follow-imports=silent", "slim2deploy/deploy/engine.py", "slim2deploy/runtime/trt.py"],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(stubs)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the stubs really were used: a wrong TensorRT call must be caught
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\ntrt.Builder(trt.Logger()).create_network(flags='x')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(cache), str(probe)],
        env={**os.environ, "MYPYPATH": str(stubs)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "create_network" in proc.stdout, proc.stdout
