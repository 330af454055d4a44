"""``slim2deploy build``: from an unpruned checkpoint to everything a user ships.

Stages (``build_stages.STAGES``), each a function of its inputs:

- prune      plan + surgery (the selection: selector + rails)        -> slim.pt, plan.json
- finetune   on ``data``                                              -> slim-finetuned.pt
- export     ONNX of baseline and slim, parity-gated against torch   -> baseline.onnx, slim.onnx
- precision  fp16 graphs and calibrated int8 Q/DQ graphs             -> *.fp16.onnx, *.int8.onnx
- engines    TensorRT engines + manifests (when TensorRT and a GPU are present)
- bench      ONNX Runtime CPU latency of every graph against the fp32 baseline, interleaved -> benchmark.*
- report     report.json and report.md

Each stage runs through ``base.cache.StageCache`` (``build.json``): a re-run skips a stage whose key and
outputs are unchanged. Every check on user input runs before any work (``build_inputs``); the output
folder is locked for the whole run, so two builds never mix their files in one output folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slim2deploy.base.cache import StageCache, exclusive_dir
from slim2deploy.base.files import created_folder
from slim2deploy.deploy.engine import resolve_engine_policy
from slim2deploy.deploy.precision import resolve_int8_flavour
from slim2deploy.measure.report import at_chance
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.folder import AnyData, majority_share
from slim2deploy.pipeline.build_inputs import (
    BuildConfig,
    BuildResult,
    check_batches,
    check_out,
    load_inputs,
    validate,
)
from slim2deploy.pipeline.build_stages import (
    Run,
    accuracy,
    accuracy_report,
    bench_stage,
    engines_stage,
    export_stage,
    finetune_stage,
    precision_stage,
    prune_stage,
    report_stage,
)
from slim2deploy.pipeline.export import variant_path
from slim2deploy.pipeline.finetune import AccuracyDrop
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.score import gamma_warning

__all__ = ["BuildConfig", "BuildResult", "build", "validate"]


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> BuildResult:
    """Run the pipeline of the module docstring; see ``BuildConfig`` for the options."""
    engine_options = validate(cfg)
    engine_policy = resolve_engine_policy(cfg.engine)
    flavour, why = resolve_int8_flavour(cfg.int8_flavour, engines=engine_policy[0])
    out = Path(cfg.out)
    check_out(out)
    inputs = load_inputs(cfg)  # a bad checkpoint, calibration set or dataset fails before the folder is touched
    check_batches(cfg, inputs)
    with created_folder(out), exclusive_dir(out, "build"):  # a failed build leaves no empty output folder behind
        run = Run(cfg, out, inputs, StageCache(out / "build.json", log), log, BuildResult(out), flavour)
        if "int8" in cfg.precisions:
            log(f"int8 flavour: {flavour} ({why})")
        pruned_path = prune_stage(run)
        pruned = load_model(pruned_path, cfg.trust_code)
        warn_weak_gammas(out / "plan.json", log)
        before = accuracy(run, "baseline", Path(cfg.model), inputs.baseline)
        warn_chance(before, inputs.eval_ds, log)
        after_surgery = accuracy(run, "after_surgery", pruned_path, pruned)
        slim_path = finetune_stage(run, pruned_path)
        tuned, slim_model = None, pruned
        if slim_path != pruned_path:
            slim_model = load_model(slim_path, cfg.trust_code)
            tuned = accuracy(run, "after_finetune", slim_path, slim_model)
        acc = accuracy_report(run, before, after_surgery, tuned)
        log(describe_accuracy(acc))
        exports = export_stage(run, {"baseline": (inputs.baseline, Path(cfg.model)), "slim": (slim_model, slim_path)})
        precision = precision_stage(run, list(exports))
        precisions = ["fp32", *(p for p in cfg.precisions if p != "fp32")]
        onnx = {n: {p: str(variant_path(out / f"{n}.onnx", p)) for p in precisions} for n in exports}
        onnx_files = [Path(p) for files in onnx.values() for p in files.values()]
        engines = engines_stage(run, onnx_files, engine_options, engine_policy)
        graphs = {"baseline": out / "baseline.onnx", "slim": out / "slim.onnx"}
        for p in precisions[1:]:
            graphs.update({f"{n}.{p}": variant_path(out / f"{n}.onnx", p) for n in ("slim", "baseline")})
        bench = bench_stage(run, graphs)
        parts = {"accuracy": acc, "exports": exports, "precision": precision, "engines": engines, "benchmark": bench}
        report_stage(run, slim_model, {**parts, "artifacts": onnx})
        removed, changed = run.cache.drop_unused()
        said = []
        if removed:
            said.append(f"removed {', '.join(removed)}: written by an earlier build of other settings, not by this one")
        if changed:
            said.append(f"kept {', '.join(changed)}: written by an earlier build of other settings, but changed since")
        if said:
            log("; ".join(said))
    if acc["within_allowance"] is False:
        raise AccuracyDrop(
            f"the slim model scores {acc['final']:.2%} where the unpruned one scored {acc['baseline']:.2%} on the "
            f"same {acc['images']} held-out images: {acc['drop_points']:.2f} points lost, more than `max_drop` "
            f"{cfg.max_drop:g} allows; fine-tune longer (`finetune_epochs`), prune less (a smaller `speedup` or "
            f"`ratio`), or sparse-train first; what was made is in {out} for inspection"
        )
    return run.result


def load_model(path: Path, trust_code: bool) -> torch.nn.Module:
    return model_from_checkpoint(load_checkpoint(path, trust_code=trust_code), trust_code=trust_code)


def describe_accuracy(acc: dict[str, Any]) -> str:
    """One line: the three evaluations and the allowance (or why there is none)."""
    if acc["baseline"] is None:
        return "accuracy: not measured (no held-out data: give `data`), so the allowance is not checked"
    shown = [f"unpruned {acc['baseline']:.2%}", f"after surgery {acc['after_surgery']:.2%}"]
    if acc["after_finetune"] is not None:
        shown.append(f"after fine-tuning {acc['after_finetune']:.2%}")
    allowed = "" if acc["max_drop"] is None else f" (allowance {acc['max_drop']:g})"
    drop = f"drop {acc['drop_points']:.2f} points{allowed}"
    return f"accuracy on {acc['images']} held-out images: {', '.join(shown)}; {drop}"


def warn_chance(before: float | None, ds: AnyData | None, log: Callable[[str], None]) -> None:
    """Say when the unpruned model does no better on the held-out images than always answering their most
    common class: its weights do not fit this data, and an allowance measured from it guards nothing."""
    if before is None or ds is None or len(ds) == 0:
        return
    majority = majority_share(ds)
    if at_chance(before, majority):
        log(
            f"warning: the unpruned model scores {before:.2%} on {len(ds)} held-out images, no better than always "
            f"answering their most common class ({majority:.2%}): its weights do not fit this data (another class "
            "order, normalisation (mean, std) or image size than they were trained with, or weights never trained "
            "on these classes), so the accuracy allowance guards nothing; check how the model was imported, or "
            "train it on these classes first"
        )


def warn_weak_gammas(plan_path: Path, log: Callable[[str], None]) -> None:
    """Say, on its own line, when the plan's gammas carry no signal (the model was not sparse-trained)."""
    weak = gamma_warning(PruningPlan.from_json(plan_path.read_text()).groups)
    if weak is not None:
        log(f"warning: {weak}")
