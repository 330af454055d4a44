"""slim2deploy finetune: train a pruned model (no sparsity penalty) to recover its accuracy."""

from __future__ import annotations

import argparse

from slim2deploy.cli.common import DATA_RULES, add_data_args, add_trust_arg, number, seed_value

ONLY_WHEN = DATA_RULES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pruned checkpoint; the plan travels with the weights",
        description="Fine-tune a (pruned) checkpoint with plain SGD, without the sparsity penalty, "
        "and save it with the same architecture + plan.",
    )
    p.add_argument("--model", required=True, metavar="SLIM.pt", help="checkpoint written by 'slim2deploy prune'")
    p.add_argument("--out", required=True, metavar="FT.pt", help="fine-tuned checkpoint to write")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training data")
    p.add_argument("--lr", type=number(above=0), default=0.01, help="initial learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--schedule", choices=["step", "cosine"], default="cosine", help="learning-rate schedule")
    p.add_argument(
        "--seed", type=seed_value, default=0, help="makes a run repeatable on the CPU (CUDA: add --deterministic)"
    )
    p.add_argument("--deterministic", action="store_true", help="repeatable on CUDA too (see train --help)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_data_args(p, required=True)
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import check_outputs
    from slim2deploy.pipeline.train import finetune_checkpoint

    check_outputs({"--out": args.out}, inputs=[args.model, args.data])
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
        limit_val=args.limit_val,
        seed=args.seed,
        deterministic=args.deterministic,
        schedule=args.schedule,
        device=args.device,
        trust_code=args.trust_pickle,
        stream=args.stream,
        crop=args.crop,
        workers=args.workers,
        input_shape=args.input_shape,
    )
    last = history[-1]
    print(f"val_acc {last.val_acc:.4f} after {last.epoch} epoch(s); wrote {args.out}")
    return 0
