"""Precision lives in the graph: fp16 ONNX graphs and calibrated int8 Q/DQ ONNX graphs.

TensorRT 10 (strongly typed networks) and 11 compile what the ONNX file says, so the precision
is decided here and every variant is checked on ONNX Runtime (CPU).

int8 flavours (both explicit QuantizeLinear/DequantizeLinear, per-channel symmetric weights):
- ``tensorrt``: S8S8, symmetric activations, Q/DQ only on the inputs and weights of Conv/Gemm/
  MatMul, float biases (TensorRT fuses the rest itself and has no int32 bias DQ). Judge it at ORT's
  BASIC level: on this AVX2 CPU ORT's fused S8S8 int8 kernels lose accuracy badly, while BASIC
  keeps the plain Q/DQ arithmetic that TensorRT reproduces. The file records this in its metadata
  (``slim2deploy.ort_optimization = basic``), which ``runtime.ort.ort_session`` honours.
- ``cpu``: U8S8 with ``reduce_range`` (7-bit weights avoid the AVX2 int16 saturation), Q/DQ
  around Conv, Gemm, MatMul, Add, Concat and pooling so ORT fuses them into QLinear kernels.

Calibration runs ONNX Runtime's calibrators directly rather than through ``quantize_static``:
that function does not pass the histogram sizes on, so Entropy ran with 128 bins and 128
quantized bins, which leaves exactly one candidate threshold (the full range) -- the same scales
as MinMax. Here Entropy uses 2048 bins and 128 quantized bins (TensorRT's own entropy setting)
and Percentile 2048 bins at the 99.99th percentile.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import temporary_folder
from slim2deploy.deploy.calib import check_calib
from slim2deploy.deploy.export import ORT_LEVEL_KEY, PRECISION_KEY, load_onnx, save_onnx

PRECISIONS = ("fp32", "fp16", "int8")
CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_FLAVOURS = ("tensorrt", "cpu")
HIST_BINS, ENTROPY_QUANT_BINS, DEFAULT_PERCENTILE = 2048, 128, 99.99
_TRT_OPS = ["Conv", "Gemm", "MatMul"]
_CPU_OPS = [*_TRT_OPS, "Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"]


def resolve_int8_flavour(flavour: str, *, engines: bool) -> tuple[str, str]:
    """The int8 flavour to write and why: ``auto`` follows the runtime the graph is for -- TensorRT's S8S8 where
    engines are built from it, else ONNX Runtime CPU's U8S8 (the TensorRT flavour runs 0.3-0.7x the fp32
    graph's speed on ONNX Runtime CPU, the cpu flavour 1.7-2.4x faster)."""
    if flavour not in ("auto", *INT8_FLAVOURS):
        raise SlimError(f"unknown int8 flavour {flavour!r}; use auto, {' or '.join(INT8_FLAVOURS)}")
    if flavour != "auto":
        return flavour, "as asked"
    if engines:
        return "tensorrt", "auto: TensorRT engines are built from it"
    return "cpu", "auto: for ONNX Runtime on the CPU, as no TensorRT engines are built here"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SlimError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def _tag(model: Any, precision: str, ort_level: str) -> None:
    meta = {p.key: p for p in model.metadata_props}
    for key, value in ((PRECISION_KEY, precision), (ORT_LEVEL_KEY, ort_level)):
        if key in meta:
            meta[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def to_fp16(onnx_in: str | Path, onnx_out: str | Path, *, keep_io_fp32: bool = True) -> Path:
    """Write an fp16 copy of ``onnx_in``: weights and activations in fp16; inputs/outputs fp32 by default.

    Uses ONNX Runtime's own converter (``onnxruntime.transformers.float16``), which keeps ops that
    have no fp16 definition (Resize scales, shape arithmetic) in fp32 behind Casts.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_onnx(onnx_in)
    half = convert_float_to_float16(model, keep_io_types=keep_io_fp32)
    _toposort(half.graph)
    _tag(half, "fp16" if keep_io_fp32 else "fp16-io", "all")
    return save_onnx(half, onnx_out)


def _toposort(graph: Any) -> None:
    """Order nodes after their inputs' producers; ORT's fp16 converter and quantizer append nodes at the end."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(name in ready for name in n.input)]
        if not runnable:
            raise SlimError("the fp16 graph has a cycle or a dangling input; this is a bug, please report it")
        for node in runnable:
            ready.update(node.output)
        ordered += runnable
        pending = [n for n in pending if all(n is not r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)


class _Reader:
    """A CalibrationDataReader over an in-memory array, in fixed-size batches."""

    def __init__(self, name: str, x: np.ndarray, batch_size: int, fixed_batch: int | None):
        step = fixed_batch or batch_size
        chunks = [x[i : i + step] for i in range(0, len(x), step)]
        if fixed_batch:  # a static-batch graph only takes full batches
            chunks = [c for c in chunks if len(c) == fixed_batch] or [np.resize(x, (fixed_batch, *x.shape[1:]))]
        self._feeds = iter([{name: np.ascontiguousarray(c, dtype=np.float32)} for c in chunks])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@dataclass
class Int8Result:
    path: str
    method: str
    flavour: str
    n_calib: int
    seconds: float
    ort_optimization: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Result:
        return cls(**d)


def quantize_int8(
    onnx_in: str | Path,
    onnx_out: str | Path,
    calib_x: np.ndarray,
    *,
    method: str = "minmax",
    flavour: str = "tensorrt",
    percentile: float = DEFAULT_PERCENTILE,
    batch_size: int = 32,
) -> Int8Result:
    """Calibrate on ``calib_x`` (float32 N x C x H x W, preprocessed) and write an explicit Q/DQ graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantType, create_calibrator
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    if method not in CALIB_METHODS:
        raise SlimError(f"unknown calibration method {method!r}; use one of {', '.join(CALIB_METHODS)}")
    if flavour not in INT8_FLAVOURS:
        raise SlimError(f"unknown int8 flavour {flavour!r}; use tensorrt (S8S8 for GPUs) or cpu (U8S8)")
    model = load_onnx(onnx_in)
    inp = model.graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    calib_x = check_calib(calib_x, tuple(dims[1:]), "calibration set")  # type: ignore[arg-type]
    start = time.perf_counter()
    trt = flavour == "tensorrt"
    ops = _TRT_OPS if trt else _CPU_OPS
    calib_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    calib_options: dict[str, Any] = {"symmetric": trt, "num_bins": HIST_BINS}
    if method == "entropy":
        calib_options["num_quantized_bins"] = ENTROPY_QUANT_BINS
    if method == "percentile":
        calib_options.update(percentile=percentile, symmetric=True)
    with temporary_folder("slim2deploy-int8-") as tmp, _quiet():
        calibrator = create_calibrator(
            Path(onnx_in),
            ops,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=calib_method,
            extra_options=calib_options,
        )
        calibrator.collect_data(_Reader(inp.name, calib_x, batch_size, dims[0]))
        ranges = calibrator.compute_data()
        del calibrator
        options: dict[str, Any] = {"ActivationSymmetric": trt, "WeightSymmetric": True}
        if trt:
            options.update(QuantizeBias=False, OpTypesToExcludeOutputQuantization=_TRT_OPS)
        quantizer = QDQQuantizer(
            load_model_with_shape_infer(Path(onnx_in)),
            True,  # per-channel weights
            not trt,  # reduce_range: 7-bit weights for the CPU's u8s8 kernels
            QuantType.QInt8,
            QuantType.QInt8 if trt else QuantType.QUInt8,
            ranges,
            [],
            [],
            ops,
            options,
        )
        quantizer.quantize_model()
        quantized = quantizer.model.model
        _toposort(quantized.graph)
    level = "basic" if trt else "all"
    _tag(quantized, f"int8-{flavour}-{method}", level)
    save_onnx(quantized, onnx_out)
    return Int8Result(str(onnx_out), method, flavour, len(calib_x), round(time.perf_counter() - start, 3), level)


@contextlib.contextmanager
def _quiet() -> Any:
    """ONNX Runtime's calibrators print progress and log pre-processing advice; keep the CLI readable."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def activation_scales(onnx_path: str | Path) -> dict[str, float]:
    """Scale of every per-tensor (activation) QuantizeLinear in a Q/DQ graph, by quantized tensor name."""
    from onnx import numpy_helper

    model = load_onnx(onnx_path, check=False)
    inits = {t.name: t for t in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]])
            if scale.ndim == 0:
                scales[node.input[0]] = float(scale)
    return scales
