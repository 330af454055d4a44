"""Latency and throughput of models, baseline beside slim, in one interleaved run.

The method follows trtexec and Polygraphy: warm up for a fixed time, then many timed
iterations over a few rotated input sets, each call ending with the output on the host (so a
GPU is synchronised), reported as min/mean/median/p90/p95/p99/max and samples/s. Models given
together are measured interleaved: every round runs each model for a slice of the iterations,
with the order rotated per round, so drifting clocks or a noisy neighbour hit all of them
alike; the spread of the per-round medians shows how much that noise was.

Only the base Runner API is used; nothing here imports torch (only the torch runner does, for
checkpoints), so ``bench/latency.py`` runs on a GPU box with numpy and a runtime only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.environment import check_memory
from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.onnx_info import ORT_FLOOR_BYTES, memory_estimate
from slim2deploy.measure.environment import environment
from slim2deploy.measure.memory import peak_rss
from slim2deploy.measure.results import BatchResult, Comparison, LatencyStats, ModelResult, ModelSize, Speedup
from slim2deploy.runtime.base import Runner
from slim2deploy.runtime.registry import open_runner, runner_kind


def _file_bytes(path: Path) -> int:
    side = path.with_name(path.name + ".data")  # the dynamo exporter's external weights
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)


def model_size(runner: Runner) -> ModelSize:
    """Params/MACs from the best source the runner knows, its file size and its memory figures."""
    costs, source = runner.costs()
    return ModelSize(
        params=costs.get("params"),
        macs=costs.get("macs"),
        file_bytes=_file_bytes(runner.path) if runner.path is not None else 0,
        cost_source=source,
        memory=runner.memory(),
    )


# ---------------------------------------------------------------------------------------------
def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.stem for p in paths]
    if len(set(names)) == len(names):
        return names
    names = [f"{p.parent.name}/{p.stem}" for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _timed(runner: Runner, inputs: list[np.ndarray], n: int, start: int) -> tuple[list[float], list[float]]:
    wall: list[float] = []
    device: list[float] = []
    for i in range(n):
        x = inputs[(start + i) % len(inputs)]
        t0 = time.perf_counter_ns()
        runner.infer(x)
        wall.append((time.perf_counter_ns() - t0) / 1e6)
        if runner.last_compute_ms is not None:
            device.append(runner.last_compute_ms)
    return wall, device


def _warm_up(runner: Runner, inputs: list[np.ndarray], seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    i = 0
    while True:  # at least two calls: the first one often allocates or captures a graph
        runner.infer(inputs[i % len(inputs)])
        i += 1
        if i >= 2 and time.perf_counter() >= deadline:
            return


def measure(
    runners: Sequence[Runner],
    batches: Sequence[int],
    *,
    warmup_s: float = 1.0,
    iterations: int = 100,
    rounds: int = 5,
    input_sets: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[tuple[list[BatchResult], dict[int, str]]]:
    """Interleaved timing of active runners; per runner (batch results, skipped batches)."""
    if iterations < rounds or rounds < 1:
        raise SlimError(f"need at least one iteration per round (iterations={iterations}, rounds={rounds})")
    per_round = math.ceil(iterations / rounds)
    rng = np.random.default_rng(seed)
    results: list[tuple[list[BatchResult], dict[int, str]]] = [([], {}) for _ in runners]
    for batch in batches:
        active = []
        for k, r in enumerate(runners):
            if r.supports_batch(batch):
                active.append(k)
            else:
                hi = r.info.max_batch
                results[k][1][batch] = f"outside the supported batch range {r.info.min_batch}..{hi}"
        if not active:
            continue
        if log:
            log(f"batch {batch}: warm-up {warmup_s:g} s, {rounds} rounds x {per_round} iterations per model")
        inputs: dict[int, list[np.ndarray]] = {}
        for k in active:
            info = runners[k].info
            shape = (batch, *info.sample_shape)
            inputs[k] = [rng.standard_normal(shape).astype(info.input_dtype) for _ in range(input_sets)]
            _warm_up(runners[k], inputs[k], warmup_s)
        wall: dict[int, list[float]] = {k: [] for k in active}
        device: dict[int, list[float]] = {k: [] for k in active}
        medians: dict[int, list[float]] = {k: [] for k in active}
        for rnd in range(rounds):
            order = active[rnd % len(active) :] + active[: rnd % len(active)]
            for k in order:
                w, d = _timed(runners[k], inputs[k], per_round, rnd * per_round)
                wall[k] += w
                device[k] += d
                medians[k].append(float(np.median(w)))
        for k in active:
            results[k][0].append(
                BatchResult(
                    batch=batch,
                    latency=LatencyStats.from_samples(batch, wall[k]),
                    compute=LatencyStats.from_samples(batch, device[k]) if len(device[k]) == len(wall[k]) else None,
                    round_medians_ms=medians[k],
                )
            )
    return results


def speedups(models: Sequence[ModelResult], baseline: ModelResult) -> list[Speedup]:
    out = []
    for m in models:
        if m is baseline:
            continue
        macs_ratio = None
        if m.size.macs and baseline.size.macs:
            macs_ratio = m.size.macs / baseline.size.macs
        for b in m.batches:
            base = baseline.at(b.batch)
            if base is None:
                continue
            speedup = base.latency.median_ms / b.latency.median_ms
            reduction = 1.0 - b.latency.median_ms / base.latency.median_ms
            efficiency = None
            if macs_ratio is not None and macs_ratio < 1.0:
                efficiency = reduction / (1.0 - macs_ratio)
            out.append(Speedup(m.name, b.batch, speedup, reduction, macs_ratio, efficiency))
    return out


def _check_same_input(runners: Sequence[Runner]) -> None:
    """A speed-up is only one when both models do the same job: refuse models of another input."""
    base = runners[0]
    for r in runners[1:]:
        if r.info.sample_shape != base.info.sample_shape:
            raise SlimError(
                f"{r.name} takes inputs of shape {list(r.info.sample_shape)} but the baseline {base.name} takes "
                f"{list(base.info.sample_shape)}; a speed-up between models of different inputs means nothing: "
                "give a baseline of the same input shape, or drop the `baseline`"
            )


def check_onnx_batches(
    paths: Sequence[Path], batches: Sequence[int], flag: str = "`bench_batch`", input_sets: int = 1
) -> None:
    """Refuse, before any session is made, batches whose ONNX models, timed together in one process, would
    not fit in the memory: each graph's estimate (``onnx_info.memory_estimate``, checked against measured
    peaks) plus the input sets the benchmark draws. A static-batch graph counts at its own batch only."""
    estimates = [(p, e) for p in paths if runner_kind(p) == "onnx" and (e := memory_estimate(p)) is not None]
    batch = max(batches)
    running = [(p, e, b) for p, e in estimates if (b := batch if e.static_batch is None else e.static_batch) in batches]
    if running:
        need = ORT_FLOOR_BYTES + sum(
            e.model_bytes(b) + _input_bytes(e.input_bytes, b, input_sets) for _, e, b in running
        )
        names = " and ".join(p.name for p, _, _ in running)
        what = f"one batch through {names} (the graph's live activations, weights and ONNX Runtime's own memory)"
        check_memory(need, flag, batch, what, estimated=True)


def check_runner_batches(runners: Sequence[Runner], batches: Sequence[int], flag: str, input_sets: int = 1) -> None:
    """Refuse, before any batch is drawn, batches that active runners knowing what a sample needs in a forward
    pass (``Runner.sample_bytes``: the torch runner) cannot hold in memory at once, with the input sets."""
    batch = max(batches)
    sized = [(r, n) for r in runners if (n := r.sample_bytes()) is not None]
    if sized:
        need = sum(n * batch + _input_bytes(r.info.input_bytes(), batch, input_sets) for r, n in sized)
        names = " and ".join(r.name for r, _ in sized)
        check_memory(need, flag, batch, f"one batch through {names} (each layer's input plus output, at least)")


def _input_bytes(sample: int, batch: int, input_sets: int) -> int:
    # the sets drawn for a batch, each made in float64 (twice the float32 kept) before its cast
    return (input_sets + 2) * sample * batch


def benchmark(
    paths: Sequence[str | os.PathLike[str]],
    *,
    baseline: str | os.PathLike[str] | None = None,
    batches: Sequence[int] = (1,),
    warmup_s: float = 1.0,
    iterations: int = 100,
    rounds: int = 5,
    input_sets: int = 3,
    names: Sequence[str] | None = None,
    measure_rss: bool = True,
    log: Callable[[str], None] | None = None,
    batch_flag: str = "`bench_batch`",
    **runner_options: Any,
) -> Comparison:
    """Measure every model in ``paths`` (plus ``baseline``, placed first) interleaved.

    ``runner_options`` go to ``open_runner`` (device, threads, opt_level, precision,
    mode, channels_last, cuda_graph, ...). Batches a model cannot run (an engine's profile) are
    recorded as skipped for that model. ``batch_flag`` names the batches in the message refusing one
    too large for the memory.
    """
    all_paths = [Path(p) for p in paths]
    if baseline is not None:
        base_path = Path(baseline)
        all_paths = [base_path, *[p for p in all_paths if p.resolve() != base_path.resolve()]]
    if not all_paths:
        raise SlimError("give at least one model to benchmark")
    batches = sorted(set(int(b) for b in batches))
    if not batches or batches[0] < 1:
        raise SlimError(f"batch sizes must be positive integers, got {batches}")
    model_names = list(names) if names else _unique_names(all_paths)
    if len(model_names) != len(all_paths):
        raise SlimError(f"got {len(model_names)} names for {len(all_paths)} models")
    check_onnx_batches(all_paths, batches, batch_flag, input_sets)
    runners = [open_runner(p, **runner_options) for p in all_paths]
    try:
        for r in runners:
            r.activate()
        check_runner_batches(runners, batches, batch_flag, input_sets)
        if baseline is not None:
            _check_same_input(runners)
        timings = measure(
            runners, batches, warmup_s=warmup_s, iterations=iterations, rounds=rounds, input_sets=input_sets, log=log
        )
        models = []
        for name, r, (batch_results, skipped) in zip(model_names, runners, timings, strict=True):
            size = model_size(r)
            if measure_rss and batch_results:
                size.memory.update(peak_rss(r, batch_results[-1].batch))
            models.append(ModelResult(name, str(r.path), r.info.to_dict(), size, batch_results, skipped))
    finally:
        for r in runners:
            r.deactivate()
    base = models[0] if baseline is not None else None
    return Comparison(
        environment=environment(runner_options.get("threads")),
        settings={
            "batches": batches,
            "warmup_s": warmup_s,
            "iterations": iterations,
            "rounds": rounds,
            "input_sets": input_sets,
            "runner_options": {k: v for k, v in runner_options.items() if v is not None},
            "timing": "end to end: host input to host output; compute: device events around the engine alone",
        },
        models=models,
        baseline=base.name if base else None,
        speedups=speedups(models, base) if base else [],
    )


def time_pair(
    baseline_path: str | os.PathLike[str],
    slim_path: str | os.PathLike[str],
    batches: Sequence[int] = (1, 64),
    **kwargs: Any,
) -> Comparison:
    """Baseline against slim model, measured interleaved (the bench scripts use this)."""
    kwargs.setdefault("names", ["baseline", "slim"])
    return benchmark([slim_path], baseline=baseline_path, batches=batches, **kwargs)
