"""The ``train`` and ``finetune`` stages: checkpoint in, checkpoint out, around the training loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import sha256_file
from slim2deploy.model.checkpoint import Checkpoint, checkpoint_for, load_checkpoint, save_checkpoint, with_input_shape
from slim2deploy.model.distributed import DistInfo, init_distributed, shutdown_distributed
from slim2deploy.model.folder import AnyData, check_fits, describe, load_data
from slim2deploy.model.loop import EpochResult, TrainConfig, evaluate, fit
from slim2deploy.model.preprocess import (
    Stats,
    channels_of,
    data_for,
    describe_stats,
    preprocess_meta,
    starting_stats,
)
from slim2deploy.model.recipe import DISTILL_TEMPERATURE, DISTILL_WEIGHT, MAX_DROP
from slim2deploy.model.sparsity import GammaGroup, Masks
from slim2deploy.model.weights import build_with_weights
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
    def of(cls, ckpt: Checkpoint, path: str | Path) -> ResumePoint:
        if not ckpt.train_state:
            raise SlimError(
                f"{path} records no training run to continue (it was imported, pruned or fine-tuned elsewhere); "
                "start a new run from its weights with `model` instead"
            )
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
    teacher: nn.Module | None = None,
    num_classes: int | None = None,
    blocks: Sequence[GammaGroup] = (),
) -> list[EpochResult]:
    """``fit`` that writes ``out`` after every epoch with what ``ResumePoint.of`` needs to go on.

    ``plan`` (a pruned model's) travels with the weights; ``resume`` continues an earlier run; ``teacher``
    distils into the model (``model.loop.fit``). ``num_classes``: the model's outputs (default: the data's classes).
    ``blocks``: the gamma groups of ``cfg.sparsity_block`` (``prune.trace.branch_groups``).
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

    return fit(
        model, train_ds, val_ds, cfg, dist_info=dist_info, start_epoch=resume.epoch if resume else 0,
        optimizer_state=resume.optimizer if resume else None, on_epoch_end=save, masks=masks,
        progress=progress, desc=desc, teacher=teacher, blocks=blocks,
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
    resume_point, report, plan = None, None, None
    arch_kwargs: dict[str, Any]
    source = resume or start
    if source:
        ckpt, rebuilt = _start_from(source, trust_code, arch, width, stats, resume=bool(resume))
        if resume:
            resume_point = ResumePoint.of(ckpt, source)
            if resume_point.epoch >= cfg.epochs:
                raise SlimError(
                    f"{source} already finished {resume_point.epoch} epochs; pass a larger `epochs` to go on"
                )
        model, arch, arch_kwargs, plan = rebuilt.model, ckpt.arch, ckpt.arch_kwargs, ckpt.plan
        rebuilt_classes: int | None = ckpt.num_classes

        def load(split: str, limit: int | None) -> AnyData:
            return data_for(ckpt, data, split, data_dir=data_dir, limit=limit, image_size=image_size, **data_kw)

        train_ds = load("train", limit_train)
        said = f"the checkpoint's own, {source}" if ckpt.stats else "estimated from the training data"
    else:
        arch, rebuilt_classes = arch or DEFAULT_ARCH, None
        check_code(arch, trust_code)
        stats, said = starting_stats(arch, weights=bool(weights or pretrained), given=stats, channels=channels_of(data))
        train_ds = load_data(data, "train", data_dir, image_size, stats, **data_kw).subset(limit_train)
        check_fits(train_ds, train_ds.input_shape, None, data)

        def load(split: str, limit: int | None) -> AnyData:
            own = (train_ds.mean, train_ds.std)
            return load_data(data, split, data_dir, image_size, own, **data_kw).subset(limit)

        arch_kwargs = {"num_classes": train_ds.num_classes, "in_channels": train_ds.input_shape[0]}
        if width is not None:
            arch_kwargs["width"] = width
        if split_name(arch)[0]:
            arch_kwargs.pop("in_channels")
        arch_kwargs = factory_args(arch, arch_kwargs)
        torch.manual_seed(cfg.seed)  # the initial weights are part of what --seed repeats
        model, arch_kwargs, report = build_with_weights(
            arch, arch_kwargs, weights=weights, pretrained=pretrained, trust_code=trust_code
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

    meta = {
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
        **({"pruned": ckpt.meta["pruned"]} if source and "pruned" in ckpt.meta else {}),
    }
    masks = None
    if cfg.sparsity > 0 and cfg.sparsity_scope != "all":
        masks = prunable_masks(model, torch.zeros(1, *train_ds.input_shape), exact=cfg.sparsity_scope == "prunable")
    blocks = _blocks(model, arch, train_ds.input_shape) if cfg.sparsity_block > 0 else []
    history = train_to_checkpoint(
        model, out, arch=arch, arch_kwargs=arch_kwargs, train_ds=train_ds, val_ds=val_ds, cfg=cfg, meta=meta,
        plan=plan, dist_info=info, resume=resume_point, masks=masks, num_classes=rebuilt_classes, blocks=blocks,
    )  # fmt: skip
    if info.is_main:
        tqdm.write(f"wrote {out}")
    if info.world > 1:
        shutdown_distributed()
    return history, info.is_main


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


@dataclass
class Distill:
    """Distillation in a fine-tune: the teacher checkpoint and the loss settings."""

    teacher: str | Path
    weight: float = DISTILL_WEIGHT
    temperature: float = DISTILL_TEMPERATURE


class AccuracyDrop(SlimError):
    """A model lost more top-1 accuracy than the allowance; what was made is kept for inspection."""


def check_drop(reference: float | None, final: float, n: int, max_drop: float | None, advice: str) -> None:
    """Refuse a model whose top-1 ``final`` is more than ``max_drop`` points under ``reference`` (both
    measured on the same ``n`` held-out images); nothing to check without a reference or an allowance."""
    if reference is None or max_drop is None or not math.isfinite(final):
        return
    drop = (reference - final) * 100
    if drop > max_drop:
        noise = f"; one image is {100 / n:.2g} points of {n}" if n and 100 / n > max_drop / 2 else ""
        raise AccuracyDrop(
            f"the slim model scores {final:.2%} where the unpruned one scored {reference:.2%} on the same {n} "
            f"held-out images: {drop:.2f} points lost, more than `max_drop` {max_drop:g} allows{noise}; {advice}"
        )


def load_teacher(path: str | Path, student: Checkpoint, trust_code: bool) -> tuple[nn.Module, str]:
    """The teacher model and its sha256; refused unless it takes the student's inputs (shape and
    normalisation) and predicts its classes."""
    teacher = load_checkpoint(path, trust_code=trust_code)
    differ = []
    if tuple(teacher.input_shape) != tuple(student.input_shape) and teacher.module is None:
        differ.append(f"inputs {tuple(teacher.input_shape)} (the student's: {tuple(student.input_shape)})")
    if teacher.num_classes != student.num_classes and teacher.module is None:
        differ.append(f"{teacher.num_classes} classes (the student's: {student.num_classes})")
    names = [teacher.meta.get("classes"), student.meta.get("classes")]
    if all(isinstance(c, list) for c in names) and names[0] != names[1] and not differ:
        differ.append("other class names")
    if teacher.stats is not None and student.stats is not None and teacher.stats != student.stats:
        differ.append(f"another normalisation (mean {teacher.stats[0]}, std {teacher.stats[1]})")
    if differ:
        raise SlimError(
            f"the teacher {path} has {'; '.join(differ)}: a teacher must see the student's inputs and predict "
            "its classes; give the checkpoint the student was pruned from"
        )
    model = rebuild(with_input_shape(teacher, student.input_shape, str(path)), trust_code=trust_code).model
    return model, sha256_file(path)


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
    eval_limit: int | None = None,
    seed: int = 0,
    deterministic: bool = False,
    schedule: str = "cosine",
    amp: bool = False,
    device: str = "auto",
    trust_code: bool = False,
    progress: bool = True,
    stream: bool | None = None,
    crop: int | None = None,
    workers: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    train_data: AnyData | None = None,
    distill: Distill | None = None,
    resume: str | Path | None = None,
    max_drop: float | None = MAX_DROP,
    log: Callable[[str], None] | None = tqdm.write,
) -> list[EpochResult]:
    """Fine-tune the (pruned) model in ``src`` without the sparsity penalty and save it to ``dst`` after
    every epoch (``resume`` continues such a run: the same source, teacher and settings).

    The plan travels with the weights, so ``dst`` rebuilds the same slim architecture. ``distill`` adds
    distillation from a teacher (the unpruned model, typically). ``train_data``: the training split already
    loaded with these options and ``limit_train`` (``build`` reads it before pruning); else it is read here.
    ``max_drop``: refuse (``AccuracyDrop``, after saving) a final model more than that many points of top-1
    under the teacher's accuracy on the same held-out images (or, without a teacher, under what the
    checkpoint records of the unpruned model).
    """
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed, deterministic=deterministic,
        amp=amp, distill_weight=distill.weight if distill else DISTILL_WEIGHT,
        distill_temperature=distill.temperature if distill else DISTILL_TEMPERATURE,
    )  # fmt: skip
    cfg.validate()  # a bad epoch count or batch size is refused before the data is read
    info = init_distributed(device)  # under torchrun each process fine-tunes its slice (and has its own teacher)
    ckpt = with_input_shape(load_checkpoint(src, trust_code=trust_code), input_shape, str(src))
    rebuilt = rebuild(ckpt, trust_code=trust_code)
    teacher, teacher_sha = load_teacher(distill.teacher, ckpt, trust_code) if distill else (None, None)
    settings = {
        "lr": lr, "schedule": schedule, "batch_size": batch_size, "data": data, "from": str(src),
        "from_sha256": sha256_file(src),
        "distill": {**asdict(distill), "teacher": str(distill.teacher), "sha256": teacher_sha} if distill else None,
    }  # fmt: skip
    resume_point, model = None, rebuilt.model
    if resume is not None:
        resume_point, model = _resume_finetune(resume, settings, epochs, trust_code)
    kw: dict[str, Any] = {"data_dir": data_dir, "image_size": image_size, "stream": stream, "crop": crop}
    kw.update(seed=seed, workers=workers)
    train_ds = train_data if train_data is not None else data_for(ckpt, data, "train", limit=limit_train, **kw)
    val_ds = data_for(ckpt, data, "val", limit=eval_limit, **kw)
    if log is not None and info.is_main:
        log(describe_stats((val_ds.mean, val_ds.std), "the checkpoint's own"))
    rebuilt.check_batch(min(batch_size, len(train_ds)), "`batch_size`")
    reference = _recorded_before(ckpt)
    if teacher is not None and info.is_main:
        reference = evaluate(teacher.to(info.device), val_ds, batch_size, info.device)[1]
    meta = {**ckpt.meta, "finetune": {**settings, "epochs": epochs, "reference_acc": reference}}
    history = train_to_checkpoint(
        model, dst, arch=ckpt.arch, arch_kwargs=ckpt.arch_kwargs, train_ds=train_ds, val_ds=val_ds, cfg=cfg,
        meta=meta, plan=ckpt.plan, dist_info=info, resume=resume_point, progress=progress, desc="finetune",
        teacher=teacher, num_classes=ckpt.num_classes,
    )  # fmt: skip
    if info.world > 1:
        shutdown_distributed()
    if history and info.is_main:
        advice = "fine-tune longer (`epochs`) or with distillation (`teacher`), or prune less"
        check_drop(reference, history[-1].val_acc, len(val_ds), max_drop, advice)
    return history


def _recorded_before(ckpt: Checkpoint) -> float | None:
    """The unpruned model's accuracy a pruned checkpoint records (its training's held-out split), if any."""
    before = (ckpt.meta.get("pruned") or {}).get("val_acc_before")
    return float(before) if isinstance(before, (int, float)) and math.isfinite(before) else None


def _resume_finetune(
    path: str | Path, settings: dict[str, Any], epochs: int, trust_code: bool
) -> tuple[ResumePoint, nn.Module]:
    """Where the fine-tune saved in ``path`` stopped, and its model; refused unless it fine-tuned the same
    source with the same teacher and settings (anything else would not continue that run)."""
    ckpt = load_checkpoint(path, trust_code=trust_code)
    point = ResumePoint.of(ckpt, path)
    recorded = ckpt.meta.get("finetune") or {}
    same = {k: recorded.get(k) == v for k, v in settings.items() if k not in ("from",)}
    if not all(same.values()):
        changed = ", ".join(k for k, ok in same.items() if not ok)
        raise SlimError(
            f"{path} is not a fine-tune of this source with these settings ({changed} differ); resume it with "
            "the command line that started it, or start a new fine-tune without `resume`"
        )
    if point.epoch >= epochs:
        raise SlimError(f"{path} already finished {point.epoch} epochs; pass a larger `epochs` to go on")
    return point, rebuild(ckpt, trust_code=trust_code).model
