"""One layer of a latency table as a standalone ONNX graph, to time on an ONNX-based target.

Built directly with ``onnx.helper`` (milliseconds, where a torch export takes a second): the
convolution or linear at the widths asked for, at its real kernel, stride, padding, dilation and
input size, with a bias (deployment graphs carry the BatchNorm folded into it) and the ReLU that
runtimes fuse into it. The batch dimension is dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_bytes
from slim2deploy.prune.latency import LayerSpec

OPSET = 17
_NP = {"fp32": np.float32, "fp16": np.float16}


def write_layer_onnx(layer: LayerSpec, c_in: int, c_out: int, path: str | Path, precision: str = "fp32") -> Path:
    """``layer`` with ``c_in`` input and ``c_out`` output channels (features) as an ONNX file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in _NP:
        raise SlimError(f"layer profiling supports precision fp32 or fp16, got {precision!r}")
    dtype = _NP[precision]
    elem = TensorProto.FLOAT if precision == "fp32" else TensorProto.FLOAT16
    rng = np.random.default_rng(0)
    if layer.op == "conv":
        groups = c_in if layer.depthwise else 1
        if layer.depthwise:
            c_out = c_in
        w = rng.standard_normal((c_out, c_in // groups, *layer.kernel)).astype(dtype) * 0.1
        in_shape: list[int | str] = ["N", c_in, *layer.in_hw]
        out_shape: list[int | str] = ["N", c_out, "H", "W"]
        node = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            kernel_shape=list(layer.kernel),
            strides=list(layer.stride),
            pads=list(layer.padding) * 2,
            dilations=list(layer.dilation),
            group=groups,
        )
    elif layer.op == "linear":
        w = rng.standard_normal((c_out, c_in)).astype(dtype) * 0.1
        in_shape, out_shape = ["N", c_in], ["N", c_out]
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        raise SlimError(f"cannot build a latency probe for layer type {layer.op!r}")
    b = np.zeros(c_out, dtype=dtype)
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["y"], ["out"])],
        "probe",
        [helper.make_tensor_value_info("x", elem, in_shape)],
        [helper.make_tensor_value_info("out", elem, out_shape)],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())
    return Path(path)
