"""The GPU study of issue 10 in one command: slim models against their baseline on each GPU target.

    python bench/gpu.py                                   # an H100: four models, every GPU target
    python bench/gpu.py --device cpu --targets ort-cpu,torch-cpu --models mobilenet_v2 \\
        --image-size 64 --batches 1,8 --profile-batch 8 --out build/gpu-cpu/gpu.md   # a CPU smoke run

For each torchvision model (random weights, BatchNorm gamma drawn so that half of every layer's
channels are near zero: ``draw_sparse_gammas``), a slim2deploy checkpoint is written once; then,
per target, the model is pruned to ``--speedup`` 1.5 and 2.0 (``prune_to_budget``: profile, select,
cut, closed loop) and at ``--ratio 0.5`` (the paper's global threshold), and baseline and slim model
are benchmarked interleaved (``measure.benchmark.time_pair``) at every batch, on GPU targets by CUDA
events around the model alone. The ratio model's predicted latency comes from the target's table
of the speed-up runs. Every finished (model, target, selection) row is written at once to the
JSON beside ``--out`` and skipped when the command runs again, so a run cut short by
``--budget-s`` (or anything else) resumes where it stopped.

Profiling effort is capped: one profiling batch, ``--tries`` closed-loop tries, the cell cache in
the work directory shared by all runs, and ``torch-cuda-compiled`` selects on the ``torch-cuda``
table (whose cells are timed without compiling each layer) and is verified compiled in the loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_doc import render

from slim2deploy.base.environment import tensorrt_version
from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text
from slim2deploy.measure.benchmark import time_pair
from slim2deploy.measure.environment import environment
from slim2deploy.measure.targets import TARGETS, make_target
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.stats import count_macs
from slim2deploy.pipeline.budget import prune_to_budget
from slim2deploy.pipeline.import_model import sparse_like_checkpoint
from slim2deploy.pipeline.profile import checkpoint_artifact
from slim2deploy.pipeline.prune import prune_checkpoint
from slim2deploy.prune.goal import by_budget
from slim2deploy.prune.latency import LatencyTable
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import by_ratio

MODELS = ("resnet50", "vgg16_bn", "mobilenet_v2", "efficientnet_b0")
GPU_TARGETS = ("torch-cuda", "torch-cuda-compiled")
SCHEMA = "slim2deploy.gpu-study/1"
# what makes an earlier run's rows comparable with this one's
SETTINGS = ("device", "image_size", "precision", "profile_batch", "round_to", "ratio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--models", default=",".join(MODELS), help="torchvision classifiers")
    p.add_argument("--targets", default=None, help="default: torch-cuda,torch-cuda-compiled (+trt if importable)")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--speedups", default="1.5,2.0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=("fp16", "fp32"), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--profile-batch", type=int, default=64, help="the batch latency tables and the loop use")
    p.add_argument("--round-to", type=int, default=8, help="kept counts are multiples of this (rails)")
    p.add_argument("--tries", type=int, default=2, help="closed-loop tries per budget")
    p.add_argument("--iterations", type=int, default=60, help="benchmark iterations per model and batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-s", type=float, default=0.3)
    p.add_argument("--budget-s", type=float, default=450.0, help="start no new row after this many seconds")
    p.add_argument("--work", default="build/gpu-study", help="checkpoints, tables and the cell cache")
    p.add_argument("--out", default="docs/gpu.md", help="the doc; the JSON goes beside it (.json)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.targets is None:
        gpu = [*GPU_TARGETS, *(("trt",) if tensorrt_version() else ())]
        args.targets = ",".join(gpu if args.device == "cuda" else ("ort-cpu", "torch-cpu"))
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",")})
        args.speedups = [float(s) for s in args.speedups.split(",") if s]
    except ValueError as exc:
        p.error(f"--batches takes integers and --speedups numbers, comma-separated ({exc})")
    if args.batches[0] < 1 or any(s <= 1 for s in args.speedups):
        p.error("batches must be positive and speed-ups above 1")
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("torch sees no CUDA GPU; for a CPU smoke run give --device cpu --targets ort-cpu,torch-cpu")
    return args


class Study:
    """The rows so far, on disk as JSON beside the doc; every write is atomic."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.doc = Path(args.out)
        self.path = self.doc.with_suffix(".json")
        self.settings = {k: getattr(args, k) for k in SETTINGS}
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("settings") != self.settings:
                raise SlimError(
                    f"{self.path} holds rows made with other settings ({old.get('settings')}); "
                    "give another --out or delete it"
                )
            self.rows = {row_key(r["model"], r["target"], r["selection"]): r for r in old.get("rows", [])}
        self.environment = environment(None)

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row_key(row["model"], row["target"], row["selection"])] = row
        payload = {"schema": SCHEMA, "settings": self.settings, "environment": self.environment}
        payload["rows"] = list(self.rows.values())
        self.doc.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(payload, indent=1) + "\n")
        atomic_write_text(self.doc, render(self.args, self.environment, list(self.rows.values())))


def source_path(args: argparse.Namespace, model: str) -> Path:
    return Path(args.work) / f"{model}-{args.image_size}px.pt"


def fresh_compiler() -> None:
    """torch.compile caches code per Python function, not per model, and falls back to eager after
    ``recompile_limit`` recompilations of one function; every model here shares a few forward
    functions (each batch size is one more), so each row starts with empty caches and more room."""
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def row_key(model: str, target: str, selection: str) -> str:
    return f"{model}|{target}|{selection}"


def macs_ratio(slim: Path, base: Path) -> float:
    ckpt = load_checkpoint(base)
    x = torch.zeros(1, *ckpt.input_shape)
    return count_macs(model_from_checkpoint(load_checkpoint(slim)), x) / count_macs(model_from_checkpoint(ckpt), x)


def run_row(args: argparse.Namespace, model: str, target_name: str, selection: str, log: Any) -> dict[str, Any]:
    """Prune ``model`` by ``selection`` ("ratio R" or "speedup S") for the target and benchmark it."""
    work = Path(args.work)
    src = source_path(args, model)
    target = make_target(target_name, args.profile_batch, args.precision)
    rails = Rails(round_to=args.round_to)
    setting = f"{args.precision}-b{args.profile_batch}-r{args.round_to}"
    table_path = work / f"{src.stem}-{target_name}-{setting}.table.json"
    eager_table = work / f"{src.stem}-torch-cuda-{setting}.table.json"
    # compiling every profiled layer would cost minutes: compiled selects on the CUDA-graph table
    reuse = target_name == "torch-cuda-compiled" and eager_table.exists()
    if reuse:
        table_path = eager_table
    if target.runner_options().get("mode") == "compiled":
        fresh_compiler()
    kind, value = selection.split()
    row: dict[str, Any] = {"model": model, "target": target_name, "selection": selection}
    started = time.perf_counter()
    if kind == "ratio":
        slim = work / f"{src.stem}-ratio{value}-r{args.round_to}.pt"
        if not slim.exists():
            prune_checkpoint(src, slim, by_ratio(float(value), rails))
        plan = load_checkpoint(slim).plan or {}
        base_art = checkpoint_artifact(src, target, work, f"{src.stem}-{target_name}-{args.precision}")
        slim_art = checkpoint_artifact(slim, target, work, f"{slim.stem}-{target_name}-{args.precision}")
        row["baseline_ms"], row["measured_ms"] = target.latencies([base_art, slim_art])
        if table_path.exists():  # as the closed loop predicts: the table's ratio times this run's baseline
            counts = [len(g["keep"]) for g in plan.get("groups", [])]
            table = LatencyTable.from_json(table_path.read_text())
            row["predicted_ms"] = table.predict(counts) / table.full_ms * row["baseline_ms"]
            row["table"] = "torch-cuda" if reuse else target_name
    else:
        slim = work / f"{src.stem}-{target_name}-{setting}-speedup{value}.pt"
        budget = by_budget(
            rails,
            speedup=float(value),
            target=target_name,
            batch=args.profile_batch,
            precision=args.precision,
            table=str(table_path) if reuse else None,
            cache=str(work / "cache"),
            tries=args.tries,
        )
        result = prune_to_budget(src, slim, budget, target=target, table_out=None if reuse else table_path, log=log)
        row.update({k: result.chosen[k] for k in ("predicted_ms", "measured_ms", "baseline_ms", "goal_ms")})
        row.update(met=result.met, tries=len(result.tries), table="torch-cuda" if reuse else target_name)
        base_art = checkpoint_artifact(src, target, work, f"{src.stem}-{target_name}-{args.precision}")
        slim_art = checkpoint_artifact(slim, target, work, slim.stem)
    row["prune_s"] = time.perf_counter() - started
    row["macs_ratio"] = macs_ratio(slim, src)
    log(f"benchmark at batches {args.batches}")
    comp = time_pair(
        base_art,
        slim_art,
        batches=args.batches,
        iterations=args.iterations,
        rounds=args.rounds,
        warmup_s=args.warmup_s,
        measure_rss=False,
        **target.runner_options(),
    )
    row["batches"] = {}
    base, thin = comp.model("baseline"), comp.model("slim")
    for b in args.batches:
        x, y = base.at(b), thin.at(b)
        if x is None or y is None:
            continue
        device = x.compute is not None and y.compute is not None
        bx, by = (x.compute, y.compute) if device else (x.latency, y.latency)  # type: ignore[assignment]
        row["batches"][str(b)] = {
            "timing": "compute (CUDA events)" if device else "end to end",
            "baseline_ms": bx.median_ms,  # type: ignore[union-attr]
            "slim_ms": by.median_ms,  # type: ignore[union-attr]
            "speedup": bx.median_ms / by.median_ms,  # type: ignore[union-attr]
        }
    row["total_s"] = time.perf_counter() - started
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        study = Study(args)
    except SlimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    selections = [f"speedup {s:g}" for s in args.speedups] + [f"ratio {args.ratio:g}"]
    todo = [(m, t, s) for m in args.models for t in args.targets for s in selections]
    for i, (model, target, selection) in enumerate(todo):
        tag = f"{model} {target} {selection}"

        def log(msg: str, tag: str = tag) -> None:
            print(f"[{time.perf_counter() - t0:7.1f}s] {tag}: {msg}", flush=True)

        if row_key(model, target, selection) in study.rows:
            log("done in an earlier run; skipped")
            continue
        if time.perf_counter() - t0 > args.budget_s:
            log(f"--budget-s {args.budget_s:g} spent; {len(todo) - i} rows left, run the command again to resume")
            break
        src = source_path(args, model)
        if not src.exists():
            log("writing the sparse-like checkpoint")
            shape = (3, args.image_size, args.image_size)
            sparse_like_checkpoint(f"torchvision:{model}", src, shape, meta={"study": "bench/gpu.py"})
        try:
            row = run_row(args, model, target, selection, log)
        except SlimError as exc:
            row = {"model": model, "target": target, "selection": selection, "error": str(exc).splitlines()[0]}
        study.add(row)
        speeds = ", ".join(f"b{b} {v['speedup']:.2f}x" for b, v in row.get("batches", {}).items())
        log(f"error: {row['error']}" if "error" in row else f"MACs x{row['macs_ratio']:.3f}, {speeds}")
    print(f"[{time.perf_counter() - t0:7.1f}s] wrote {study.doc} and {study.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
