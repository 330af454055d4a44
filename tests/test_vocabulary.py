"""One vocabulary: the same flag for the same meaning in every command and in bench/latency.py."""

from __future__ import annotations

import argparse
import re

import pytest
from helpers import ROOT, run_main

from slim2deploy.cli import build_parser
from slim2deploy.cli.latency import build_parser as latency_parser
from slim2deploy.cli.parser import Parser
from slim2deploy.cli.vocabulary import FLAGS


def _parsers() -> dict[str, Parser]:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {**dict(sub.choices), "bench/latency.py": latency_parser()}


def _flags(parser: Parser) -> list[tuple[str, argparse.Action]]:
    return [(s, a) for a in parser.arguments for s in a.option_strings if s not in parser.deprecated and s != "-h"]


def _kind(action: argparse.Action) -> tuple[str, str, str, object]:
    """How a flag is parsed: what it stores into, as what kind of action, through which type, how many values."""
    return action.dest, type(action).__name__, getattr(action.type, "__name__", str(action.type)), action.nargs


def test_every_flag_is_in_the_vocabulary() -> None:
    missing = {
        f"{cmd} {flag}" for cmd, p in _parsers().items() for flag, _ in _flags(p) if flag not in {*FLAGS, "--help"}
    }
    assert not missing, f"flags without a registered meaning (add them to cli/vocabulary.py): {sorted(missing)}"


def test_one_meaning_one_flag() -> None:
    meanings: dict[str, str] = {}
    for flag, meaning in FLAGS.items():
        assert meaning not in meanings, f"{flag} and {meanings[meaning]} are registered with one meaning"
        meanings[meaning] = flag
    used = {flag for p in _parsers().values() for flag, _ in _flags(p)}
    assert not set(FLAGS) - used, f"registered but used nowhere: {sorted(set(FLAGS) - used)}"


def test_a_flag_is_parsed_the_same_way_in_every_command() -> None:
    seen: dict[str, tuple[str, tuple[str, str, str, object]]] = {}
    for cmd, parser in _parsers().items():
        for flag, action in _flags(parser):
            kind = _kind(action)
            if flag in seen:
                other, want = seen[flag]
                assert kind == want, f"{flag} is {kind} in {cmd} but {want} in {other}"
            else:
                seen[flag] = (cmd, kind)


def test_deprecated_spellings_point_at_flags_the_command_has_and_are_hidden() -> None:
    for cmd, parser in _parsers().items():
        help_text = parser.format_help()
        for old, new in parser.deprecated.items():
            assert new in dict(_flags(parser)), f"{cmd}: {old} is an alias of {new}, which it does not have"
            assert re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", help_text) is None, f"{cmd} --help shows {old}"


@pytest.mark.parametrize(
    ("argv", "dest", "value", "note"),
    [
        (["profile", "--model", "m.pt", "--out", "t.json", "--batch", "8"], "profile_batch", 8, "--profile-batch"),
        (["inspect", "--model", "m.pt", "--trust-pickle"], "trust_code", True, "--trust-code"),
        (["train", "--out", "t.pt", "--limit-val", "5"], "eval_limit", 5, "--eval-limit"),
        (["export", "--model", "m.pt", "--out", "m.onnx", "--eval-n", "7"], "eval_limit", 7, "--eval-limit"),
    ],
)
def test_old_spellings_still_parse_and_say_so(argv, dest, value, note, capsys) -> None:
    top = build_parser()
    args = top.parse_args(argv)
    assert getattr(args, dest) == value
    args._parser.note_deprecated(argv[1:])
    err = capsys.readouterr().err
    assert f"use {note}" in err and len(err.strip().splitlines()) == 1


def test_library_parameters_become_the_commands_flags_in_errors() -> None:
    p = _parsers()["finetune"]
    assert p.in_flags("lower `batch_size` or give `image_size`") == "lower --batch-size or give --image-size"
    build = _parsers()["build"]  # build has no --image-size: the parameter keeps its bare name, no invented flag
    assert build.in_flags("give `image_size`") == "give image_size"


def test_a_deprecated_flag_works_through_the_command_line(tmp_path) -> None:
    out = run_main("inspect", "--model", str(ROOT / "demo" / "vgg11-w0.25-sparse.pt"), "--trust-pickle")
    assert out.returncode == 0, out.stderr
    assert "--trust-pickle is deprecated, use --trust-code" in out.stderr
