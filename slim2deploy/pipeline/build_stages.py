"""The stages of ``slim2deploy build``, each a function of its inputs, run through the stage cache.

A stage's key hashes everything that changes its result (upstream file contents, options, the data it
measures on); a re-run skips a stage whose key and outputs are unchanged (``base.cache.StageCache``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from slim2deploy.base.cache import Shape, StageCache, stage_key
from slim2deploy.base.files import atomic_write_text, sha256_file
from slim2deploy.base.formats import read_json
from slim2deploy.deploy.engine import EngineOptions, compile_engine
from slim2deploy.deploy.export import DEFAULT_OPSET
from slim2deploy.measure import benchmark
from slim2deploy.measure.report import (
    EXPORT_INFO,
    PRECISION_INFO,
    PRUNE_INFO,
    batch_latency,
    graph_counts,
    write_build_report,
)
from slim2deploy.measure.results import Comparison
from slim2deploy.measure.tables import format_table, write_reports
from slim2deploy.measure.targets import TIMING_METHOD
from slim2deploy.model.folder import close_loaders, majority_share
from slim2deploy.model.loop import evaluate
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.pipeline.budget import prune_selected
from slim2deploy.pipeline.build_inputs import BuildConfig, BuildResult, Inputs
from slim2deploy.pipeline.export import export_checked, make_precision, variant_path
from slim2deploy.pipeline.finetune import Distill, finetune_checkpoint
from slim2deploy.prune.goal import goal_of
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.score import gamma_warning

STAGES = ("prune", "finetune", "export", "precision", "engines", "bench", "report")


@dataclass
class Run:
    """One build in progress: its config, inputs, stage cache and what it has produced so far."""

    cfg: BuildConfig
    out: Path
    inputs: Inputs
    cache: StageCache
    log: Callable[[str], None]
    result: BuildResult
    int8_flavour: str = "cpu"  # what --int8-flavour resolved to for this run

    def stage(self, name: str, text: str) -> None:
        self.log(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name:<9} {text}")

    def cached(
        self,
        name: str,
        entry: str,
        key: str,
        outputs: list[Path],
        work: Callable[[], dict[str, Any] | None],
        label: str,
        shape: Shape = dict,
    ) -> dict[str, Any]:
        """Run ``work`` through the cache as ``entry`` of stage ``name``; when it is fresh, log ``label``
        instead. ``shape``: what a recorded info must hold to be reused (what the report reads of it).
        Streamed folders' workers stop when the stage ends, not whenever the garbage collector runs."""
        try:
            info, ran = self.cache.run(entry, key, outputs, work, shape)
        finally:
            close_loaders()
        if not ran:
            self.stage(name, label)
            self.result.skipped.append(entry)
        return info


def prune_stage(run: Run) -> Path:
    cfg, out = run.cfg, run.out
    slim_path, plan_path = out / "slim.pt", out / "plan.json"

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        pruned = prune_selected(
            cfg.model, slim_path, cfg.selection, fold=cfg.fold, exact=cfg.exact, trust_code=cfg.trust_code,
            table_out=out / "latency-table.json", log=run.log,
        )  # fmt: skip
        goal, loop = goal_of(cfg.selection), pruned.latency
        latency = None
        if goal is not None and loop is not None:
            latency = {"goal": goal.goal(), "met": loop.met, **loop.chosen, "tries": loop.tries}
        weak = f"warning: {gamma_warning(pruned.plan.groups)}"  # said once, by build, cached stage or not
        run.log("\n".join(line for line in pruned.summary.splitlines() if line != weak))
        atomic_write_text(plan_path, pruned.plan.to_json())
        seconds = time.perf_counter() - started
        run.stage("prune", f"{cfg.selection.describe()}: {slim_path} ({seconds:.1f}s)")
        return {"seconds": round(seconds, 2), "latency": latency}

    measured = goal_of(cfg.selection) is not None
    # a latency goal's model depends on how it was timed, and with depth on whether removal was priced (a build
    # from before that chose widths only under the same selection)
    timed = [TIMING_METHOD, *(["priced depth"] if cfg.selection.depth else [])] if measured else []
    extra = ([] if cfg.exact else ["approximate"]) + timed
    key = stage_key(sha256_file(cfg.model), cfg.selection.to_dict(), cfg.fold, *extra)
    run.cached("prune", "prune", key, [slim_path, plan_path], work, "unchanged, skipped", PRUNE_INFO)
    run.result.artifacts.update(slim=str(slim_path), plan=str(plan_path))
    return slim_path


def finetune_stage(run: Run, slim_path: Path) -> Path:
    cfg = run.cfg
    if not cfg.epochs:
        why = "given 0 epochs" if cfg.finetune_epochs == 0 else "no data to fine-tune on"
        run.stage("finetune", f"off ({why})")
        return slim_path
    assert cfg.data is not None  # validate() insists on it
    ft_path = run.out / "slim-finetuned.pt"
    distill = Distill(cfg.model, cfg.distill_weight, cfg.distill_temperature) if cfg.distill else None
    options: dict[str, Any] = dict(
        data=cfg.data, data_dir=cfg.data_dir, epochs=cfg.epochs, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
        limit_train=cfg.limit_train, eval_limit=cfg.eval_limit, seed=cfg.seed, distill=distill,
    )  # fmt: skip

    def work() -> dict[str, Any]:
        history = finetune_checkpoint(
            slim_path, ft_path, **options, train_data=run.inputs.train_ds, trust_code=cfg.trust_code, max_drop=None
        )
        how = f", distilled from {cfg.model}" if distill else ", without distillation"
        run.stage("finetune", f"{cfg.epochs} epochs on {cfg.data}{how}: {ft_path}")
        return {"val_acc": history[-1].val_acc}

    key = stage_key(sha256_file(slim_path), sha256_file(cfg.model), {**options, "distill": str(distill)})
    run.cached("finetune", "finetune", key, [ft_path], work, "unchanged, skipped")
    run.inputs.train_ds = None  # not held in memory through export and engine building
    run.result.artifacts["slim_finetuned"] = str(ft_path)
    return ft_path


def accuracy(run: Run, name: str, path: Path, model: torch.nn.Module) -> float | None:
    """Top-1 of ``model`` (the file ``path``) on the held-out data, cached with the build: None without data."""
    cfg, ds = run.cfg, run.inputs.eval_ds
    if ds is None:
        return None
    key = stage_key(sha256_file(path), cfg.data, cfg.data_dir, cfg.eval_limit, run.inputs.data_hash)

    def work() -> dict[str, Any]:
        return {"top1": evaluate(model, ds, cfg.batch_size, desc=f"evaluating {name.replace('_', ' ')}")[1]}

    info, _ = run.cache.run(f"accuracy:{name}", key, [], work)
    return float(info["top1"])


def export_stage(run: Run, models: dict[str, tuple[torch.nn.Module, Path]]) -> dict[str, Any]:
    """fp32 ONNX of each model (``name.onnx``), parity-gated; returns each export's info."""
    opset = run.cfg.opset or DEFAULT_OPSET
    exports = {}
    for name, (model, src) in models.items():
        path = run.out / f"{name}.onnx"

        def work(model: torch.nn.Module = model, path: Path = path) -> dict[str, Any]:
            info = export_checked(model, run.inputs.example, path, run.inputs.check_x, opset=opset)
            run.stage("export", f"{path.name}: {info['bytes'] / 1e6:.2f} MB, {info['summary']}")
            return info

        key = stage_key(sha256_file(src), opset, run.inputs.check_hash)
        skipped = f"{path.name} unchanged, skipped"
        exports[name] = run.cached("export", f"export:{name}", key, [path], work, skipped, EXPORT_INFO)
    return exports


def precision_stage(run: Run, names: list[str]) -> dict[str, Any]:
    """fp16/int8 graphs from each fp32 graph, with their agreement on the held-out data."""
    cfg, inputs = run.cfg, run.inputs
    agreement: dict[str, Any] = {}
    for prec in (p for p in cfg.precisions if p != "fp32"):
        calib = (cfg.calib_method, run.int8_flavour, sha256_file(cfg.calib)) if prec == "int8" and cfg.calib else ()
        for name in names:
            src = run.out / f"{name}.onnx"
            dst = variant_path(src, prec)

            def work(src: Path = src, prec: str = prec) -> dict[str, Any]:
                info = make_precision(
                    src, prec, inputs.eval_x, inputs.eval_y,
                    calib_x=inputs.calib_x, calib_method=cfg.calib_method, flavour=run.int8_flavour,
                )  # fmt: skip
                run.stage("precision", info["summary"])
                return info

            key = stage_key(sha256_file(src), prec, calib, inputs.data_hash)
            skipped = f"{dst.name} unchanged, skipped"
            entry = f"{prec}:{name}"
            agreement[f"{name}.{prec}"] = run.cached("precision", entry, key, [dst], work, skipped, PRECISION_INFO)
    if set(cfg.precisions) == {"fp32"}:
        run.stage("precision", "fp32 only (fp16 and int8 are asked for with the precision list)")
    return agreement


def engines_stage(
    run: Run, onnx_files: list[Path], options: EngineOptions, policy: tuple[bool, str]
) -> dict[str, Any] | str:
    """``policy``: ``resolve_engine_policy``'s answer, taken before any work (``require`` fails early)."""
    wanted, message = policy
    if not wanted:
        run.stage("engines", message)
        return message
    options = replace(options, timing_cache=str(run.out / "timing.cache"))
    engines = {}
    for src in onnx_files:
        dst = src.with_suffix(".engine")

        def work(src: Path = src, dst: Path = dst) -> dict[str, Any]:
            manifest = compile_engine(src, dst, options)
            run.stage("engines", f"{dst.name} compiled")
            return manifest.to_dict()

        key = stage_key(sha256_file(src), options.to_dict())
        skipped = f"{dst.name} unchanged, skipped"
        engines[dst.name] = run.cached("engines", f"engine:{dst.name}", key, [dst], work, skipped)
    return engines


def bench_stage(run: Run, graphs: dict[str, Path]) -> dict[str, Any] | None:
    """Every graph the build made (``name`` -> file; the first is the fp32 baseline), timed interleaved
    against that baseline on ONNX Runtime CPU."""
    cfg, out = run.cfg, run.out
    if not cfg.bench:
        run.stage("bench", "off (benchmark switched off)")
        return None
    files = [out / f"benchmark.{ext}" for ext in ("json", "md", "png")]
    names, paths = list(graphs), list(graphs.values())

    def work() -> None:
        run.stage("bench", f"ONNX Runtime CPU, batches {list(cfg.bench_batches)}, {', '.join(names)} interleaved ...")
        comparison = benchmark.benchmark(
            paths[1:], baseline=paths[0], names=names, batches=cfg.bench_batches, iterations=cfg.bench_iterations,
            rounds=cfg.bench_rounds, warmup_s=cfg.bench_warmup_s, threads=cfg.threads, device="cpu",
            batch_flag="`bench_batch`", log=run.log,
        )  # fmt: skip
        write_reports(comparison, out, stem="benchmark")

    settings = (cfg.bench_batches, cfg.bench_iterations, cfg.bench_rounds, cfg.bench_warmup_s, cfg.threads)
    key = stage_key(names, [sha256_file(p) for p in paths], settings)
    run.cached("bench", "bench", key, files, work, "unchanged, skipped (the numbers below are from the previous run)")
    comparison = Comparison.from_dict(read_json(files[0], "benchmark result"))
    run.log(format_table(comparison))
    run.result.artifacts.update({f"benchmark_{p.suffix[1:]}": str(p) for p in files})
    return comparison.to_dict()


def report_stage(run: Run, slim_model: torch.nn.Module, parts: dict[str, Any]) -> None:
    """report.json/.md from every stage's results; always rewritten (it is cheap and shows this run)."""
    cfg, inputs = run.cfg, run.inputs
    models = {"baseline": inputs.baseline, "slim": slim_model}
    report = {
        "model": cfg.model,
        "config": cfg.to_dict(),
        "int8_flavour": run.int8_flavour if "int8" in cfg.precisions else None,
        "selection": cfg.selection.describe(),
        "latency_target": run.cache.info("prune").get("latency"),
        **{n: {"params": count_params(m), "macs": count_macs(m, inputs.example)} for n, m in models.items()},
        "structure": structure(run.out / "plan.json", parts.get("exports") or {}),
        "latency": batch_latency(parts.get("benchmark")),
        **parts,
    }
    written = write_build_report(report, run.out)
    run.cache.done("report", stage_key(report), written)
    run.stage("report", ", ".join(str(p) for p in written))
    run.result.report = report
    run.result.artifacts.update({f"report_{p.suffix[1:]}": str(p) for p in written})


def structure(plan_path: Path, exports: dict[str, Any]) -> dict[str, Any]:
    """What pruning removed besides channels: residual blocks (by their join), and the conv/linear layers and
    nodes of the fp32 ONNX graphs, baseline and slim."""
    plan = PruningPlan.from_json(plan_path.read_text())
    graphs = {name: graph_counts((exports.get(name) or {}).get("op_counts")) for name in ("baseline", "slim")}
    return {
        "blocks_removed": [b.join for b in plan.removed_branches()],
        "blocks_removable": sum(b.removable for b in plan.branches),
        "graphs": {name: counts for name, counts in graphs.items() if counts is not None},
    }


def accuracy_report(run: Run, before: float | None, pruned: float | None, tuned: float | None) -> dict[str, Any]:
    """The three evaluations (unpruned, right after surgery, after fine-tuning) and the allowance."""
    ds, cfg = run.inputs.eval_ds, run.cfg
    final = tuned if tuned is not None else pruned
    drop = None if before is None or final is None else round((before - final) * 100, 4)
    return {
        "baseline": before, "after_surgery": pruned, "after_finetune": tuned, "final": final,
        "images": len(ds) if ds is not None else 0, "drop_points": drop, "max_drop": cfg.max_drop,
        "majority_class": majority_share(ds) if ds is not None else None,
        "within_allowance": None if drop is None or cfg.max_drop is None else drop <= cfg.max_drop,
    }  # fmt: skip
