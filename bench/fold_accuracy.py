"""Accuracy right after pruning (no fine-tuning), with and without folding removed channels'
constant output into the next layer's bias.

    python bench/fold_accuracy.py [--model demo/vgg11-w0.25-sparse.pt] [--limit 2000]

Uses the checkpoint's own dataset (Fashion-MNIST for the demo model) and its test split.
"""

from __future__ import annotations

import argparse

import torch

from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.data import load_dataset
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import select_channels
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups

RAILS = {"paper": {"min_channels": 1, "max_prune": 1.0, "round_to": 1}, "default": {}}


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo/vgg11-w0.25-sparse.pt")
    p.add_argument("--limit", type=int, default=2000, help="test images used")
    p.add_argument("--ratios", default="0.5,0.6,0.7,0.8")
    args = p.parse_args()
    ckpt = load_checkpoint(args.model)
    model = model_from_checkpoint(ckpt)
    stats = (tuple(ckpt.meta["mean"]), tuple(ckpt.meta["std"]))
    ds = load_dataset(ckpt.meta.get("dataset", "fashion-mnist"), "test", stats=stats).subset(args.limit)
    x, y = ds.x, ds.y
    example = x[:1]
    traced = {True: trace_groups(model, example), False: trace_groups(model, example, fold=False)}
    print(f"{args.model}: baseline top-1 {accuracy(model, x, y):.4f} on {len(y)} test images")
    print(f"{'rails':>8} {'ratio':>6} {'params':>9} {'fold':>8} {'no fold':>8}")
    for rails, kw in RAILS.items():
        for ratio in (float(r) for r in args.ratios.split(",")):
            acc = {}
            for fold, structure in traced.items():
                slim = apply_plan(model, select_channels(structure, ratio, **kw))
                acc[fold] = accuracy(slim, x, y)
            n = sum(q.numel() for q in slim.parameters())
            print(f"{rails:>8} {ratio:>6.2f} {n:>9,} {acc[True]:>8.4f} {acc[False]:>8.4f}")


if __name__ == "__main__":
    main()
