"""The ``train`` and ``finetune`` stages: checkpoint in, checkpoint out, around the training loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import Checkpoint, checkpoint_for, load_checkpoint, save_checkpoint
from slim2deploy.model.distributed import DistInfo, init_distributed, shutdown_distributed
from slim2deploy.model.folder import AnyData, check_fits, close_loaders, describe, load_data
from slim2deploy.model.loop import EpochResult, TrainConfig, fit
from slim2deploy.model.preprocess import (
    Stats,
    channels_of,
    data_for,
    describe_stats,
    preprocess_meta,
    starting_stats,
)
from slim2deploy.model.sparsity import GammaGroup, Masks
from slim2deploy.model.weights import WeightsReport, build_with_weights
from slim2deploy.model.zoo import check_code, factory_args, split_name
from slim2deploy.prune.rebuild import Rebuilt, rebuild
from slim2deploy.prune.trace import branch_groups, prunable_masks


@dataclass
class ResumePoint:
    """Where a checkpoint written by ``train_to_checkpoint`` stopped: epochs done, optimizer, history."""

    epoch: int
    optimizer: dict[str, Any] | None
    history: list[dict[str, Any]]

    @classmethod
    def of(cls, ckpt: Checkpoint, path: str | Path, epochs: int | None = None) -> ResumePoint:
        """The point ``ckpt`` (read from ``path``) stopped at; refused when a run to ``epochs`` is already done."""
        if not ckpt.train_state:
            raise SlimError(
                f"{path} records no training run to continue (it was imported, pruned or fine-tuned elsewhere); "
                "start a new run from its weights with `model` instead"
            )
        state = ckpt.train_state
        point = cls(int(state["epoch"]), state.get("optimizer"), list(state.get("history", [])))
        if epochs is not None and point.epoch >= epochs:
            raise SlimError(f"{path} already finished {point.epoch} epochs; pass a larger `epochs` to go on")
        return point


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
    teacher: nn.Module | None = None,
    num_classes: int | None = None,
    blocks: Sequence[GammaGroup] = (),
) -> list[EpochResult]:
    """``fit`` that writes ``out`` after every epoch with what ``ResumePoint.of`` needs to go on.

    ``plan`` (a pruned model's) travels with the weights; ``resume`` continues an earlier run; ``teacher``
    distils into the model (``model.loop.fit``). ``num_classes``: the model's outputs (default: the data's classes).
    ``blocks``: the gamma groups of ``cfg.sparsity_block`` (``prune.trace.branch_groups``). Streamed
    folders' worker processes are stopped when it returns.
    """
    done = list(resume.history) if resume else []
    classes = num_classes or train_ds.num_classes

    def save(result: EpochResult, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        done.append(result.to_dict())
        facts = {**meta, "epochs": result.epoch, "val_acc": result.val_acc, "small_gamma_share": result.small_gamma}
        ckpt = checkpoint_for(net, arch, arch_kwargs, train_ds.input_shape, classes, facts, plan)
        ckpt.train_state = {"epoch": result.epoch, "optimizer": optimizer.state_dict(), "history": list(done)}
        save_checkpoint(ckpt, out)
        if on_epoch is not None:
            on_epoch(result)

    try:
        return fit(
            model, train_ds, val_ds, cfg, dist_info=dist_info, start_epoch=resume.epoch if resume else 0,
            optimizer_state=resume.optimizer if resume else None, on_epoch_end=save, masks=masks,
            progress=progress, desc=desc, teacher=teacher, blocks=blocks,
        )  # fmt: skip
    finally:
        close_loaders()  # streamed folders' workers stop now, not wherever the garbage collector runs


DEFAULT_ARCH = "vgg11"  # what 'train' builds without --arch


def check_resumed(
    ckpt: Checkpoint,
    source: str,
    arch: str | None,
    width: float | None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None,
) -> None:
    """A resumed run goes on with the checkpoint's model and normalisation: a flag naming others is refused
    (the same values are accepted, so a run's own command line with its resume added works)."""
    differ = []
    if arch is not None and arch != ckpt.arch:
        differ.append(f"`arch={arch}` (it has {ckpt.arch})")
    if width is not None and width != ckpt.arch_kwargs.get("width", 1.0):
        differ.append(f"`width={width:g}` (it has {ckpt.arch_kwargs.get('width', 1.0):g})")
    if stats is not None and "mean" in ckpt.meta:
        own = (tuple(map(float, ckpt.meta["mean"])), tuple(map(float, ckpt.meta["std"])))
        if tuple(map(tuple, stats)) != own:
            differ.append(f"`mean`/`std` {stats} (it has {own})")
    if differ:
        raise SlimError(
            f"`resume={source}` goes on with the checkpoint's own model and normalisation, not "
            f"{'; '.join(differ)}; drop these, or start a new run without `resume`"
        )


def _start_from(
    src: str, trust_code: bool, arch: str | None, width: float | None, stats: Stats | None, resume: bool
) -> tuple[Checkpoint, Rebuilt]:
    """The checkpoint a run starts from (``start``) or goes on with (``resume``), and its model."""
    ckpt = load_checkpoint(src, trust_code=trust_code)
    if ckpt.module is not None:
        raise SlimError(
            f"{src} is a pickled nn.Module, which records no architecture to train; make a slim2deploy checkpoint "
            "of it first ('slim2deploy import' with its architecture and weights)"
        )
    if resume:
        check_resumed(ckpt, src, arch, width, stats)
    return ckpt, rebuild(ckpt, trust_code=trust_code)


def train_command(
    *,
    arch: str | None,
    width: float | None,
    data: str,
    data_dir: str | None,
    image_size: int | None,
    limit_train: int | None,
    eval_limit: int | None,
    cfg: TrainConfig,
    out: str,
    resume: str | None = None,
    start: str | None = None,
    device: str = "auto",
    trust_code: bool = False,
    weights: str | None = None,
    pretrained: bool = False,
    stats: Stats | None = None,
    stream: bool | None = None,
    crop: int | None = None,
    workers: int | None = None,
) -> tuple[list[EpochResult], bool]:
    """What ``slim2deploy train`` does: build a model (or take a checkpoint's), train it, checkpoint every epoch.

    A new model is built by ``arch`` (a ``package.module:factory`` only with ``trust_code``), starting from
    ``weights`` (a state_dict file) or ``pretrained`` (the library's weights), whose classifier is re-initialised
    for another class count. ``start`` begins a new run from a slim2deploy checkpoint (its architecture, plan,
    weights and normalisation); ``resume`` continues the run saved in one. The normalisation follows
    ``model.preprocess.starting_stats``. Returns the epoch results and whether this process writes files.
    """
    cfg.validate()
    info = init_distributed(device)
    data_kw: dict[str, Any] = {"stream": stream, "crop": crop, "seed": cfg.seed, "workers": workers}
    report, plan, resume_point = None, None, None
    arch_kwargs: dict[str, Any]
    source = resume or start
    if source:
        ckpt, rebuilt = _start_from(source, trust_code, arch, width, stats, resume=bool(resume))
        resume_point = ResumePoint.of(ckpt, source, cfg.epochs) if resume else None
        model, arch, arch_kwargs, plan = rebuilt.model, ckpt.arch, ckpt.arch_kwargs, ckpt.plan
        rebuilt_classes: int | None = ckpt.num_classes

        def own(split: str, limit: int | None) -> AnyData:
            return data_for(ckpt, data, split, data_dir=data_dir, limit=limit, image_size=image_size, **data_kw)

        load: Callable[[str, int | None], AnyData] = own
        train_ds = load("train", limit_train)
        said = f"the checkpoint's own, {source}" if ckpt.stats else "estimated from the training data"
    else:
        arch, rebuilt_classes = arch or DEFAULT_ARCH, None
        model, arch_kwargs, report, train_ds, said, load = _new_model(
            arch, width, data, data_dir, image_size, stats, weights, pretrained, trust_code, data_kw, limit_train, cfg
        )
        rebuilt = Rebuilt(model, train_ds.input_shape)  # no pass yet: the batch check below measures it
        if report is not None and info.is_main:
            tqdm.write(report.summary())
    val_ds = load("val", eval_limit)
    if info.is_main:
        tqdm.write(describe(train_ds))
        tqdm.write(describe_stats((train_ds.mean, train_ds.std), said))
    if val_ds.input_shape != train_ds.input_shape:
        raise SlimError(f"train images are {train_ds.input_shape}, validation images {val_ds.input_shape}")
    # a batch is never more images than the data has: only what the loader will really stack is checked
    rebuilt.check_batch(min(cfg.batch_size, len(train_ds)), "`batch_size`")

    pruned = ckpt.meta.get("pruned") if source else None
    meta = _train_meta(train_ds, said, cfg, info, report, start, pruned)
    masks, blocks = _penalised(model, arch, train_ds.input_shape, cfg)
    history = train_to_checkpoint(
        model, out, arch=arch, arch_kwargs=arch_kwargs, train_ds=train_ds, val_ds=val_ds, cfg=cfg, meta=meta,
        plan=plan, dist_info=info, resume=resume_point, masks=masks, num_classes=rebuilt_classes, blocks=blocks,
    )  # fmt: skip
    if info.is_main:
        tqdm.write(f"wrote {out}")
    if info.world > 1:
        shutdown_distributed()
    return history, info.is_main


def _new_model(
    arch: str,
    width: float | None,
    data: str,
    data_dir: str | None,
    image_size: int | None,
    stats: Stats | None,
    weights: str | None,
    pretrained: bool,
    trust_code: bool,
    data_kw: dict[str, Any],
    limit_train: int | None,
    cfg: TrainConfig,
) -> tuple[nn.Module, dict[str, Any], WeightsReport | None, AnyData, str, Callable[[str, int | None], AnyData]]:
    """A new model of ``arch`` for ``data`` (from ``weights``/``pretrained`` when given): the model, its
    architecture arguments, the weights report, the training set, how its normalisation was chosen, and a
    loader of the other splits with the same normalisation."""
    check_code(arch, trust_code)
    stats, said = starting_stats(arch, weights=bool(weights or pretrained), given=stats, channels=channels_of(data))
    train_ds = load_data(data, "train", data_dir, image_size, stats, **data_kw).subset(limit_train)
    check_fits(train_ds, train_ds.input_shape, None, data)

    def load(split: str, limit: int | None) -> AnyData:
        own = (train_ds.mean, train_ds.std)
        return load_data(data, split, data_dir, image_size, own, **data_kw).subset(limit)

    arch_kwargs: dict[str, Any] = {"num_classes": train_ds.num_classes, "in_channels": train_ds.input_shape[0]}
    if width is not None:
        arch_kwargs["width"] = width
    if split_name(arch)[0]:
        arch_kwargs.pop("in_channels")
    arch_kwargs = factory_args(arch, arch_kwargs)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what `seed` repeats
    model, arch_kwargs, report = build_with_weights(
        arch, arch_kwargs, weights=weights, pretrained=pretrained, trust_code=trust_code
    )
    return model, arch_kwargs, report, train_ds, said, load


def _train_meta(
    train_ds: AnyData,
    said: str,
    cfg: TrainConfig,
    info: DistInfo,
    report: WeightsReport | None,
    start: str | None,
    pruned: Any,
) -> dict[str, Any]:
    """What a trained checkpoint records about its data, normalisation and run."""
    return {
        "dataset": train_ds.name,
        "classes": train_ds.classes,
        "mean": list(train_ds.mean),
        "std": list(train_ds.std),
        "normalisation": said,
        "train_images": len(train_ds),
        "preprocess": preprocess_meta(train_ds),
        "train_config": cfg.to_dict(),
        "world_size": info.world,
        **({"weights": report.to_dict()} if report is not None else {}),
        **({"started_from": str(start)} if start else {}),
        **({"pruned": pruned} if pruned is not None else {}),
    }


def _penalised(
    model: nn.Module, arch: str, input_shape: tuple[int, ...], cfg: TrainConfig
) -> tuple[Masks, list[GammaGroup]]:
    """What the sparsity penalties act on: the channels of ``sparsity_scope`` (None: all) and the branch groups."""
    masks = None
    if cfg.sparsity > 0 and cfg.sparsity_scope != "all":
        masks = prunable_masks(model, torch.zeros(1, *input_shape), exact=cfg.sparsity_scope == "prunable")
    return masks, _blocks(model, arch, input_shape) if cfg.sparsity_block > 0 else []


def _blocks(model: nn.Module, arch: str, input_shape: tuple[int, ...]) -> list[GammaGroup]:
    """The groups ``sparsity_block`` acts on, traced once before training; a model without any is refused
    (the penalty would do nothing)."""
    found = branch_groups(model, torch.zeros(1, *input_shape))
    if not found:
        raise SlimError(
            f"`sparsity_block` acts on removable residual branches and {arch} has none ('slim2deploy inspect' "
            "lists its residual joins and why each stays); drop it, or use `sparsity` (L1 on every gamma)"
        )
    return found
