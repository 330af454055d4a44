"""slim2deploy prune: one global |gamma| threshold, rails, real channel surgery."""

from __future__ import annotations

import argparse

from slim2deploy.cli.common import add_trust_arg
from slim2deploy.plan import DEFAULT_MAX_PRUNE, DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prune",
        help="remove the channels with the smallest BatchNorm gammas (a dense, thinner model)",
        description="Trace the model, group the channels that must be pruned together, remove the "
        "fraction RATIO of them with the smallest |gamma| under one global threshold (Network Slimming), "
        "cut them out and save architecture + plan + slim weights. Prints the per-layer table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="sparse-trained checkpoint")
    p.add_argument("--ratio", type=float, required=True, help="fraction of prunable channels to remove, in (0, 1)")
    p.add_argument("--out", required=True, metavar="SLIM.pt", help="pruned checkpoint to write")
    g = p.add_argument_group("rails (--min-channels 1 --max-prune 1 --round-to 1: the paper exactly)")
    g.add_argument("--min-channels", type=int, default=DEFAULT_MIN_CHANNELS, help="keep at least this many per group")
    g.add_argument("--max-prune", type=float, default=DEFAULT_MAX_PRUNE, help="remove at most this fraction of a group")
    g.add_argument(
        "--round-to",
        type=int,
        default=DEFAULT_ROUND_TO,
        help="round kept channel counts up to a multiple of this (fast kernels want 8 or 32)",
    )
    g.add_argument(
        "--no-fold",
        action="store_true",
        help="do not fold removed channels' constant output into the next layer's bias",
    )
    p.add_argument("--plan-json", default=None, metavar="FILE", help="also write the plan as JSON")
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.fileio import atomic_write_text
    from slim2deploy.surgery import prune_checkpoint

    plan, table = prune_checkpoint(
        args.model,
        args.out,
        args.ratio,
        min_channels=args.min_channels,
        max_prune=args.max_prune,
        round_to=args.round_to,
        fold=not args.no_fold,
        trust_code=args.trust_pickle,
    )
    print(table)
    if args.plan_json:
        atomic_write_text(args.plan_json, plan.to_json())
    print(f"wrote {args.out}")
    return 0
