"""``slim2deploy build``: from a sparse-trained checkpoint to everything a user ships.

Stages, each a function of its inputs:

1. prune     plan + surgery (the selection: selector + rails)        -> slim.pt, plan.json
2. finetune  optional, on ``data``                                    -> slim-finetuned.pt
3. export    ONNX of baseline and slim, parity-gated against torch   -> baseline.onnx, slim.onnx
4. precision fp16 graphs and calibrated int8 Q/DQ graphs             -> *.fp16.onnx, *.int8.onnx
5. engines   TensorRT engines + manifests (when TensorRT and a GPU are present)
6. bench     ONNX Runtime CPU latency, baseline vs slim, interleaved -> benchmark.{json,md,png}
7. report    report.json and report.md

Each stage runs through ``base.cache.StageCache`` (``build.json``): its key hashes everything that
changes its result (upstream file contents, options, the data it measures on), and a re-run skips
a stage whose key and outputs are unchanged. Every check on user input runs before any work; the
output folder is locked for the whole run, so two builds never mix their files in one ``--out``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim2deploy.base.cache import Shape, StageCache, exclusive_dir, stage_key
from slim2deploy.base.environment import check_memory
from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text, created_folder, sha256_file
from slim2deploy.base.formats import read_json
from slim2deploy.deploy.calib import load_calib
from slim2deploy.deploy.engine import ENGINE_POLICIES, EngineOptions, compile_engine, resolve_engine_policy
from slim2deploy.deploy.export import DEFAULT_OPSET
from slim2deploy.deploy.precision import CALIB_METHODS, INT8_FLAVOURS, check_precision
from slim2deploy.measure import benchmark
from slim2deploy.measure.report import EXPORT_INFO, PRECISION_INFO, PRUNE_INFO, write_build_report
from slim2deploy.measure.results import Comparison
from slim2deploy.measure.tables import format_table, write_reports
from slim2deploy.measure.targets import TIMING_METHOD
from slim2deploy.model.checkpoint import Checkpoint, load_checkpoint
from slim2deploy.model.folder import AnyData, check_classes_to_learn, check_fits, load_data, sample_arrays
from slim2deploy.model.loop import evaluate
from slim2deploy.model.stats import check_memory_for, count_macs, count_params
from slim2deploy.pipeline.budget import Budget, check_table, prune_to_budget
from slim2deploy.pipeline.export import export_checked, make_precision, variant_path
from slim2deploy.pipeline.prune import prune_checkpoint
from slim2deploy.pipeline.train import data_options, finetune_checkpoint
from slim2deploy.prune.rebuild import model_from_checkpoint, rebuild
from slim2deploy.prune.select import Selection

STAGES = ("prune", "finetune", "export", "precision", "engines", "bench", "report")
PRECISION_SAMPLE = 1000  # images of a streamed eval folder the ONNX precision checks run on


@dataclass
class BuildConfig:
    model: str
    selection: Selection | Budget  # a ratio (or widths), or a latency budget measured on a target
    out: str = "build"
    fold: bool = True
    exact: bool = True  # False: --approximate
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


def validate(cfg: BuildConfig) -> EngineOptions:
    """Every check on the flags, before any work is done; returns the engine options they describe."""
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
    if not (math.isfinite(cfg.finetune_lr) and cfg.finetune_lr > 0):
        raise SlimError(f"--finetune-lr must be a positive number, got {cfg.finetune_lr}")
    at_least_one = {
        "--batch-size": cfg.batch_size,
        "--limit-train": cfg.limit_train,
        "--eval-limit": cfg.eval_limit,
        "--bench-iterations": cfg.bench_iterations,
        "--bench-rounds": cfg.bench_rounds,
        "--threads": cfg.threads,
    }
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise SlimError(f"{flag} must be at least 1, got {value}")
    if not cfg.bench_batches or any(b < 1 for b in cfg.bench_batches):
        raise SlimError(f"--bench-batch must be positive batch sizes, got {list(cfg.bench_batches)}")
    if cfg.bench_warmup_s < 0:
        raise SlimError(f"the benchmark warm-up must be >= 0 s, got {cfg.bench_warmup_s}")
    if any(b < 1 for b in cfg.engine_batches):
        raise SlimError(f"--batch must be positive batch sizes, got {list(cfg.engine_batches)}")
    return EngineOptions.from_batches(
        list(cfg.engine_batches), workspace_mib=cfg.workspace_mib, opt_level=cfg.builder_opt_level
    )


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file or cannot be created or written; touches nothing."""
    if out.exists() and not out.is_dir():
        raise SlimError(f"--out {out} is an existing file; give a folder (it is created if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SlimError(f"cannot create the output folder {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimError(f"cannot write to {parent}; choose another --out")


@dataclass
class Inputs:
    """What every stage reads, loaded and checked before the first stage runs."""

    ckpt: Checkpoint
    baseline: torch.nn.Module
    image_bytes: int  # what one image needs at once through the baseline, from the pass that checked it
    example: torch.Tensor
    calib_x: np.ndarray | None
    eval_ds: AnyData | None
    train_ds: AnyData | None  # the fine-tuning data (None without fine-tuning)
    check_x: np.ndarray  # parity inputs: random plus real images
    eval_x: np.ndarray  # what precision agreement is measured on (held-out data, else check_x)
    eval_y: np.ndarray | None
    check_hash: str  # of check_x; with data_hash, in the keys: results measured on other data are not reused
    data_hash: str  # of eval_x and eval_y


def load_inputs(cfg: BuildConfig) -> Inputs:
    ckpt = load_checkpoint(cfg.model, trust_pickle=cfg.trust_pickle)
    if ckpt.module is not None:
        raise SlimError(
            f"{cfg.model} is a pickled nn.Module; build needs a slim2deploy checkpoint. Run the stages one by one "
            "with --trust-pickle --input-shape C,H,W (prune, finetune, export), or save it in the slim2deploy format"
        )
    if ckpt.is_pruned:
        raise SlimError(f"{cfg.model} is already pruned; build takes the unpruned sparse-trained checkpoint")
    rebuilt = rebuild(ckpt, trust_code=cfg.trust_pickle)
    baseline = rebuilt.model
    if isinstance(cfg.selection, Budget):
        check_table(cfg.selection, baseline, ckpt, fold=cfg.fold, exact=cfg.exact)
    train_ds = check_finetune_batch(cfg, ckpt) if cfg.finetune_epochs else None
    calib_x = load_calib(cfg.calib, ckpt.input_shape, ckpt.stats) if cfg.calib else None
    eval_ds = _eval_data(cfg, ckpt.meta)
    if eval_ds is not None:
        source = cfg.data or str(ckpt.meta.get("dataset"))
        check_fits(eval_ds, ckpt.input_shape, ckpt.num_classes, source, ckpt.meta.get("classes"))
    # a streamed folder is evaluated whole in torch, but the ONNX checks take a sample
    eval_x, eval_y = (None, None) if eval_ds is None else sample_arrays(eval_ds, PRECISION_SAMPLE)
    rng = np.random.default_rng(cfg.seed)
    parts = [rng.standard_normal((8, *ckpt.input_shape)).astype(np.float32)]
    parts += [np.asarray(real[:32], dtype=np.float32) for real in (calib_x, eval_x) if real is not None]
    check_x = np.concatenate(parts)
    measured_on = check_x if eval_x is None else eval_x
    return Inputs(
        ckpt, baseline, rebuilt.bytes_per_image(), torch.zeros(1, *ckpt.input_shape), calib_x, eval_ds, train_ds,
        check_x, measured_on, eval_y,
        _digest(check_x), _digest(measured_on, eval_y),
    )  # fmt: skip


def check_finetune_batch(cfg: BuildConfig, ckpt: Checkpoint) -> AnyData:
    """Refuse, before pruning, fine-tuning data that does not fit the model and a ``--batch-size`` whose
    images alone exceed the memory (a lower bound: the slim model is not known yet; fine-tuning checks
    the batch through it). Returns the training data: the fine-tune stage uses it, not a second read."""
    assert cfg.data is not None  # validate() insists on it
    opts = data_options(ckpt.meta, None, None, None, cfg.seed)
    size = opts.pop("image_size")
    train_ds = load_data(cfg.data, "train", cfg.data_dir, size, ckpt.stats, **opts).subset(cfg.limit_train)
    check_fits(train_ds, ckpt.input_shape, ckpt.num_classes, cfg.data, ckpt.meta.get("classes"))
    check_classes_to_learn(train_ds, cfg.data)
    batch = min(cfg.batch_size, len(train_ds))  # the loader never stacks more images than the data has
    need = math.prod(ckpt.input_shape) * 4 * batch  # float32
    check_memory(need, "--batch-size", cfg.batch_size, f"one batch of {batch:,} float32 images")
    return train_ds


def check_batches(cfg: BuildConfig, inputs: Inputs) -> None:
    """Refuse a batch flag whose one batch cannot be in memory, before any stage allocates it."""
    profile = cfg.selection.batch if isinstance(cfg.selection, Budget) else None
    bench = max(cfg.bench_batches) if cfg.bench else None
    for flag, batch in (("--profile-batch", profile), ("--bench-batch", bench)):
        if batch is not None:
            check_memory_for(inputs.image_bytes, batch, flag)


def _digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(b"none" if a is None else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _eval_data(cfg: BuildConfig, meta: dict[str, Any]) -> AnyData | None:
    """Held-out data, from --data or the dataset the checkpoint was trained on."""
    name = cfg.data or meta.get("dataset")
    if not name:
        return None
    stats = (tuple(meta["mean"]), tuple(meta["std"])) if "mean" in meta else None
    opts = data_options(meta, None, None, None)
    try:
        return load_data(name, "val", cfg.data_dir, opts.pop("image_size"), stats, **opts).subset(cfg.eval_limit)
    except SlimError:
        if cfg.data:
            raise
        return None  # the training data is not on this machine; the report says accuracy is unknown


@dataclass
class Run:
    """One build in progress: its config, inputs, stage cache and what it has produced so far."""

    cfg: BuildConfig
    out: Path
    inputs: Inputs
    cache: StageCache
    log: Callable[[str], None]
    result: BuildResult

    def stage(self, i: int, name: str, text: str) -> None:
        self.log(f"[{i}/{len(STAGES)}] {name:<9} {text}")

    def cached(
        self,
        i: int,
        stage: str,
        key: str,
        outputs: list[Path],
        work: Callable[[], dict[str, Any] | None],
        label: str,
        shape: Shape = dict,
    ) -> dict[str, Any]:
        """Run ``work`` through the cache; when it is fresh, log ``label`` as stage ``i`` instead.
        ``shape``: what a recorded info must hold to be reused (what the report reads of it)."""
        info, ran = self.cache.run(stage, key, outputs, work, shape)
        if not ran:
            self.stage(i, STAGES[i - 1], label)
            self.result.skipped.append(stage)
        return info


def prune_stage(run: Run) -> Path:
    cfg, out = run.cfg, run.out
    slim_path, plan_path = out / "slim.pt", out / "plan.json"

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        latency = None
        if isinstance(cfg.selection, Budget):
            pruned = prune_to_budget(
                cfg.model, slim_path, cfg.selection, fold=cfg.fold, exact=cfg.exact, trust_code=cfg.trust_pickle,
                table_out=out / "latency-table.json", log=run.log,
            )  # fmt: skip
            plan, table = pruned.plan, pruned.summary
            latency = {"goal": cfg.selection.goal(), "met": pruned.met, **pruned.chosen, "tries": pruned.tries}
        else:
            plan, table = prune_checkpoint(
                cfg.model, slim_path, cfg.selection, fold=cfg.fold, exact=cfg.exact,
                trust_code=cfg.trust_pickle,
            )  # fmt: skip
        run.log(table)
        atomic_write_text(plan_path, plan.to_json())
        seconds = time.perf_counter() - started
        run.stage(1, "prune", f"{cfg.selection.describe()}: {slim_path} ({seconds:.1f}s)")
        return {"seconds": round(seconds, 2), "latency": latency}

    extra = ([] if cfg.exact else ["approximate"]) + ([TIMING_METHOD] if isinstance(cfg.selection, Budget) else [])
    key = stage_key(sha256_file(cfg.model), cfg.selection.to_dict(), cfg.fold, *extra)  # timed: how it was timed
    run.cached(1, "prune", key, [slim_path, plan_path], work, "unchanged, skipped", PRUNE_INFO)
    run.result.artifacts.update(slim=str(slim_path), plan=str(plan_path))
    return slim_path


def finetune_stage(run: Run, slim_path: Path) -> Path:
    cfg = run.cfg
    if not cfg.finetune_epochs:
        run.stage(2, "finetune", "off (--finetune-epochs 0)")
        return slim_path
    assert cfg.data is not None  # validate() insists on it
    ft_path = run.out / "slim-finetuned.pt"
    options = dict(
        data=cfg.data, data_dir=cfg.data_dir, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
        batch_size=cfg.batch_size, limit_train=cfg.limit_train, seed=cfg.seed,
    )  # fmt: skip

    def work() -> dict[str, Any]:
        history = finetune_checkpoint(slim_path, ft_path, **options, train_data=run.inputs.train_ds)  # type: ignore[arg-type]
        run.stage(2, "finetune", f"{cfg.finetune_epochs} epochs on {cfg.data}: {ft_path}")
        return {"val_acc": history[-1].val_acc}

    run.cached(2, "finetune", stage_key(sha256_file(slim_path), options), [ft_path], work, "unchanged, skipped")
    run.inputs.train_ds = None  # not held in memory through export and engine building
    run.result.artifacts["slim_finetuned"] = str(ft_path)
    return ft_path


def export_stage(run: Run, models: dict[str, tuple[torch.nn.Module, Path]]) -> dict[str, Any]:
    """fp32 ONNX of each model (``name.onnx``), parity-gated; returns each export's info."""
    opset = run.cfg.opset or DEFAULT_OPSET
    exports = {}
    for name, (model, src) in models.items():
        path = run.out / f"{name}.onnx"

        def work(model: torch.nn.Module = model, path: Path = path) -> dict[str, Any]:
            info = export_checked(model, run.inputs.example, path, run.inputs.check_x, opset=opset)
            run.stage(3, "export", f"{path.name}: {info['bytes'] / 1e6:.2f} MB, {info['summary']}")
            return info

        key = stage_key(sha256_file(src), opset, run.inputs.check_hash)
        skipped = f"{path.name} unchanged, skipped"
        exports[name] = run.cached(3, f"export:{name}", key, [path], work, skipped, EXPORT_INFO)
    return exports


def precision_stage(run: Run, names: list[str]) -> dict[str, Any]:
    """fp16/int8 graphs from each fp32 graph, with their agreement on the held-out data."""
    cfg, inputs = run.cfg, run.inputs
    agreement: dict[str, Any] = {}
    for prec in (p for p in cfg.precisions if p != "fp32"):
        calib = (cfg.calib_method, cfg.int8_flavour, sha256_file(cfg.calib)) if prec == "int8" and cfg.calib else ()
        for name in names:
            src = run.out / f"{name}.onnx"
            dst = variant_path(src, prec)

            def work(src: Path = src, prec: str = prec) -> dict[str, Any]:
                info = make_precision(
                    src, prec, inputs.eval_x, inputs.eval_y,
                    calib_x=inputs.calib_x, calib_method=cfg.calib_method, flavour=cfg.int8_flavour,
                )  # fmt: skip
                run.stage(4, "precision", info["summary"])
                return info

            key = stage_key(sha256_file(src), prec, calib, inputs.data_hash)
            skipped = f"{dst.name} unchanged, skipped"
            agreement[f"{name}.{prec}"] = run.cached(4, f"{prec}:{name}", key, [dst], work, skipped, PRECISION_INFO)
    if set(cfg.precisions) == {"fp32"}:
        run.stage(4, "precision", "fp32 only (--precision fp32,fp16,int8 adds more)")
    return agreement


def engines_stage(
    run: Run, onnx_files: list[Path], options: EngineOptions, policy: tuple[bool, str]
) -> dict[str, Any] | str:
    """``policy``: ``resolve_engine_policy``'s answer, taken before any work (--engine require fails early)."""
    wanted, message = policy
    if not wanted:
        run.stage(5, "engines", message)
        return message
    options = replace(options, timing_cache=str(run.out / "timing.cache"))
    engines = {}
    for src in onnx_files:
        dst = src.with_suffix(".engine")

        def work(src: Path = src, dst: Path = dst) -> dict[str, Any]:
            manifest = compile_engine(src, dst, options)
            run.stage(5, "engines", f"{dst.name} compiled")
            return manifest.to_dict()

        key = stage_key(sha256_file(src), options.to_dict())
        engines[dst.name] = run.cached(5, f"engine:{dst.name}", key, [dst], work, f"{dst.name} unchanged, skipped")
    return engines


def bench_stage(run: Run, baseline: Path, slim: Path) -> dict[str, Any] | None:
    cfg, out = run.cfg, run.out
    if not cfg.bench:
        run.stage(6, "bench", "off (--no-bench)")
        return None
    files = [out / f"benchmark.{ext}" for ext in ("json", "md", "png")]

    def work() -> None:
        run.stage(6, "bench", f"ONNX Runtime CPU, batches {list(cfg.bench_batches)}, baseline vs slim interleaved ...")
        comparison = benchmark.compare(
            baseline, slim, batches=cfg.bench_batches, iterations=cfg.bench_iterations, rounds=cfg.bench_rounds,
            warmup_s=cfg.bench_warmup_s, threads=cfg.threads, device="cpu", batch_flag="--bench-batch",
        )  # fmt: skip
        write_reports(comparison, out, stem="benchmark")

    settings = (cfg.bench_batches, cfg.bench_iterations, cfg.bench_rounds, cfg.bench_warmup_s, cfg.threads)
    key = stage_key(sha256_file(baseline), sha256_file(slim), settings)
    run.cached(6, "bench", key, files, work, "unchanged, skipped (the numbers below are from the previous run)")
    comparison = Comparison.from_dict(read_json(files[0], "benchmark result"))
    run.log(format_table(comparison))
    run.result.artifacts.update({f"benchmark_{p.suffix[1:]}": str(p) for p in files})
    return comparison.to_dict()


def report_stage(run: Run, slim_model: torch.nn.Module, parts: dict[str, Any]) -> None:
    """report.json/.md from every stage's results; always rewritten (it is cheap and shows this run)."""
    cfg, inputs = run.cfg, run.inputs
    models = {"baseline": inputs.baseline, "slim": slim_model}
    accuracy = None
    if inputs.eval_ds is not None:
        accuracy = {name: evaluate(m, inputs.eval_ds)[1] for name, m in models.items()}
    report = {
        "model": cfg.model,
        "config": cfg.to_dict(),
        "selection": cfg.selection.describe(),
        "latency_target": run.cache.info("prune").get("latency"),
        **{n: {"params": count_params(m), "macs": count_macs(m, inputs.example)} for n, m in models.items()},
        "accuracy": accuracy,
        **parts,
    }
    written = write_build_report(report, run.out)
    run.cache.done("report", stage_key(report), written)
    run.stage(7, "report", ", ".join(str(p) for p in written))
    run.result.report = report
    run.result.artifacts.update({f"report_{p.suffix[1:]}": str(p) for p in written})


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> BuildResult:
    """Run the pipeline of the module docstring; see ``BuildConfig`` for the options."""
    engine_options = validate(cfg)
    engine_policy = resolve_engine_policy(cfg.engine)
    out = Path(cfg.out)
    check_out(out)
    inputs = load_inputs(cfg)  # a bad checkpoint, calibration set or dataset fails before --out is touched
    check_batches(cfg, inputs)
    with created_folder(out), exclusive_dir(out, "build"):  # a failed build leaves no empty --out behind
        run = Run(cfg, out, inputs, StageCache(out / "build.json", log), log, BuildResult(out))
        slim_path = finetune_stage(run, prune_stage(run))
        slim_model = model_from_checkpoint(load_checkpoint(slim_path))
        exports = export_stage(run, {"baseline": (inputs.baseline, Path(cfg.model)), "slim": (slim_model, slim_path)})
        precision = precision_stage(run, list(exports))
        precisions = ["fp32", *(p for p in cfg.precisions if p != "fp32")]
        onnx = {n: {p: str(variant_path(out / f"{n}.onnx", p)) for p in precisions} for n in exports}
        onnx_files = [Path(p) for files in onnx.values() for p in files.values()]
        engines = engines_stage(run, onnx_files, engine_options, engine_policy)
        bench = bench_stage(run, out / "baseline.onnx", out / "slim.onnx")
        parts = {"exports": exports, "precision": precision, "engines": engines, "benchmark": bench, "artifacts": onnx}
        report_stage(run, slim_model, parts)
        removed, changed = run.cache.drop_unused()
        said = []
        if removed:
            said.append(f"removed {', '.join(removed)}: written by an earlier build of other settings, not by this one")
        if changed:
            said.append(f"kept {', '.join(changed)}: written by an earlier build of other settings, but changed since")
        if said:
            log("; ".join(said))
    return run.result
