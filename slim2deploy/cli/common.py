"""Flag groups shared by several subcommands, so each flag means the same everywhere."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.latency import DEFAULT_MARGIN
from slim2deploy.prune.rails import DEFAULT_MAX_PRUNE, DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO, Rails

if TYPE_CHECKING:
    from slim2deploy.pipeline.budget import Budget
    from slim2deploy.prune.select import Selection


_Group = TypeVar("_Group", argparse._ArgumentGroup, argparse._MutuallyExclusiveGroup)


class Parser(argparse.ArgumentParser):
    """A parser whose mistakes are one line, like every other refusal: argparse's own error() puts the
    whole usage block above it, which buries the line that says what is wrong.

    It also keeps, in ``arguments``, every argument added to it or to its groups (the ``Action`` that
    ``add_argument`` returns), so the flags a command line gives can be told apart from defaults
    (``given_flags``) without reading argparse's private lists. Subcommand parsers made by its
    ``add_subparsers`` are of this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.arguments: list[argparse.Action] = []  # before argparse's __init__, which adds --help
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self._record(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        return self._recording(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *, required: bool = False) -> argparse._MutuallyExclusiveGroup:
        return self._recording(super().add_mutually_exclusive_group(required=required))

    def _record(self, action: argparse.Action) -> argparse.Action:
        self.arguments.append(action)
        return action

    def _recording(self, group: _Group) -> _Group:
        """``group``, whose ``add_argument`` (and whose own mutually exclusive groups') records here too:
        argparse adds a group's arguments to the parser without going through its ``add_argument``."""
        add, nest = group.add_argument, group.add_mutually_exclusive_group
        group.add_argument = lambda *a, **k: self._record(add(*a, **k))  # type: ignore[method-assign]
        group.add_mutually_exclusive_group = lambda **k: self._recording(nest(**k))  # type: ignore[method-assign]
        return group


class HelpFormatter(argparse.HelpFormatter):
    """Every subcommand's --help: a flag's default shown once, and only where it says something.

    Not for a positional, a switch, a default of None, or a help text that already speaks of its
    default; a tuple default is shown as the comma-separated value the flag takes.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or isinstance(default, bool)
            or default == argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


TARGETS = ("ort-cpu", "torch-cpu", "torch-cuda", "torch-cuda-compiled", "trt")  # measure.targets.TARGETS


def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None if required else "fashion-mnist",
        required=required,
        help="'fashion-mnist', a folder of class sub-folders (or with train/ and val/), or a .npz file",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Fashion-MNIST IDX files; unset means /usr/share/datasets/fashion-mnist",
    )
    g.add_argument(
        "--image-size",
        type=at_least(1),
        default=None,
        help="folder images: in memory, resize to this square size; streamed, resize the shorter side to it",
    )
    g.add_argument("--limit-train", type=at_least(1), default=None, metavar="N", help="train on the first N images")
    g.add_argument("--limit-val", type=at_least(1), default=None, metavar="N", help="evaluate on the first N images")
    add_stream_args(g)


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
        help="streamed folders: the model's input size (train: random-resized crop; eval: center crop); "
        "default --image-size",
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
    g.add_argument("--mean", default=None, help="input normalisation mean per channel, e.g. 0.485,0.456,0.406")
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
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training data")
    g.add_argument("--batch-size", type=int, default=64, help="per-process batch size")
    g.add_argument("--lr", type=number(above=0), default=lr, help="initial learning rate")
    g.add_argument("--momentum", type=number(at_least=0, below=1), default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=number(at_least=0), default=1e-4, help="L2 weight decay on every parameter")
    g.add_argument(
        "--schedule",
        choices=["step", "cosine"],
        default="step",
        help="step: lr x0.1 at 50%% and 75%% of the epochs; cosine: per step",
    )
    g.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    g.add_argument("--no-augment", action="store_true", help="no pad-and-crop / flip augmentation")
    g.add_argument("--seed", type=seed_value, default=0, help="makes a run repeatable on the CPU")
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="with --seed, repeatable on CUDA too: deterministic kernels, no cuDNN autotuning, a fixed cuBLAS "
        "workspace (slower)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def seed_value(text: str) -> int:
    """A --seed: what numpy and torch accept (0 .. 2**32 - 1), refused by argparse otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is a whole number in 0..{2**32 - 1}, got {value}")
    return value


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low`` (also used by bench/latency.py)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def number(
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> Callable[[str], float]:
    """An argparse type for a float flag: a finite number within the bounds given.

    nan and inf are refused too, since a comparison with nan is always False and would pass a
    library check written as ``if value <= 0``; argparse puts the flag's own name before the message.
    """
    wanted: list[tuple[str, Callable[[float], bool]]] = []
    if above is not None:
        wanted.append((f"> {above:g}", lambda v: v > above))
    if at_least is not None:
        wanted.append((f">= {at_least:g}", lambda v: v >= at_least))
    if below is not None:
        wanted.append((f"< {below:g}", lambda v: v < below))
    if at_most is not None:
        wanted.append((f"<= {at_most:g}", lambda v: v <= at_most))
    described = " ".join(["a finite number", " and ".join(text for text, _ in wanted)]).rstrip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not all(ok(value) for _, ok in wanted):
            raise argparse.ArgumentTypeError(f"must be {described}, got {text!r}")
        return value

    return parse


def parse_input_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        c = h = w = 0
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W (e.g. 3,32,32), got {text!r}")
    return c, h, w


def add_trust_arg(p: argparse.ArgumentParser, input_shape: bool = True) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoints that run code when loaded (a pickled nn.Module, or a model "
        "built by a 'package.module:factory'); only for files you trust",
    )
    if input_shape:
        p.add_argument(
            "--input-shape",
            type=parse_input_shape,
            default=None,
            metavar="C,H,W",
            help="input shape of a pickled nn.Module (it records none), e.g. 3,32,32",
        )


def add_target_args(p: argparse.ArgumentParser, batch_flag: str = "--profile-batch") -> None:
    """Where latency is measured: target, batch, precision, threads, the cell cache."""
    g = p.add_argument_group("latency target")
    g.add_argument("--target", default="ort-cpu", choices=TARGETS, help="runtime and device latency is measured on")
    g.add_argument(
        batch_flag, dest="profile_batch", type=at_least(1), default=64, help="batch the latency is measured at"
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
    """--ratio or a latency budget, and the safety rails: what ``selection_from_args`` reads."""
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
    g.add_argument(
        "--no-fold",
        action="store_true",
        help="do not fold removed channels' constant output into the next layer's bias",
    )
    add_approximate_arg(g)

    g = p.add_argument_group("latency budget (with --speedup or --latency-ms)")
    g.add_argument("--table", default=None, metavar="TABLE.json", help="reuse a 'slim2deploy profile' table")
    g.add_argument("--save-table", default=None, metavar="FILE", help="write the latency table used")
    g.add_argument("--tries", type=int, default=4, help="measured tries (over the goal: tighten; far under: widen)")
    g.add_argument(
        "--margin",
        type=number(at_least=0, below=0.5),
        default=DEFAULT_MARGIN,
        metavar="FRACTION",
        help="aim this fraction under the goal, so that timing noise lands on the goal's side",
    )


def add_rails_args(
    g: argparse._ActionsContainer,
    round_to_help: str = "round kept channel counts up to a multiple of this; GPU and CPU kernels want 8 "
    "(TensorRT int8: 32)",
) -> None:
    """--min-channels, --max-prune, --round-to: what ``rails_from_args`` reads (prune, build, profile)."""
    g.add_argument(
        "--min-channels", type=int, default=DEFAULT_MIN_CHANNELS, help="keep at least this many channels per group"
    )
    g.add_argument(
        "--max-prune",
        type=number(above=0, at_most=1),
        default=DEFAULT_MAX_PRUNE,
        help="remove at most this fraction of a group",
    )
    g.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, help=round_to_help)


APPROXIMATE_HELP = (
    "also prune channel groups that some layer reads raw, not through a BatchNorm of the group "
    "(e.g. a pre-activation ResNet's residual stream, read by the next stage's shortcut convolution): "
    "gamma still ranks them, but cutting them changes the outputs, so fine-tune after"
)


def add_approximate_arg(g: argparse._ActionsContainer, help: str = APPROXIMATE_HELP) -> None:
    g.add_argument("--approximate", action="store_true", help=help)


def rails_from_args(args: argparse.Namespace) -> Rails:
    return Rails(args.min_channels, args.max_prune, args.round_to)


def selection_from_args(args: argparse.Namespace) -> Selection | Budget:
    """A ``Selection`` (``--ratio``) or a ``Budget`` (``--speedup``/``--latency-ms``); bad values are one SlimError."""
    from slim2deploy.pipeline.budget import Budget  # imports torch: only when a command runs
    from slim2deploy.prune.select import by_ratio

    if args.ratio is not None:
        return by_ratio(args.ratio, rails_from_args(args))
    return Budget(
        speedup=args.speedup,
        latency_ms=args.latency_ms,
        target=args.target,
        batch=args.profile_batch,
        precision=args.profile_precision,
        threads=args.profile_threads,
        table=args.table,
        cache=cache_from_args(args),
        tries=args.tries,
        rails=rails_from_args(args),
        margin=args.margin,
    )


def cache_from_args(args: argparse.Namespace) -> str | None:
    from slim2deploy.measure.targets import DEFAULT_CACHE

    return None if args.no_cache else str(args.cache or DEFAULT_CACHE)


# --- flags that do nothing in some combinations -------------------------------------------------
# A flag the command would ignore next to the others (--fp16-io at fp32, --arch with --resume) is
# refused after parsing: the user believes it did something. Each command module declares its
# rules as data (ONLY_WHEN); refuse_ignored_flags checks them all before any work.


@dataclass(frozen=True)
class OnlyWhen:
    """``flag`` does something only when ``applies(args)``; given otherwise, it is refused with
    "FLAG applies only WHERE; drop it or FIX"."""

    flag: str
    applies: Callable[[argparse.Namespace], bool]
    where: str
    fix: str


def given_flags(parser: Parser, argv: Sequence[str]) -> set[str]:
    """The option strings ``argv`` sets itself, not through a default (a flag given with its default
    value counts as given): ``argv`` parsed once more into a namespace that already holds a marker for
    every argument, which argparse's defaults do not overwrite (documented under ``default``), so
    only what ``argv`` sets replaces it. The parser is not changed. (Every flag here stores a value;
    an append or count action would need a marker it can add to.)"""
    unset = object()
    arguments = parser.arguments
    given, _ = parser.parse_known_args(list(argv), argparse.Namespace(**{a.dest: unset for a in arguments}))
    found: set[str] = set()
    for action in arguments:
        value = getattr(given, action.dest, unset)
        if not action.option_strings or value is unset:
            continue
        # --stream and --in-memory share one dest: a switch is given when its own constant is there
        if action.nargs == 0 and value != action.const:
            continue
        found.update(action.option_strings)
    return found


def refuse_ignored_flags(
    parser: Parser, argv: Sequence[str], args: argparse.Namespace, rules: Sequence[OnlyWhen]
) -> None:
    """One SlimError for the first flag in ``argv`` that ``rules`` say the others make ineffective."""
    if not rules:
        return
    given = given_flags(parser, argv)
    for rule in rules:
        if rule.flag in given and not rule.applies(args):
            raise SlimError(f"{rule.flag} applies only {rule.where}; drop it or {rule.fix}")


def maybe_folder(data: str | None) -> bool:
    """``data`` names an image folder, or may (a path that does not exist fails later, on its own)."""
    return data is not None and data != "fashion-mnist" and not data.startswith("npz:") and not data.endswith(".npz")


def _budget(args: argparse.Namespace) -> bool:
    return args.speedup is not None or args.latency_ms is not None


# the data flags of train, finetune and calib (add_data_args, add_stream_args)
DATA_RULES = (
    *(
        OnlyWhen(flag, lambda a: maybe_folder(a.data), "to image folders (--data DIR)", "give --data a folder")
        for flag in ("--image-size", "--crop", "--workers", "--in-memory")
    ),
    OnlyWhen("--data-dir", lambda a: a.data == "fashion-mnist", "to --data fashion-mnist", "use --data fashion-mnist"),
)
# where latency is measured (add_target_args): profiling keeps its cells in --cache
CACHE_RULES = (OnlyWhen("--cache", lambda a: not a.no_cache, "when measured cells are kept", "drop --no-cache"),)
# a budget's flags (add_selection_args + add_target_args) next to --ratio, or a --table that is not profiled again
BUDGET_RULES = (
    *(
        OnlyWhen(flag, _budget, "to a latency budget (--speedup or --latency-ms)", "prune to a budget, not --ratio")
        for flag in (
            "--table",
            "--save-table",
            "--tries",
            "--margin",
            "--target",
            "--profile-batch",
            "--profile-precision",
            "--profile-threads",
            "--cache",
            "--no-cache",
        )
    ),
    *(
        OnlyWhen(flag, lambda a: a.table is None, "when layers are profiled, not with --table", "drop --table")
        for flag in ("--cache", "--no-cache")
    ),
    *CACHE_RULES,
)
