"""The latency-matched comparison of issue 10: three ways to one measured ONNX Runtime CPU latency.

1. ``latency``: ``pipeline.budget.prune_to_budget`` on the sparse model (``--speedup S``, ort-cpu,
   batch 64): profile, select by the latency table, cut, closed loop on the target.
2. ``gamma``: the sparse model pruned by the global |gamma| threshold (``RatioSelector``, default
   rails) at the ratio whose measured latency is closest to model 1's; the ratio is found by
   bisection, each candidate timed interleaved with model 1 on the same target.
3. ``uniform``: the architecture with every layer scaled by one width factor (bisection the same
   way), trained from scratch for the sparse-training epochs.
4. ``scratch``: the latency-targeted model's architecture re-initialised and trained from scratch for the
   sparse-training epochs (Liu et al. 2019, "Rethinking the Value of Network Pruning").
5. ``width`` (models with removable residual branches only): the same ``--speedup`` goal reached by width
   alone (``depth=False``, as ``--no-depth``), to show what removing branches adds.

All then get the same fine-tuning, so each trains sparse/scratch epochs + fine-tuning epochs; each is
fine-tuned twice, on the labels alone and with distillation from the unpruned sparse model (``+kd`` rows,
the loss ``build`` fine-tunes with by default). The graphs (unpruned baseline and the others) are finally
timed together, interleaved.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slim2deploy.base.cache import stage_key
from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import sha256_file
from slim2deploy.deploy.export import export_onnx
from slim2deploy.measure.targets import TIMING_METHOD, Target, make_target
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.loop import evaluate
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.model.zoo import create_model
from slim2deploy.pipeline.budget import prune_to_budget
from slim2deploy.prune.goal import by_budget
from slim2deploy.prune.latency import LatencyTable
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import by_ratio, select
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups

BATCH = 64


def _reinitialised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` (the same widths) with fresh weights, initialised as the zoo initialises."""
    from slim2deploy.model.nets import init_weights

    torch.manual_seed(seed)
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return init_weights(fresh)


class LatencyStudy:
    def __init__(self, study: Any, speedup: float, steps: int, distill: bool = True) -> None:
        self.s, self.speedup, self.steps, self.distill = study, speedup, steps, distill
        cfg = study.cfg
        self.target: Target = make_target("ort-cpu", BATCH, "fp32", cfg.threads)
        self.timing = {"iterations": cfg.bench_iterations, "rounds": cfg.bench_rounds, "warmup_s": cfg.bench_warmup_s}
        self.dir: Path = study.dir / f"latency-x{speedup:g}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def onnx(self, model: torch.nn.Module, stem: str) -> Path:
        path = self.dir / f"{stem}.onnx"
        export_onnx(model.cpu().eval(), self.s.example, path)
        return path

    def acc(self, model: torch.nn.Module) -> float:
        return float(evaluate(model.to(self.s.device), self.s.val_ds, device=self.s.device)[1])

    def match(
        self, name: str, lo: float, hi: float, faster_above: bool, make: Callable[[float], torch.nn.Module], ref: Path
    ) -> dict[str, Any]:
        """Bisection over a knob in [lo, hi] for the model whose latency is closest to ``ref``'s.

        Latency falls as the knob rises when ``faster_above`` (a ratio), rises otherwise (a width).
        Each candidate is timed interleaved with ``ref``, so load on the machine hits both alike.
        """
        trials: list[dict[str, Any]] = []
        seen: dict[str, float] = {}
        for step in range(self.steps):
            x = round((lo + hi) / 2, 4)
            try:
                model = make(x)
            except SlimError:  # past what the rails allow: only smaller knobs are possible
                lo, hi = (lo, x) if faster_above else (x, hi)
                continue
            widths = str(sorted((k, v.shape) for k, v in model.state_dict().items() if v.dim() > 1))
            if widths not in seen:
                ref_ms, ms = self.target.latencies([ref, self.onnx(model, f"{name}-try")], **self.timing)
                seen[widths] = ms / ref_ms
            rel = seen[widths]
            trials.append({"knob": x, "relative": round(rel, 4)})
            self.s.log(f"{self.s.setup.arch} {name} try {step + 1}: {x:g} -> {rel:.3f}x the latency-targeted model")
            too_slow = rel > 1
            lo, hi = (x, hi) if too_slow == faster_above else (lo, x)
        if not trials:
            raise SlimError(f"{name}: no candidate in [{lo}, {hi}] could be built")
        best = min(trials, key=lambda t: abs(math.log(t["relative"])))
        return {"knob": best["knob"], "relative": best["relative"], "trials": trials}

    def run(self, baseline: torch.nn.Module, baseline_acc: float) -> dict[str, Any]:
        s, cfg = self.s, self.s.cfg
        sparse_ckpt = s.checkpoints["sparse"]
        src_key = sha256_file(sparse_ckpt)
        lat_ckpt, table_path = self.dir / "latency.pt", self.dir / "latency-table.json"

        def budget_prune(dst: Path, depth: bool, table_out: Path | None = None) -> Callable[[], dict[str, Any]]:
            def prune() -> dict[str, Any]:
                budget = by_budget(speedup=self.speedup, batch=BATCH, threads=cfg.threads,
                                   cache=str(self.dir / "cells"), or_smallest=True, depth=depth)  # fmt: skip
                res = prune_to_budget(sparse_ckpt, dst, budget, table_out=table_out, log=s.log)
                return {"chosen": res.chosen, "tries": len(res.tries), "met": res.met}

            return prune

        prune_key = stage_key(src_key, self.speedup, cfg.threads, TIMING_METHOD, "priced depth")
        pruned = s.cached("latency-prune", prune_key, [lat_ckpt, table_path], budget_prune(lat_ckpt, True, table_path))
        sparse = model_from_checkpoint(load_checkpoint(sparse_ckpt))
        traced = trace_groups(sparse, s.example)
        # a model with removable branches also gets the same goal reached by width alone (--no-depth): what
        # depth adds, at the same measured latency goal and the same fine-tuning (issue 23's depth study)
        width_only: dict[str, Any] | None = None
        width_ckpt = self.dir / "latency-width.pt"
        if any(b.removable for b in traced.branches):
            width_key = stage_key(src_key, self.speedup, cfg.threads, TIMING_METHOD, "width only")
            width_only = s.cached("latency-prune-width", width_key, [width_ckpt], budget_prune(width_ckpt, False))
        table = LatencyTable.from_json(table_path.read_text())
        ckpt = load_checkpoint(lat_ckpt)
        lat_model = model_from_checkpoint(ckpt)
        lat_plan = PruningPlan.from_dict(ckpt.plan)
        ref = self.onnx(lat_model, "latency-pruned")

        def gamma_model(ratio: float) -> torch.nn.Module:
            return apply_plan(sparse, select(traced, by_ratio(ratio)))

        def uniform_model(factor: float) -> torch.nn.Module:
            torch.manual_seed(cfg.seed + 2)
            return create_model(s.setup.arch, **{**s.arch_kwargs, "width": s.setup.width * factor})

        timing_key = [cfg.threads, self.timing, self.steps, sha256_file(lat_ckpt), TIMING_METHOD]
        gamma = s.cached("latency-match-gamma", stage_key(src_key, timing_key), [],
                         lambda: self.match("gamma", 0.0, 0.95, True, gamma_model, ref))  # fmt: skip
        uniform = s.cached("latency-match-uniform", stage_key(timing_key),  [],
                           lambda: self.match("uniform", 0.1, 1.0, False, uniform_model, ref))  # fmt: skip

        rows: list[dict[str, Any]] = []
        models: dict[str, torch.nn.Module] = {"baseline": baseline}
        rows.append(self.describe("baseline", baseline, None, table, cfg.epochs, "unpruned, λ = 0"))
        rows[-1]["acc"] = baseline_acc
        tag = f"x{self.speedup:g}"
        # the same fine-tuning epochs for every row; each once on the labels alone, once distilling from the
        # unpruned (sparse-trained) model the pipeline pruned -- what 'build' does by default
        teachers = {"": None, "+kd": sparse} if self.distill else {"": None}
        # (1) latency-targeted and (2) gamma-threshold: fine-tune the pruned sparse model
        gamma_plan = select(traced, by_ratio(gamma["knob"]))
        pruned_models = [
            ("latency", lat_model, lat_plan, f"--speedup {self.speedup:g}: {pruned['tries']} tries, "
             f"{'met' if pruned['met'] else 'missed'}"),
            ("gamma", apply_plan(sparse, gamma_plan), gamma_plan, f"ratio {gamma['knob']:g}"),
        ]  # fmt: skip
        if width_only is not None:
            wckpt = load_checkpoint(width_ckpt)
            pruned_models.insert(1, ("width", model_from_checkpoint(wckpt), PruningPlan.from_dict(wckpt.plan),
                                     f"--speedup {self.speedup:g} --no-depth: {width_only['tries']} tries, "
                                     f"{'met' if width_only['met'] else 'missed'}"))  # fmt: skip
        for name, model, plan, knob in pruned_models:
            before = self.acc(model)
            for suffix, teacher in teachers.items():
                tuned, hist = s.train(f"{name}-{tag}{suffix}", copy.deepcopy(model), s.ft_cfg(), plan, teacher=teacher)
                models[name + suffix] = tuned
                rows.append(self.describe(name + suffix, tuned, before, table, cfg.epochs + cfg.ft_epochs, knob, plan))
                rows[-1]["acc"] = hist[-1]["val_acc"]
        # (3) uniform width and (4) the latency-targeted architecture, each from scratch for the sparse
        # epochs (Liu et al. 2019), then the same fine-tuning
        factor = uniform["knob"]
        width_kwargs = {**s.arch_kwargs, "width": s.setup.width * factor}
        widths = f"width × {factor:g} (= {s.setup.width * factor:.4g})"
        for name, start, plan, kwargs, how in (
            ("uniform", uniform_model(factor), None, width_kwargs, widths),
            ("scratch", _reinitialised(lat_model, cfg.seed + 3), lat_plan, None, "the latency-targeted widths"),
        ):  # fmt: skip
            scratch, hist = s.train(f"{name}-{tag}-scratch", start, s.train_cfg(sparse=False), plan, arch_kwargs=kwargs)
            before = hist[-1]["val_acc"]
            for suffix, teacher in teachers.items():
                tuned, hist = s.train(f"{name}-{tag}{suffix}", copy.deepcopy(scratch), s.ft_cfg(), plan,
                                      arch_kwargs=kwargs, teacher=teacher)  # fmt: skip
                models[name + suffix] = tuned
                rows.append(self.describe(name + suffix, tuned, before, table, cfg.epochs + cfg.ft_epochs, how, plan))
                rows[-1]["acc"] = hist[-1]["val_acc"]

        files = [self.onnx(models[r["variant"]], f"final-{r['variant']}") for r in rows]

        def measure() -> dict[str, Any]:
            return {"ms": self.target.latencies(files, **self.timing)}

        bench_key = stage_key([sha256_file(f) for f in files], self.timing, cfg.threads, TIMING_METHOD)
        measured = s.cached("latency-bench", bench_key, files, measure)
        for r, ms in zip(rows, measured["ms"], strict=True):
            r["measured_ms"] = round(ms, 4)
            r["speedup"] = round(measured["ms"][0] / ms, 3)
        return {
            "speedup_goal": self.speedup,
            "batch": BATCH,
            "target": self.target.describe(),
            "budget": pruned,
            "width_only_budget": width_only,
            "gamma_search": gamma,
            "uniform_search": uniform,
            "rows": rows,
        }

    def describe(
        self, variant: str, model: torch.nn.Module, before: float | None, table: LatencyTable, epochs: int, how: str,
        plan: PruningPlan | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """A row's model columns; ``plan``: the pruning plan it was cut by, whose kept counts per group (0: the
        branch removed) the table predicts -- a model without its removed branches traces to fewer groups."""
        model = model.cpu().eval()
        if plan is not None:
            counts = [len(g.keep) for g in plan.groups]
        else:
            counts = [g.size for g in trace_groups(model, self.s.example).groups]
        predicted = table.predict(counts) if len(counts) == len(table.sizes) else None
        return {
            "variant": variant,
            "how": how,
            "acc_before": before,
            "params": count_params(model),
            "macs": count_macs(model, self.s.example),
            "predicted_ms": None if predicted is None else round(predicted, 4),
            "epochs": epochs,
        }
