"""Fashion-MNIST study: what Network Slimming delivers against two controls, in one command.

    python bench/study.py [--quick] [--out docs/results.md] [--work DIR] [--device auto]

For each model (a VGG and a pre-activation ResNet from the zoo) it trains a baseline (lambda=0)
and a sparse model, prunes the sparse model at every ratio with the paper-exact rails and with
the default rails, fine-tunes each slim model, exports fp32/fp16/int8 ONNX, measures accuracy
and ONNX Runtime CPU latency (baseline and slim models interleaved), and runs two controls at
the same kept widths as each default-rails slim model:

- ``own-gamma``: the baseline pruned by its own |gamma| ranking (per group, the same number of
  channels the slim model keeps) and fine-tuned for the same epochs;
- ``scratch``: the slim architecture re-initialised and trained from scratch for the sparse
  epochs plus the fine-tune epochs (Liu et al. 2019, "Rethinking the Value of Network Pruning").

Everything goes through the library (train.fit, plan, surgery, export, precision, benchmark).
Checkpoints and per-stage results are cached under ``--work`` in a folder keyed by the settings,
so an interrupted run resumes where it stopped (training resumes at the last finished epoch).
The Markdown table and the JSON next to it are written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim2deploy.base.files import atomic_write_text
from slim2deploy.deploy.calib import load_calib
from slim2deploy.deploy.export import export_onnx
from slim2deploy.deploy.precision import quantize_int8, to_fp16
from slim2deploy.measure import benchmark
from slim2deploy.measure.compare import check_agreement, check_parity
from slim2deploy.measure.environment import environment
from slim2deploy.measure.results import Comparison
from slim2deploy.model.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint
from slim2deploy.model.data import load_dataset
from slim2deploy.model.loop import DistInfo, TrainConfig, evaluate, fit, pick_device
from slim2deploy.model.sparsity import small_gamma_share
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.model.zoo import create_model, init_weights
from slim2deploy.prune import plan as plan_mod
from slim2deploy.prune import select as select_mod
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.surgery import apply_plan

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "calib" / "fashion-mnist-512.npz"
RAILS = {
    "paper": {"round_to": 1, "min_channels": 1, "max_prune": 1.0},
    "default": {
        "round_to": plan_mod.DEFAULT_ROUND_TO,
        "min_channels": plan_mod.DEFAULT_MIN_CHANNELS,
        "max_prune": plan_mod.DEFAULT_MAX_PRUNE,
    },
}


@dataclass
class ModelSetup:
    """One architecture of the study and its sparse-training settings."""

    arch: str
    width: float
    sparsity: float
    sparsity_mode: str = "proximal"
    sparsity_warmup: float = 0.0
    sparsity_scope: str = "all"  # "prunable": no penalty on gammas the surgery can never remove
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    control_ratios: tuple[float, ...] = (0.5,)  # with the default rails


@dataclass
class StudyConfig:
    models: list[ModelSetup]
    epochs: int = 6  # baseline and sparse training
    ft_epochs: int = 2  # fine-tuning of every pruned model; scratch control trains epochs + ft_epochs
    rails: tuple[str, ...] = ("paper", "default")
    lr: float = 0.1
    schedule: str = "cosine"
    ft_lr: float = 0.01
    ft_schedule: str = "cosine"
    batch_size: int = 64
    limit_train: int | None = None
    limit_val: int | None = None
    seed: int = 0
    threads: int = 2
    bench_batches: tuple[int, ...] = (1, 64)
    bench_iterations: int = 200
    bench_rounds: int = 8
    bench_warmup_s: float = 1.0
    mode: str = "full"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self, setup: ModelSetup, sparse: bool = True) -> str:
        """Hash of the training settings; which ratios, rails and benchmarks run does not change a stage.

        ``sparse=False`` leaves out the sparsity settings: the baseline is shared by every lambda.
        """
        d = self.to_dict()
        for k in ("models", "rails", "threads", "bench_batches", "bench_iterations", "bench_rounds", "bench_warmup_s"):
            d.pop(k)
        d.pop("mode")
        skip = {"ratios", "control_ratios"} | (
            set() if sparse else {"sparsity", "sparsity_mode", "sparsity_warmup", "sparsity_scope"}
        )
        d["setup"] = {k: v for k, v in asdict(setup).items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def full_config(cuda: bool) -> StudyConfig:
    # CPU: widths that train a Fashion-MNIST epoch in about a minute on 2 cores, and the ResNet
    # (1.6x slower per epoch) pruned at 50% only, to stay near 90 minutes; GPU: full width, all ratios.
    return StudyConfig(
        models=[
            # on all 60k images for 6 epochs, lambda 1e-3 leaves ~50% of VGG's gammas below 1e-2
            # (the demo model); the ResNet's residual streams cannot be pruned, so they go unpenalised
            ModelSetup("vgg11", 1.0 if cuda else 0.25, sparsity=1e-3),
            ModelSetup(
                "resnet20",
                1.0 if cuda else 0.5,
                sparsity=1e-3,
                sparsity_scope="prunable",
                ratios=(0.3, 0.5, 0.7) if cuda else (0.5,),
            ),
        ]
    )


def quick_config(cuda: bool) -> StudyConfig:
    return StudyConfig(
        models=[ModelSetup("vgg11", 1.0 if cuda else 0.25, sparsity=2e-3, ratios=(0.5,))],
        epochs=2,
        ft_epochs=1,
        limit_train=10_000,
        limit_val=2_000,
        bench_iterations=30,
        bench_rounds=3,
        mode="quick",
    )


def smoke_config() -> StudyConfig:
    """For the test suite: seconds, not minutes; the numbers mean nothing."""
    return StudyConfig(
        models=[ModelSetup("vgg11", 0.125, sparsity=2e-3, ratios=(0.5,))],
        epochs=1,
        ft_epochs=1,
        rails=("default",),
        limit_train=1_000,
        limit_val=500,
        batch_size=32,
        bench_iterations=6,
        bench_rounds=2,
        bench_warmup_s=0.05,
        mode="smoke",
    )


@dataclass
class Row:
    """One line of the results table."""

    model: str
    variant: str  # baseline, sparse, slim, own-gamma, scratch
    rails: str | None = None
    ratio: float | None = None
    small_gamma: float | None = None
    acc_pruned: float | None = None  # right after surgery, before any fine-tuning
    acc: float | None = None  # final (after fine-tuning / training)
    params: int = 0
    macs: int = 0
    onnx_bytes: int | None = None
    fp16_acc: float | None = None
    int8_acc: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch -> median ms
    speedup: dict[str, float] = field(default_factory=dict)
    efficiency: dict[str, float | None] = field(default_factory=dict)
    epochs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def name(self) -> str:
        if self.ratio is None:
            return self.variant
        return f"{self.variant}-{self.rails}-{round(self.ratio * 100)}"


class Study:
    def __init__(self, cfg: StudyConfig, setup: ModelSetup, work: Path, device: torch.device, log: Any):
        self.cfg, self.setup, self.device, self.log = cfg, setup, device, log
        self.dir = work / f"{setup.arch}-w{setup.width:g}-{cfg.key(setup)}"
        self.base_dir = work / f"{setup.arch}-w{setup.width:g}-baseline-{cfg.key(setup, sparse=False)}"
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.json", json.dumps({**cfg.to_dict(), "setup": asdict(setup)}, indent=2))
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

    # -- caching -------------------------------------------------------------------------------
    def cached(self, name: str, fn: Any) -> Any:
        path = self.dir / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        started = time.perf_counter()
        value = fn()
        value["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_text(path, json.dumps(value, indent=2))
        return value

    def train(self, name: str, model: torch.nn.Module, cfg: TrainConfig, plan: dict[str, Any] | None = None) -> Any:
        """Train (or resume, or load) ``model``; the finished checkpoint is ``<name>.pt``."""
        where = self.base_dir if name == "baseline" else self.dir
        done, partial = where / f"{name}.pt", where / f"{name}.partial.pt"
        if done.exists():
            ckpt = load_checkpoint(done)
            self.train_seconds += sum(h["seconds"] for h in ckpt.meta["history"])
            return model_from_checkpoint(ckpt), ckpt.meta["history"]
        start, opt_state, history = 0, None, []
        if partial.exists():
            ckpt = load_checkpoint(partial)
            model = model_from_checkpoint(ckpt)
            start, opt_state = int(ckpt.train_state["epoch"]), ckpt.train_state["optimizer"]
            history = list(ckpt.train_state["history"])
            self.log(f"{self.setup.arch} {name}: resuming at epoch {start + 1}")

        def save(result: Any, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
            history.append(result.to_dict())
            ckpt = checkpoint_for(
                net, self.setup.arch, self.arch_kwargs, self.train_ds.input_shape, self.train_ds.num_classes,
                {**self.meta, "train_config": cfg.to_dict(), "history": history}, plan,
            )  # fmt: skip
            ckpt.train_state = {"epoch": result.epoch, "optimizer": optimizer.state_dict(), "history": history}
            save_checkpoint(ckpt, partial)
            self.log(
                f"{self.setup.arch} {name} epoch {result.epoch}/{cfg.epochs}: val acc {result.val_acc:.4f}, "
                f"gamma<1e-2 {result.small_gamma:.1%}, {result.seconds:.0f}s"
            )

        fit(
            model, self.train_ds, self.val_ds, cfg, dist_info=DistInfo(device=self.device),
            start_epoch=start, optimizer_state=opt_state, on_epoch_end=save, progress=False, desc=name,
        )  # fmt: skip
        ckpt = load_checkpoint(partial)
        self.train_seconds += sum(h["seconds"] for h in history)
        ckpt.train_state = None
        save_checkpoint(ckpt, done)
        partial.unlink()
        return model.cpu().eval(), history

    # -- stages ----------------------------------------------------------------------------------
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
        return TrainConfig(
            epochs=self.cfg.ft_epochs,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.ft_lr,
            schedule=self.cfg.ft_schedule,
            seed=self.cfg.seed,
        )

    def fresh(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return create_model(self.setup.arch, **self.arch_kwargs)

    def accuracy(self, model: torch.nn.Module) -> float:
        return evaluate(model.to(self.device), self.val_ds, device=self.device)[1]

    def row(self, model: torch.nn.Module, variant: str, **kw: Any) -> Row:
        model = model.cpu().eval()
        return Row(self.setup.arch, variant, params=count_params(model), macs=count_macs(model, self.example), **kw)

    def finetuned(self, name: str, slim: torch.nn.Module, plan: plan_mod.PruningPlan) -> tuple[Any, Any]:
        return self.train(name, slim, self.ft_cfg(), plan.to_dict())

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

        traced = plan_mod.trace_groups(sparse, self.example)
        for rails in cfg.rails:
            for ratio in setup.ratios:
                plan = select_mod.select_channels(traced, ratio, **RAILS[rails])
                tag = f"{rails}-{round(ratio * 100)}"
                slim = apply_plan(sparse, plan)
                acc_pruned = self.cached(f"pruned-{tag}", lambda s=slim: {"acc": self.accuracy(s)})["acc"]
                slim, hist = self.finetuned(f"slim-{tag}", slim, plan)
                row = self.row(slim, "slim", rails=rails, ratio=ratio, small_gamma=gamma_share)
                row.acc_pruned, row.acc, row.epochs = acc_pruned, hist[-1]["val_acc"], cfg.epochs + cfg.ft_epochs
                rows.append(row)
                models[row.name] = slim
                if rails == "default" and ratio in setup.control_ratios:
                    rows += self.controls(plan, baseline, ratio, models)

        self.export_all(rows, models)
        self.bench(rows, models)
        return {
            "arch": setup.arch,
            "setup": asdict(setup),
            "work_dir": str(self.dir),
            "rows": [r.to_dict() for r in rows],
            "sparse_history": sparse_history,
            "train_seconds": round(self.train_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
        }

    def controls(
        self, plan: plan_mod.PruningPlan, baseline: torch.nn.Module, ratio: float, models: dict[str, Any]
    ) -> list[Row]:
        cfg, tag = self.cfg, f"default-{round(ratio * 100)}"
        rows = []
        # (a) the baseline pruned to the same kept widths, channels ranked by the baseline's own gamma
        own = plan_mod.rescore(plan, baseline)
        for g in own.groups:
            if g.pruned and g.scores is not None:
                order = sorted(range(g.size), key=lambda i, s=g.scores: (-s[i], i))
                g.keep = sorted(order[: len(g.keep)])
        pruned = apply_plan(baseline, own)
        acc_pruned = self.cached(f"own-gamma-pruned-{tag}", lambda: {"acc": self.accuracy(pruned)})["acc"]
        model, hist = self.finetuned(f"own-gamma-{tag}", pruned, own)
        row = self.row(model, "own-gamma", rails="default", ratio=ratio, acc_pruned=acc_pruned)
        row.acc, row.epochs = hist[-1]["val_acc"], cfg.epochs + cfg.ft_epochs
        row.small_gamma = small_gamma_share(baseline)
        # what the baseline's own global threshold would have kept at the same ratio and rails
        own_global = select_mod.plan_pruning(baseline, self.example, ratio, **RAILS["default"])
        row.notes.append(
            f"baseline's own global threshold at ratio {ratio}: "
            f"{count_macs(apply_plan(baseline, own_global), self.example):,} MACs"
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
        model, hist = self.train(f"scratch-{tag}", arch, self.train_cfg(sparse=False, epochs=epochs), plan.to_dict())
        row = self.row(model, "scratch", rails="default", ratio=ratio, acc=hist[-1]["val_acc"], epochs=epochs)
        rows.append(row)
        models[row.name] = model
        return rows

    def export_all(self, rows: list[Row], models: dict[str, torch.nn.Module]) -> None:
        calib_x = load_calib(CALIB, tuple(self.train_ds.input_shape))
        x, y = self.val_ds.x.numpy(), self.val_ds.y.numpy()
        for row in rows:
            if row.name not in models:
                continue

            def export(row: Row = row) -> dict[str, Any]:
                model = models[row.name].cpu().eval()
                fp32 = self.dir / f"{row.name}.onnx"
                res = export_onnx(model, self.example, fp32)
                check_parity(model, fp32, x[:64]).raise_if_failed()
                out: dict[str, Any] = {"bytes": res.bytes}
                to_fp16(fp32, fp32.with_suffix(".fp16.onnx"))
                quantize_int8(fp32, fp32.with_suffix(".int8.onnx"), calib_x, flavour="tensorrt")
                for prec in ("fp16", "int8"):
                    rep = check_agreement(fp32.with_suffix(f".{prec}.onnx"), fp32, x, y)
                    out[prec] = rep.accuracy
                    out["fp32"] = rep.reference_accuracy
                return out

            res = self.cached(f"export-{row.name}", export)
            row.onnx_bytes, row.fp16_acc, row.int8_acc = res["bytes"], res["fp16"], res["int8"]
            self.log(
                f"{self.setup.arch} {row.name}: fp32 {res['fp32']:.4f} fp16 {res['fp16']:.4f} int8 {res['int8']:.4f}"
            )

    def bench(self, rows: list[Row], models: dict[str, torch.nn.Module]) -> None:
        # The controls share their slim model's architecture, so only baseline and slim models are timed.
        timed = [r for r in rows if r.variant in ("baseline", "slim")]
        cfg = self.cfg

        def measure() -> dict[str, Any]:
            comparison = benchmark.benchmark(
                [self.dir / f"{r.name}.onnx" for r in timed[1:]],
                baseline=self.dir / "baseline.onnx",
                batches=cfg.bench_batches,
                iterations=cfg.bench_iterations,
                rounds=cfg.bench_rounds,
                warmup_s=cfg.bench_warmup_s,
                names=[r.name for r in timed],
                measure_rss=False,
                threads=cfg.threads,
            )
            return comparison.to_dict()

        settings = [[r.name for r in timed], cfg.bench_batches, cfg.bench_iterations, cfg.bench_rounds, cfg.threads]
        key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]
        c = Comparison.from_dict(self.cached(f"benchmark-{key}", measure))
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


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def table(result: dict[str, Any], batches: tuple[int, ...]) -> str:
    rows = result["rows"]
    base = next(r for r in rows if r["variant"] == "baseline")
    head = [
        "variant", "γ<1e-2 %", "acc pruned %", "acc final %", "params", "MACs", "MACs −%", "ONNX KB",
        *[f"b{b} ms" for b in batches], *[f"b{b} speed-up" for b in batches], *[f"b{b} eff." for b in batches],
        "fp16 %", "int8 %", "epochs",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"] if r["ratio"] is None else f"{r['variant']} {r['rails']} {round(r['ratio'] * 100)}%",
            _pct(r["small_gamma"], 1),
            _pct(r["acc_pruned"]),
            _pct(r["acc"]),
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:.2f}M",
            _num(100 * (1 - r["macs"] / base["macs"]), ".1f"),
            _num(None if r["onnx_bytes"] is None else r["onnx_bytes"] / 1024, ".0f"),
            *[_num(r["latency_ms"].get(str(b)), ".3f") for b in batches],
            *[_num(r["speedup"].get(str(b))) for b in batches],
            *[_num(r["efficiency"].get(str(b))) for b in batches],
            _pct(r["fp16_acc"]),
            _pct(r["int8_acc"]),
            str(r["epochs"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The issue's targets for this model at 50% with the default rails: (target, met, measured)."""
    rows = {(r["variant"], r["rails"], r["ratio"]): r for r in result["rows"]}
    base, sparse = rows[("baseline", None, None)], rows[("sparse", None, None)]
    slim = rows.get(("slim", "default", 0.5))
    if slim is None:
        return []
    own, scratch = rows.get(("own-gamma", "default", 0.5)), rows.get(("scratch", "default", 0.5))
    macs_red = 1 - slim["macs"] / base["macs"]
    out = [
        (
            "accuracy right after pruning within 1 point of the unpruned sparse model",
            sparse["acc"] - slim["acc_pruned"] <= 0.01,
            f"{100 * slim['acc_pruned']:.2f}% vs {100 * sparse['acc']:.2f}% "
            f"({100 * (slim['acc_pruned'] - sparse['acc']):+.2f} points)",
        ),
        (
            "after fine-tuning within 0.3 points of the baseline",
            base["acc"] - slim["acc"] <= 0.003,
            f"{100 * slim['acc']:.2f}% vs {100 * base['acc']:.2f}% ({100 * (slim['acc'] - base['acc']):+.2f} points)",
        ),
    ]
    for ctrl, name in ((own, "the baseline pruned by its own γ"), (scratch, "the same architecture from scratch")):
        if ctrl is not None:
            out.append(
                (
                    f"beats {name} at equal MACs",
                    slim["acc"] > ctrl["acc"],
                    f"{100 * slim['acc']:.2f}% vs {100 * ctrl['acc']:.2f}% ({100 * (slim['acc'] - ctrl['acc']):+.2f})",
                )
            )
    out.append(("≥ 40% fewer MACs", macs_red >= 0.4, f"{100 * macs_red:.1f}% fewer"))
    eff = slim["efficiency"].get("64")
    if "64" in slim["speedup"]:
        red = 1 - 1 / slim["speedup"]["64"]
        out.append(
            (
                "batch-64 latency reduced by ≥ 0.8 × the MACs reduction",
                red >= 0.8 * macs_red,
                f"latency −{100 * red:.1f}% vs MACs −{100 * macs_red:.1f}% (efficiency {_num(eff)})",
            )
        )
    if "1" in slim["speedup"]:
        out.append(("not slower than the baseline at batch 1", slim["speedup"]["1"] >= 1.0,
                    f"speed-up {slim['speedup']['1']:.2f}×"))  # fmt: skip
    if slim["int8_acc"] is not None:
        diff = slim["int8_acc"] - slim["acc"]
        out.append(("int8 accuracy within 0.5 points of fp32", abs(diff) <= 0.005, f"{100 * diff:+.2f} points"))
    return out


def environment_info(device: torch.device) -> dict[str, Any]:
    import onnxruntime

    env = environment()
    return {
        "cpu": env.get("cpu"),
        "cpu_count": env.get("cpu_count"),
        "cpus_usable": env.get("cpus_usable"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }


def render(report: dict[str, Any]) -> str:
    cfg = report["config"]
    env = report["environment"]
    batches = tuple(cfg["bench_batches"])
    out = [
        "# Fashion-MNIST study: Network Slimming against its controls",
        "",
        f"Generated by `{report['command']}` ({cfg['mode']} settings) on {report['finished']}; this "
        f"invocation took {report['seconds'] / 60:.1f} min (stages already in the work dir are reused; the "
        "epoch times of every training are in the JSON).",
        "",
        "Columns: *γ<1e-2* share of BatchNorm scaling factors below 1e-2 after (sparse) training; "
        "*acc pruned* accuracy right after surgery, before fine-tuning; *acc final* after fine-tuning "
        "(controls: after their training); *bN ms* ONNX Runtime CPU median latency at batch N "
        "(baseline and slim models measured interleaved); *speed-up* baseline / model; *eff.* "
        "latency reduction ÷ MACs reduction (1.0 = every removed MAC paid off); fp16 / int8: "
        "accuracy of the fp16 graph and of the calibrated int8 Q/DQ graph (TensorRT flavour, "
        "evaluated on ONNX Runtime CPU). Controls run the same graph as their slim model, so their "
        "latency is the slim model's. Accuracy is top-1 on the Fashion-MNIST test set "
        f"({report['val_images']} images).",
        "",
    ]
    for res in report["results"]:
        s = res["setup"]
        out += [
            f"## {s['arch']} (width {s['width']:g})",
            "",
            f"Sparse training: {s['sparsity_mode']} L1 on γ ({s.get('sparsity_scope', 'all')} of them), "
            f"λ = {s['sparsity']:g}, warm-up "
            f"{s['sparsity_warmup']:g} epochs; {cfg['epochs']} epochs, lr {cfg['lr']:g} ({cfg['schedule']} "
            f"schedule); fine-tuning {cfg['ft_epochs']} epochs, lr {cfg['ft_lr']:g} ({cfg['ft_schedule']}). "
            f"Training time (sum of epochs): {res['train_seconds'] / 60:.1f} min.",
            "",
            table(res, batches),
            "",
        ]
        notes = [f"- {r['variant']} {round(r['ratio'] * 100)}%: {n}" for r in res["rows"] for n in r["notes"]]
        if notes:
            out += [*notes, ""]
        checks = targets(res)
        if checks:
            out += [f"Targets at 50% with the default rails ({s['arch']}):", ""]
            out += [f"- {'met' if ok else '**missed**'}: {name} — {got}" for name, ok, got in checks]
            out.append("")
    out += [
        "## How it was run",
        "",
        f"- command: `{report['command']}`",
        f"- seeds: training seed {cfg['seed']} (data order, augmentation, initial weights), scratch control "
        f"initialised with seed {cfg['seed'] + 1}",
        f"- training images: {report['train_images']}, test images: {report['val_images']}, batch "
        f"{cfg['batch_size']}, augmentation: random shift ±2 px and horizontal flip",
        f"- machine: {env['cpu']}, {env['cpus_usable']} usable cores of {env['cpu_count']}, {env['platform']}; "
        f"device {env['device']}" + (f" ({env['gpu']})" if env["gpu"] else ""),
        f"- libraries: torch {env['torch']}, onnxruntime {env['onnxruntime']}, numpy {env['numpy']}, "
        f"python {env['python']}",
        f"- latency: ONNX Runtime CPU, intra-op threads: {cfg['threads']}, {cfg['bench_iterations']} iterations "
        f"in {cfg['bench_rounds']} interleaved rounds after {cfg['bench_warmup_s']:g} s warm-up per model",
        "",
    ]
    return "\n".join(out)


DISCUSSION = "<!-- discussion: hand-written, kept when the study is re-run -->"


def _discussion(path: Path) -> str:
    """The hand-written discussion at the end of an earlier report, so a re-run does not erase it."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(DISCUSSION)
    return "" if at < 0 else "\n" + text[at:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: vgg11, 10k images, 2+1 epochs, 50%% only")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"), help="Markdown report (JSON written beside it)")
    p.add_argument("--work", default=str(ROOT / "runs" / "study"), help="checkpoints and cached stage results")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--models", help="comma-separated subset of the configured models, e.g. vgg11")
    p.add_argument("--epochs", type=int, help="override the baseline/sparse training epochs")
    p.add_argument("--ft-epochs", type=int, help="override the fine-tuning epochs")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--sparsity", type=float, help="override lambda of the selected models")
    p.add_argument("--sparsity-warmup", type=float, help="override the lambda warm-up (epochs) of the selected models")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime CPU threads (default 2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    cfg = smoke_config() if args.smoke else quick_config(cuda) if args.quick else full_config(cuda)
    cfg.threads = args.threads
    if args.models:
        wanted = args.models.split(",")
        cfg.models = [m for m in cfg.models if m.arch in wanted]
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    if args.ft_epochs:
        cfg = replace(cfg, ft_epochs=args.ft_epochs)
    if args.sparsity is not None:
        cfg.models = [replace(m, sparsity=args.sparsity) for m in cfg.models]
    if args.sparsity_warmup is not None:
        cfg.models = [replace(m, sparsity_warmup=args.sparsity_warmup) for m in cfg.models]
    if args.limit_train:
        cfg = replace(cfg, limit_train=args.limit_train)
    overridden = any(
        v is not None for v in (args.epochs, args.ft_epochs, args.sparsity, args.sparsity_warmup, args.limit_train)
    )
    if overridden:
        cfg = replace(cfg, mode=f"{cfg.mode}, overridden by the flags")
    if not cfg.models:
        print(f"no model left after --models {args.models}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {msg}", flush=True)

    results = []
    train_n = val_n = 0
    for setup in cfg.models:
        study = Study(cfg, setup, Path(args.work), device, log)
        train_n, val_n = len(study.train_ds), len(study.val_ds)
        log(f"{setup.arch} width {setup.width:g}: work dir {study.dir}")
        results.append(study.run())
    command = "python bench/study.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    report = {
        "format": "slim2deploy.study/1",
        "command": command.strip(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 1),
        "config": cfg.to_dict(),
        "environment": environment_info(device),
        "train_images": train_n,
        "val_images": val_n,
        "results": results,
        "targets": {
            r["arch"]: [{"target": t, "met": ok, "measured": got} for t, ok, got in targets(r)] for r in results
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    atomic_write_text(out, render(report) + _discussion(out))
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
