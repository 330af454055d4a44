"""``slim2deploy build``: from a sparse-trained checkpoint to everything a user ships.

Stages, each a function of its inputs:

1. prune     plan + surgery (rails as options)                       -> slim.pt, plan.json
2. finetune  optional, on ``data``                                    -> slim.pt
3. export    ONNX of baseline and slim, parity-gated against torch   -> baseline.onnx, slim.onnx
4. precision fp16 graphs and calibrated int8 Q/DQ graphs             -> *.fp16.onnx, *.int8.onnx
5. engines   TensorRT engines + manifests (when TensorRT and a GPU are present)
6. bench     ONNX Runtime CPU latency, baseline vs slim, interleaved -> benchmark.{json,md,png}
7. report    report.json and report.md

Every stage records a key (a hash of its inputs: upstream file contents and its options) in
``build.json``; a re-run skips a stage whose key and outputs are unchanged. Every file is
written atomically, so a failing stage leaves the earlier artifacts intact and nothing half-written.
All checks that can fail on user input (selection, precision list, calibration set) run before any work.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text, sha256_file
from slim2deploy.deploy.calib import load_calib
from slim2deploy.deploy.engine import ENGINE_POLICIES, BuildOptions, build_engine, resolve_engine_policy
from slim2deploy.deploy.export import DEFAULT_OPSET, export_onnx
from slim2deploy.deploy.precision import (
    CALIB_METHODS,
    INT8_FLAVOURS,
    check_precision,
    quantize_int8,
    to_fp16,
)
from slim2deploy.measure import benchmark
from slim2deploy.measure.compare import check_agreement, check_parity
from slim2deploy.measure.report import write_build_report
from slim2deploy.measure.results import Comparison
from slim2deploy.measure.tables import format_table, write_reports
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.folder import load_data, sample_arrays
from slim2deploy.model.loop import evaluate
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.pipeline.budget import Budget, prune_to_budget
from slim2deploy.pipeline.prune import prune_checkpoint
from slim2deploy.pipeline.train import data_options, finetune_checkpoint
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import Selection

PRECISION_SAMPLE = 1000  # images of a streamed eval folder the ONNX precision checks run on
STAGES = ("prune", "finetune", "export", "precision", "engines", "bench", "report")


@dataclass
class BuildConfig:
    model: str
    selection: Selection | Budget  # a ratio (or widths), or a latency budget measured on a target
    out: str = "build"
    fold: bool = True
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    batch_size: int = 64
    data: str | None = None
    data_dir: str | None = None
    limit_train: int | None = None
    eval_limit: int | None = None
    precisions: tuple[str, ...] = ("fp32",)
    calib: str | None = None
    calib_method: str = "minmax"
    int8_flavour: str = "tensorrt"
    opset: int | None = None
    engine: str = "auto"
    engine_batches: tuple[int, ...] = (1, 64)
    workspace_mib: int = 1024
    builder_opt_level: int = 3
    bench: bool = True
    bench_batches: tuple[int, ...] = (1, 64)
    bench_iterations: int = 200
    bench_rounds: int = 5
    bench_warmup_s: float = 1.0
    threads: int | None = None
    seed: int = 0
    trust_pickle: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "selection": self.selection.to_dict()}


@dataclass
class BuildResult:
    out_dir: Path
    artifacts: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    """build.json: the key each stage was last built with, and what it produced."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "build.json"
        try:
            self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, json.JSONDecodeError):
            self.data = {}

    def fresh(self, stage: str, key: str, outputs: list[Path]) -> bool:
        """Same inputs as last time, and the outputs are still exactly what that run wrote."""
        entry = self.data.get(stage, {})
        recorded = entry.get("outputs", {})
        return entry.get("key") == key and all(p.exists() and recorded.get(p.name) == sha256_file(p) for p in outputs)

    def done(self, stage: str, key: str, outputs: list[Path], info: dict[str, Any] | None = None) -> None:
        self.data[stage] = {
            "key": key,
            "outputs": {p.name: sha256_file(p) for p in outputs},
            "info": info or {},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str))

    def info(self, stage: str) -> dict[str, Any]:
        return dict(self.data.get(stage, {}).get("info", {}))


def validate(cfg: BuildConfig) -> None:
    """Every check on user input, before any work is done."""

    if not cfg.precisions:
        raise SlimError("--precision needs at least one of fp32, fp16, int8")
    for p in cfg.precisions:
        check_precision(p)
    if "int8" in cfg.precisions and not cfg.calib:
        raise SlimError(
            "--precision int8 needs a calibration set: --calib calib/fashion-mnist-512.npz "
            "(make one with 'slim2deploy calib')"
        )
    if cfg.calib_method not in CALIB_METHODS:
        raise SlimError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}")
    if cfg.int8_flavour not in INT8_FLAVOURS:
        raise SlimError(f"--int8-flavour must be one of {', '.join(INT8_FLAVOURS)}")
    if cfg.engine not in ENGINE_POLICIES:
        raise SlimError(f"--engine must be one of {', '.join(ENGINE_POLICIES)}")
    if cfg.finetune_epochs < 0:
        raise SlimError(f"--finetune-epochs must be >= 0, got {cfg.finetune_epochs}")
    if cfg.finetune_epochs and not cfg.data:
        raise SlimError("--finetune-epochs needs --data (the dataset to fine-tune on)")
    if any(b < 1 for b in (*cfg.bench_batches, *cfg.engine_batches)):
        raise SlimError("batch sizes must be positive integers")


def _eval_data(cfg: BuildConfig, meta: dict[str, Any]) -> Any:
    """Held-out data (a ``data.Dataset``), from --data or the dataset the checkpoint was trained on."""

    name = cfg.data or meta.get("dataset")
    if not name:
        return None
    stats = (tuple(meta["mean"]), tuple(meta["std"])) if "mean" in meta else None
    opts = data_options(meta, None, None, None)
    try:
        ds = load_data(name, "val", cfg.data_dir, opts.pop("image_size"), stats, **opts).subset(cfg.eval_limit)
    except SlimError:
        if cfg.data:
            raise
        return None  # the training data is not on this machine; the report says accuracy is unknown
    return ds


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> BuildResult:
    """Run the pipeline of the module docstring; see ``BuildConfig`` for the options."""
    import torch


    validate(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out)
    result = BuildResult(out)
    n_stages = len(STAGES)

    def stage(i: int, name: str, text: str) -> None:
        log(f"[{i}/{n_stages}] {name:<9} {text}")

    ckpt = load_checkpoint(cfg.model, trust_pickle=cfg.trust_pickle)
    if ckpt.module is not None:
        raise SlimError(
            f"{cfg.model} is a pickled nn.Module; build needs a slim2deploy checkpoint. Run the stages one by one "
            "with --trust-pickle --input-shape C,H,W (prune, finetune, export), or save it in the slim2deploy format"
        )
    if ckpt.is_pruned:
        raise SlimError(f"{cfg.model} is already pruned; build takes the unpruned sparse-trained checkpoint")
    baseline = model_from_checkpoint(ckpt, trust_code=cfg.trust_pickle)
    example = torch.zeros(1, *ckpt.input_shape)
    calib_x = load_calib(cfg.calib, ckpt.input_shape) if cfg.calib else None
    build_engines, engine_msg = resolve_engine_policy(cfg.engine)
    ckpt_sha = sha256_file(cfg.model)
    eval_ds = _eval_data(cfg, ckpt.meta)
    # a streamed folder is evaluated whole in torch, but the ONNX precision checks take a sample
    eval_xy = None if eval_ds is None else sample_arrays(eval_ds, PRECISION_SAMPLE)

    # 1. prune
    slim_path, plan_path = out / "slim.pt", out / "plan.json"
    key = _key(ckpt_sha, cfg.selection.to_dict(), cfg.fold)
    if state.fresh("prune", key, [slim_path, plan_path]):
        stage(1, "prune", "unchanged, skipped")
        result.skipped.append("prune")
    else:

        started = time.perf_counter()
        latency = None
        if isinstance(cfg.selection, Budget):
            pruned = prune_to_budget(
                cfg.model,
                slim_path,
                cfg.selection,
                fold=cfg.fold,
                trust_code=cfg.trust_pickle,
                table_out=out / "latency-table.json",
                log=log,
            )
            plan, table = pruned.plan, pruned.summary
            latency = {"goal": cfg.selection.goal(), "met": pruned.met, **pruned.chosen, "tries": pruned.tries}
        else:
            plan, table = prune_checkpoint(
                cfg.model,
                slim_path,
                cfg.selection,
                fold=cfg.fold,
                trust_code=cfg.trust_pickle,
            )
        log(table)
        atomic_write_text(plan_path, plan.to_json())
        info = {"seconds": round(time.perf_counter() - started, 2), "latency": latency}
        state.done("prune", key, [slim_path, plan_path], info)
        stage(1, "prune", f"{cfg.selection.describe()}: {slim_path} ({time.perf_counter() - started:.1f}s)")
    result.artifacts.update(slim=str(slim_path), plan=str(plan_path))

    # 2. finetune
    ft_path = out / "slim-finetuned.pt"
    if cfg.finetune_epochs:
        key = _key(
            sha256_file(slim_path),
            cfg.data,
            cfg.data_dir,
            cfg.finetune_epochs,
            cfg.finetune_lr,
            cfg.batch_size,
            cfg.limit_train,
            cfg.seed,
        )
        if state.fresh("finetune", key, [ft_path]):
            stage(2, "finetune", "unchanged, skipped")
            result.skipped.append("finetune")
        else:

            assert cfg.data is not None  # validate() insists on it
            finetune_checkpoint(
                slim_path,
                ft_path,
                data=cfg.data,
                data_dir=cfg.data_dir,
                epochs=cfg.finetune_epochs,
                lr=cfg.finetune_lr,
                batch_size=cfg.batch_size,
                limit_train=cfg.limit_train,
                seed=cfg.seed,
            )
            state.done("finetune", key, [ft_path])
            stage(2, "finetune", f"{cfg.finetune_epochs} epochs on {cfg.data}: {ft_path}")
        final_slim = ft_path
        result.artifacts["slim_finetuned"] = str(ft_path)
    else:
        stage(2, "finetune", "off (--finetune-epochs 0)")
        final_slim = slim_path
    slim_model = model_from_checkpoint(load_checkpoint(final_slim))

    # 3. export + parity

    opset = cfg.opset or DEFAULT_OPSET
    parity_x = _parity_inputs(ckpt.input_shape, calib_x, eval_xy, cfg.seed)
    onnx_paths: dict[str, dict[str, Path]] = {"baseline": {}, "slim": {}}
    exports: dict[str, Any] = {}
    for name, model, src in (("baseline", baseline, Path(cfg.model)), ("slim", slim_model, final_slim)):
        path = out / f"{name}.onnx"
        key = _key(sha256_file(src), opset)
        onnx_paths[name]["fp32"] = path
        if state.fresh(f"export:{name}", key, [path]):
            exports[name] = state.info(f"export:{name}")
            stage(3, "export", f"{path.name} unchanged, skipped")
            result.skipped.append(f"export:{name}")
            continue
        res = export_onnx(model, example, path, opset=opset)
        parity = check_parity(model, path, parity_x)
        parity.raise_if_failed()
        exports[name] = {**res.to_dict(), "parity": parity.to_dict()}
        state.done(f"export:{name}", key, [path], exports[name])
        stage(3, "export", f"{path.name}: {res.bytes / 1e6:.2f} MB, {parity.summary()}")

    # 4. precision

    agreement: dict[str, Any] = {}
    for prec in cfg.precisions:
        if prec == "fp32":
            continue
        for name in ("baseline", "slim"):
            src = onnx_paths[name]["fp32"]
            dst = out / f"{name}.{prec}.onnx"
            onnx_paths[name][prec] = dst
            extra = (cfg.calib_method, cfg.int8_flavour, sha256_file(cfg.calib)) if prec == "int8" and cfg.calib else ()
            key = _key(sha256_file(src), prec, *extra)
            if state.fresh(f"{prec}:{name}", key, [dst]):
                agreement[f"{name}.{prec}"] = state.info(f"{prec}:{name}")
                stage(4, "precision", f"{dst.name} unchanged, skipped")
                result.skipped.append(f"{prec}:{name}")
                continue
            if prec == "fp16":
                to_fp16(src, dst)
            else:
                assert calib_x is not None
                quantize_int8(src, dst, calib_x, method=cfg.calib_method, flavour=cfg.int8_flavour)
            x, y = eval_xy if eval_xy is not None else (parity_x, None)
            rep = check_agreement(dst, src, x, y)
            agreement[f"{name}.{prec}"] = rep.to_dict()
            state.done(f"{prec}:{name}", key, [dst], rep.to_dict())
            stage(4, "precision", rep.summary())
    if set(cfg.precisions) == {"fp32"}:
        stage(4, "precision", "fp32 only (--precision fp32,fp16,int8 adds more)")

    # 5. engines
    engines: dict[str, Any] = {}
    if build_engines:

        options = BuildOptions.from_batches(
            list(cfg.engine_batches),
            workspace_mib=cfg.workspace_mib,
            opt_level=cfg.builder_opt_level,
            timing_cache=str(out / "timing.cache"),
        )
        for paths in onnx_paths.values():
            for src in paths.values():
                dst = src.with_suffix(".engine")
                key = _key(sha256_file(src), options.to_dict())
                if state.fresh(f"engine:{dst.name}", key, [dst]):
                    engines[dst.name] = state.info(f"engine:{dst.name}")
                    stage(5, "engines", f"{dst.name} unchanged, skipped")
                    continue
                manifest = build_engine(src, dst, options)
                engines[dst.name] = manifest.to_dict()
                state.done(f"engine:{dst.name}", key, [dst], manifest.to_dict())
                stage(5, "engines", f"{dst.name} built")
    else:
        stage(5, "engines", engine_msg)

    # 6. bench
    bench: dict[str, Any] | None = None
    if cfg.bench:

        bench_files = [out / f"benchmark.{ext}" for ext in ("json", "md", "png")]
        settings = (cfg.bench_batches, cfg.bench_iterations, cfg.bench_rounds, cfg.bench_warmup_s, cfg.threads)
        key = _key(*(sha256_file(onnx_paths[n]["fp32"]) for n in ("baseline", "slim")), settings)
        if state.fresh("bench", key, bench_files):
            comparison = Comparison.from_dict(json.loads(bench_files[0].read_text()))
            stage(6, "bench", "unchanged, skipped (the numbers below are from the previous run)")
            result.skipped.append("bench")
        else:
            stage(6, "bench", f"ONNX Runtime CPU, batches {list(cfg.bench_batches)}, baseline vs slim interleaved ...")
            comparison = benchmark.compare(
                onnx_paths["baseline"]["fp32"],
                onnx_paths["slim"]["fp32"],
                batches=cfg.bench_batches,
                iterations=cfg.bench_iterations,
                rounds=cfg.bench_rounds,
                warmup_s=cfg.bench_warmup_s,
                threads=cfg.threads,
                device="cpu",
            )
            write_reports(comparison, out, stem="benchmark")
            state.done("bench", key, bench_files)
        log(format_table(comparison))
        bench = comparison.to_dict()
        result.artifacts.update({f"benchmark_{p.suffix[1:]}": str(p) for p in bench_files})
    else:
        stage(6, "bench", "off (--no-bench)")

    # 7. report
    accuracy = None
    if eval_ds is not None:

        accuracy = {name: evaluate(m, eval_ds)[1] for name, m in (("baseline", baseline), ("slim", slim_model))}
    report = {
        "model": cfg.model,
        "config": cfg.to_dict(),
        "selection": cfg.selection.describe(),
        "latency_target": state.info("prune").get("latency"),
        "baseline": {"params": count_params(baseline), "macs": count_macs(baseline, example)},
        "slim": {"params": count_params(slim_model), "macs": count_macs(slim_model, example)},
        "accuracy": accuracy,
        "exports": exports,
        "precision": agreement,
        "engines": engines or engine_msg,
        "benchmark": bench,
        "artifacts": {n: {p: str(v) for p, v in d.items()} for n, d in onnx_paths.items()},
    }

    written = write_build_report(report, out)
    state.done("report", _key(report), written)
    stage(7, "report", ", ".join(str(p) for p in written))
    result.report = report
    result.artifacts.update({f"report_{p.suffix[1:]}": str(p) for p in written})
    return result


def _parity_inputs(shape: tuple[int, int, int], calib_x: Any, eval_xy: Any, seed: int) -> Any:
    """Random inputs plus real ones (calibration or held-out images) for the export parity gate."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((8, *shape)).astype(np.float32)]
    for real in (calib_x, None if eval_xy is None else eval_xy[0]):
        if real is not None:
            parts.append(np.asarray(real[:32], dtype=np.float32))
    return np.concatenate(parts)
