"""The export and precision stages: a torch model in, its fp32/fp16/int8 ONNX graphs out, each measured.

``export_checked`` writes the fp32 graph behind the torch-parity gate; ``make_precision`` turns
an fp32 graph into an fp16 or a calibrated int8 Q/DQ graph and measures its top-1 agreement
(and accuracy, given labels) against fp32. ``export_variants`` is both in one call, for callers
that want every precision of a model at once (``bench/study.py``); ``build`` calls the two
pieces as separate cached stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.export import DEFAULT_OPSET, check_parity, export_onnx
from slim2deploy.deploy.precision import check_precision, evaluate_onnx, quantize_int8, to_fp16


def variant_path(fp32: Path, precision: str) -> Path:
    """``slim.onnx`` -> ``slim.fp16.onnx``; fp32 is the file itself."""
    return fp32 if precision == "fp32" else fp32.with_suffix(f".{precision}.onnx")


def export_checked(
    model: torch.nn.Module, example: torch.Tensor, path: Path, parity_x: np.ndarray, *, opset: int | None = None
) -> dict[str, Any]:
    """Export fp32 ONNX to ``path``; raise SlimError unless ONNX Runtime matches torch on ``parity_x``."""
    res = export_onnx(model, example, path, opset=opset or DEFAULT_OPSET)
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
            raise SlimError("int8 needs a calibration set: pass --calib FILE (make one with 'slim2deploy calib')")
        quantize_int8(src, dst, calib_x, method=calib_method, flavour=flavour)
    else:
        raise SlimError(f"make_precision converts fp32 graphs to fp16 or int8, not {precision!r}")
    rep = evaluate_onnx(dst, src, eval_x, eval_y)
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
