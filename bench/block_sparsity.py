"""Does L1 on gamma alone empty whole residual branches? And what does the block penalty trade for it?

    python bench/block_sparsity.py [--arch resnet20] [--width 0.5] [--limit-train 4000]
        [--epochs 4] [--l1 1e-5,1e-4,1e-3,1e-2] [--block 1e-2,2e-2,5e-2] [--runs baseline,l1,block]

Trains the zoo model on Fashion-MNIST (the first ``--limit-train`` training images, evaluated on the
first ``--eval-limit`` test images) once per setting, from the same initial weights and seed:
the baseline; L1 on every gamma (``--sparsity``) at each of ``--l1`` in both modes (subgradient, the
paper's, and proximal); the block penalty (``--sparsity-block``) at each of ``--block``. For each it
counts the removable residual branches (``prune.trace.branch_groups``) that end with their internal
group wholly below 1e-2 -- removable at a global threshold -- and with it exactly 0, then prunes what
lies below 1e-2 (ratio = the share of prunable channels below it, default rails, depth on) and
evaluates that model without fine-tuning.

``pull`` is how far the penalty alone moves one gamma (L1) or one group's norm (block) over the run:
lambda * sum of the momentum-effective steps lr/(1-momentum). The paper's ResNet recipe (160 epochs of
CIFAR-10 at batch 64, lambda 1e-5) pulls 0.66; a few epochs on a subset pull far less at the same
lambda, which is why larger lambdas are in the table. Prints one Markdown row per run.
"""

from __future__ import annotations

import argparse
import time

import torch

from slim2deploy.model.data import load_dataset
from slim2deploy.model.loop import TrainConfig, evaluate, fit, lr_at
from slim2deploy.model.sparsity import GammaGroup, small_gamma_share
from slim2deploy.model.stats import count_macs
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.select import by_ratio, select
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import branch_groups, trace_groups

THRESHOLD = 1e-2


def total_step(cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Sum over the run of the momentum-effective step lr/(1-momentum), as the loop applies it."""
    steps = [e + s / steps_per_epoch for e in range(cfg.epochs) for s in range(steps_per_epoch)]
    return sum(lr_at(cfg, at) for at in steps) / (1 - cfg.momentum)


def branches(model: torch.nn.Module, groups: list[GammaGroup]) -> tuple[int, int, float]:
    """(groups wholly below the threshold, groups exactly 0, the smallest group's largest |gamma|)."""
    peaks = [float(g.values(model).abs().max()) for g in groups]
    return sum(p < THRESHOLD for p in peaks), sum(p == 0 for p in peaks), min(peaks)


def pruned_at_threshold(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, int, float] | None:
    """The model with what lies below THRESHOLD pruned (ratio = its share of the prunable channels), the
    branches removed, and its MACs over the model's; None when nothing is below it."""
    traced = trace_groups(model, x)
    scores = [s for g in traced.groups if g.prunable for s in g.scores or []]
    share = sum(s < THRESHOLD for s in scores) / max(len(scores), 1)
    if share == 0:
        return None
    plan = select(traced, by_ratio(min(share, 0.99)))
    slim = apply_plan(model, plan)
    return slim, len(plan.removed_branches()), count_macs(slim, x) / count_macs(model, x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--limit-train", type=int, default=4000)
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--l1", default="1e-5,1e-4,1e-3,1e-2", help="lambdas of L1 on every gamma")
    p.add_argument("--block", default="1e-2,2e-2,5e-2", help="lambdas of the block penalty")
    p.add_argument("--runs", default="baseline,l1,block", help="which kinds of run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    train = load_dataset("fashion-mnist", "train").subset(args.limit_train)
    val = load_dataset("fashion-mnist", "val", stats=(train.mean, train.std)).subset(args.eval_limit)
    x = torch.zeros(1, *train.input_shape)
    runs: list[tuple[str, float, str, float]] = []  # label, L1 lambda, mode, block lambda
    kinds = args.runs.split(",")
    if "baseline" in kinds:
        runs.append(("baseline", 0.0, "subgradient", 0.0))
    for lam in [float(v) for v in args.l1.split(",") if v] if "l1" in kinds else []:
        runs += [(f"L1 {mode}", lam, mode, 0.0) for mode in ("subgradient", "proximal")]
    for lam in [float(v) for v in args.block.split(",") if v] if "block" in kinds else []:
        runs.append(("block", 0.0, "subgradient", lam))
    rows = []
    for label, lam, mode, block in runs:
        torch.manual_seed(args.seed)
        model = create_model(args.arch, in_channels=1, num_classes=train.num_classes, width=args.width)
        groups = branch_groups(model, x)
        cfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, sparsity=lam, sparsity_mode=mode,
            sparsity_block=block, seed=args.seed,
        )  # fmt: skip
        started = time.perf_counter()
        fit(model, train, None, cfg, progress=False, blocks=groups if block else (), desc=label)
        seconds = time.perf_counter() - started
        model.eval()
        acc = evaluate(model, val, 256)[1]
        below, zero, smallest = branches(model, groups)
        pull = (lam or block) * total_step(cfg, len(train) // args.batch_size)
        cut = pruned_at_threshold(model, x)
        after = "- | 0 | 1.000" if cut is None else f"{evaluate(cut[0], val, 256)[1]:.2%} | {cut[1]} | {cut[2]:.3f}"
        rows.append(
            f"| {label} | {lam or block:g} | {pull:.3g} | {acc:.2%} | {small_gamma_share(model):.1%} | "
            f"{below} of {len(groups)} | {zero} | {smallest:.2e} | {after} | {seconds:.0f} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\n{args.arch} width {args.width:g}, Fashion-MNIST: first {len(train)} training images, {args.epochs} epochs, "
        f"batch {args.batch_size}, lr {args.lr:g} (step schedule), seed {args.seed}; accuracy on the first "
        f"{len(val)} test images; 'pruned' = what lies below {THRESHOLD:g} removed (default rails, depth on), "
        "no fine-tuning"
    )
    print(
        "| penalty | lambda | pull | top-1 | gamma < 1e-2 | branches < 1e-2 | branches = 0 | smallest branch "
        "max|gamma| | top-1 pruned | branches removed | MACs pruned/full | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
