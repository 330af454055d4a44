"""The training loop: plain SGD over in-memory or streamed data, with the BatchNorm-gamma penalties.

Used for sparse training (``train``) and for fine-tuning a pruned model (``finetune``). Kept
boring on purpose: one loop, no callbacks framework. Data parallelism follows torchrun's
environment (``model.distributed``): every rank applies the same penalty to the same weights.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slim2deploy.base.errors import SlimError
from slim2deploy.model import sparsity
from slim2deploy.model.checkpoint import tensor_fault
from slim2deploy.model.data import batches
from slim2deploy.model.distributed import DistInfo, pick_device, sync_batchnorm
from slim2deploy.model.folder import AnyData, FolderData, check_classes_to_learn
from slim2deploy.model.recipe import DISTILL_TEMPERATURE, DISTILL_WEIGHT

SCHEDULES = ("step", "cosine")


@dataclass
class TrainConfig:
    """Defaults follow the official Network Slimming recipe, scaled to the number of epochs."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # step: lr x0.1 at 50% and 75% of the epochs; cosine: per step
    sparsity: float = 0.0  # lambda of the L1 penalty on BatchNorm gammas; 0 trains the baseline
    sparsity_mode: str = "subgradient"  # or "proximal"
    sparsity_warmup: float = 0.0  # epochs over which lambda ramps from 0
    sparsity_scope: str = "all"  # or "prunable"/"approximate": only gammas of channels prune can remove
    sparsity_block: float = 0.0  # lambda of the group lasso on each removable residual branch's gammas
    amp: bool = False
    augment: bool = True
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (CUDA); see make_deterministic
    # distillation from a teacher (``fit(teacher=...)``): loss = (1 - w) * CE + w * T^2 * KL(teacher_T || student_T)
    distill_weight: float = DISTILL_WEIGHT
    distill_temperature: float = DISTILL_TEMPERATURE

    def validate(self) -> None:
        if self.epochs < 1:
            raise SlimError(f"`epochs` must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise SlimError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SlimError(f"`lr` must be a positive number, got {self.lr}")
        for flag, value in (
            ("`sparsity`", self.sparsity),
            ("`weight_decay`", self.weight_decay),
            ("`sparsity_warmup`", self.sparsity_warmup),
            ("`sparsity_block`", self.sparsity_block),
        ):
            if not (value >= 0 and math.isfinite(value)):
                raise SlimError(f"{flag} must be a finite number >= 0, got {value}")
        if not 0 <= self.momentum < 1:
            raise SlimError(f"`momentum` must be in [0, 1), got {self.momentum}")
        if self.sparsity_mode not in sparsity.MODES:
            raise SlimError(f"`sparsity_mode` must be one of {', '.join(sparsity.MODES)}")
        if self.sparsity_scope not in sparsity.SCOPES:
            raise SlimError(f"`sparsity_scope` must be one of {', '.join(sparsity.SCOPES)}")
        if self.schedule not in SCHEDULES:
            raise SlimError(f"`schedule` must be one of {', '.join(SCHEDULES)}")
        if not 0 <= self.distill_weight <= 1:
            raise SlimError(f"`distill_weight` must be in [0, 1], got {self.distill_weight}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise SlimError(f"`distill_temperature` must be a positive number, got {self.distill_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochResult:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    small_gamma: float  # share of |gamma| < 1e-2
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use
CUBLAS_WORKSPACE = ":4096:8"
# the resume test's tolerance on CUDA: a few backward kernels (adaptive average pooling) have no
# deterministic CUDA version and only warn under make_deterministic, so runs agree to rounding
CUDA_RESUME_ATOL = 1e-4


def make_deterministic() -> None:
    """Same seed, same numbers on CUDA too: deterministic kernels, no cuDNN autotuning.

    Kernels without a deterministic CUDA version warn instead of failing (``warn_only``), so a
    resumed or repeated CUDA run matches to ``CUDA_RESUME_ATOL`` rather than bit for bit. On the
    CPU the training loop is deterministic anyway.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` epochs (fractional)."""
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(progress / cfg.epochs, 1.0)))
    epoch = int(progress)
    factor = 1.0
    if epoch >= math.floor(cfg.epochs * 0.5) and cfg.epochs >= 2:
        factor *= 0.1
    if epoch >= math.floor(cfg.epochs * 0.75) and cfg.epochs >= 4:
        factor *= 0.1
    return cfg.lr * factor


def iterate(
    ds: AnyData,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    do_augment: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (x, y) batches of one epoch, from memory or streamed from a folder through a DataLoader."""
    if isinstance(ds, FolderData):
        return ds.batches(batch_size, shuffle=shuffle, epoch=epoch, augment=do_augment, rank=rank, world=world)
    return batches(
        ds, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, do_augment=do_augment, rank=rank, world=world
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: AnyData,
    batch_size: int = 64,
    device: torch.device | None = None,
    desc: str | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` on ``ds`` in eval mode; ``desc``: show progress."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    steps = -(-len(ds) // batch_size)
    shown = desc is not None and steps > 20  # a bar only where there is something to wait for
    batched = iterate(ds, batch_size, shuffle=False)
    for x, y in tqdm(batched, total=steps, desc=desc, unit="batch", disable=not shown, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x).float()
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    n = max(len(ds), 1)
    return loss_sum / n, correct / n


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (Hinton et al. 2015):
    the T^2 keeps its gradient on the scale of the cross-entropy's whatever T."""
    t = temperature
    log_s = F.log_softmax(student / t, dim=1)
    log_t = F.log_softmax(teacher / t, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (t * t)


def step_loss(
    out: torch.Tensor, y: torch.Tensor, taught: torch.Tensor | None, cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its terms: cross-entropy, plus distillation from the teacher's
    logits ``taught`` (same batch, same augmentation) when there is a teacher."""
    ce = F.cross_entropy(out.float(), y)
    if taught is None:
        return ce, {"ce": ce.item()}
    kd = distill_loss(out.float(), taught.float(), cfg.distill_temperature)
    w = cfg.distill_weight
    return (1 - w) * ce + w * kd, {"ce": ce.item(), "kd": kd.item()}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_one_epoch(
    net: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_ds: AnyData,
    cfg: TrainConfig,
    info: DistInfo,
    epoch: int,
    masks: sparsity.Masks,
    progress: bool,
    desc: str,
    teacher: nn.Module | None = None,
    blocks: Sequence[sparsity.GammaGroup] = (),
) -> tuple[float, float, float]:
    """One epoch of SGD with the sparsity penalties (and distillation from ``teacher``); returns (train loss,
    train accuracy, last lr).

    ``net`` is what runs forward (``model`` itself, or its DDP wrapper); the penalties act on ``model``.
    """
    net.train()
    amp_dtype = torch.float16 if info.device.type == "cuda" else torch.bfloat16
    steps_per_epoch = len(train_ds) // (cfg.batch_size * info.world)
    seen, loss_sum, correct, lr = 0, 0.0, 0, cfg.lr
    terms: dict[str, float] = {}
    bar = tqdm(
        iterate(
            train_ds,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            epoch=epoch,
            do_augment=cfg.augment,
            rank=info.rank,
            world=info.world,
        ),
        total=steps_per_epoch,
        desc=f"{desc} {epoch + 1}/{cfg.epochs}",
        unit="batch",
        disable=not (progress and info.is_main),
        leave=True,
        dynamic_ncols=True,
    )
    for step, (x, y) in enumerate(bar):
        at = epoch + step / steps_per_epoch
        lr = lr_at(cfg, at)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        with torch.autocast(info.device.type, dtype=amp_dtype, enabled=cfg.amp):
            out = net(x)
            with torch.no_grad():
                taught = teacher(x) if teacher is not None else None
        loss, parts = step_loss(out, y, taught, cfg)
        _descend(model, optimizer, scaler, loss, cfg, at, lr, masks, blocks)
        value = loss.item()
        if not math.isfinite(value):
            raise SlimError(
                f"training diverged: the loss is {value} at epoch {epoch + 1}, step {step + 1}; nothing "
                "was saved for this epoch. Lower `lr` or `sparsity`, or check the data for extreme values"
            )
        seen += len(y)
        loss_sum += value * len(y)
        terms = {k: terms.get(k, 0.0) + v * len(y) for k, v in parts.items()}
        correct += int((out.argmax(1) == y).sum())
        if step % 20 == 0 or step == steps_per_epoch - 1:
            shown = {k: f"{v / seen:.3f}" for k, v in terms.items()} if teacher is not None else {}
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                **shown,
                acc=f"{correct / seen:.3f}",
                g_small=f"{sparsity.small_gamma_share(model):.1%}",
                lr=f"{lr:.3g}",
            )
    bar.close()
    return loss_sum / max(seen, 1), correct / max(seen, 1), lr


def _descend(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss: torch.Tensor,
    cfg: TrainConfig,
    at: float,
    lr: float,
    masks: sparsity.Masks,
    blocks: Sequence[sparsity.GammaGroup],
) -> None:
    """One optimiser step on ``loss`` with the sparsity penalties at epoch position ``at``."""
    lam = sparsity.warmed_up(cfg.sparsity, at, cfg.sparsity_warmup)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.sparsity_mode == "subgradient":
        scaler.unscale_(optimizer)  # the penalty is added to true, unscaled gradients
        sparsity.add_l1_subgradient(model, lam, masks)
    scaler.step(optimizer)
    scaler.update()
    # SGD with momentum m moves weights by lr/(1-m) per unit of steady gradient; using the same effective
    # step in the proximal steps gives lambda the same pull as in subgradient mode.
    step = lr / (1 - cfg.momentum)
    if cfg.sparsity_mode == "proximal":
        sparsity.proximal_step(model, step, lam, masks)
    sparsity.group_proximal_step(model, step, sparsity.warmed_up(cfg.sparsity_block, at, cfg.sparsity_warmup), blocks)


def check_trainable(model: nn.Module, train_ds: AnyData, cfg: TrainConfig, info: DistInfo) -> None:
    """Refuse, before any step, training that cannot work or means nothing: BatchNorm on batches of one
    image, data of one class, fewer images than one global batch."""
    if cfg.batch_size * info.world < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise SlimError(
            "a training batch of 1 image gives BatchNorm no batch statistics (it fails on 1x1 feature maps "
            "and is noise elsewhere); use a `batch_size` of 2 or more"
        )
    check_classes_to_learn(train_ds, train_ds.name.removeprefix("npz:").removeprefix("folder:") or "the data")
    if len(train_ds) < cfg.batch_size * info.world:
        raise SlimError(
            f"{len(train_ds)} training images are fewer than one global batch "
            f"({cfg.batch_size} x {info.world}); lower `batch_size` or use more data"
        )


def _validate(
    model: nn.Module, val_ds: AnyData | None, cfg: TrainConfig, info: DistInfo, epoch: int
) -> tuple[float, float]:
    """Validation loss and accuracy after ``epoch`` (NaN where not validated); refuses a diverged model."""
    # buffers too: a huge `sparsity` can leave the weights finite but blow up BatchNorm's running_var,
    # which the checkpoint loader would then refuse (and inference turns into garbage)
    fault = tensor_fault(model.state_dict())
    val_loss, val_acc = (float("nan"), float("nan"))
    if fault is None and val_ds is not None and info.is_main:
        val_loss, val_acc = evaluate(model, val_ds, cfg.batch_size, info.device)
        if not math.isfinite(val_loss):
            fault = f"the validation loss is {val_loss}"
    if fault is not None:
        cause = (
            f"The learning rate `lr` ({cfg.lr:g})"
            + (f" or `sparsity` ({cfg.sparsity:g})" if cfg.sparsity else "")
            + (f" or `sparsity_block` ({cfg.sparsity_block:g})" if cfg.sparsity_block else "")
        )
        raise SlimError(
            f"training diverged: {fault} after epoch {epoch + 1}; nothing was saved for this epoch. "
            f"{cause} is likely too high: lower it, or check the data and its normalisation for extreme values"
        )
    return val_loss, val_acc


def fit(
    model: nn.Module,
    train_ds: AnyData,
    val_ds: AnyData | None,
    cfg: TrainConfig,
    *,
    dist_info: DistInfo | None = None,
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochResult, nn.Module, torch.optim.Optimizer], None] | None = None,
    masks: sparsity.Masks = None,
    progress: bool = True,
    desc: str = "train",
    teacher: nn.Module | None = None,
    blocks: Sequence[sparsity.GammaGroup] = (),
) -> list[EpochResult]:
    """Train ``model`` in place from ``start_epoch`` to ``cfg.epochs``; returns one result per epoch.

    ``masks`` limits the sparsity penalty to the channels they mark (``sparsity_scope`` prunable).
    ``blocks``: the gamma groups ``cfg.sparsity_block`` acts on (``prune.trace.branch_groups``).
    ``teacher`` (a model of the same inputs and classes) adds distillation from its logits on the same
    augmented batch (``step_loss``); it runs in eval mode without gradients, one copy per process.
    """
    cfg.validate()
    info = dist_info or DistInfo(device=pick_device("auto"))
    check_trainable(model, train_ds, cfg, info)
    if teacher is not None:
        teacher = teacher.to(info.device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        make_deterministic()
    model.to(info.device)
    net: nn.Module = model
    if info.world > 1:
        model = sync_batchnorm(model, info.device)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and info.device.type == "cuda")
    history: list[EpochResult] = []

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        train_loss, train_acc, lr = train_one_epoch(
            net, model, optimizer, scaler, train_ds, cfg, info, epoch, masks, progress, desc, teacher, blocks
        )
        val_loss, val_acc = _validate(model, val_ds, cfg, info, epoch)
        result = EpochResult(
            epoch=epoch + 1,
            lr=lr,
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=val_loss,
            val_acc=val_acc,
            small_gamma=sparsity.small_gamma_share(model),
            seconds=time.perf_counter() - started,
        )
        history.append(result)
        if progress and info.is_main:
            tqdm.write(
                f"epoch {result.epoch}: train loss {result.train_loss:.4f} acc {result.train_acc:.4f} | "
                f"val loss {result.val_loss:.4f} acc {result.val_acc:.4f} | "
                f"gamma<1e-2 {result.small_gamma:.1%} | {result.seconds:.1f}s"
            )
        if on_epoch_end is not None and info.is_main:
            on_epoch_end(result, model, optimizer)
    if info.world > 1:
        # DDP's reducer (and the last step's autograd graph, freed with train_one_epoch's locals: the
        # all-reduces of CpuSyncBatchNorm) hold the process group and gloo work objects with tensors.
        # Left to the garbage collector at exit, freeing them takes the GIL while Python is being torn
        # down, which now and then aborts the process ("terminate called without an active
        # exception", exit -6). Free them while alive.
        net = model
        gc.collect()
    return history
