"""What is in a checkpoint: size, cost, and how sparse its BatchNorm gammas are (per layer and per
removable residual block)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_path
from slim2deploy.model.checkpoint import Checkpoint
from slim2deploy.model.sparsity import GammaStats, all_gammas, bn_layers, gamma_stats
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.score import gamma_warning
from slim2deploy.prune.summary import coverage_lines
from slim2deploy.prune.trace import groups_in_branches, trace_groups

SMALL = 1e-2  # "near zero": what the gamma tables count and a global threshold there would remove


@dataclass
class BlockStats:
    """|gamma| of one group inside a removable residual branch: all below ``SMALL``, a threshold there
    empties the group and removes the branch (``removable``: "exact" when all are 0, so removing it changes
    nothing; "< 1e-2"; or "no")."""

    block: str
    count: int
    max: float
    below_1e2: float
    removable: str
    gammas: list[float]  # |gamma| of the group's channels, for the histogram

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def block_stats(model: torch.nn.Module, traced: PruningPlan) -> list[BlockStats]:
    """One ``BlockStats`` per group inside a removable residual branch of ``traced`` (``model`` traced)."""
    rows = []
    for group in groups_in_branches(traced):
        g = group.values(model).abs().float().cpu()
        peak = float(g.max())
        state = "exact" if peak == 0 else "< 1e-2" if peak < SMALL else "no"
        rows.append(BlockStats(group.name, g.numel(), peak, float((g < SMALL).float().mean()), state, g.tolist()))
    return rows


@dataclass
class Inspection:
    arch: str
    arch_kwargs: dict[str, Any]
    input_shape: tuple[int, int, int]
    params: int
    macs: int
    pruned: bool
    gammas: list[GammaStats] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)
    removed_blocks: list[str] = field(default_factory=list)  # joins of the residual branches pruning removed
    layers: list[int] = field(default_factory=list)  # a pruned checkpoint's conv/linear layers: [unpruned, now]
    blocks: list[BlockStats] = field(default_factory=list)  # the removable ones left

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "input_shape": list(self.input_shape),
            "params": self.params,
            "macs": self.macs,
            "pruned": self.pruned,
            "gammas": [g.to_dict() for g in self.gammas],
            "meta": self.meta,
            "coverage": self.coverage,
            "removed_blocks": self.removed_blocks,
            "layers": self.layers,
            "blocks": [b.to_dict() for b in self.blocks],
        }

    def table(self) -> str:
        lines = [
            f"model      {self.arch} {self.arch_kwargs}{'  (pruned)' if self.pruned else ''}",
            f"input      {'x'.join(map(str, self.input_shape))}",
            f"params     {self.params:,}",
            f"MACs       {self.macs:,}  (per image; FLOPs ~ 2 x MACs)",
        ]
        for key in ("dataset", "epochs", "val_acc", "small_gamma_share"):
            if key in self.meta:
                lines.append(f"{key:<10} {self.meta[key]}")
        if self.layers:
            lines.append(f"layers     {self.layers[1]} convolutions and linears (unpruned: {self.layers[0]})")
        if self.removed_blocks:
            shown = ", ".join(self.removed_blocks[:6]) + (", ..." if len(self.removed_blocks) > 6 else "")
            lines.append(f"removed    {len(self.removed_blocks)} residual block(s): {shown}")
        lines += ["", *self.coverage.get("lines", [])]
        if self.blocks:
            w = max(len("removable residual block"), *(len(b.block) for b in self.blocks))
            lines += ["", f"{'removable residual block':<{w}}  {'count':>6}  {'max':>9}  {'<1e-2':>6}  removable now"]
            for b in self.blocks:
                lines.append(f"{b.block:<{w}}  {b.count:>6}  {b.max:>9.2e}  {b.below_1e2:>6.1%}  {b.removable}")
            ready = sum(b.removable != "no" for b in self.blocks)
            lines.append(f"{ready} of {len(self.blocks)} removable at a global threshold of 1e-2 now")
        if self.gammas:
            w = max(len(g.layer) for g in self.gammas)
            lines.append("")
            lines.append(
                f"{'BatchNorm':<{w}}  {'count':>6}  {'<1e-2':>6}  {'<1e-3':>6}  {'min':>9}  {'median':>9}  {'max':>9}"
            )
            for g in self.gammas:
                lines.append(
                    f"{g.layer:<{w}}  {g.count:>6}  {g.below_1e2:>6.1%}  {g.below_1e3:>6.1%}  "
                    f"{g.min:>9.2e}  {g.median:>9.2e}  {g.max:>9.2e}"
                )
            total = sum(g.count for g in self.gammas)
            s2 = sum(g.below_1e2 * g.count for g in self.gammas) / total
            s3 = sum(g.below_1e3 * g.count for g in self.gammas) / total
            lines.append(f"{'all':<{w}}  {total:>6}  {s2:>6.1%}  {s3:>6.1%}")
        return "\n".join(lines)


def inspect_checkpoint(ckpt: Checkpoint, *, trust_code: bool = False) -> Inspection:
    model = model_from_checkpoint(ckpt, trust_code=trust_code)
    shape = ckpt.input_shape if all(ckpt.input_shape) else (3, 224, 224)
    x = torch.zeros(1, *shape)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("train_config", "versions", "classes")}
    plan = PruningPlan.from_dict(ckpt.plan) if ckpt.plan is not None else None
    coverage, traced = planner_coverage(model, x)
    return Inspection(
        ckpt.arch,
        ckpt.arch_kwargs,
        shape,
        count_params(model),
        count_macs(model, x),
        ckpt.is_pruned,
        gamma_stats(model),
        meta,
        coverage,
        [b.join for b in plan.removed_branches()] if plan is not None else [],
        _layers(ckpt, model) if plan is not None and ckpt.module is None else [],
        block_stats(model, traced) if traced is not None else [],
    )


def _layers(ckpt: Checkpoint, slim: torch.nn.Module) -> list[int]:
    """Convolutions and linears of the architecture unpruned and of ``slim`` (a removed branch's are gone)."""
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    unpruned = create_model(ckpt.arch, **ckpt.arch_kwargs)
    return [sum(isinstance(m, kinds) for m in net.modules()) for net in (unpruned, slim)]


def planner_coverage(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], PruningPlan | None]:
    """How much of the model the planner can prune: the share of BatchNorm-scored channels in
    prunable groups, every unprunable group with its reason, and the residual joins, removable or
    why not (a model it cannot trace says why); and the traced plan (None then)."""
    try:
        traced = trace_groups(model, x)
    except SlimError as exc:
        return {"error": str(exc), "lines": [f"prunable: unknown, the model could not be traced: {exc}"]}, None
    prunable, scored = traced.coverage()
    weak = gamma_warning(traced.groups)
    return {
        "prunable_channels": prunable,
        "scored_channels": scored,
        "unprunable": [{"channels": g.size, "modules": g.modules(), "reason": why} for g, why in traced.unprunable()],
        "gamma_warning": weak,
        "branches": [{"join": b.join, "groups": b.groups, "reason": b.reason} for b in traced.branches],
        "lines": coverage_lines(traced) + ([f"warning: {weak}"] if weak else []),
    }, traced


def plot_gammas(
    ckpt: Checkpoint, out: str | Path, *, trust_code: bool = False, blocks: Sequence[BlockStats] | None = None
) -> Path:
    """One |gamma| histogram per removable residual block (``blocks``; None: traced here) and per BatchNorm
    layer (log-spaced bins), plus one over all layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    model = model_from_checkpoint(ckpt, trust_code=trust_code)
    if blocks is None:
        shape = ckpt.input_shape if all(ckpt.input_shape) else (3, 224, 224)
        traced = planner_coverage(model, torch.zeros(1, *shape))[1]  # a model that cannot be traced has none
        blocks = block_stats(model, traced) if traced is not None else []
    panels = [("all layers", all_gammas(model), "tab:blue")]
    panels += [(f"block: {b.block}", torch.tensor(b.gammas), "tab:orange") for b in blocks]
    panels += [(name, bn.weight.detach().abs(), "tab:blue") for name, bn in bn_layers(model)]
    cols = min(6, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False)
    bins = torch.logspace(-6, 1, 36).numpy()
    for ax, (name, g, color) in zip(axes.flat, panels, strict=False):
        ax.hist(g.clamp(min=1e-6).numpy(), bins=bins, color=color)
        ax.set_xscale("log")
        # four labelled ticks and no minor ones: drawing log ticks is most of the time on a panel
        ax.xaxis.set_major_locator(FixedLocator([1e-6, 1e-4, 1e-2, 1.0]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.axvline(SMALL, color="tab:red", lw=0.8)
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"|gamma| per removable residual block (orange) and per BatchNorm ({ckpt.arch}); red line: 1e-2", fontsize=9
    )
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.02 + 0.1 / rows, top=1 - 0.35 / rows, hspace=0.6, wspace=0.3)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out)
