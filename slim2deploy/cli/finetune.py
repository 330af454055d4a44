"""slim2deploy finetune: train a pruned model (no sparsity penalty) to recover its accuracy."""

from __future__ import annotations

import argparse

from slim2deploy.cli.flags import (
    add_batch_size_arg,
    add_data_args,
    add_device_args,
    add_distill_args,
    add_max_drop_arg,
    add_schedule_arg,
    add_seed_arg,
    add_trust_arg,
)
from slim2deploy.cli.parser import at_least, number
from slim2deploy.cli.rules import DATA_RULES, OnlyWhen

ONLY_WHEN = (
    *DATA_RULES,
    *(
        OnlyWhen(flag, lambda a: a.teacher is not None, "with a --teacher", "add --teacher CKPT")
        for flag in ("--distill-weight", "--distill-temperature")
    ),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pruned checkpoint; the plan travels with the weights",
        description="Fine-tune a (pruned) checkpoint with plain SGD, without the sparsity penalty, with "
        "distillation from --teacher (the unpruned model) when given, and save it with the same architecture + "
        "plan after every epoch (--resume goes on). With --max-drop, a model that lost more top-1 accuracy than "
        "that against the teacher (or the unpruned model's recorded accuracy) ends with exit 2.",
    )
    p.add_argument("--model", required=True, metavar="SLIM.pt", help="checkpoint written by 'slim2deploy prune'")
    p.add_argument("--out", required=True, metavar="FT.pt", help="fine-tuned checkpoint to write")
    p.add_argument("--epochs", type=at_least(1), default=5, help="passes over the training data")
    p.add_argument("--lr", type=number(above=0), default=0.01, help="initial learning rate")
    add_batch_size_arg(p)
    add_schedule_arg(p, "cosine")
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    add_seed_arg(p, "makes a run repeatable on the CPU (CUDA: add --deterministic)")
    add_device_args(p)
    p.add_argument("--resume", default=None, metavar="FT.pt", help="continue the fine-tune saved in FT.pt")
    g = p.add_argument_group("distillation and accuracy")
    g.add_argument(
        "--teacher",
        default=None,
        metavar="CKPT",
        help="distil from this model (the unpruned checkpoint; same inputs and classes)",
    )
    add_distill_args(g)
    add_max_drop_arg(g)
    add_data_args(p, required=True)
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import check_outputs
    from slim2deploy.pipeline.finetune import Distill, finetune_checkpoint

    # --resume may name --out (a run continues in place)
    check_outputs({"--out": args.out}, inputs=[args.model, args.data, args.teacher])
    distill = Distill(args.teacher, args.distill_weight, args.distill_temperature) if args.teacher else None
    history = finetune_checkpoint(
        args.model,
        args.out,
        data=args.data,
        data_dir=args.data_dir,
        image_size=args.image_size,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        limit_train=args.limit_train,
        eval_limit=args.eval_limit,
        seed=args.seed,
        deterministic=args.deterministic,
        schedule=args.schedule,
        amp=args.amp,
        device=args.device,
        trust_code=args.trust_code,
        stream=args.stream,
        crop=args.crop,
        workers=args.workers,
        input_shape=args.input_shape,
        distill=distill,
        resume=args.resume,
        max_drop=args.max_drop,
    )
    last = history[-1]
    print(f"val_acc {last.val_acc:.4f} after {last.epoch} epoch(s); wrote {args.out}")
    return 0
