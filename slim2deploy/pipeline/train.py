"""The ``train`` and ``finetune`` stages: checkpoint in, checkpoint out, around the training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import Checkpoint, checkpoint_for, load_checkpoint, save_checkpoint, with_input_shape
from slim2deploy.model.folder import AnyData, check_fits, describe, load_data, preprocess_meta
from slim2deploy.model.loop import (
    DistInfo,
    EpochResult,
    TrainConfig,
    fit,
    init_distributed,
    pick_device,
    shutdown_distributed,
)
from slim2deploy.model.sparsity import Masks
from slim2deploy.model.weights import build_with_weights
from slim2deploy.model.zoo import pretrained_stats, split_name
from slim2deploy.prune.rebuild import Rebuilt, rebuild
from slim2deploy.prune.trace import prunable_masks


@dataclass
class ResumePoint:
    """Where a checkpoint written by ``train_to_checkpoint`` stopped: epochs done, optimizer, history."""

    epoch: int
    optimizer: dict[str, Any] | None
    history: list[dict[str, Any]]

    @classmethod
    def of(cls, ckpt: Checkpoint, path: str | Path) -> ResumePoint:
        if not ckpt.train_state:
            raise SlimError(f"{path} has no training state to resume from (was it pruned or exported?)")
        state = ckpt.train_state
        return cls(int(state["epoch"]), state.get("optimizer"), list(state.get("history", [])))


def train_to_checkpoint(
    model: nn.Module,
    out: str | Path,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    train_ds: AnyData,
    val_ds: AnyData | None,
    cfg: TrainConfig,
    meta: dict[str, Any],
    plan: dict[str, Any] | None = None,
    dist_info: DistInfo | None = None,
    resume: ResumePoint | None = None,
    masks: Masks = None,
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """``fit`` that writes ``out`` after every epoch with what ``ResumePoint.of`` needs to go on.

    ``plan`` (a pruned model's) travels with the weights; ``resume`` continues an earlier run.
    """
    done = list(resume.history) if resume else []

    def save(result: EpochResult, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        done.append(result.to_dict())
        facts = {**meta, "epochs": result.epoch, "val_acc": result.val_acc, "small_gamma_share": result.small_gamma}
        ckpt = checkpoint_for(net, arch, arch_kwargs, train_ds.input_shape, train_ds.num_classes, facts, plan)
        ckpt.train_state = {"epoch": result.epoch, "optimizer": optimizer.state_dict(), "history": list(done)}
        save_checkpoint(ckpt, out)
        if on_epoch is not None:
            on_epoch(result)

    return fit(
        model, train_ds, val_ds, cfg, dist_info=dist_info, start_epoch=resume.epoch if resume else 0,
        optimizer_state=resume.optimizer if resume else None, on_epoch_end=save, masks=masks,
        progress=progress, desc=desc,
    )  # fmt: skip


DEFAULT_ARCH = "vgg11"  # what 'train' builds without --arch


def check_resumed(
    ckpt: Checkpoint,
    source: str,
    arch: str | None,
    width: float | None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None,
) -> None:
    """A resumed run goes on with the checkpoint's model and normalisation: a flag naming others is refused
    (the same values are accepted, so a run's own command line with --resume added works)."""
    differ = []
    if arch is not None and arch != ckpt.arch:
        differ.append(f"--arch {arch} (it has {ckpt.arch})")
    if width is not None and width != ckpt.arch_kwargs.get("width", 1.0):
        differ.append(f"--width {width:g} (it has {ckpt.arch_kwargs.get('width', 1.0):g})")
    if stats is not None and "mean" in ckpt.meta:
        own = (tuple(map(float, ckpt.meta["mean"])), tuple(map(float, ckpt.meta["std"])))
        if tuple(map(tuple, stats)) != own:
            differ.append(f"--mean/--std {stats} (it has {own})")
    if differ:
        raise SlimError(
            f"--resume {source} goes on with the checkpoint's own model and normalisation, not "
            f"{'; '.join(differ)}; drop these flags, or start a new run without --resume"
        )


def train_command(
    *,
    arch: str | None,
    width: float | None,
    data: str,
    data_dir: str | None,
    image_size: int | None,
    limit_train: int | None,
    limit_val: int | None,
    cfg: TrainConfig,
    out: str,
    resume: str | None = None,
    device: str = "auto",
    trust_code: bool = False,
    weights: str | None = None,
    pretrained: bool = False,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    stream: bool | None = None,
    crop: int | None = None,
    workers: int | None = None,
) -> tuple[list[EpochResult], bool]:
    """What ``slim2deploy train`` does: build or resume a model, train it, checkpoint every epoch.

    ``weights`` (a state_dict file) or ``pretrained`` (the library's weights) start from trained
    weights; a classifier for another class count is re-initialised. ``stats`` fixes the input
    normalisation (default: the pretrained weights' own, else the training data's). Returns the
    epoch results and whether this process is the one that writes files.
    """
    cfg.validate()
    info = init_distributed(device)
    data_kw: dict[str, Any] = {"stream": stream, "crop": crop, "seed": cfg.seed, "workers": workers}
    resume_point, report = None, None
    arch_kwargs: dict[str, Any]
    if resume:
        ckpt = load_checkpoint(resume, trust_pickle=trust_code)
        check_resumed(ckpt, resume, arch, width, stats)
        resume_point = ResumePoint.of(ckpt, resume)
        rebuilt = rebuild(ckpt, trust_code=trust_code)
        model = rebuilt.model
        arch, arch_kwargs = ckpt.arch, ckpt.arch_kwargs
        stats = (tuple(ckpt.meta["mean"]), tuple(ckpt.meta["std"]))
        train_ds = load_data(data, "train", data_dir, image_size, stats, **data_kw).subset(limit_train)
        check_fits(train_ds, ckpt.input_shape, ckpt.num_classes, data, ckpt.meta.get("classes"))
        if resume_point.epoch >= cfg.epochs:
            raise SlimError(f"{resume} already finished {resume_point.epoch} epochs; pass a larger --epochs to go on")
    else:
        arch = arch or DEFAULT_ARCH
        if pretrained and stats is None:
            stats = pretrained_stats(arch)
        train_ds = load_data(data, "train", data_dir, image_size, stats, **data_kw).subset(limit_train)
        arch_kwargs = {"num_classes": train_ds.num_classes, "in_channels": train_ds.input_shape[0]}
        if width is not None:
            arch_kwargs["width"] = width
        if split_name(arch)[0]:
            arch_kwargs.pop("in_channels")
        torch.manual_seed(cfg.seed)  # the initial weights are part of what --seed repeats
        model, arch_kwargs, report = build_with_weights(
            arch, arch_kwargs, weights=weights, pretrained=pretrained, trust_pickle=trust_code
        )
        rebuilt = Rebuilt(model, train_ds.input_shape)  # no pass yet: the batch check below measures it
        if report is not None and info.is_main:
            tqdm.write(report.summary())
    val_ds = load_data(data, "val", data_dir, image_size, (train_ds.mean, train_ds.std), **data_kw).subset(limit_val)
    if info.is_main:
        tqdm.write(describe(train_ds))
    if val_ds.input_shape != train_ds.input_shape:
        raise SlimError(f"train images are {train_ds.input_shape}, validation images {val_ds.input_shape}")
    # a batch is never more images than the data has: only what the loader will really stack is checked
    rebuilt.check_batch(min(cfg.batch_size, len(train_ds)), "--batch-size")

    meta = {
        "dataset": train_ds.name,
        "classes": train_ds.classes,
        "mean": list(train_ds.mean),
        "std": list(train_ds.std),
        "train_images": len(train_ds),
        "preprocess": preprocess_meta(train_ds),
        "train_config": cfg.to_dict(),
        "world_size": info.world,
        **({"weights": report.to_dict()} if report is not None else {}),
    }
    masks = None
    if cfg.sparsity > 0 and cfg.sparsity_scope != "all":
        masks = prunable_masks(model, torch.zeros(1, *train_ds.input_shape), exact=cfg.sparsity_scope == "prunable")
    history = train_to_checkpoint(
        model, out, arch=arch, arch_kwargs=arch_kwargs, train_ds=train_ds, val_ds=val_ds, cfg=cfg, meta=meta,
        dist_info=info, resume=resume_point, masks=masks,
    )  # fmt: skip
    if info.is_main:
        tqdm.write(f"wrote {out}")
    if info.world > 1:
        shutdown_distributed()
    return history, info.is_main


def data_options(
    meta: dict[str, Any],
    image_size: int | None,
    stream: bool | None,
    crop: int | None,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Data flags for a later stage: what the user gave, else how the checkpoint's training read its data."""
    pre = meta.get("preprocess") or {}
    return {
        "image_size": image_size if image_size is not None else pre.get("image_size"),
        "stream": stream if stream is not None else pre.get("stream"),
        "crop": crop if crop is not None else pre.get("crop"),
        "seed": seed,
        "workers": workers,
    }


def finetune_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    data: str,
    data_dir: str | None = None,
    image_size: int | None = None,
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 64,
    limit_train: int | None = None,
    limit_val: int | None = None,
    seed: int = 0,
    deterministic: bool = False,
    schedule: str = "cosine",
    device: str = "auto",
    trust_code: bool = False,
    progress: bool = True,
    stream: bool | None = None,
    crop: int | None = None,
    workers: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    train_data: AnyData | None = None,
) -> list[EpochResult]:
    """Fine-tune the (pruned) model in ``src`` without the sparsity penalty and save it to ``dst``.

    The plan travels with the weights, so ``dst`` rebuilds the same slim architecture. ``train_data``:
    the training split already loaded with these options and ``limit_train`` (``build`` reads it
    before pruning, to check it); else it is read here.
    """
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed, deterministic=deterministic
    )
    cfg.validate()  # a bad --epochs or --batch-size is refused before the data is read
    info = DistInfo(device=pick_device(device))
    ckpt = with_input_shape(load_checkpoint(src, trust_pickle=trust_code), input_shape, str(src))
    rebuilt = rebuild(ckpt, trust_code=trust_code)
    model = rebuilt.model
    stats = ckpt.stats
    data_kw = data_options(ckpt.meta, image_size, stream, crop, seed, workers)
    size = data_kw.pop("image_size")
    train_ds = (
        train_data
        if train_data is not None
        else load_data(data, "train", data_dir, size, stats, **data_kw).subset(limit_train)
    )
    val_ds = load_data(data, "val", data_dir, size, stats, **data_kw).subset(limit_val)
    for ds in (train_ds, val_ds):
        check_fits(ds, ckpt.input_shape, ckpt.num_classes, data, ckpt.meta.get("classes"))
    rebuilt.check_batch(min(batch_size, len(train_ds)), "--batch-size")
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed, deterministic=deterministic
    )
    history = fit(model, train_ds, val_ds, cfg, dist_info=info, progress=progress, desc="finetune")
    meta = {
        **ckpt.meta,
        "finetune": {"epochs": epochs, "lr": lr, "data": data, "from": str(src)},
        "val_acc": history[-1].val_acc,
    }
    out = checkpoint_for(model, ckpt.arch, ckpt.arch_kwargs, ckpt.input_shape, ckpt.num_classes, meta, ckpt.plan)
    save_checkpoint(out, dst)
    return history
