"""The plan summary: per-layer channels, params and MACs before -> after, totals, removed residual
branches, unprunable groups and residual joins that cannot be removed."""

from __future__ import annotations

import torch
from torch import nn

from slim2deploy.model.stats import count_params, layer_costs
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.surgery import apply_plan


def summarize(plan: PruningPlan, model: nn.Module, example_input: torch.Tensor, slim: nn.Module | None = None) -> str:
    """Per-layer table (channels, params, MACs before -> after), totals and unprunable groups.

    ``slim`` is ``apply_plan(model, plan)`` if already at hand.
    """
    slim = slim if slim is not None else apply_plan(model, plan)
    before = layer_costs(model, example_input)
    after = {c.name: c for c in layer_costs(slim, example_input)}
    width = max([len(c.name) for c in before] + [5])
    lines = [f"{'layer':<{width}}  {'channels':>11}  {'params':>21}  {'MACs':>25}"]
    for c in before:
        a = after.get(c.name)
        if a is None:  # replaced with its removed branch
            lines.append(
                f"{c.name:<{width}}  {c.out_shape[0]:>5}->{'-':<5}  {c.params:>10,}->{0:<10,}  {c.macs:>12,}->{0:<12,}"
            )
            continue
        lines.append(
            f"{c.name:<{width}}  {c.out_shape[0]:>5}->{a.out_shape[0]:<5}  "
            f"{c.params:>10,}->{a.params:<10,}  {c.macs:>12,}->{a.macs:<12,}"
        )
    p0, p1 = count_params(model), count_params(slim)
    m0, m1 = sum(c.macs for c in before), sum(c.macs for c in after.values())
    lines.append(
        f"{'total':<{width}}  {'':>11}  {p0:>10,}->{p1:<10,}  {m0:>12,}->{m1:<12,}"
        f"  (params -{_pct(p0, p1)}, MACs -{_pct(m0, m1)})"
    )
    n_prunable = sum(g.prunable for g in plan.groups)
    lines.append(
        f"groups: {len(plan.groups)}, prunable {n_prunable}, pruned {sum(g.pruned for g in plan.groups)}; "
        f"channels removed {plan.removed_channels} of {plan.prunable_channels} prunable"
        + (f" (ratio {plan.ratio}, threshold {plan.threshold:.4g})" if plan.threshold is not None else "")
        + f"; rails: min_channels={plan.min_channels} max_prune={plan.max_prune} round_to={plan.round_to}"
    )
    if plan.new_biases:
        lines.append(f"removed channels' constant output folded into {len(plan.new_biases)} new bias(es)")
    lines += removed_lines(plan, len({c.name for c in before}), len(after))
    lines += coverage_lines(plan)
    lines += [n if n.startswith("warning:") else f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def removed_lines(plan: PruningPlan, layers_before: int, layers_after: int) -> list[str]:
    """How many residual blocks the plan removes, and each one's join, groups and replaced layers."""
    gone = plan.removed_branches()
    removable = [b for b in plan.branches if b.removable]
    if not removable:
        return []
    lines = [
        f"blocks removed: {len(gone)} of {len(removable)} removable residual branches; "
        f"conv/linear layers {layers_before} -> {layers_after}"
    ]
    for b in gone:
        emptied = [i for i in b.groups if not plan.groups[i].keep]
        lines.append(
            f"  {b.join}: group(s) {', '.join(map(str, emptied))} emptied; constant from {', '.join(b.const)}; "
            f"{len(b.skip)} more layer(s) skipped"
        )
    return lines


def coverage_lines(plan: PruningPlan) -> list[str]:
    """The share of BatchNorm-scored channels that are prunable, each unprunable group with its reason,
    the removable residual branches, and each residual join that cannot be removed with its reason."""
    prunable, scored = plan.coverage()
    share = f"{100.0 * prunable / scored:.1f}%" if scored else "n/a"
    lines = [f"prunable: {prunable} of {scored} BatchNorm-scored channels ({share})"]
    unpr = plan.unprunable()
    if unpr:
        lines.append(f"unprunable groups ({len(unpr)}):")
        for g, why in unpr:
            lines.append(f"  {g.size:>5} ch  {', '.join(g.modules())[:70]}: {why}")
    approx = [g for g in plan.groups if g.prunable and g.approximate]
    if approx:
        cut = [g for g in approx if g.pruned]
        lines.append(
            f"approximate (`approximate=True`): {len(approx)} group(s) read raw by another layer, "
            f"{len(cut)} of them cut" + ("; the outputs change, so fine-tune:" if cut else ":")
        )
        for g in approx:
            lines.append(f"  {g.size:>5} ch  {', '.join(g.modules())[:70]}: {g.approximate[0]}")
    return lines + branch_lines(plan)


def branch_lines(plan: PruningPlan, shown: int = 12) -> list[str]:
    """Removable residual branches (depth) and the joins that cannot be removed, with why."""
    if not plan.branches:
        return []
    removable = [b for b in plan.branches if b.removable]
    fixed = [b for b in plan.branches if not b.removable]
    lines = [f"removable residual branches: {len(removable)} of {len(plan.branches)} joins"]
    for b in removable[:shown]:
        lines.append(f"  {b.join}: groups {', '.join(map(str, b.groups))}; {len(b.modules())} layer(s) to replace")
    if len(removable) > shown:
        lines.append(f"  ... and {len(removable) - shown} more")
    if fixed:
        lines.append(f"not removable ({len(fixed)}):")
        for b in fixed[:shown]:
            lines.append(f"  {b.join}: {b.reason}")
        if len(fixed) > shown:
            lines.append(f"  ... and {len(fixed) - shown} more")
    return lines


def _pct(a: int, b: int) -> str:
    return f"{100.0 * (a - b) / a:.1f}%" if a else "0%"
