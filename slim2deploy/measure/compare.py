"""Parity and agreement as "run two runners, compare outputs", in the manner of Polygraphy's Comparator.

A reference and a candidate are any two runners (torch against ONNX Runtime for the export
gate, an fp32 graph against its fp16 or int8 copy for precision agreement); only the base
Runner API is used, so a new runtime is compared without a line here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.export import FP32_ATOL, FP32_RTOL
from slim2deploy.runtime.base import Runner
from slim2deploy.runtime.registry import open_runner


@dataclass
class ParityReport:
    """A candidate against a reference; relative error is max|out - ref| / max|ref| (robust near zero)."""

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
                "try another `opset` or exporter, and report the model if it persists"
            )


def compare_outputs(ref: np.ndarray, out: np.ndarray, rtol: float, atol: float, what: str = "onnx") -> ParityReport:
    """Passes when every output is finite and max|out - ref| <= atol + rtol * max|ref|."""
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


@contextlib.contextmanager
def active(runner: Runner) -> Iterator[Runner]:
    """``runner`` activated for the block; one the caller activated stays active afterwards."""
    if runner.is_active:
        yield runner
        return
    with runner:
        yield runner


def run_all(runner: Runner, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Outputs (float32) for every input in ``x``, in batches the runner accepts.

    A static-batch graph or an engine's profile bounds the batch; a short last batch is padded
    with copies of its last input and the padding dropped.
    """
    info = runner.info
    step = min(batch_size, info.max_batch or batch_size)
    step = max(step, info.min_batch)
    outs = []
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        n = len(chunk)
        if n < info.min_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], info.min_batch - n, axis=0)])
        outs.append(np.asarray(runner.infer(chunk))[:n].astype(np.float32))
    return np.concatenate(outs)


def _runner(source: Any, x: np.ndarray, **options: Any) -> Runner:
    if isinstance(source, Runner):
        return source
    if isinstance(source, str | os.PathLike):
        return open_runner(source, **options)
    return open_runner(source, backend="torch", device="cpu", input_shape=tuple(x.shape[1:]))


def check_parity(
    model_or_runner: Any,
    onnx_path: str | os.PathLike[str],
    inputs: np.ndarray,
    *,
    rtol: float = FP32_RTOL,
    atol: float = FP32_ATOL,
    device: str = "cpu",
    optimization: str = "auto",
) -> ParityReport:
    """The ONNX file on ONNX Runtime against a reference on ``inputs`` (float32, N x C x H x W).

    The reference is an ``nn.Module`` (run by torch on the CPU), a runner, or a model file.
    Call ``raise_if_failed()`` on the report to gate.
    """
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    candidate = open_runner(onnx_path, backend="onnx", device=device, opt_level=optimization)
    reference = _runner(model_or_runner, x, device=device)
    with active(candidate), active(reference):
        out = run_all(candidate, x)
        ref = run_all(reference, x)
    return compare_outputs(ref, out, rtol, atol, what=Path(onnx_path).name)


@dataclass
class AgreementReport:
    """A candidate (fp16 / int8 graph) against an fp32 reference on held-out inputs."""

    candidate: str
    n: int
    top1_agreement: float
    max_abs: float
    max_rel: float
    accuracy: float | None
    reference_accuracy: float | None
    ort_optimization: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgreementReport:
        return cls(**d)

    def summary(self) -> str:
        text = f"{Path(self.candidate).name}: top-1 agreement with fp32 {self.top1_agreement:.2%} on {self.n} inputs"
        if self.accuracy is not None and self.reference_accuracy is not None:
            text += f", accuracy {self.accuracy:.2%} (fp32 {self.reference_accuracy:.2%})"
        return text + f", max rel error {self.max_rel:.3g} (ORT optimisation {self.ort_optimization})"


def check_agreement(
    candidate: str | os.PathLike[str] | Runner,
    reference: str | os.PathLike[str] | Runner,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    optimization: str = "auto",
    device: str = "cpu",
    batch_size: int = 64,
) -> AgreementReport:
    """Top-1 agreement (and accuracy when labels ``y`` are given) of ``candidate`` against ``reference``.

    Files are opened by type; ``optimization="auto"`` runs each ONNX file at the level it records
    (BASIC for TensorRT-bound int8 graphs).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    cand = _runner(candidate, x, device=device, opt_level=optimization)
    ref_runner = _runner(reference, x, device=device)
    with active(cand), active(ref_runner):
        out = run_all(cand, x, batch_size)
        ref = run_all(ref_runner, x, batch_size)
        level = str(cand.info.options.get("opt_level", "n/a"))
    name = str(cand.path) if cand.path is not None else cand.name
    report = compare_outputs(ref, out, rtol=0.0, atol=0.0, what=name)
    acc = ref_acc = None
    if y is not None:
        acc = float((out.argmax(1) == y).mean())
        ref_acc = float((ref.argmax(1) == y).mean())
    return AgreementReport(name, len(x), report.top1_agreement, report.max_abs, report.max_rel, acc, ref_acc, level)
