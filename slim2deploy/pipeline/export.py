"""One model to one gated ONNX file at one precision: export, parity, fp16/int8, agreement.

The orchestration of the ``export`` command (and of ``build`` and the study): the graph work is
in ``deploy`` (export, precision), the checks run two runners and compare (``measure.compare``).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import sha256_file
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
from slim2deploy.deploy.precision import check_precision, quantize_int8, to_fp16
from slim2deploy.measure.compare import check_agreement, check_parity


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
        raise SlimError("int8 needs a calibration set: pass --calib FILE (make one with 'slim2deploy calib')")
    if static_batch is not None and static_batch < 1:
        raise SlimError(f"--static-batch must be at least 1, got {static_batch}")
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal((8, *input_shape)).astype(np.float32)
    real = eval_x if eval_x is not None else calib_x
    if real is not None:
        probe = np.concatenate([probe, np.asarray(real[:64], dtype=np.float32)])
    example = torch.from_numpy(probe[: static_batch or 1].copy())
    if static_batch and len(example) < static_batch:
        example = torch.from_numpy(np.resize(probe, (static_batch, *input_shape)))
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="slim2deploy-precision-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        result = export_onnx(
            model, example, fp32_path, opset=check_opset(opset), dynamic_batch=static_batch is None
        )
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
