"""The `slim2deploy` command: a thin layer that parses flags and calls the library.

Each subcommand lives in its own module here with two functions:
``add_parser(subparsers)`` declares its flags and ``run(args) -> int`` calls the library;
an optional ``ONLY_WHEN`` table names the flags that do nothing next to some others (refused).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from slim2deploy.base.errors import SlimError, one_line
from slim2deploy.base.interrupts import TERMINATED_STATUS, Terminated, sigterm_as_interrupt
from slim2deploy.cli.parser import HelpFormatter, Parser
from slim2deploy.cli.rules import refuse_ignored_flags

# Order is the order shown in --help: the pipeline, first to last.
COMMANDS = ["import", "train", "inspect", "profile", "prune", "finetune", "calib", "export", "build"]
# A command whose name is a Python keyword lives in a module named otherwise.
MODULES = {"import": "import_model"}


def _module(name: str) -> str:
    return f"slim2deploy.cli.{MODULES.get(name, name)}"


def _available_commands() -> list[str]:
    return [name for name in COMMANDS if importlib.util.find_spec(_module(name)) is not None]


def build_parser() -> Parser:
    parser = Parser(
        prog="slim2deploy",
        description="Network Slimming for deployment: sparse-train, prune channels for real, "
        "export ONNX (fp32/fp16/int8) and TensorRT engines, and benchmark against the baseline.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _available_commands():
        module = importlib.import_module(_module(name))
        p = module.add_parser(sub)
        p.formatter_class = HelpFormatter
        p.set_defaults(_run=module.run, _parser=p, _only_when=getattr(module, "ONLY_WHEN", ()))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slim2deploy")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        own_parser = getattr(args, "_parser", parser)
        own_parser.error(own_parser.unrecognized(extra))
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    # the subcommand's own flags follow its name (the top level takes only --help and --version)
    own = argv[argv.index(args.command) + 1 :]
    args._parser.note_deprecated(own)
    try:
        with sigterm_as_interrupt():  # kill cleans up as Ctrl-C does: temporary files, locks, workers
            refuse_ignored_flags(args._parser, own, args, args._only_when)
            return int(args._run(args) or 0)
    except SlimError as exc:
        print(f"slim2deploy {args.command}: error: {one_line(args._parser.in_flags(str(exc)))}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return TERMINATED_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_loader_workers()


def stop_loader_workers() -> None:
    """Streamed folders' DataLoader workers stop when the command ends, also when it runs inside a longer
    process (the Python API, the tests): left to the garbage collector, torch waits 5 s for each."""
    folder = sys.modules.get("slim2deploy.model.folder")  # loaded only if a command read a folder
    if folder is not None:
        folder.close_loaders()


if __name__ == "__main__":
    sys.exit(main())
