"""slim2deploy inspect: params, MACs, prunable share and BatchNorm-gamma statistics of a checkpoint."""

from __future__ import annotations

import argparse
import json

from slim2deploy.cli.flags import add_trust_arg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect",
        help="params, MACs, prunable share and gamma statistics per BatchNorm and per residual block",
        description="Print params, MACs, the share of BatchNorm-scored channels the planner can prune "
        "(with each unprunable structure and why), per removable residual block the |gamma| of its inner group "
        "(count, max, share below 1e-2, whether a global threshold at 1e-2 removes the block now), and "
        "per-BatchNorm |gamma| statistics (count, share below 1e-2 and 1e-3, min/median/max) of a checkpoint; "
        "warn when the gammas say nothing (not sparse-trained).",
    )
    p.add_argument("--model", metavar="CKPT", default=None, help="a slim2deploy checkpoint (.pt)")
    # the checkpoint was positional before --model; kept for one release
    p.add_argument("checkpoint", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="write a |gamma| histogram per residual block and per layer"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from slim2deploy.base.errors import SlimError
    from slim2deploy.base.files import atomic_write_text, check_outputs
    from slim2deploy.model.checkpoint import load_checkpoint, with_input_shape
    from slim2deploy.pipeline.inspect import inspect_checkpoint, plot_gammas

    if args.checkpoint is not None:
        if args.model is not None:
            raise SlimError("give the checkpoint once, with --model")
        print("note: 'inspect CKPT' is deprecated, use 'inspect --model CKPT'", file=sys.stderr)
    path = args.model or args.checkpoint
    if path is None:
        raise SlimError("give the checkpoint to inspect: --model CKPT")
    check_outputs({"--json": args.json, "--plot": args.plot}, inputs=[path])
    ckpt = with_input_shape(load_checkpoint(path, trust_code=args.trust_code), args.input_shape, path)
    info = inspect_checkpoint(ckpt, trust_code=args.trust_code)
    args._parser.say(info.table())
    if args.json:
        atomic_write_text(args.json, json.dumps(info.to_dict(), indent=2, default=str))
    if args.plot:
        print(f"wrote {plot_gammas(ckpt, args.plot, trust_code=args.trust_code, blocks=info.blocks)}")
    return 0
