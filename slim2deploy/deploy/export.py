"""ONNX export with a parity gate: one self-contained, checked, Conv+BN-folded graph per model.

Exporter: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) by default. Here it
takes 0.2-0.9 s per zoo/torchvision model against 3-6 s for the dynamo exporter, gives the same
numerics (both ~3e-7 relative to torch), folds Conv+BN itself in eval mode and writes one file.
It is deprecated upstream, so ``exporter="auto"`` falls back to the dynamo exporter when it is
missing or fails; ``exporter="dynamo"`` forces the new one.

Opset 17 by default: supported by ONNX Runtime and by TensorRT 8.6-10's ONNX parser, and new
enough for per-channel QuantizeLinear/DequantizeLinear (opset >= 13) used by int8 graphs.

After export the graph is simplified with onnxslim when installed (it drops the Identity and
Constant nodes the TorchScript exporter leaves: mobilenet_v2 170 -> 100 nodes, resnet20 69 -> 62;
ORT latency is unchanged because ORT does the same at load time, but TensorRT and people read a
smaller graph), any remaining Conv -> BatchNormalization pair is folded, and the result must pass
``onnx.checker`` with strict shape inference and contain no channel-selection Gather.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slim2deploy.base.errors import SlimError, first_line
from slim2deploy.base.files import atomic_path, sha256_file, temporary_folder

if TYPE_CHECKING:
    import onnx
    import torch

DEFAULT_OPSET = 17
# 13: per-channel QuantizeLinear/DequantizeLinear for int8; 20: the TorchScript exporter's last opset
# (above it, or below 13, torch would silently write another opset than the one asked for)
MIN_OPSET, MAX_OPSET = 13, 20
# the dynamo exporter implements opset 18 and up; converting down to 17 fails on ReduceMean here
DYNAMO_MIN_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# protobuf cannot hold more than 2 GiB in one message; only then do weights go to a side file
PROTOBUF_LIMIT = 2**31 - 1
# metadata key telling ONNX Runtime users which graph optimisation level gives faithful numerics
# (read by runtime.ort.ort_session, the package's one ONNX Runtime session factory)
ORT_LEVEL_KEY = "slim2deploy.ort_optimization"
PRECISION_KEY = "slim2deploy.precision"

FP32_RTOL, FP32_ATOL = 1e-4, 1e-6
# fp16 has a 10-bit mantissa (2^-11 ~ 4.9e-4 per rounding); errors grow with depth, so logits are
# allowed 1e-2 of their largest magnitude. Measured: resnet20 ~8e-4, mobilenet_v2 ~2e-3.
FP16_RTOL, FP16_ATOL = 1e-2, 1e-4


@dataclass
class ExportResult:
    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    input_shape: list[int | str]
    bytes: int
    sha256: str
    exporter: str
    simplifier: str | None
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportResult:
        return cls(**d)


def load_onnx(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file; a truncated or damaged file is one clear SlimError."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise SlimError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(str(path))
        if check:
            onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise many types for a bad file
        raise SlimError(
            f"{path} is truncated or not a valid ONNX model ({first_line(exc, 200)}); export it again"
        ) from exc
    return model


def _exporter_torchscript(model: Any, x: Any, path: Path, opset: int, dynamic_batch: bool) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
            do_constant_folding=True,
        )


def _exporter_dynamo(model: Any, x: Any, path: Path, opset: int, dynamic_batch: bool) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=max(opset, DYNAMO_MIN_OPSET),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("the dynamo exporter returned no program")
    program.save(str(path), external_data=False)


def fuse_conv_bn_nodes(model: onnx.ModelProto) -> int:
    """Fold every BatchNormalization whose only input producer is a Conv used by nothing else; returns count."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    folded = []
    for bn in graph.node:
        conv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if (
            conv is None
            or conv.op_type != "Conv"
            or consumers.get(conv.output[0]) != 1
            or conv.output[0] in outputs
            or len(bn.output) != 1
            or not all(name in inits for name in [*bn.input[1:5], *conv.input[1:]])
        ):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        w_init = inits[conv.input[1]]
        w = numpy_helper.to_array(w_init).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
        scale = gamma / np.sqrt(var + eps)
        dtype = numpy_helper.to_array(w_init).dtype
        folded_w = (w * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(dtype)
        new_w = numpy_helper.from_array(folded_w, conv.input[1] + "_bnfold")
        new_b = numpy_helper.from_array(((b - mean) * scale + beta).astype(dtype), conv.input[1] + "_bnfold_bias")
        graph.initializer.extend([new_w, new_b])
        data = conv.input[0]
        del conv.input[:]
        conv.input.extend([data, new_w.name, new_b.name])
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    if folded:
        _drop_unused_initializers(model)
    return len(folded)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def graph_leftovers(model: onnx.ModelProto) -> list[str]:
    """What a deployable classifier graph must not contain: unfolded Conv+BN, channel-selection gathers."""
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name for t in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    problems = []
    for node in model.graph.node:
        src = producer.get(node.input[0]) if node.input else None
        # a Conv whose output also feeds a shortcut (pre-activation ResNet stem) must stay unfolded
        if (
            node.op_type == "BatchNormalization"
            and src is not None
            and src.op_type == "Conv"
            and consumers[node.input[0]] == 1
        ):
            problems.append(f"BatchNormalization {node.name!r} after Conv {src.name!r} was not folded")
        if node.op_type in ("Gather", "GatherElements", "GatherND"):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            from_shape = src is not None and src.op_type == "Shape"
            if axis != 0 and not from_shape and node.input[0] not in inits:
                problems.append(f"{node.op_type} {node.name!r} selects along axis {axis} (a pruning leftover?)")
    return problems


def _simplify(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, str | None]:
    """The graph simplified by onnxslim, if it is installed and leaves the outputs as they were: a simplifier
    must never change what the model computes (onnxslim 0.1.90 merged a TF-style asymmetric Pad into the next
    Conv wrongly: 7% relative error), so both graphs run on ONNX Runtime and the simplified one is kept only
    where they agree. Without ONNX Runtime to check it, the graph is kept as exported."""
    try:
        import onnxslim
    except ImportError:
        return model, None
    try:
        slim = onnxslim.slim(model)
    except Exception as exc:  # noqa: BLE001 - a simplifier failure must not block an export that is valid
        warnings.warn(f"onnxslim failed ({first_line(exc)}); keeping the unsimplified graph", stacklevel=3)
        return model, None
    name = f"onnxslim {getattr(onnxslim, '__version__', '')}".strip()
    differs = _outputs_differ(model, slim, batch)
    if differs is not None:  # recorded in the export's info: the graph is the exporter's own
        return model, f"none ({name} not kept: {differs})"
    return slim, name


def _outputs_differ(a: onnx.ModelProto, b: onnx.ModelProto, batch: int) -> str | None:
    """Why two graphs of one model disagree on random inputs (None: they agree to 1e-5 relative); "cannot
    check" where ONNX Runtime is missing or fails on one of them."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "cannot check without onnxruntime"
    dims = [d.dim_value or batch for d in a.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    outs = []
    for model in (a, b):
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
        except Exception as exc:  # noqa: BLE001 - either graph failing to run is a reason to keep the other
            return f"cannot check: {first_line(exc)}"
    err = float(np.abs(outs[0] - outs[1]).max() / max(float(np.abs(outs[0]).max()), 1e-12))
    return None if err <= 1e-5 else f"max relative difference {err:.2g}"


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write one self-contained file atomically (weights in a side .data file only past protobuf's 2 GiB)."""
    import onnx

    path = Path(path)
    with atomic_path(path) as tmp:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.save(model, str(tmp))
        else:
            onnx.save(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
    return path


def check_opset(opset: int | None) -> int:
    """The opset to export at (None: the default); one outside MIN_OPSET..MAX_OPSET is refused."""
    if opset is None:
        return DEFAULT_OPSET
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SlimError(
            f"`opset` {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET}): int8 Q/DQ "
            f"needs {MIN_OPSET}, and the exporter writes at most {MAX_OPSET}"
        )
    return opset


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    simplify: bool = True,
) -> ExportResult:
    """Export ``model`` (eval mode) to ``path``: folded, simplified, checked, shape-inferred, one file.

    ``example_input`` fixes C x H x W (and the batch size when ``dynamic_batch`` is False).
    ``exporter`` is auto (TorchScript, then dynamo if that fails), torchscript or dynamo.
    Run ``measure.compare.check_parity`` on the result before shipping it.
    """
    import onnx
    import torch

    if exporter not in ("auto", "torchscript", "dynamo"):
        raise SlimError(f"unknown exporter {exporter!r}; use auto, torchscript or dynamo")
    opset = check_opset(opset)
    if example_input.dim() != 4:
        raise SlimError(f"the example input must be N x C x H x W, got shape {tuple(example_input.shape)}")
    start = time.perf_counter()
    model = model.eval()
    tried = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors = []
    with temporary_folder("slim2deploy-export-") as tmpdir, torch.no_grad():
        raw = Path(tmpdir) / "raw.onnx"
        for name in tried:
            try:
                (_exporter_torchscript if name == "torchscript" else _exporter_dynamo)(
                    model, example_input, raw, opset, dynamic_batch
                )
                used = name
                break
            except Exception as exc:  # noqa: BLE001 - exporters raise anything; all tried ones are reported
                errors.append(f"{name}: {first_line(exc)}")
        else:
            raise SlimError(f"ONNX export failed ({'; '.join(errors)})")
        proto = onnx.load(str(raw))
    simplifier = None
    if simplify:
        proto, simplifier = _simplify(proto, max(int(example_input.shape[0]), 2))
    fuse_conv_bn_nodes(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise SlimError(f"the exported graph fails onnx.checker ({first_line(exc)})") from exc
    problems = graph_leftovers(proto)
    if problems:
        raise SlimError("the exported graph is not clean: " + "; ".join(problems[:5]))
    save_onnx(proto, path)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return ExportResult(
        path=str(path),
        opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        input_shape=[d.dim_param if d.dim_param else int(d.dim_value) for d in dims],
        bytes=Path(path).stat().st_size,
        sha256=sha256_file(path),
        exporter=used,
        simplifier=simplifier,
        seconds=round(time.perf_counter() - start, 3),
        op_counts=ops,
    )
