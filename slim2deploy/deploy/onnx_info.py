"""What an ONNX file holds, read without torch: params and per-sample MACs from the graph."""

from __future__ import annotations

import math
import os

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
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
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
    for node in graph.node:
        for i in _WEIGHT_OPS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                init = source_init(node.input[i])
                if init is not None and init not in counted:
                    counted.add(init)
                    params += math.prod(inits[init].dims)
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or not out or min(out) < 0:
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
    return {"params": int(params), "macs": int(macs // batch)}


def batch_bytes(path: str | os.PathLike[str]) -> tuple[int | None, int] | None:
    """(the input's static batch or None, bytes per sample of the largest single tensor) of an ONNX graph.

    The tensor is the input or, from onnx shape inference, the largest activation whose first
    dimension is the input's dynamic batch and whose other dimensions are known: a lower bound on
    what one sample needs at once (weights and tensors of unknown size are left out). A static-batch
    graph counts its input only. None without onnx or for a file onnx cannot read (the runtime
    then says what is wrong); the weights themselves are never loaded.
    """
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
    if len(inputs) != 1 or not inputs[0].type.tensor_type.HasField("shape"):
        return None

    def per_sample(v: onnx.ValueInfoProto) -> int | None:
        t = v.type.tensor_type
        rest = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim[1:]]
        if not t.shape.dim or min(rest, default=1) < 1 or t.elem_type == 0:
            return None
        return math.prod(rest) * helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize

    inp = inputs[0]
    first = inp.type.tensor_type.shape.dim[0] if inp.type.tensor_type.shape.dim else None
    own = per_sample(inp)
    if own is None or first is None:
        return None
    if first.HasField("dim_value") and first.dim_value > 0:
        return first.dim_value, own
    batch = first.dim_param or "slim2deploy_batch"
    first.dim_param = batch
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - without shapes the input alone is the bound
        return None, own
    largest = own
    for v in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].dim_param == batch and (size := per_sample(v)) is not None:
            largest = max(largest, size)
    return None, largest
