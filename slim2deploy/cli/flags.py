"""Flag groups shared by several commands, so each flag means the same everywhere (``cli.vocabulary``)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING

from slim2deploy.base.errors import SlimError
from slim2deploy.cli.parser import at_least, input_shape, number
from slim2deploy.model.recipe import DISTILL_TEMPERATURE, DISTILL_WEIGHT, MAX_DROP
from slim2deploy.prune.importance import DEFAULT_IMPORTANCE, NAMES
from slim2deploy.prune.latency import DEFAULT_MARGIN
from slim2deploy.prune.rails import DEFAULT_MAX_PRUNE, DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO, Rails

if TYPE_CHECKING:
    from slim2deploy.prune.select import Selection


def target_names() -> list[str]:
    """The latency targets, from the one table of them (``measure.targets.TARGETS``; torch-free)."""
    from slim2deploy.measure.targets import TARGETS

    return list(TARGETS)


def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None if required else "fashion-mnist",
        required=required,
        help="'fashion-mnist', a folder of class sub-folders (or with train/ and val/), or a .npz file",
    )
    add_data_dir_arg(g)
    g.add_argument(
        "--image-size",
        type=at_least(1),
        default=None,
        help="folder images: in memory without a crop, resize to this square size; streamed or with a crop (--crop, "
        "or one the checkpoint records), resize the shorter side to it before the center crop "
        "(a checkpoint records it: later commands read the folder the same way)",
    )
    g.add_argument("--limit-train", type=at_least(1), default=None, metavar="N", help="train on the first N images")
    add_eval_limit_arg(g)
    add_stream_args(g)


def add_data_dir_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Fashion-MNIST IDX files; unset means /usr/share/datasets/fashion-mnist",
    )


def add_eval_limit_arg(
    g: argparse._ActionsContainer, default: int | None = None, deprecated: tuple[str, ...] = ("--limit-val",)
) -> None:
    g.add_argument(
        "--eval-limit",
        type=at_least(1),
        default=default,
        metavar="N",
        deprecated=deprecated,
        help="evaluate on the first N held-out images",
    )


def add_stream_args(g: argparse._ActionsContainer) -> None:
    """How a folder is read: streamed through a DataLoader or decoded into memory."""
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--stream",
        dest="stream",
        action="store_const",
        const=True,
        default=None,
        help="read a folder lazily through a DataLoader (default when its decoded images exceed 1 GiB)",
    )
    mode.add_argument(
        "--in-memory", dest="stream", action="store_const", const=False, help="decode a folder into memory once"
    )
    g.add_argument(
        "--crop",
        type=at_least(1),
        default=None,
        help="folder images: the model's input size, a center crop after --image-size resized the shorter "
        "side (streamed folders: default --image-size, and training takes random-resized crops instead)",
    )
    g.add_argument(
        "--workers",
        type=at_least(0),
        default=None,
        help="DataLoader worker processes for streamed folders (default min(4, CPUs))",
    )


def add_source_args(p: argparse.ArgumentParser) -> None:
    """Where a torchvision/timm/zoo model's starting weights come from, and its input normalisation."""
    g = p.add_argument_group("starting weights")
    src = g.add_mutually_exclusive_group()
    src.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="a state_dict file (.pt/.pth read without running code, or .safetensors); "
        "missing/unexpected keys are reported",
    )
    src.add_argument(
        "--pretrained",
        action="store_true",
        help="the library's pretrained weights (torchvision:NAME, timm:NAME); downloads into its cache on first use",
    )
    add_stats_args(g)


def add_stats_args(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--mean",
        default=None,
        help="input normalisation mean per channel, e.g. 0.485,0.456,0.406 (default: the rule in docs/training.md)",
    )
    g.add_argument("--std", default=None, help="input normalisation std per channel, e.g. 0.229,0.224,0.225")


def stats_from_args(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from --mean/--std, or None when neither is given."""
    if args.mean is None and args.std is None:
        return None
    if args.mean is None or args.std is None:
        raise SlimError("give --mean and --std together")
    try:
        mean = tuple(float(v) for v in args.mean.split(","))
        std = tuple(float(v) for v in args.std.split(","))
    except ValueError as exc:
        raise SlimError(f"--mean and --std take comma-separated numbers ({exc})") from exc
    if len(mean) != len(std) or any(v <= 0 for v in std):
        raise SlimError(f"--mean and --std need one value per channel and std > 0, got {mean} and {std}")
    return mean, std


def add_train_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    g = p.add_argument_group("optimisation (SGD with momentum, as the official recipe)")
    g.add_argument("--epochs", type=at_least(1), default=epochs, help="passes over the training data")
    add_batch_size_arg(g)
    g.add_argument("--lr", type=number(above=0), default=lr, help="initial learning rate")
    g.add_argument("--momentum", type=number(at_least=0, below=1), default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=number(at_least=0), default=1e-4, help="L2 weight decay on every parameter")
    add_schedule_arg(g, "step")
    g.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    g.add_argument("--no-augment", action="store_true", help="no pad-and-crop / flip augmentation")
    add_seed_arg(g, "makes a run repeatable on the CPU")
    add_device_args(g)


def add_batch_size_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--batch-size", type=at_least(1), default=64, help="training images per step and process (evaluation too)"
    )


def add_schedule_arg(g: argparse._ActionsContainer, default: str) -> None:
    g.add_argument(
        "--schedule",
        choices=["step", "cosine"],
        default=default,
        help="step: lr x0.1 at 50%% and 75%% of the epochs; cosine: per step",
    )


def add_seed_arg(g: argparse._ActionsContainer, what: str) -> None:
    from slim2deploy.cli.parser import seed_value

    g.add_argument("--seed", type=seed_value, default=0, help=what)


def add_device_args(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="with --seed, repeatable on CUDA too: deterministic kernels, no cuDNN autotuning, a fixed cuBLAS "
        "workspace (slower)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_trust_arg(p: argparse.ArgumentParser, input_shape_flag: bool = True) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        deprecated=("--trust-pickle",),
        help="allow what runs code that is neither slim2deploy's nor an installed model library's: a checkpoint "
        "holding a pickled nn.Module, and a model made by a 'package.module:factory' (importing it runs that "
        "module); only for files and modules you trust",
    )
    if input_shape_flag:
        p.add_argument(
            "--input-shape",
            type=input_shape,
            default=None,
            metavar="C,H,W",
            help="input shape of a pickled nn.Module (it records none), e.g. 3,32,32",
        )


def add_target_args(p: argparse.ArgumentParser, deprecated_batch: tuple[str, ...] = ()) -> None:
    """Where latency is measured: target, batch, precision, threads, the cell cache."""
    g = p.add_argument_group("latency target")
    g.add_argument(
        "--target", default="ort-cpu", choices=target_names(), help="runtime and device latency is measured on"
    )
    g.add_argument(
        "--profile-batch",
        type=at_least(1),
        default=64,
        deprecated=deprecated_batch,
        help="batch the latency is measured at (your deployment batch)",
    )
    g.add_argument(
        "--profile-precision", default="fp32", choices=["fp32", "fp16"], help="precision the latency is measured at"
    )
    g.add_argument(
        "--profile-threads", type=at_least(1), default=None, help="runtime threads (default: the runtime's choice)"
    )
    g.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="where measured layer latencies are kept (default: ~/.cache/slim2deploy/latency)",
    )
    g.add_argument("--no-cache", action="store_true", help="measure every layer again and keep nothing")


def add_selection_args(p: argparse.ArgumentParser) -> None:
    """--ratio or a latency budget, the safety rails and --keep: what ``selection_from_args`` reads."""
    g = p.add_argument_group("pruning (--min-channels 1 --max-prune 1 --round-to 1: the paper exactly)")
    how = g.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--ratio", type=number(above=0, below=1), help="fraction of prunable channels to remove, in (0, 1)"
    )
    how.add_argument(
        "--speedup",
        type=number(above=1),
        metavar="S",
        help="keep the most |gamma| whose measured latency on --target is the unpruned model's / S",
    )
    how.add_argument(
        "--latency-ms", type=number(above=0), metavar="T", help="like --speedup, with a latency budget in ms"
    )
    add_rails_args(g)
    add_keep_arg(g)
    add_depth_args(g)
    add_importance_arg(g)
    g.add_argument(
        "--no-fold",
        action="store_true",
        help="do not fold removed channels' constant output into the next layer's bias",
    )
    add_approximate_arg(g)

    g = p.add_argument_group("latency budget (with --speedup or --latency-ms)")
    g.add_argument("--table", default=None, metavar="TABLE.json", help="reuse a 'slim2deploy profile' table")
    g.add_argument("--save-table", default=None, metavar="FILE", help="write the latency table used")
    g.add_argument(
        "--tries", type=at_least(1), default=4, help="measured tries (over the goal: tighten; far under: widen)"
    )
    g.add_argument(
        "--margin",
        type=number(at_least=0, below=0.5),
        default=DEFAULT_MARGIN,
        metavar="FRACTION",
        help="aim this fraction under the goal, so that timing noise lands on the goal's side",
    )


def add_keep_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--keep",
        action="append",
        default=None,
        metavar="LAYER",
        help="keep this layer's channels out of every selection (a module name, shell wildcards allowed, e.g. "
        "'features.0' or 'layer4.*'); repeatable",
    )


def add_rails_args(
    g: argparse._ActionsContainer,
    round_to_help: str = "round kept channel counts up to a multiple of this; GPU and CPU kernels want 8 "
    "(TensorRT int8: 32)",
) -> None:
    """--min-channels, --max-prune, --round-to: what ``rails_from_args`` reads (prune, build, profile)."""
    g.add_argument(
        "--min-channels",
        type=at_least(1),
        default=DEFAULT_MIN_CHANNELS,
        help="keep at least this many channels per group",
    )
    g.add_argument(
        "--max-prune",
        type=number(above=0, at_most=1),
        default=DEFAULT_MAX_PRUNE,
        help="remove at most this fraction of a group",
    )
    g.add_argument("--round-to", type=at_least(1), default=DEFAULT_ROUND_TO, help=round_to_help)


DEPTH_HELP = (
    "remove a residual branch (a ResNet block's convolutions) whose channels the selection would empty, instead "
    "of keeping it at the rails' floor -- a ratio: when none of one of its groups' channels scores above the "
    "threshold; --speedup/--latency-ms: when removing it keeps the most gamma within the budget. On by default: "
    "exact where that group's gamma are 0 (the block becomes its input plus a constant), it removes whole kernels, "
    "what ONNX Runtime and a GPU at small batches pay for, and the floor would keep channels gamma says nothing about"
)
NO_DEPTH_HELP = "never empty a group to remove a residual branch: prune width only"


def add_depth_args(g: argparse._ActionsContainer, help: str = DEPTH_HELP, no_help: str = NO_DEPTH_HELP) -> None:
    """--depth / --no-depth (one switch, on by default): what ``selection_from_args`` reads as ``depth``."""
    pair = g.add_mutually_exclusive_group()
    pair.add_argument("--depth", dest="depth", action="store_const", const=True, default=True, help=help)
    pair.add_argument("--no-depth", dest="depth", action="store_const", const=False, help=no_help)


IMPORTANCE_HELP = (
    "what ranks the channels: 'gamma' (default, the paper's |gamma|) or 'gamma-out' (|gamma| times the channel's "
    "weight norm in the layers that read it, relative to their typical input channel); docs/pruning.md compares them"
)


def add_importance_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument("--importance", choices=NAMES, default=DEFAULT_IMPORTANCE, help=IMPORTANCE_HELP)


APPROXIMATE_HELP = (
    "also prune channel groups that some layer reads raw, not through a BatchNorm of the group "
    "(e.g. a pre-activation ResNet's residual stream, read by the next stage's shortcut convolution): "
    "gamma still ranks them, but cutting them changes the outputs, so fine-tune after"
)


def add_approximate_arg(g: argparse._ActionsContainer, help: str = APPROXIMATE_HELP) -> None:
    g.add_argument("--approximate", action="store_true", help=help)


def rails_from_args(args: argparse.Namespace) -> Rails:
    return Rails(args.min_channels, args.max_prune, args.round_to)


def selection_from_args(args: argparse.Namespace) -> Selection:
    """The ``Selection`` the flags ask for: a ``--ratio``, or a latency goal (``--speedup``/``--latency-ms``,
    measured on the target); bad values are one SlimError."""
    from slim2deploy.prune.select import by_ratio

    keep = tuple(args.keep or ())
    if args.ratio is not None:
        selection = by_ratio(args.ratio, rails_from_args(args), keep=keep, depth=args.depth)
    else:
        selection = _budget_from_args(args, keep)
    return replace(selection, importance=args.importance)


def _budget_from_args(args: argparse.Namespace, keep: tuple[str, ...]) -> Selection:
    from slim2deploy.prune.goal import by_budget

    return by_budget(
        rails_from_args(args),
        keep,
        args.depth,
        speedup=args.speedup,
        latency_ms=args.latency_ms,
        target=args.target,
        batch=args.profile_batch,
        precision=args.profile_precision,
        threads=args.profile_threads,
        table=args.table,
        cache=args.cache,
        no_cache=args.no_cache,
        tries=args.tries,
        margin=args.margin,
    )


def cache_from_args(args: argparse.Namespace) -> str | None:
    from slim2deploy.measure.targets import DEFAULT_CACHE

    return None if args.no_cache else str(args.cache or DEFAULT_CACHE)


def add_distill_args(g: argparse._ActionsContainer) -> None:
    """The distillation loss: (1 - w) * cross-entropy + w * T^2 * KL(teacher_T || student_T)."""
    g.add_argument(
        "--distill-weight",
        type=number(at_least=0, at_most=1),
        default=DISTILL_WEIGHT,
        metavar="W",
        help="share of the distillation term in the loss (the rest is cross-entropy on the labels)",
    )
    g.add_argument(
        "--distill-temperature",
        type=number(above=0),
        default=DISTILL_TEMPERATURE,
        metavar="T",
        help="softmax temperature of the teacher's and student's logits",
    )


def add_max_drop_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--max-drop",
        type=number(at_least=0),
        default=MAX_DROP,
        metavar="POINTS",
        help="points of top-1 accuracy the slim model may lose against the unpruned one on the same held-out "
        "images (checked where that reference is known); more ends with exit 2, the files kept for inspection",
    )
