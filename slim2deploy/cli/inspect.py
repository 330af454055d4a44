"""slim2deploy inspect: params, MACs, prunable share and BatchNorm-gamma statistics of a checkpoint."""

from __future__ import annotations

import argparse
import json

from slim2deploy.cli.common import add_trust_arg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect",
        help="params, MACs, prunable share and per-BatchNorm gamma statistics of a checkpoint",
        description="Print params, MACs, the share of BatchNorm-scored channels the planner can prune "
        "(with each unprunable structure and why), and per-BatchNorm |gamma| statistics (count, share "
        "below 1e-2 and 1e-3, min/median/max) of a checkpoint.",
    )
    p.add_argument("checkpoint", help="a slim2deploy checkpoint (.pt)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a |gamma| histogram per layer")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import atomic_write_text, check_outputs
    from slim2deploy.model.checkpoint import load_checkpoint, with_input_shape
    from slim2deploy.pipeline.inspect import inspect_checkpoint, plot_gammas

    check_outputs({"--json": args.json, "--plot": args.plot}, inputs=[args.checkpoint])
    ckpt = with_input_shape(
        load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle), args.input_shape, args.checkpoint
    )
    info = inspect_checkpoint(ckpt, trust_code=args.trust_pickle)
    print(info.table())
    if args.json:
        atomic_write_text(args.json, json.dumps(info.to_dict(), indent=2, default=str))
    if args.plot:
        print(f"wrote {plot_gammas(ckpt, args.plot, trust_code=args.trust_pickle)}")
    return 0
