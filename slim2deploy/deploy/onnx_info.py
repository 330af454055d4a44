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
