"""The fake's network definition and ONNX parser (see __init__)."""

from __future__ import annotations

import os
from typing import Any

from ._types import FROM_ONNX, DataType, Dims, ErrorCode, ILogger

# ops this fake's parser has no importer for (and any op outside the standard ONNX domains)
UNSUPPORTED_OPS = frozenset({"Unique", "StringNormalizer", "TfIdfVectorizer"})


class ITensor:
    def __init__(self, name: str, shape: Dims, dtype: DataType, dim_names: list[str]) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype
        self._dim_names = dim_names

    def get_dimension_name(self, index: int) -> str | None:
        return self._dim_names[index] or None


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.name = "Unnamed Network 0"
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._nodes: list[Any] = []
        self._model = b""

    def get_flag(self, flag: Any) -> bool:
        return bool(self.flags & (1 << int(flag)))

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._nodes)

    def __len__(self) -> int:
        return self.num_layers

    def get_input(self, index: int) -> ITensor | None:
        return self._inputs[index] if 0 <= index < len(self._inputs) else None

    def get_output(self, index: int) -> ITensor | None:
        return self._outputs[index] if 0 <= index < len(self._outputs) else None


class ParserError:
    def __init__(self, code: ErrorCode, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
        self._code, self._desc, self._node, self._name, self._op = code, desc, node, name, op

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def file(self) -> str:
        return "fake_onnx_parser.py"

    def func(self) -> str:
        return "import_model"

    def line(self) -> int:
        return 0

    def local_function_stack(self) -> list[str]:
        return []

    def local_function_stack_size(self) -> int:
        return 0

    def __str__(self) -> str:
        return f"In node {self._node} with name: {self._name} and operator: {self._op}: {self._code.name}: {self._desc}"


def _tensor(value_info: Any) -> ITensor:
    tensor_type = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    names = [d.dim_param for d in tensor_type.shape.dim]
    dtype = FROM_ONNX.get(tensor_type.elem_type, DataType.FLOAT)
    return ITensor(value_info.name, Dims(dims), dtype, names)


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self.network, self.logger = network, logger
        self.flags = 0
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError | None:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self) -> None:
        self._errors.clear()

    def supports_operator(self, op_name: str) -> bool:
        return op_name not in UNSUPPORTED_OPS

    def parse_from_file(self, model: str) -> bool:
        import onnx

        try:
            proto = onnx.load(model)  # with an external-data file next to it
        except Exception as exc:  # noqa: BLE001 - protobuf and file errors alike: the model does not load
            return self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"failed to load ONNX file {model}: {exc}")
        return self._import(proto)

    def parse(self, model: Any, path: str | None = None) -> bool:
        import onnx
        from onnx.external_data_helper import load_external_data_for_model

        try:
            proto = onnx.load_from_string(bytes(model))
            if path is not None:
                load_external_data_for_model(proto, os.path.dirname(path))
        except Exception as exc:  # noqa: BLE001
            return self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"failed to parse the ONNX model: {exc}")
        return self._import(proto)

    def _fail(self, code: ErrorCode, desc: str, node: int = -1, name: str = "", op: str = "") -> bool:
        error = ParserError(code, desc, node, name, op)
        self._errors.append(error)
        self.logger.log(ILogger.ERROR, str(error))
        return False

    def _import(self, proto: Any) -> bool:
        graph = proto.graph
        ok = True
        for i, node in enumerate(graph.node):
            if node.op_type in UNSUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
                desc = f"this TensorRT has no importer for {node.domain or 'ai.onnx'}::{node.op_type}"
                ok = self._fail(ErrorCode.UNSUPPORTED_NODE, desc, i, node.name, node.op_type)
        if not graph.output:
            ok = self._fail(ErrorCode.INVALID_GRAPH, "the graph has no outputs")
        if not ok:
            return False
        weights = {t.name for t in graph.initializer}
        self.network._inputs = [_tensor(v) for v in graph.input if v.name not in weights]
        self.network._outputs = [_tensor(v) for v in graph.output]
        self.network._nodes = list(graph.node)
        self.network._model = proto.SerializeToString()  # weights included: the engine is self-contained
        return True
