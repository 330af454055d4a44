"""slim2deploy train: (sparse) training of a zoo model on a dataset."""

from __future__ import annotations

import argparse
import json

from slim2deploy.cli.flags import add_data_args, add_source_args, add_train_args, add_trust_arg, stats_from_args
from slim2deploy.cli.parser import number
from slim2deploy.cli.rules import DATA_RULES, OnlyWhen

ONLY_WHEN = (
    *(
        OnlyWhen(
            flag,
            lambda a: a.resume is None,
            "to a new run, not with --resume (it goes on with the checkpoint's weights)",
            "drop --resume",
        )
        for flag in ("--weights", "--pretrained", "--model")
    ),
    *(
        OnlyWhen(
            flag,
            lambda a: a.model is None,
            "to a model built by name, not with --model (the checkpoint has its architecture, weights and "
            "normalisation)",
            "drop --model",
        )
        for flag in ("--arch", "--width", "--weights", "--pretrained", "--mean", "--std")
    ),
    *(
        OnlyWhen(flag, lambda a: a.sparsity > 0, "with --sparsity above 0", "set --sparsity")
        for flag in ("--sparsity-mode", "--sparsity-scope")
    ),
    OnlyWhen(
        "--sparsity-warmup",
        lambda a: a.sparsity > 0 or a.sparsity_block > 0,
        "with --sparsity or --sparsity-block above 0",
        "set one of them",
    ),
    *DATA_RULES,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a model with the L1 penalty on BatchNorm gammas (--sparsity 0: baseline)",
        description="Sparse training as in Network Slimming: the L1 penalty lambda*sum|gamma| on every "
        "BatchNorm scale. Runs under torchrun for data parallelism "
        "(torchrun --nproc_per_node=N -m slim2deploy train ...).",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="zoo name (vgg11/13/16/19, resnet20/56/164, densenet40), torchvision:NAME, timm:NAME "
        "or package.module:factory (needs --trust-code) (default: vgg11; with --model or --resume, the checkpoint's)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="CKPT",
        help="start a new run from this slim2deploy checkpoint (from 'import', 'train', 'prune', ...): its "
        "architecture, weights and normalisation",
    )
    p.add_argument("--width", type=number(above=0), default=None, help="width multiplier of zoo models (default 1.0)")
    p.add_argument("--out", required=True, help="checkpoint to write (updated after every epoch)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue the run saved in CKPT")
    add_source_args(p)
    add_data_args(p)
    add_train_args(p, epochs=10, lr=0.1)
    g = p.add_argument_group("sparsity")
    g.add_argument(
        "--sparsity",
        type=number(at_least=0),
        default=0.0,
        help="lambda of the L1 penalty on BatchNorm gammas; paper: 1e-4 VGG, 1e-5 ResNet/DenseNet",
    )
    g.add_argument(
        "--sparsity-mode",
        choices=["subgradient", "proximal"],
        default="subgradient",
        help="subgradient: the paper's grad += lambda*sign(gamma); proximal: soft-threshold "
        "gamma after each step (exact zeros)",
    )
    g.add_argument(
        "--sparsity-warmup",
        type=number(at_least=0),
        default=0.0,
        metavar="EPOCHS",
        help="ramp lambda (and that of --sparsity-block) linearly from 0 over this many epochs",
    )
    g.add_argument(
        "--sparsity-scope",
        choices=["all", "prunable", "approximate"],
        default="all",
        help="all: every BatchNorm gamma (the paper); prunable: only gammas of channels the surgery can "
        "remove (e.g. not a pre-activation ResNet's residual stream); approximate: of channels "
        "'prune --approximate' can remove",
    )
    g.add_argument(
        "--sparsity-block",
        type=number(at_least=0),
        default=0.0,
        metavar="LAMBDA",
        help="lambda of a group lasso on each removable residual branch: after every step the gammas of each "
        "group inside one are scaled by max(0, 1 - step*LAMBDA/||gamma_group||), step = lr/(1-momentum), so "
        "a weak branch's whole group reaches exactly 0 and 'prune --ratio' removes the branch (depth); "
        "independent of --sparsity, ramped by --sparsity-warmup (default 0: off)",
    )
    g.add_argument("--history", default=None, metavar="JSON", help="also write per-epoch results here")
    add_trust_arg(p, input_shape_flag=False)  # checkpoints this tool wrote record their input shape
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import atomic_write_text, check_output, check_outputs
    from slim2deploy.model.loop import TrainConfig
    from slim2deploy.pipeline.train import train_command

    # --resume may name --out (a run continues in place); no other input may be written over
    check_outputs({"--out": args.out, "--history": args.history}, inputs=[args.data, args.model, args.weights])
    if args.history:
        check_output(args.history, "--history", inputs=[args.resume])
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        sparsity=args.sparsity,
        sparsity_mode=args.sparsity_mode,
        sparsity_warmup=args.sparsity_warmup,
        sparsity_scope=args.sparsity_scope,
        sparsity_block=args.sparsity_block,
        amp=args.amp,
        augment=not args.no_augment,
        seed=args.seed,
        deterministic=args.deterministic,
    )
    history, is_main = train_command(
        arch=args.arch,
        width=args.width,
        data=args.data,
        data_dir=args.data_dir,
        image_size=args.image_size,
        limit_train=args.limit_train,
        eval_limit=args.eval_limit,
        cfg=cfg,
        out=args.out,
        resume=args.resume,
        start=args.model,
        device=args.device,
        trust_code=args.trust_code,
        weights=args.weights,
        pretrained=args.pretrained,
        stats=stats_from_args(args),
        stream=args.stream,
        crop=args.crop,
        workers=args.workers,
    )
    if args.history and is_main:
        atomic_write_text(args.history, json.dumps([h.to_dict() for h in history], indent=2))
    return 0
