"""What an ONNX file holds, read without torch: params and per-sample MACs from the graph."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WEIGHT_OPS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2)}
_PASS_THROUGH = {"DequantizeLinear", "Cast", "Identity", "Transpose", "Reshape", "Flatten"}


def onnx_costs(path: str | os.PathLike[str]) -> dict[str, int]:
    """Params and per-sample MACs of convs and matmuls read from an ONNX graph ({} without onnx).

    MACs use the same rule as ``stats.count_macs``: output elements per sample times the
    weight's fan-in, so a torch model and its export agree. Params count the weights of
    Conv/Gemm/MatMul/BatchNorm (also through Q/DQ or casts), not shape constants or scales.
    """
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return {}
    model = onnx.load(str(path))
    batch = 1
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].dim_value > 0:
            batch = dims[0].dim_value  # a static batch: divide it out at the end
        elif dims:
            dims[0].dim_value = 1  # a dynamic batch: pin it to 1 for per-sample counts
    try:
        model = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # onnx raises several types here; without shapes there are no trustworthy MACs
        return {}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes: dict[str, list[int]] = {name: list(t.dims) for name, t in inits.items()}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
            # an exporter's own value_info (batch symbolic) sits beside the inferred one: the known one wins
            if v.name not in shapes or min(shapes[v.name], default=0) < 0:
                shapes[v.name] = shape
    producer = {out: n for n in graph.node for out in n.output}

    def source_init(name: str) -> str | None:
        """The initializer a weight input comes from, looking through DQ/Cast/reshape chains."""
        for _ in range(8):
            if name in inits:
                return name
            node = producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    counted: set[str] = set()
    params = 0
    macs = 0
    unknown = 0
    for node in graph.node:
        for i in _WEIGHT_OPS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                init = source_init(node.input[i])
                if init is not None and init not in counted:
                    counted.add(init)
                    params += math.prod(inits[init].dims)
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if not out or min(out) < 0:
            unknown += 1  # shape inference could not follow it (padding computed in the graph, say)
            continue
        w = shapes.get(node.input[1])
        a = shapes.get(node.input[0])
        if node.op_type == "Conv" and w:
            macs += math.prod(out) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose" and w and a:
            macs += math.prod(a) * math.prod(w[1:])
        elif a:
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[0] if trans_a and node.op_type == "Gemm" else a[-1]
            macs += math.prod(out) * k
    # MACs that leave out layers whose shape is unknown would be a wrong number: say none instead
    return {"params": int(params), **({"macs": int(macs // batch)} if not unknown else {})}


# ONNX Runtime's peak host memory at batch N, estimated from the graph before any session exists:
#   ORT_FLOOR_BYTES + WEIGHT_FACTOR x file bytes + ACTIVATION_FACTOR x live activations of one sample x N.
# ``bench/onnx_memory.py`` prints it against the peak RSS of a fresh process running the model (CPU EP,
# ONNX Runtime 1.32, 2 cores): over 6 models (vgg11, resnet20, densenet40, mobilenet_v2, resnet18,
# efficientnet_b0) at batches 1, 32 and 256 the peak was 40-78% of the estimate, never above it; densenet40
# at 512 and 1024 images, 79-80%.
# The floor is Python + numpy + onnxruntime loaded (62 MiB measured) and a session's own structures; the
# weights are read, parsed and held (pre-packed copies too); the activations are the most tensors alive at
# once in graph order, which the runtime's planner and arena round up (measured up to 3.3 times for a
# DenseNet, whose concatenations grow every buffer).
ORT_FLOOR_BYTES = 192 << 20
WEIGHT_FACTOR = 4
ACTIVATION_FACTOR = 4


@dataclass(frozen=True)
class OnnxMemory:
    """What running an ONNX graph takes in host memory, estimated (see ``ORT_FLOOR_BYTES``)."""

    static_batch: int | None  # the batch a static-batch graph takes; None for a dynamic batch
    input_bytes: int  # the input, one sample
    live_bytes: int  # the most activation bytes alive at once for one sample (the input included)
    weight_bytes: int  # the file and its external data

    def model_bytes(self, batch: int) -> int:
        """This model's share at ``batch``: its weights and activations, without the runtime's floor."""
        return WEIGHT_FACTOR * self.weight_bytes + ACTIVATION_FACTOR * self.live_bytes * batch

    def at(self, batch: int) -> int:
        """The estimated peak of one process running this model alone at ``batch``."""
        return ORT_FLOOR_BYTES + self.model_bytes(batch)


def memory_estimate(path: str | os.PathLike[str]) -> OnnxMemory | None:
    """``OnnxMemory`` of an ONNX graph, from onnx shape inference with the batch pinned to one (the weights
    are never loaded); None without onnx, for a file onnx cannot read or shapes it cannot infer (the
    runtime then says what is wrong), or for a graph of several inputs."""
    try:
        import onnx
        from onnx import helper, shape_inference
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - onnx raises protobuf and OS errors of several types
        return None
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1 or not inputs[0].type.tensor_type.HasField("shape") or not inputs[0].type.tensor_type.shape.dim:
        return None
    first = inputs[0].type.tensor_type.shape.dim[0]
    static = first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else None
    if static is None:
        first.dim_value = 1  # per-sample sizes: the dynamic batch pinned to one
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - without shapes there is no estimate
        return None

    def size(v: onnx.ValueInfoProto) -> int:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if t.elem_type == 0 or not t.HasField("shape") or min(dims, default=1) < 1:
            return 0  # unknown: left out
        return math.prod(dims) * helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize

    sizes = {v.name: size(v) for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    per_batch = static or 1
    own = sizes.get(inputs[0].name, 0)
    if own == 0:
        return None
    live = _live_peak(inferred.graph, sizes, inputs[0].name)
    side = Path(f"{path}.data")  # the dynamo exporter's external weights
    weights = Path(path).stat().st_size + (side.stat().st_size if side.exists() else 0)
    return OnnxMemory(static, own // per_batch, max(live, own) // per_batch, weights)


def _live_peak(graph: Any, sizes: dict[str, int], input_name: str) -> int:
    """The most bytes of activations alive at once when the nodes run in file order (a topological one):
    a tensor lives from the node that makes it to the last node that reads it (outputs to the end)."""
    last = {name: i for i, node in enumerate(graph.node) for name in node.input}
    outputs = {v.name for v in graph.output}
    live = {input_name: sizes.get(input_name, 0)}
    peak = sum(live.values())
    for i, node in enumerate(graph.node):
        live.update((name, sizes.get(name, 0)) for name in node.output)
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last.get(n, -1) <= i and n not in outputs]:
            del live[name]
    return peak
