"""docs/commands.md, written from the parsers themselves: ``python -m slim2deploy.cli.reference > docs/commands.md``.

The page can then never disagree with ``--help`` (``tests/test_docs.py`` compares it with this output).
"""

from __future__ import annotations

import argparse
import sys

from slim2deploy.cli import build_parser
from slim2deploy.cli.latency import build_parser as latency_parser
from slim2deploy.cli.parser import HelpFormatter, Parser
from slim2deploy.cli.vocabulary import FLAGS

HEAD = """# Commands and flags

Written from the parsers (`python -m slim2deploy.cli.reference > docs/commands.md`): what `--help` says, in one
page. A flag means the same in every command (`slim2deploy/cli/vocabulary.py`); old spellings still work for
one release, with a note. Errors name the flag to change; in Python (`slim2deploy.slim`, `slim2deploy.export`,
`slim2deploy.build`, ...) the same setting is the keyword argument of the flag's name (`--profile-batch` is
`profile_batch`), and errors name it that way.
"""


def _default(action: argparse.Action) -> str:
    """The default as --help shows it, where the help text does not already say it."""
    if "default" in (action.help or "").lower():
        return ""
    shown = HelpFormatter("x")._get_help_string(action) or ""
    return shown.rsplit("(default: ", 1)[1][:-1] if "(default: " in shown else ""


def _section(title: str, parser: Parser) -> list[str]:
    lines = [f"## {title}", "", " ".join((parser.description or "").split()), ""]
    lines += ["| flag | meaning | default |", "|---|---|---|"]
    for action in parser.arguments:
        names = [s for s in action.option_strings if s not in parser.deprecated]
        if not names or names[0] in ("-h", "--help"):
            continue
        meaning = " ".join((action.help or FLAGS.get(names[0], "")).split()).replace("|", "/").replace("%%", "%")
        lines.append(f"| `{names[0]}` | {meaning} | {_default(action).replace('|', '/')} |")
    if parser.deprecated:
        old = ", ".join(f"`{o}` (now `{n}`)" for o, n in sorted(parser.deprecated.items()))
        lines += ["", f"Deprecated spellings: {old}."]
    return [*lines, ""]


def reference() -> str:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    lines = [HEAD]
    for name, parser in sub.choices.items():
        lines += _section(f"`slim2deploy {name}`", parser)
    latency = latency_parser()
    latency.description = (latency.description or "").split("\n\n")[0]
    lines += _section("`python bench/latency.py`", latency)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
