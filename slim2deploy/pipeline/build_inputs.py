"""What a ``build`` needs before its first stage: the settings checked, the inputs loaded and checked.

Every check on user input runs here, before the output folder is touched: a bad flag, checkpoint,
calibration set, latency table or dataset fails with one error and nothing written.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim2deploy.base.environment import check_memory
from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.calib import load_calib
from slim2deploy.deploy.engine import ENGINE_POLICIES, EngineOptions
from slim2deploy.deploy.precision import CALIB_METHODS, check_precision, resolve_int8_flavour
from slim2deploy.model.checkpoint import Checkpoint, load_checkpoint
from slim2deploy.model.folder import AnyData, check_classes_to_learn, sample_arrays
from slim2deploy.model.preprocess import data_for
from slim2deploy.model.recipe import DISTILL_TEMPERATURE, DISTILL_WEIGHT, FINETUNE_EPOCHS, MAX_DROP
from slim2deploy.model.stats import check_memory_for
from slim2deploy.pipeline.budget import check_table
from slim2deploy.prune.goal import goal_of
from slim2deploy.prune.rebuild import rebuild
from slim2deploy.prune.select import Selection

PRECISION_SAMPLE = 1000  # images of a streamed eval folder the ONNX precision checks run on


@dataclass
class BuildConfig:
    model: str
    selection: Selection  # a ratio (or widths), or a latency goal measured on a target
    out: str = "build"
    fold: bool = True
    exact: bool = True  # False: --approximate
    finetune_epochs: int | None = None  # None: FINETUNE_EPOCHS when there is data to fine-tune on, else none
    finetune_lr: float = 0.01
    distill: bool = True  # fine-tune with distillation from the unpruned model
    distill_weight: float = DISTILL_WEIGHT
    distill_temperature: float = DISTILL_TEMPERATURE
    max_drop: float | None = MAX_DROP  # points of top-1 the slim model may lose; None: not checked
    batch_size: int = 64
    data: str | None = None
    data_dir: str | None = None
    limit_train: int | None = None
    eval_limit: int | None = None
    precisions: tuple[str, ...] = ("fp32",)
    calib: str | None = None
    calib_method: str = "minmax"
    int8_flavour: str = "auto"  # auto: tensorrt where engines are built, else cpu
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
    trust_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "selection": self.selection.to_dict()}

    @property
    def epochs(self) -> int:
        """Fine-tuning epochs this build runs: as given, else FINETUNE_EPOCHS with data, else none."""
        if self.finetune_epochs is not None:
            return self.finetune_epochs
        return FINETUNE_EPOCHS if self.data else 0


@dataclass
class BuildResult:
    out_dir: Path
    artifacts: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def validate(cfg: BuildConfig) -> EngineOptions:
    """Every check on the settings, before any work is done; returns the engine options they describe."""
    if not cfg.precisions:
        raise SlimError("`precision` needs at least one of fp32, fp16, int8")
    for p in cfg.precisions:
        check_precision(p)
    if "int8" in cfg.precisions and not cfg.calib:
        raise SlimError(
            "int8 needs a calibration set: `calib` (e.g. calib/fashion-mnist-512.npz; 'slim2deploy calib' makes one)"
        )
    if cfg.calib_method not in CALIB_METHODS:
        raise SlimError(f"`calib_method` must be one of {', '.join(CALIB_METHODS)}")
    resolve_int8_flavour(cfg.int8_flavour, engines=False)  # refuses an unknown flavour
    if cfg.engine not in ENGINE_POLICIES:
        raise SlimError(f"`engine` must be one of {', '.join(ENGINE_POLICIES)}")
    if cfg.epochs < 0:
        raise SlimError(f"`finetune_epochs` must be >= 0, got {cfg.finetune_epochs}")
    if cfg.epochs and not cfg.data:
        raise SlimError("fine-tuning needs `data` (the dataset to fine-tune on)")
    if not (math.isfinite(cfg.finetune_lr) and cfg.finetune_lr > 0):
        raise SlimError(f"`finetune_lr` must be a positive number, got {cfg.finetune_lr}")
    at_least_one = {
        "batch_size": cfg.batch_size,
        "limit_train": cfg.limit_train,
        "eval_limit": cfg.eval_limit,
        "bench_iterations": cfg.bench_iterations,
        "bench_rounds": cfg.bench_rounds,
        "threads": cfg.threads,
    }
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise SlimError(f"`{name}` must be at least 1, got {value}")
    if not cfg.bench_batches or any(b < 1 for b in cfg.bench_batches):
        raise SlimError(f"`bench_batch` must be positive batch sizes, got {list(cfg.bench_batches)}")
    if cfg.bench_warmup_s < 0:
        raise SlimError(f"the benchmark warm-up must be >= 0 s, got {cfg.bench_warmup_s}")
    if not cfg.engine_batches or any(b < 1 for b in cfg.engine_batches):
        raise SlimError(f"`engine_batch` must be positive batch sizes, got {list(cfg.engine_batches)}")
    return EngineOptions.from_batches(
        list(cfg.engine_batches), workspace_mib=cfg.workspace_mib, opt_level=cfg.builder_opt_level
    )


def check_out(out: Path) -> None:
    """Refuse an output folder that is a file or cannot be created or written; touches nothing."""
    if out.exists() and not out.is_dir():
        raise SlimError(f"the output folder {out} is an existing file; give a folder (it is created if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SlimError(f"cannot create the output folder {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimError(f"cannot write to {parent}; choose another output folder (`out`)")


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
    ckpt = load_checkpoint(cfg.model, trust_code=cfg.trust_code)
    if ckpt.module is not None:
        raise SlimError(
            f"{cfg.model} is a pickled nn.Module; build needs a slim2deploy checkpoint. Run the stages one by one "
            "(prune, finetune, export, with `trust_code` and `input_shape`), or make a checkpoint of it with "
            "'slim2deploy import'"
        )
    if ckpt.is_pruned:
        raise SlimError(f"{cfg.model} is already pruned; build takes the unpruned checkpoint it came from")
    rebuilt = rebuild(ckpt, trust_code=cfg.trust_code)
    baseline = rebuilt.model
    check_table(cfg.selection, baseline, ckpt, fold=cfg.fold, exact=cfg.exact)
    train_ds = check_finetune_batch(cfg, ckpt) if cfg.epochs else None
    calib_x = load_calib(cfg.calib, ckpt.input_shape, ckpt.stats) if cfg.calib else None
    eval_ds = _eval_data(cfg, ckpt)
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
        digest(check_x), digest(measured_on, eval_y),
    )  # fmt: skip


def check_finetune_batch(cfg: BuildConfig, ckpt: Checkpoint) -> AnyData:
    """Refuse, before pruning, fine-tuning data that does not fit the model and a batch size whose images
    alone exceed the memory (a lower bound: the slim model is not known yet; fine-tuning checks the batch
    through it). Returns the training data: the fine-tune stage uses it, not a second read."""
    assert cfg.data is not None  # validate() insists on it
    train_ds = data_for(ckpt, cfg.data, "train", data_dir=cfg.data_dir, limit=cfg.limit_train, seed=cfg.seed)
    check_classes_to_learn(train_ds, cfg.data)
    batch = min(cfg.batch_size, len(train_ds))  # the loader never stacks more images than the data has
    need = math.prod(ckpt.input_shape) * 4 * batch  # float32
    check_memory(need, "`batch_size`", cfg.batch_size, f"one batch of {batch:,} float32 images")
    return train_ds


def check_batches(cfg: BuildConfig, inputs: Inputs) -> None:
    """Refuse a batch setting whose one batch cannot be in memory, before any stage allocates it."""
    goal = goal_of(cfg.selection)
    profile = goal.batch if goal is not None else None
    bench = max(cfg.bench_batches) if cfg.bench else None
    for name, batch in (("`profile_batch`", profile), ("`bench_batch`", bench)):
        if batch is not None:
            check_memory_for(inputs.image_bytes, batch, name)


def digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(b"none" if a is None else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _eval_data(cfg: BuildConfig, ckpt: Checkpoint) -> AnyData | None:
    """Held-out data, from ``data`` or the dataset the checkpoint was trained on (when it is here)."""
    name = cfg.data or ckpt.meta.get("dataset")
    if not name or not isinstance(name, str):
        return None
    try:
        return data_for(ckpt, name, "val", data_dir=cfg.data_dir, limit=cfg.eval_limit)
    except SlimError:
        if cfg.data:
            raise
        return None  # the training data is not on this machine; the report says accuracy is unknown
