"""Every subcommand's --help: each flag explained, its default shown once and as the user types it."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys

import pytest

from slim2deploy.cli import COMMANDS, _module, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_there() -> None:
    assert sorted(_subparsers()) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help(command: str) -> None:
    sp = _subparsers()[command]
    bare = [a.option_strings[0] for a in sp._actions if a.option_strings and not (a.help or "").strip()]
    assert not bare, f"{command}: flags without help text: {bare}"


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_shown_once_and_plainly(command: str) -> None:
    text = _subparsers()[command].format_help()
    # one entry per flag: from its option line to the next one
    entries = re.split(r"\n(?=  -)", text)
    for entry in entries:
        flat = " ".join(entry.split())
        assert flat.lower().count("default") <= 1 or "default:" not in flat, f"{command}: {flat}"
        assert "(default: None)" not in flat and "(default: False)" not in flat, f"{command}: {flat}"
        assert "('" not in flat and "['" not in flat, f"{command}: a Python repr in --help: {flat}"


def test_help_runs_as_a_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "slim2deploy", "build", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "(default: fp32)" in " ".join(out.split())


def test_ignored_flag_rules_name_real_flags() -> None:
    """Each ONLY_WHEN rule (cli.rules.OnlyWhen) names a flag its command has: a typo would never fire."""
    from slim2deploy.cli import latency

    parsers = {**_subparsers(), "bench/latency.py": latency.build_parser()}
    modules = {**{c: importlib.import_module(_module(c)) for c in COMMANDS}, "bench/latency.py": latency}
    for command, parser in parsers.items():
        flags = {s for a in parser._actions for s in a.option_strings}
        missing = [rule.flag for rule in getattr(modules[command], "ONLY_WHEN", ()) if rule.flag not in flags]
        assert not missing, f"{command}: rules for flags it does not have: {missing}"


def test_the_parser_records_every_flag_its_groups_and_exclusive_groups_add() -> None:
    """given_flags reads Parser.arguments, not argparse's private list: both must hold the same flags."""
    for command, parser in _subparsers().items():
        recorded = sorted(s for a in parser.arguments for s in a.option_strings)
        assert recorded == sorted(s for a in parser._actions for s in a.option_strings), command


def test_given_flags_are_the_ones_typed_whatever_their_value() -> None:
    from slim2deploy.cli.rules import given_flags

    train = _subparsers()["train"]
    before = [(a.dest, a.default) for a in train.arguments]
    argv = ["--data", "x.npz", "--out", "t.pt", "--in-memory", "--epochs", str(train.get_default("epochs"))]
    assert given_flags(train, argv) == {"--data", "--out", "--in-memory", "--epochs"}  # a default typed counts
    assert given_flags(train, ["--data", "x.npz", "--out", "t.pt", "--stream"]) == {"--data", "--out", "--stream"}
    assert [(a.dest, a.default) for a in train.arguments] == before  # the parser is left as it was


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["build", "--model", "m.pt", "--ratio", "0.5", "--epochs", "1"], "--epochs: did you mean --finetune-epochs?"),
        (["prune", "--model", "m.pt", "--ratio", "0.5", "--out", "s.pt", "--speedupp", "2"], "did you mean --speedup?"),
        (["train", "--out", "x.pt", "--ratio", "0.5"], None),  # nothing near: no guess
    ],
)
def test_a_flag_the_command_does_not_take_is_named_by_that_command_with_the_nearest_it_does(argv, hint, capsys):
    from slim2deploy.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith(f"slim2deploy {argv[0]}: error: unrecognized arguments: ")
    assert err.endswith(f"(see slim2deploy {argv[0]} --help)")
    assert (hint in err) if hint else "did you mean" not in err


def test_a_missing_data_path_is_said_to_be_missing(tmp_path):
    from slim2deploy.base.errors import SlimError
    from slim2deploy.model.data import load_dataset

    with pytest.raises(SlimError, match=r"no such folder or file: .*nope"):
        load_dataset(str(tmp_path / "nope"))
