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

import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_path, sha256_file

if TYPE_CHECKING:
    import onnx
    import onnxruntime
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


@dataclass
class ParityReport:
    """ONNX Runtime against a reference; relative error is max|ort - ref| / max|ref| (robust near zero)."""

    n: int
    max_abs: float
    max_rel: float
    top1_agreement: float
    rtol: float
    atol: float
    ok: bool
    what: str = "onnx"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParityReport:
        return cls(**d)

    def summary(self) -> str:
        return (
            f"{self.what}: max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g} "
            f"(tolerance rtol {self.rtol:g}, atol {self.atol:g}), top-1 agreement {self.top1_agreement:.2%} "
            f"on {self.n} inputs"
        )

    def raise_if_failed(self) -> None:
        """The parity gate: a graph that does not compute what the model computes is not shipped."""
        if not self.ok:
            raise SlimError(
                f"parity check failed for {self.summary()}. The exported graph does not match the model; "
                "try another --opset or exporter, and report the model if it persists"
            )


def compare_outputs(ref: np.ndarray, out: np.ndarray, rtol: float, atol: float, what: str = "onnx") -> ParityReport:
    ref = ref.astype(np.float64).reshape(len(ref), -1)
    out = out.astype(np.float64).reshape(len(out), -1)
    if ref.shape != out.shape:
        raise SlimError(f"{what}: output shape {out.shape} differs from the reference {ref.shape}")
    max_abs = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    ok = bool(np.isfinite(out).all()) and max_abs <= atol + rtol * scale
    return ParityReport(len(ref), max_abs, max_rel, agree, rtol, atol, ok, what)


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
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SlimError(f"{path} is truncated or not a valid ONNX model ({first}); export it again") from exc
    return model


def ort_session(
    path: str | Path,
    optimization: str = "auto",
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    threads: int = 0,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session; ``optimization`` is disable/basic/extended/all, or auto (the file's own hint)."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization == "auto":
        optimization = onnx_metadata(path).get(ORT_LEVEL_KEY, "all")
    if optimization not in levels:
        raise SlimError(f"unknown ONNX Runtime optimisation level {optimization!r}; use {', '.join(levels)} or auto")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad files
        load_onnx(path)  # a damaged file gets the clearer message
        raise SlimError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from exc


def onnx_metadata(path: str | Path) -> dict[str, str]:
    return {p.key: p.value for p in load_onnx(path, check=False).metadata_props}


def run_onnx(session: onnxruntime.InferenceSession, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``x`` through the session in batches (a static-batch graph gets its own batch size)."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or batch_size
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    outs = []
    for start in range(0, len(x), step):
        chunk = x[start : start + step].astype(dtype)
        n = len(chunk)
        if fixed and n < fixed:  # pad the last batch of a static graph, then drop the padding
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        outs.append(np.asarray(session.run(None, {inp.name: chunk})[0])[:n].astype(np.float32))
    return np.concatenate(outs)


def torch_outputs(model: torch.nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import torch

    model = model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(x[i : i + batch_size])).float().numpy() for i in range(0, len(x), batch_size)]
        )


def check_parity(
    model: torch.nn.Module,
    onnx_path: str | Path,
    inputs: np.ndarray,
    *,
    rtol: float = FP32_RTOL,
    atol: float = FP32_ATOL,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    optimization: str = "auto",
) -> ParityReport:
    """Compare the ONNX file on ONNX Runtime with the torch model on ``inputs`` (float32, N x C x H x W).

    Passes when max|ort - torch| <= atol + rtol * max|torch|. Call ``raise_if_failed()`` to gate.
    """
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    ref = torch_outputs(model, inputs)
    out = run_onnx(ort_session(onnx_path, optimization, providers), inputs)
    return compare_outputs(ref, out, rtol, atol, what=Path(onnx_path).name)


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


def fold_conv_bn(model: onnx.ModelProto) -> int:
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


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    try:
        import onnxslim
    except ImportError:
        return model, None
    try:
        return onnxslim.slim(model), f"onnxslim {getattr(onnxslim, '__version__', '')}".strip()
    except Exception as exc:  # noqa: BLE001 - a simplifier failure must not block an export that is valid
        warnings.warn(f"onnxslim failed ({exc}); keeping the unsimplified graph", stacklevel=3)
        return model, None


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
            f"--opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET}): int8 Q/DQ "
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
    Run ``check_parity`` on the result before shipping it.
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
    with tempfile.TemporaryDirectory(prefix="slim2deploy-export-") as tmpdir, torch.no_grad():
        raw = Path(tmpdir) / "raw.onnx"
        for name in tried:
            try:
                (_exporter_torchscript if name == "torchscript" else _exporter_dynamo)(
                    model, example_input, raw, opset, dynamic_batch
                )
                used = name
                break
            except Exception as exc:  # noqa: BLE001 - exporters raise anything; all tried ones are reported
                errors.append(f"{name}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc!r}")
        else:
            raise SlimError(f"ONNX export failed ({'; '.join(errors)})")
        proto = onnx.load(str(raw))
    simplifier = None
    if simplify:
        proto, simplifier = _simplify(proto)
    fold_conv_bn(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise SlimError(f"the exported graph fails onnx.checker ({str(exc).splitlines()[0][:300]})") from exc
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
