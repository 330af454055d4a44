"""The training loop: plain SGD over in-memory or streamed data, with the BatchNorm-gamma L1 penalty.

Used for sparse training (``train``) and for fine-tuning a pruned model (``finetune``). Kept
boring on purpose: one loop, no callbacks framework. Data parallelism follows torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, nccl on GPU, BatchNorm converted to
SyncBatchNorm so that N processes compute what one process computes at the same global batch.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slim2deploy.base.errors import SlimError
from slim2deploy.model import sparsity
from slim2deploy.model.checkpoint import tensor_fault
from slim2deploy.model.data import batches
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
    amp: bool = False
    augment: bool = True
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (CUDA); see make_deterministic
    # distillation from a teacher (``fit(teacher=...)``): loss = (1 - w) * CE + w * T^2 * KL(teacher_T || student_T)
    distill_weight: float = DISTILL_WEIGHT
    distill_temperature: float = DISTILL_TEMPERATURE

    def validate(self) -> None:
        if self.epochs < 1:
            raise SlimError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise SlimError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SlimError(f"--lr must be a positive number, got {self.lr}")
        for flag, value in (
            ("--sparsity", self.sparsity),
            ("--weight-decay", self.weight_decay),
            ("--sparsity-warmup", self.sparsity_warmup),
        ):
            if not (value >= 0 and math.isfinite(value)):
                raise SlimError(f"{flag} must be a finite number >= 0, got {value}")
        if not 0 <= self.momentum < 1:
            raise SlimError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.sparsity_mode not in sparsity.MODES:
            raise SlimError(f"--sparsity-mode must be one of {', '.join(sparsity.MODES)}")
        if self.sparsity_scope not in sparsity.SCOPES:
            raise SlimError(f"--sparsity-scope must be one of {', '.join(sparsity.SCOPES)}")
        if self.schedule not in SCHEDULES:
            raise SlimError(f"--schedule must be one of {', '.join(SCHEDULES)}")
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


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; anything else is one SlimError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SlimError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SlimError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SlimError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    """Leave the process group in an order that cannot abort at exit (see the end of ``fit``).

    Every rank waits for the others (rank 0 may still be writing the checkpoint), then the group
    and whatever still refers to it are freed before the interpreter starts tearing down.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics span all processes, for CPU (nn.SyncBatchNorm needs CUDA).

    Sums and sums of squares are all-reduced with autograd support, so gradients flow to every
    rank's inputs as they would through one big batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        totals = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        c = x.shape[1]
        n = totals[-1]
        mean = totals[:c] / n
        var = (totals[c : 2 * c] / n - mean * mean).clamp(min=0)
        assert self.running_mean is not None and self.running_var is not None  # only swapped in when tracked
        assert self.num_batches_tracked is not None
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make BatchNorm statistics global across processes (in place; parameters are kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats:
            m.__class__ = CpuSyncBatchNorm  # same parameters and buffers, global statistics
    return model


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
) -> tuple[float, float, float]:
    """One epoch of SGD with the sparsity penalty (and distillation from ``teacher``); returns (train loss,
    train accuracy, last lr).

    ``net`` is what runs forward (``model`` itself, or its DDP wrapper); the penalty acts on ``model``.
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
        lam = sparsity.warmed_up(cfg.sparsity, at, cfg.sparsity_warmup)
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        with torch.autocast(info.device.type, dtype=amp_dtype, enabled=cfg.amp):
            out = net(x)
            with torch.no_grad():
                taught = teacher(x) if teacher is not None else None
        loss, parts = step_loss(out, y, taught, cfg)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.sparsity_mode == "subgradient":
            scaler.unscale_(optimizer)  # the penalty is added to true, unscaled gradients
            sparsity.add_l1_subgradient(model, lam, masks)
        scaler.step(optimizer)
        scaler.update()
        if cfg.sparsity_mode == "proximal":
            # SGD with momentum m moves weights by lr/(1-m) per unit of steady gradient; using
            # the same effective step here gives lambda the same pull as in subgradient mode.
            sparsity.proximal_step(model, lr / (1 - cfg.momentum), lam, masks)
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
) -> list[EpochResult]:
    """Train ``model`` in place from ``start_epoch`` to ``cfg.epochs``; returns one result per epoch.

    ``masks`` limits the sparsity penalty to the channels they mark (``--sparsity-scope prunable``).
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
            net, model, optimizer, scaler, train_ds, cfg, info, epoch, masks, progress, desc, teacher
        )
        # buffers too: a huge --sparsity can leave the weights finite but blow up BatchNorm's running_var,
        # which the checkpoint loader would then refuse (and inference turns into garbage)
        fault = tensor_fault(model.state_dict())
        val_loss, val_acc = (float("nan"), float("nan"))
        if fault is None and val_ds is not None and info.is_main:
            val_loss, val_acc = evaluate(model, val_ds, cfg.batch_size, info.device)
            if not math.isfinite(val_loss):
                fault = f"the validation loss is {val_loss}"
        if fault is not None:
            cause = f"The learning rate `lr` ({cfg.lr:g})" + (
                f" or `sparsity` ({cfg.sparsity:g})" if cfg.sparsity else ""
            )
            raise SlimError(
                f"training diverged: {fault} after epoch {epoch + 1}; nothing was saved for this epoch. "
                f"{cause} is likely too high: lower it, or check the data and its normalisation for extreme values"
            )
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
