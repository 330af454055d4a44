"""One model of the study: train, prune, fine-tune, controls, export, time — through the pipeline.

Training and fine-tuning go through ``pipeline.train.train_to_checkpoint`` (a checkpoint per
epoch, resumed where an interrupted run stopped); selections are ``prune.select.Selection``s
(the controls use ``WidthsSelector``); export and precision are one ``pipeline.export.export_variants``
call per model; every other measured stage is cached by ``base.cache.StageCache`` in the work
dir, keyed by the files it reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim2deploy.base.cache import StageCache, stage_key
from slim2deploy.base.files import atomic_write_text, sha256_file
from slim2deploy.deploy.calib import load_calib
from slim2deploy.measure import benchmark
from slim2deploy.measure.results import Comparison
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.data import load_dataset
from slim2deploy.model.distributed import DistInfo
from slim2deploy.model.loop import TrainConfig, evaluate
from slim2deploy.model.nets import init_weights
from slim2deploy.model.sparsity import small_gamma_share
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.model.zoo import create_model
from slim2deploy.pipeline.export import export_variants, variant_path
from slim2deploy.pipeline.train import ResumePoint, train_to_checkpoint
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import Selection, WidthsSelector, by_ratio, select
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups
from studylib.config import EXACT_WIDTHS, RAILS, ModelSetup, Row, StudyConfig
from studylib.latency import LatencyStudy

ROOT = Path(__file__).resolve().parents[2]
CALIB = ROOT / "calib" / "fashion-mnist-512.npz"


def calib_for(checkpoint: Path, calib: Path = CALIB) -> np.ndarray:
    """The calibration set checked against the model's checkpoint as 'slim2deploy export --calib' checks it:
    its input shape and its mean/std, so a set normalised for another model is refused, not used."""
    ckpt = load_checkpoint(checkpoint)
    return load_calib(calib, ckpt.input_shape, ckpt.stats)


class Study:
    def __init__(self, cfg: StudyConfig, setup: ModelSetup, work: Path, device: torch.device, log: Any):
        self.cfg, self.setup, self.device, self.log = cfg, setup, device, log
        self.dir = work / f"{setup.arch}-w{setup.width:g}-{cfg.key(setup)}"
        self.base_dir = work / f"{setup.arch}-w{setup.width:g}-baseline-{cfg.key(setup, sparse=False)}"
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.json", json.dumps({**cfg.to_dict(), "setup": asdict(setup)}, indent=2))
        self.cache = StageCache(self.dir / "stages.json", log)
        self.train_ds = load_dataset("fashion-mnist", "train").subset(cfg.limit_train)
        stats = (self.train_ds.mean, self.train_ds.std)
        self.val_ds = load_dataset("fashion-mnist", "val", stats=stats).subset(cfg.limit_val)
        self.example = torch.zeros(1, *self.train_ds.input_shape)
        self.arch_kwargs = {
            "in_channels": self.train_ds.input_shape[0],
            "num_classes": self.train_ds.num_classes,
            "width": setup.width,
        }
        self.train_seconds = 0.0
        self.meta = {"dataset": "fashion-mnist", "mean": list(stats[0]), "std": list(stats[1])}
        self.checkpoints: dict[str, Path] = {}  # row name -> the checkpoint its model came from

    def cached(self, stage: str, key: str, outputs: list[Path], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        def timed() -> dict[str, Any]:
            started = time.perf_counter()
            return {**fn(), "seconds": round(time.perf_counter() - started, 1)}

        return self.cache.run(stage, key, outputs, timed)[0]

    def train(
        self,
        name: str,
        model: torch.nn.Module,
        cfg: TrainConfig,
        plan: PruningPlan | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        teacher: torch.nn.Module | None = None,
    ) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
        """Train ``model`` into ``<name>.pt`` (distilling from ``teacher`` when given), resuming an unfinished
        run and reusing a finished one."""
        path = (self.base_dir if name == "baseline" else self.dir) / f"{name}.pt"
        resume = None
        if path.exists():
            ckpt = load_checkpoint(path)
            resume, model = ResumePoint.of(ckpt, path), model_from_checkpoint(ckpt)
            if resume.epoch < cfg.epochs:
                self.log(f"{self.setup.arch} {name}: resuming at epoch {resume.epoch + 1}")

        def said(result: Any) -> None:
            self.log(
                f"{self.setup.arch} {name} epoch {result.epoch}/{cfg.epochs}: val acc {result.val_acc:.4f}, "
                f"gamma<1e-2 {result.small_gamma:.1%}, {result.seconds:.0f}s"
            )

        if resume is None or resume.epoch < cfg.epochs:
            train_to_checkpoint(
                model, path, arch=self.setup.arch, arch_kwargs=arch_kwargs or self.arch_kwargs, train_ds=self.train_ds,
                val_ds=self.val_ds, cfg=cfg, meta={**self.meta, "train_config": cfg.to_dict()},
                plan=None if plan is None else plan.to_dict(), dist_info=DistInfo(device=self.device),
                resume=resume, progress=False, desc=name, on_epoch=said, teacher=teacher,
            )  # fmt: skip
        history = ResumePoint.of(load_checkpoint(path), path).history
        self.train_seconds += sum(h["seconds"] for h in history)
        self.checkpoints[name] = path
        return model.cpu().eval(), history

    def train_cfg(self, sparse: bool, epochs: int | None = None) -> TrainConfig:
        s = self.setup
        return TrainConfig(
            epochs=epochs or self.cfg.epochs,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.lr,
            schedule=self.cfg.schedule,
            sparsity=s.sparsity if sparse else 0.0,
            sparsity_mode=s.sparsity_mode,
            sparsity_warmup=s.sparsity_warmup if sparse else 0.0,
            sparsity_scope=s.sparsity_scope,
            seed=self.cfg.seed,
        )

    def ft_cfg(self) -> TrainConfig:
        c = self.cfg
        return TrainConfig(epochs=c.ft_epochs, batch_size=c.batch_size, lr=c.ft_lr, schedule=c.ft_schedule, seed=c.seed)

    def fresh(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return create_model(self.setup.arch, **self.arch_kwargs)

    def accuracy_after_surgery(self, tag: str, source: str, selection: Selection, slim: torch.nn.Module) -> float:
        def measure() -> dict[str, Any]:
            return {"acc": evaluate(slim.to(self.device), self.val_ds, device=self.device)[1]}

        key = stage_key(sha256_file(self.checkpoints[source]), selection.to_dict(), self.cfg.limit_val)
        return float(self.cached(f"pruned-{tag}", key, [], measure)["acc"])

    def row(self, model: torch.nn.Module, variant: str, **kw: Any) -> Row:
        model = model.cpu().eval()
        return Row(self.setup.arch, variant, params=count_params(model), macs=count_macs(model, self.example), **kw)

    def run(self) -> dict[str, Any]:
        cfg, setup = self.cfg, self.setup
        started = time.perf_counter()
        rows: list[Row] = []
        models: dict[str, torch.nn.Module] = {}

        baseline, hist = self.train("baseline", self.fresh(cfg.seed), self.train_cfg(sparse=False))
        rows.append(self.row(baseline, "baseline", acc=hist[-1]["val_acc"], epochs=cfg.epochs))
        rows[-1].small_gamma = small_gamma_share(baseline)
        models["baseline"] = baseline
        sparse, hist = self.train("sparse", self.fresh(cfg.seed), self.train_cfg(sparse=True))
        gamma_share = small_gamma_share(sparse)
        rows.append(self.row(sparse, "sparse", small_gamma=gamma_share, acc=hist[-1]["val_acc"], epochs=cfg.epochs))
        sparse_history = hist

        traced = trace_groups(sparse, self.example)
        for rails in cfg.rails:
            for ratio in setup.ratios:
                selection = by_ratio(ratio, RAILS[rails])
                plan = select(traced, selection)
                tag = f"{rails}-{round(ratio * 100)}"
                slim = apply_plan(sparse, plan)
                acc_pruned = self.accuracy_after_surgery(tag, "sparse", selection, slim)
                slim, hist = self.train(f"slim-{tag}", slim, self.ft_cfg(), plan)
                row = self.row(slim, "slim", rails=rails, ratio=ratio, small_gamma=gamma_share)
                row.acc_pruned, row.acc, row.epochs = acc_pruned, hist[-1]["val_acc"], cfg.epochs + cfg.ft_epochs
                rows.append(row)
                models[row.name] = slim
                if rails == "default" and ratio in setup.control_ratios:
                    rows += self.controls(plan, baseline, ratio, models)

        self.export_all(rows, models)
        if any(r.variant == "slim" for r in rows):
            self.bench(rows)
        latency = None
        if cfg.latency_speedup is not None:
            steps = 3 if cfg.mode == "smoke" else 6
            study = LatencyStudy(self, cfg.latency_speedup, steps, distill=cfg.latency_distill)
            latency = study.run(baseline, rows[0].acc or 0.0)
        return {
            "arch": setup.arch,
            "setup": asdict(setup),
            "work_dir": str(self.dir),
            "rows": [r.to_dict() for r in rows],
            "sparse_history": sparse_history,
            "latency_study": latency,
            "train_seconds": round(self.train_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
        }

    def controls(self, plan: PruningPlan, baseline: torch.nn.Module, ratio: float, models: dict[str, Any]) -> list[Row]:
        cfg, tag = self.cfg, f"default-{round(ratio * 100)}"
        rows = []
        # (a) the baseline pruned to the slim model's per-group widths, ranked by the baseline's own gamma
        traced = trace_groups(baseline, self.example)
        own_sel = Selection(WidthsSelector(tuple(len(g.keep) for g in plan.groups)), EXACT_WIDTHS)
        own = select(traced, own_sel)
        pruned = apply_plan(baseline, own)
        acc_pruned = self.accuracy_after_surgery(f"own-gamma-{tag}", "baseline", own_sel, pruned)
        model, hist = self.train(f"own-gamma-{tag}", pruned, self.ft_cfg(), own)
        row = self.row(model, "own-gamma", rails="default", ratio=ratio, acc_pruned=acc_pruned)
        row.acc, row.epochs = hist[-1]["val_acc"], cfg.epochs + cfg.ft_epochs
        row.small_gamma = small_gamma_share(baseline)
        # what the baseline's own global threshold would have kept at the same ratio and rails
        own_global = apply_plan(baseline, select(traced, by_ratio(ratio, RAILS["default"])))
        row.notes.append(
            f"baseline's own global threshold at ratio {ratio}: {count_macs(own_global, self.example):,} MACs"
        )
        rows.append(row)
        models[row.name] = model
        # (b) the slim architecture from scratch, trained as long as sparse training + fine-tuning
        arch = apply_plan(self.fresh(cfg.seed + 1), plan)
        init_weights(arch)
        with torch.no_grad():
            for fqn in plan.new_biases:
                arch.get_parameter(fqn).zero_()
        epochs = cfg.epochs + cfg.ft_epochs
        model, hist = self.train(f"scratch-{tag}", arch, self.train_cfg(sparse=False, epochs=epochs), plan)
        row = self.row(model, "scratch", rails="default", ratio=ratio, acc=hist[-1]["val_acc"], epochs=epochs)
        rows.append(row)
        models[row.name] = model
        return rows

    def export_all(self, rows: list[Row], models: dict[str, torch.nn.Module]) -> None:
        # every set is checked before the first export, each against its own model
        calib = {r.name: calib_for(self.checkpoints[r.name]) for r in rows if r.name in models}
        x, y = self.val_ds.x.numpy(), self.val_ds.y.numpy()
        for row in rows:
            if row.name not in models:
                continue
            fp32 = self.dir / f"{row.name}.onnx"
            files = [variant_path(fp32, p) for p in ("fp32", "fp16", "int8")]

            def export(
                model: torch.nn.Module = models[row.name], fp32: Path = fp32, calib_x: np.ndarray = calib[row.name]
            ) -> dict[str, Any]:
                got = export_variants(model, self.example, fp32, ("fp32", "fp16", "int8"), x, y, calib_x=calib_x)
                fp16, int8 = got["fp16"], got["int8"]
                return {"bytes": got["fp32"]["bytes"], "fp32": fp16["reference_accuracy"], "fp16": fp16["accuracy"],
                        "int8": int8["accuracy"]}  # fmt: skip

            key = stage_key(sha256_file(self.checkpoints[row.name]), sha256_file(CALIB), self.cfg.limit_val)
            res = self.cached(f"export-{row.name}", key, files, export)
            row.onnx_bytes, row.fp16_acc, row.int8_acc = res["bytes"], res["fp16"], res["int8"]
            self.log(
                f"{self.setup.arch} {row.name}: fp32 {res['fp32']:.4f} fp16 {res['fp16']:.4f} int8 {res['int8']:.4f}"
            )

    def bench(self, rows: list[Row]) -> None:
        # The controls share their slim model's architecture, so only baseline and slim models are timed.
        timed = [r for r in rows if r.variant in ("baseline", "slim")]
        cfg = self.cfg
        files = [self.dir / f"{r.name}.onnx" for r in timed]

        def measure() -> dict[str, Any]:
            comparison = benchmark.benchmark(
                files[1:],
                baseline=files[0],
                batches=cfg.bench_batches,
                iterations=cfg.bench_iterations,
                rounds=cfg.bench_rounds,
                warmup_s=cfg.bench_warmup_s,
                names=[r.name for r in timed],
                measure_rss=False,
                threads=cfg.threads,
            )
            return comparison.to_dict()

        settings = [cfg.bench_batches, cfg.bench_iterations, cfg.bench_rounds, cfg.bench_warmup_s, cfg.threads]
        key = stage_key([r.name for r in timed], [sha256_file(f) for f in files], settings)
        measured = self.cached("benchmark", key, files, measure)
        c = Comparison.from_dict({k: v for k, v in measured.items() if k != "seconds"})
        by_name = {r.name: r for r in rows}
        for m in c.models:
            for b in m.batches:
                by_name[m.name].latency_ms[str(b.batch)] = round(b.latency.median_ms, 4)
        for s in c.speedups:
            r = by_name[s.model]
            r.speedup[str(s.batch)] = round(s.speedup, 3)
            r.efficiency[str(s.batch)] = None if s.efficiency is None else round(s.efficiency, 3)
        for r in rows:  # a control runs the same graph as its slim model
            twin = by_name.get(f"slim-{r.rails}-{round((r.ratio or 0) * 100)}")
            if r.variant in ("own-gamma", "scratch") and twin is not None:
                r.latency_ms, r.speedup, r.efficiency = twin.latency_ms, twin.speedup, twin.efficiency
        self.comparison = c
