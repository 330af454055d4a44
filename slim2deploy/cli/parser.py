"""The argument parser every command (and ``bench/latency.py``) is built on, and the value types of its flags.

``Parser`` differs from argparse's in three ways: a mistake is one line (no usage block above it), every
argument added is recorded (``arguments``: which flags a command line gave is told apart from defaults
without argparse's private lists), and a flag may keep old spellings for one release (``deprecated=``): they
still work, are hidden from ``--help`` and print one note naming the new spelling.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

_Group = TypeVar("_Group", argparse._ArgumentGroup, argparse._MutuallyExclusiveGroup)
_PARAM = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`\s]+))?`")


class Parser(argparse.ArgumentParser):
    """A parser whose mistakes are one line, that records its arguments and keeps deprecated spellings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.arguments: list[argparse.Action] = []  # before argparse's __init__, which adds --help
        self.deprecated: dict[str, str] = {}  # old spelling -> the flag's name now
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        for old in self.deprecated:  # argparse names a flag by all its spellings: "argument --new/--old"
            message = message.replace(f"/{old}:", ":").replace(f"/{old} ", " ")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args: Any, deprecated: Sequence[str] = (), **kwargs: Any) -> argparse.Action:
        return self._record(super().add_argument(*args, *deprecated, **kwargs), deprecated)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        return self._recording(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *, required: bool = False) -> argparse._MutuallyExclusiveGroup:
        return self._recording(super().add_mutually_exclusive_group(required=required))

    def _record(self, action: argparse.Action, deprecated: Sequence[str] = ()) -> argparse.Action:
        self.arguments.append(action)
        if deprecated:
            action.deprecated_strings = frozenset(deprecated)  # type: ignore[attr-defined]
            self.deprecated.update(dict.fromkeys(deprecated, action.option_strings[0]))
        return action

    def _recording(self, group: _Group) -> _Group:
        """``group``, whose ``add_argument`` (and whose own mutually exclusive groups') records here too:
        argparse adds a group's arguments to the parser without going through its ``add_argument``."""
        add, nest = group.add_argument, group.add_mutually_exclusive_group

        def add_recorded(*a: Any, deprecated: Sequence[str] = (), **k: Any) -> argparse.Action:
            return self._record(add(*a, *deprecated, **k), deprecated)

        group.add_argument = add_recorded  # type: ignore[method-assign]
        group.add_mutually_exclusive_group = lambda **k: self._recording(nest(**k))  # type: ignore[method-assign]
        return group

    def unrecognized(self, extra: Sequence[str]) -> str:
        """What argparse says of arguments this command does not take, with the nearest flag it does take."""
        known = [s for a in self.arguments for s in a.option_strings if s not in self.deprecated]
        hints = []
        for token in extra:
            if token.startswith("--"):
                flag = token.split("=", 1)[0]
                # the same word in a longer flag (--epochs: --finetune-epochs) first, then a near spelling
                near = [k for k in known if k.endswith("-" + flag[2:])] or difflib.get_close_matches(
                    flag, known, n=1, cutoff=0.8
                )
                hints += [f"{flag}: did you mean {near[0]}?"] if near else []
        return f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else "")

    def current(self, flags: Sequence[str]) -> list[str]:
        """The options of this parser, as named now (deprecated spellings excluded)."""
        return [s for a in self.arguments for s in a.option_strings if s not in self.deprecated and s in flags]

    def in_flags(self, message: str) -> str:
        """A library message in this command's terms: each `parameter` the library names (in backquotes, as the
        Python API calls it) becomes the command's flag for it; a parameter the command has no flag for keeps
        its bare name, so no message names a flag the command does not have. `name=value` is the flag with that
        value: a switch's own spelling (`depth=False` is --no-depth), otherwise ``--flag value``."""
        return _PARAM.sub(lambda m: self._flag_for(m.group(1), m.group(2)), message)

    def say(self, message: str) -> None:
        """Print a library message in this command's terms (``in_flags``): the ``log`` the commands pass down."""
        print(self.in_flags(message))

    def _flag_for(self, name: str, value: str | None) -> str:
        actions = [a for a in self.arguments if a.option_strings and a.dest == name]
        if not actions:
            return name if value is None else f"{name}={value}"
        if value is None:
            return actions[0].option_strings[0]
        for action in actions:  # a switch: the spelling that sets the value
            if action.nargs == 0 and repr(action.const) == value:
                return action.option_strings[0]
        return f"{actions[0].option_strings[0]} {value}"

    def note_deprecated(self, argv: Sequence[str]) -> None:
        """One stderr note per deprecated spelling ``argv`` uses (``--old`` or ``--old=value``)."""
        for token in argv:
            old = token.split("=", 1)[0]
            if old in self.deprecated:
                print(
                    f"note: {old} is deprecated, use {self.deprecated[old]} (the old spelling goes in a later release)",
                    file=sys.stderr,
                )


class HelpFormatter(argparse.HelpFormatter):
    """Every command's --help: deprecated spellings hidden, a flag's default shown once and only where it says
    something (not for a positional, a switch, a default of None, or a help text that speaks of its default; a
    tuple default is shown as the comma-separated value the flag takes)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "deprecated_strings", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)

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


# --- value types: each refuses a bad value in argparse, with the flag named -----------------------------------


def at_least(low: int) -> Callable[[str], int]:
    """A whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"at_least_{low}"
    return parse


def number(
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> Callable[[str], float]:
    """A finite number within the bounds given.

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

    parse.__name__ = "number"
    return parse


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated positive whole numbers (batch sizes), at least one."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names (precisions), at least one."""
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def seed_value(text: str) -> int:
    """A seed: what numpy and torch accept (0 .. 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is a whole number in 0..{2**32 - 1}, got {value}")
    return value


def input_shape(text: str) -> tuple[int, int, int]:
    """C,H,W: three positive whole numbers."""
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        c = h = w = 0
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W (e.g. 3,32,32), got {text!r}")
    if w <= 4 < min(c, h):  # 224,224,3: channels last, which the weights would report as a mismatch
        raise argparse.ArgumentTypeError(f"{text!r} reads as H,W,C; the order is channels first: {w},{c},{h}")
    return c, h, w
