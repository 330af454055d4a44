"""slim2deploy profile: a latency table of a model's prunable layers on a target."""

from __future__ import annotations

import argparse

from slim2deploy.cli.flags import (
    add_approximate_arg,
    add_depth_args,
    add_rails_args,
    add_target_args,
    add_trust_arg,
    cache_from_args,
    rails_from_args,
)
from slim2deploy.cli.parser import number
from slim2deploy.cli.rules import CACHE_RULES

ONLY_WHEN = CACHE_RULES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "profile",
        help="measure how the target's latency changes with each channel group's kept count",
        description="For every prunable channel group, time the convolutions and linears it touches at their "
        "real shapes, at every kept count the rails allow, on the target; measure the unpruned model whole "
        "to calibrate the rest. Writes a latency table for 'prune --speedup/--latency-ms --table'. "
        "Measurements are cached per target, device, library versions, batch and precision.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="sparse-trained checkpoint")
    p.add_argument("--out", required=True, metavar="TABLE.json", help="latency table to write")
    add_target_args(p, deprecated_batch=("--batch",))
    g = p.add_argument_group("kept counts to profile (the rails 'prune' will use)")
    add_rails_args(g, round_to_help="1 profiles every count (slow)")
    add_approximate_arg(g, help="also profile the groups 'prune --approximate' may cut (read raw by another layer)")
    add_depth_args(
        g,
        help="also time the model with every removable residual branch removed, so that the table prices removing "
        "one for 'prune --speedup/--latency-ms' (on by default, as pruning with depth is)",
        no_help="a width-only table (for 'prune --no-depth'): it cannot price removing a residual branch",
    )
    p.add_argument(
        "--speedup",
        type=number(above=1),
        default=None,
        metavar="S",
        help="also measure around the solution for this speed-up, so pruning to it later is exact",
    )
    add_trust_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slim2deploy.base.files import check_outputs
    from slim2deploy.pipeline.profile import profile_checkpoint

    check_outputs({"--out": args.out, "--cache": args.cache}, inputs=[args.model], folders=["--cache"])
    table = profile_checkpoint(
        args.model,
        args.out,
        target=args.target,
        batch=args.profile_batch,
        precision=args.profile_precision,
        threads=args.profile_threads,
        rails=rails_from_args(args),
        cache=cache_from_args(args),
        speedup=args.speedup,
        trust_code=args.trust_code,
        input_shape=args.input_shape,
        exact=not args.approximate,
        depth=args.depth,
    )
    print("kept counts where latency steps up (ms in the model at full width):")
    for g, steps in table.staircases().items():
        print(f"  group {g:>3} ({table.sizes[g]:>4} ch): " + "  ".join(f"{k}:{ms:.3g}" for k, ms in steps))
    cells = sum(len(layer.cells) for layer in table.layers)
    print(f"{len(table.layers)} layers, {cells} cells; unpruned {table.full_ms:.4g} ms on {table.describe()}")
    print(f"wrote {args.out}")
    return 0
