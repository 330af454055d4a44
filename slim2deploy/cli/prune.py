"""slim2deploy prune: one global |gamma| threshold, rails, real channel surgery."""

from __future__ import annotations

import argparse

from slim2deploy.cli.flags import add_selection_args, add_target_args, add_trust_arg, selection_from_args
from slim2deploy.cli.rules import BUDGET_RULES

ONLY_WHEN = BUDGET_RULES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prune",
        help="remove the channels with the smallest BatchNorm gammas (a dense, thinner model)",
        description="Trace the model, group the channels that must be pruned together, remove the "
        "fraction RATIO of them with the smallest |gamma| under one global threshold (Network Slimming), "
        "cut them out and save architecture + plan + slim weights. Prints the per-layer table. "
        "With --speedup or --latency-ms instead of --ratio: profile the layers on --target (or reuse "
        "--table), keep the most |gamma| whose predicted latency fits, then measure the slim model on the "
        "target against the unpruned one and tighten (or widen) until it fits (--tries). With --depth (the "
        "default) a residual branch goes whole where the selection empties one of its groups.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="sparse-trained checkpoint")
    p.add_argument("--out", required=True, metavar="SLIM.pt", help="pruned checkpoint to write")
    add_selection_args(p)
    add_target_args(p)
    p.add_argument("--plan-json", default=None, metavar="FILE", help="also write the plan as JSON")
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import atomic_write_text, check_outputs
    from slim2deploy.pipeline.budget import prune_selected

    check_outputs(
        {"--out": args.out, "--plan-json": args.plan_json, "--save-table": args.save_table, "--cache": args.cache},
        inputs=[args.model, args.table],
        folders=["--cache"],
    )
    pruned = prune_selected(
        args.model,
        args.out,
        selection_from_args(args),
        fold=not args.no_fold,
        exact=not args.approximate,
        trust_code=args.trust_code,
        input_shape=args.input_shape,
        table_out=args.save_table,
    )
    args._parser.say(pruned.summary)  # the library names parameters; a user of prune, its flags
    if args.plan_json:
        atomic_write_text(args.plan_json, pruned.plan.to_json())
    print(f"wrote {args.out}")
    return 0
