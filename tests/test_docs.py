"""The README and docs/ stay true: every command line in them parses, every relative link resolves, the
command reference is what the parsers say, and the README stays short."""

from __future__ import annotations

import re
import shlex

import pytest
from helpers import ROOT

from slim2deploy.cli import build_parser
from slim2deploy.cli.latency import build_parser as latency_parser
from slim2deploy.cli.reference import reference

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "calib" / "README.md"]
README_MAX_LINES = 220


def _command_lines(text: str) -> list[str]:
    """The shell command lines of a page's code blocks, continuation lines joined, comments dropped."""
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _invocations() -> list[tuple[str, list[str]]]:
    """Every ``slim2deploy ...`` and ``python bench/latency.py ...`` line in the pages, as argv."""
    found = []
    for page in PAGES:
        for line in _command_lines(page.read_text()):
            words = shlex.split(line)
            if "slim2deploy" in words and words[0] in ("slim2deploy", "torchrun", "python", "python3"):
                argv = words[words.index("slim2deploy") + 1 :]
                if argv and not argv[0].startswith("-") and argv[0] != "slim2deploy":
                    found.append((f"{page.name}: {line}", ["slim2deploy", *argv]))
            elif len(words) > 1 and words[1] == "bench/latency.py":
                found.append((f"{page.name}: {line}", ["latency", *words[2:]]))
    return found


INVOCATIONS = _invocations()


def test_the_pages_have_commands_to_check() -> None:
    assert len(INVOCATIONS) > 20 and any(argv[0] == "latency" for _, argv in INVOCATIONS)


@pytest.mark.parametrize(("where", "argv"), INVOCATIONS, ids=[w[:90] for w, _ in INVOCATIONS])
def test_every_command_line_in_the_docs_parses(where: str, argv: list[str], capsys) -> None:
    parser = latency_parser() if argv[0] == "latency" else build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}\n{capsys.readouterr().err}")
    own = getattr(args, "_parser", parser)
    used = [w.split("=")[0] for w in argv[1:] if w.startswith("--")]
    old = [w for w in used if w in own.deprecated]
    assert not old, f"{where}: deprecated spellings {old}"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_command_reference_is_what_the_parsers_say() -> None:
    written = (ROOT / "docs" / "commands.md").read_text()
    assert written == reference(), "docs/commands.md is stale: python -m slim2deploy.cli.reference > docs/commands.md"


def test_the_readme_stays_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"
