"""One model to one gated ONNX file at one precision: export, parity, fp16/int8, agreement.

The orchestration of the ``export`` command (and of ``build`` and the study): the graph work is
in ``deploy`` (export, precision), the checks run two runners and compare (``measure.compare``).

``export_precision`` makes one gated file at one precision (the ``export`` command).
``export_checked`` writes an fp32 graph behind the torch-parity gate and ``make_precision`` turns
it into an fp16 or int8 graph with its agreement (and accuracy, given labels) against fp32: the
``build`` stages call these two separately, each cached; ``export_variants`` is both at once, for
callers that want every precision of a model in one call (``bench/study.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import sha256_file, temporary_folder
from slim2deploy.deploy.calib import load_calib
from slim2deploy.deploy.engine import engine_available
from slim2deploy.deploy.export import (
    FP16_ATOL,
    FP16_RTOL,
    FP32_ATOL,
    FP32_RTOL,
    check_opset,
    export_onnx,
    load_onnx,
    save_onnx,
)
from slim2deploy.deploy.precision import check_precision, quantize_int8, resolve_int8_flavour, to_fp16
from slim2deploy.measure.compare import check_agreement, check_parity
from slim2deploy.model.checkpoint import load_checkpoint, with_input_shape
from slim2deploy.model.folder import sample_arrays
from slim2deploy.model.preprocess import data_for
from slim2deploy.prune.rebuild import model_from_checkpoint

if TYPE_CHECKING:
    import torch


@dataclass
class PrecisionExport:
    """Everything one ``export_precision`` call produced and measured, JSON-able for reports."""

    precision: str
    export: dict[str, Any]
    parity: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None
    agreement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionExport:
        return cls(**d)


def export_precision(
    model: Any,
    input_shape: tuple[int, int, int],
    out: str | Path,
    *,
    precision: str = "fp32",
    calib_x: np.ndarray | None = None,
    calib_method: str = "minmax",
    flavour: str = "tensorrt",
    static_batch: int | None = None,
    opset: int | None = None,
    eval_x: np.ndarray | None = None,
    eval_y: np.ndarray | None = None,
    seed: int = 0,
    fp16_io: bool = False,
) -> PrecisionExport:
    """Export ``model`` at ``precision`` to ``out``, gated: fp32 and fp16 must match torch within tolerance.

    The fp32 graph is always exported and parity-checked first (on random inputs plus up to 64
    calibration/evaluation inputs); fp16 gets its own tolerance; int8 needs ``calib_x`` and reports
    top-1 agreement with fp32 on ``eval_x`` (held-out data; the calibration set when none is given).
    Nothing is written to ``out`` unless every check passes.
    """
    import torch

    check_precision(precision)
    if precision == "int8" and calib_x is None:
        raise SlimError("int8 needs a calibration set: pass one as `calib` (make one with 'slim2deploy calib')")
    if static_batch is not None and static_batch < 1:
        raise SlimError(f"`static_batch` must be at least 1, got {static_batch}")
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal((8, *input_shape)).astype(np.float32)
    real = eval_x if eval_x is not None else calib_x
    if real is not None:
        probe = np.concatenate([probe, np.asarray(real[:64], dtype=np.float32)])
    example = torch.from_numpy(probe[: static_batch or 1].copy())
    if static_batch and len(example) < static_batch:
        example = torch.from_numpy(np.resize(probe, (static_batch, *input_shape)))
    out = Path(out)
    with temporary_folder("slim2deploy-precision-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        result = export_onnx(model, example, fp32_path, opset=check_opset(opset), dynamic_batch=static_batch is None)
        parity = check_parity(model, fp32_path, probe, rtol=FP32_RTOL, atol=FP32_ATOL)
        parity.raise_if_failed()
        report = PrecisionExport(precision, result.to_dict(), parity.to_dict())
        final = Path(tmp) / "final.onnx"
        if precision == "fp32":
            final = fp32_path
        elif precision == "fp16":
            to_fp16(fp32_path, final, keep_io_fp32=not fp16_io)
            fp16_parity = check_parity(model, final, probe, rtol=FP16_RTOL, atol=FP16_ATOL)
            fp16_parity.raise_if_failed()
            report.parity = fp16_parity.to_dict()
        else:
            assert calib_x is not None
            report.int8 = quantize_int8(fp32_path, final, calib_x, method=calib_method, flavour=flavour).to_dict()
            if eval_x is not None:
                report.agreement = check_agreement(final, fp32_path, eval_x, eval_y).to_dict()
            else:
                report.agreement = check_agreement(final, fp32_path, calib_x).to_dict()
        save_onnx(load_onnx(final), out)
    report.export.update(path=str(out), bytes=out.stat().st_size, sha256=sha256_file(out))
    return report


def variant_path(fp32: Path, precision: str) -> Path:
    """``slim.onnx`` -> ``slim.fp16.onnx``; fp32 is the file itself."""
    return fp32 if precision == "fp32" else fp32.with_suffix(f".{precision}.onnx")


def export_checked(
    model: torch.nn.Module, example: torch.Tensor, path: Path, parity_x: np.ndarray, *, opset: int | None = None
) -> dict[str, Any]:
    """Export fp32 ONNX to ``path``; raise SlimError unless ONNX Runtime matches torch on ``parity_x``."""
    res = export_onnx(model, example, path, opset=check_opset(opset))
    parity = check_parity(model, path, parity_x)
    parity.raise_if_failed()
    return {**res.to_dict(), "parity": parity.to_dict(), "summary": parity.summary()}


def make_precision(
    src: Path,
    precision: str,
    eval_x: np.ndarray,
    eval_y: np.ndarray | None = None,
    *,
    calib_x: np.ndarray | None = None,
    calib_method: str = "minmax",
    flavour: str = "tensorrt",
) -> dict[str, Any]:
    """Write ``variant_path(src, precision)`` from the fp32 graph ``src``; its agreement with ``src`` on ``eval_x``."""
    dst = variant_path(src, precision)
    if precision == "fp16":
        to_fp16(src, dst)
    elif precision == "int8":
        if calib_x is None:
            raise SlimError("int8 needs a calibration set: pass one as `calib` (make one with 'slim2deploy calib')")
        quantize_int8(src, dst, calib_x, method=calib_method, flavour=flavour)
    else:
        raise SlimError(f"make_precision converts fp32 graphs to fp16 or int8, not {precision!r}")
    rep = check_agreement(dst, src, eval_x, eval_y)
    return {**rep.to_dict(), "summary": rep.summary()}


def export_variants(
    model: torch.nn.Module,
    example: torch.Tensor,
    fp32_path: Path,
    precisions: Sequence[str],
    eval_x: np.ndarray,
    eval_y: np.ndarray | None = None,
    *,
    calib_x: np.ndarray | None = None,
    calib_method: str = "minmax",
    flavour: str = "tensorrt",
    opset: int | None = None,
) -> dict[str, Any]:
    """fp32 export (parity-gated on the first 64 of ``eval_x``) and every other precision from it.

    Returns ``{"fp32": export info, "fp16": agreement info, ...}``; files are named by ``variant_path``.
    """
    for p in precisions:
        check_precision(p)
    out = {"fp32": export_checked(model.cpu().eval(), example, fp32_path, eval_x[:64], opset=opset)}
    for p in precisions:
        if p != "fp32":
            out[p] = make_precision(
                fp32_path, p, eval_x, eval_y, calib_x=calib_x, calib_method=calib_method, flavour=flavour
            )
    return out


def precision_outputs(out: str | Path, precisions: Sequence[str]) -> dict[str, Path]:
    """Where each precision goes: the first to ``out``, each other beside it (``slim.onnx`` -> ``slim.fp16.onnx``)."""
    first = Path(out)
    return {
        p: first if i == 0 else first.with_name(f"{first.stem}.{p}{first.suffix}") for i, p in enumerate(precisions)
    }


def export_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    precisions: Sequence[str] = ("fp32",),
    calib: str | Path | None = None,
    calib_method: str = "minmax",
    int8_flavour: str = "auto",
    data: str | None = None,
    data_dir: str | None = None,
    eval_limit: int | None = 1000,
    static_batch: int | None = None,
    opset: int | None = None,
    fp16_io: bool = False,
    trust_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, PrecisionExport]:
    """What ``slim2deploy export`` does: the checkpoint at ``src`` as one gated ONNX file per precision
    (``precision_outputs``); int8 in ``int8_flavour`` (``auto``: TensorRT's where TensorRT is installed here,
    else ONNX Runtime CPU's), its agreement measured on ``data`` (held-out, read as the checkpoint records)."""
    if not precisions or len(set(precisions)) != len(precisions):
        raise SlimError(f"`precision` needs distinct precisions, got {','.join(precisions) or 'none'}")
    for precision in precisions:
        check_precision(precision)
    check_opset(opset)
    flavour, why = resolve_int8_flavour(int8_flavour, engines=engine_available()[0])
    ckpt = with_input_shape(load_checkpoint(src, trust_code=trust_code), input_shape, str(src))
    model = model_from_checkpoint(ckpt, trust_code=trust_code)
    calib_x = load_calib(calib, ckpt.input_shape, ckpt.stats) if calib else None
    eval_x = eval_y = None
    if data and "int8" in precisions:
        eval_x, eval_y = sample_arrays(data_for(ckpt, data, "val", data_dir=data_dir, limit=eval_limit), eval_limit)
    if log and "int8" in precisions:
        log(f"int8 flavour: {flavour} ({why})")
    reports = {}
    for precision, path in precision_outputs(out, precisions).items():
        reports[precision] = export_precision(
            model, ckpt.input_shape, path, precision=precision, calib_x=calib_x, calib_method=calib_method,
            flavour=flavour, static_batch=static_batch, opset=opset, eval_x=eval_x, eval_y=eval_y, fp16_io=fp16_io,
        )  # fmt: skip
    return reports
