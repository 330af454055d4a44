"""Flags that do nothing next to some others are refused, not silently ignored.

A flag the command would ignore next to the others (``--fp16-io`` at fp32, ``--arch`` with ``--model``) is
refused after parsing: the user believes it did something. Each command module declares its rules as data
(``ONLY_WHEN``); ``refuse_ignored_flags`` checks them all before any work.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from slim2deploy.base.errors import SlimError
from slim2deploy.cli.parser import Parser


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
    only what ``argv`` sets replaces it (an append action's marker is None, which it turns into a list).
    The parser is not changed."""
    unset = object()
    arguments = parser.arguments
    collects = (argparse._AppendAction, argparse._ExtendAction)  # they add to what is there: start from None
    start = {a.dest: None if isinstance(a, collects) else unset for a in arguments}
    given, _ = parser.parse_known_args(list(argv), argparse.Namespace(**start))
    found: set[str] = set()
    for action in arguments:
        value = getattr(given, action.dest, unset)
        if not action.option_strings or value is unset or (isinstance(action, collects) and value is None):
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


# the data flags of train, finetune and calib (flags.add_data_args, flags.add_stream_args)
DATA_RULES = (
    *(
        OnlyWhen(flag, lambda a: maybe_folder(a.data), "to image folders (--data DIR)", "give --data a folder")
        for flag in ("--image-size", "--crop", "--workers", "--in-memory")
    ),
    OnlyWhen("--data-dir", lambda a: a.data == "fashion-mnist", "to --data fashion-mnist", "use --data fashion-mnist"),
)
# where latency is measured (flags.add_target_args): profiling keeps its cells in --cache
CACHE_RULES = (OnlyWhen("--cache", lambda a: not a.no_cache, "when measured cells are kept", "drop --no-cache"),)
# a budget's flags (flags.add_selection_args + flags.add_target_args) next to --ratio, or a --table not profiled again
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
