"""Plan + surgery time for torchvision resnet50 at 224x224 on this machine (goal: under 10 s).

    python bench/plan_time.py [--model resnet50] [--size 224] [--ratio 0.5] [--repeats 3]

Prints the best of ``--repeats`` for each stage: tracing (torch.export + grouping), choosing
channels, surgery (deep copy, bias folding, slicing), and their sum.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from slim2deploy.prune.select import select_channels
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="torchvision classifier name")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = torchvision.models.get_model(args.model, weights=None).eval()
    with torch.no_grad():  # distinct gammas, so the threshold is not decided by ties
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.0, 1.0)
    x = torch.randn(1, 3, args.size, args.size)
    best = {"trace": float("inf"), "select": float("inf"), "surgery": float("inf")}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        traced = trace_groups(model, x)
        t1 = time.perf_counter()
        plan = select_channels(traced, args.ratio)
        t2 = time.perf_counter()
        slim = apply_plan(model, plan)
        t3 = time.perf_counter()
        for key, dt in (("trace", t1 - t0), ("select", t2 - t1), ("surgery", t3 - t2)):
            best[key] = min(best[key], dt)
    params = (sum(q.numel() for q in model.parameters()), sum(q.numel() for q in slim.parameters()))
    print(
        f"{args.model} {args.size}x{args.size}, ratio {args.ratio}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; best of {args.repeats}"
    )
    print(
        f"groups {len(plan.groups)} (prunable {sum(g.prunable for g in plan.groups)}), "
        f"channels removed {plan.removed_channels}/{plan.prunable_channels}, params {params[0]:,} -> {params[1]:,}"
    )
    for key, dt in best.items():
        print(f"{key:>8}: {dt:6.2f} s")
    print(f"{'total':>8}: {sum(best.values()):6.2f} s  (goal < 10 s)")


if __name__ == "__main__":
    main()
