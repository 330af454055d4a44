"""The ``finetune`` stage: a pruned checkpoint fine-tuned, distilling from its unpruned teacher by default,
and the accuracy allowance that decides whether the result ships."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import sha256_file
from slim2deploy.model.checkpoint import Checkpoint, load_checkpoint, with_input_shape
from slim2deploy.model.distributed import init_distributed, shutdown_distributed
from slim2deploy.model.folder import AnyData
from slim2deploy.model.loop import EpochResult, TrainConfig, evaluate
from slim2deploy.model.preprocess import data_for, describe_stats
from slim2deploy.model.recipe import DISTILL_TEMPERATURE, DISTILL_WEIGHT, MAX_DROP
from slim2deploy.pipeline.train import ResumePoint, train_to_checkpoint
from slim2deploy.prune.rebuild import rebuild


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
        how = "" if teacher is not None else " or with distillation (`teacher`)"  # not advised twice
        advice = f"fine-tune longer (`epochs`){how}, or prune less"
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
