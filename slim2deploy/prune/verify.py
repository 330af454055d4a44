"""The surgery's self-check: a slim model that does not run its example input is never handed back.

The slim model runs a random batch of the plan's input shape next to the original; their output
shapes must agree, and where every removed channel is all-zero in the original (its BatchNorms
have gamma = beta = 0, the case the planner's exactness rules are about), so must the outputs. A
removed residual branch counts as all-zero when the gammas its constant was computed with are 0
in the original (beta need not be: the constant includes it).
On a failure, each pruned group is cut alone to find the one to blame, and one ``SlimError``
names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.plan import Group, PruningPlan, copy_group

EXACT_REL_ERR = 1e-4  # float reassociation in a thinner layer moves outputs by ~1e-7 relative

Cut = Callable[[nn.Module, PruningPlan], nn.Module]


def verify_slim(model: nn.Module, slim: nn.Module, plan: PruningPlan, cut: Cut) -> None:
    """Raise ``SlimError`` naming the guilty group unless ``slim`` runs and matches ``model`` where it must."""
    ref = next(iter(model.parameters()), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *plan.input_shape, generator=gen)
    if ref is not None:
        x = x.to(dtype=ref.dtype, device=ref.device)
    want = _outputs(model, x)
    exact = _all_zero_removed(model, plan)
    problem = _compare(want, slim, x, exact)
    if problem is None:
        return
    culprit = _culprit(model, plan, x, cut, want, exact)
    raise SlimError(
        f"the pruned model failed its self-check ({problem}); {culprit}. The model was not pruned. "
        "This is a gap in the planner; please report it with the model code"
    )


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return _tensors(model(x))
    finally:
        for m, training in modes.items():
            m.training = training


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _compare(want: list[torch.Tensor], slim: nn.Module, x: torch.Tensor, exact: bool) -> str | None:
    try:
        got = _outputs(slim, x)
    except Exception as exc:  # noqa: BLE001 - whatever breaks, the user gets one explained error
        return f"it raised {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    shapes_want, shapes_got = [tuple(t.shape) for t in want], [tuple(t.shape) for t in got]
    if shapes_want != shapes_got:
        return f"output shapes {shapes_got} instead of {shapes_want}"
    if exact:
        for a, b in zip(want, got, strict=True):
            err = float((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12))
            if not err <= EXACT_REL_ERR:
                return f"removing all-zero channels changed the outputs (relative error {err:.2e})"
    return None


def _all_zero_removed(model: nn.Module, plan: PruningPlan) -> bool:
    """Every removed channel has gamma = beta = 0 in each of its group's BatchNorms, and every removed
    branch's constant was computed with gammas that are 0 already."""
    for b in plan.removed_branches():
        for gi, names in zip(b.groups, b.gammas, strict=True):
            if plan.groups[gi].keep:
                continue
            for fqn in names:
                gamma = model.get_parameter(fqn)
                if gamma.is_meta or gamma.any():
                    return False
    for g in plan.groups:
        if not g.pruned or not g.keep:
            continue
        bns = [m for m in g.members if m.role == "bn"]
        if not bns or g.approximate:  # a layer reads the group raw: its outputs change by design
            return False
        for m in bns:
            bn: Any = model.get_submodule(m.module)
            if bn.weight.is_meta:
                return False  # a model without values (built on the meta device): shapes only
            idx = torch.tensor(m.indices(g.removed), device=bn.weight.device)
            if bn.weight[idx].any() or (bn.bias is not None and bn.bias[idx].any()):
                return False
    return True


def _culprit(
    model: nn.Module, plan: PruningPlan, x: torch.Tensor, cut: Cut, want: list[torch.Tensor], exact: bool
) -> str:
    for i, g in enumerate(plan.groups):
        if not g.pruned:
            continue
        alone = [h if j == i else _unpruned(h) for j, h in enumerate(plan.groups)]
        try:
            slim = cut(model, _with_groups(plan, alone))
        except Exception as exc:  # noqa: BLE001 - reported with the group it came from
            return f"cutting group {i} ({_name(g)}) alone raised {type(exc).__name__}: {exc}"
        problem = _compare(want, slim, x, exact)
        if problem is not None:
            return f"group {i} ({_name(g)}) alone causes it: {problem}"
    return "no single group causes it, only their combination"


def _unpruned(g: Group) -> Group:
    return copy_group(g, keep=list(range(g.size)))


def _with_groups(plan: PruningPlan, groups: list[Group]) -> PruningPlan:
    clone = PruningPlan.from_dict(plan.to_dict())
    clone.groups = groups
    return clone


def _name(g: Group) -> str:
    return f"{g.size} channels of {', '.join(g.modules())[:120]}"
