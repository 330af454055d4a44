"""Plans are validated as data: an edited or damaged plan gets one clear error, never a traceback;
and ``apply_plan`` never returns a model that cannot run its example input."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import traced
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.select import select_channels
from slim2deploy.prune.surgery import apply_plan, cut
from slim2deploy.prune.trace import trace_groups


@functools.cache
def _plan_json() -> str:
    _, _, structure = traced("resnet20")
    return select_channels(structure, 0.5).to_json()


def _plan() -> dict[str, Any]:
    """A plan of resnet20 at ratio 0.5, as data: the caller's own copy."""
    return json.loads(_plan_json())


def _edit(d: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


_DELETE = object()

EDITS = [
    (["bogus"], 1, "unknown field"),
    (["groups", 0, "colour"], "red", "unknown field"),
    (["groups", 0, "size"], _DELETE, "lacks the field"),
    (["groups", 0, "members", 0, "tensor"], _DELETE, "lacks the field"),
    (["groups", 0, "members", 0, "role"], "sideways", "role must be one of"),
    (["groups", 0, "members", 0, "dim"], 7, "out of range"),
    (["groups", 0, "members", 0, "dim"], "0", "dim must be an integer"),
    (["groups", 0, "members", 0, "start"], -1, "start must be an integer >= 0"),
    (["groups", 0, "members", 0, "start"], 10_000, "do not fit"),
    (["groups", 0, "members", 0, "tensor"], "no.such.weight", "not among the plan's tensor_shapes"),
    (["groups", 0, "keep"], [0, 0, 1], "repeated or outside"),
    (["groups", 0, "keep"], [10_000], "repeated or outside"),
    (["groups", 0, "keep"], [], "keeps no channel"),
    (["groups", 0, "keep"], [0.5], "keep must be a list of integers"),
    (["groups", 0, "scores"], [1.0], "scores for"),
    (["groups", 0], "group", "groups must be a list of mappings"),
    (["input_shape"], [3, -28, 28], "below 1"),
    (["input_shape"], [3, 28.5, 28], "input_shape must be a list of integers"),
    (["tensor_shapes", "conv1.weight"], [-1, 3, 3, 3], "negative shape"),
    (["fold"], "yes", "fold must be true or false"),
    (["ratio"], "half", "ratio must be a number"),
    (["groups"], {}, "groups must be a list"),
]


@pytest.mark.parametrize(("path", "value", "message"), EDITS, ids=[".".join(map(str, p)) for p, _, _ in EDITS])
def test_an_edited_plan_gets_one_clear_error(path: list[Any], value: Any, message: str) -> None:
    bad = _edit(_plan(), path, value)
    with pytest.raises(SlimError, match=message) as info:
        PruningPlan.from_json(json.dumps(bad))
    assert "edited or damaged" in str(info.value) or "not a pruning plan" in str(info.value)


JUNK = st.sampled_from([None, -3, 0, 2.5, "x", [], {}, [1, 2], True, 10**9, _DELETE])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_damage_never_escapes_as_another_exception(data: st.DataObject) -> None:
    """Random edits of random fields: either the plan still loads, or one SlimError says why."""
    good = _plan()
    target: Any = good
    path: list[Any] = []
    while isinstance(target, (dict, list)) and target:  # walk down to the field to damage
        key = data.draw(
            st.sampled_from(sorted(target)) if isinstance(target, dict) else st.integers(0, len(target) - 1)
        )
        path.append(key)
        if not isinstance(target[key], (dict, list)) or data.draw(st.booleans(), label="stop here"):
            break
        target = target[key]
    if path:
        try:
            PruningPlan.from_dict(_edit(good, path, data.draw(JUNK, label="value")))
        except SlimError:
            pass


def test_plans_written_before_the_selection_field_still_load() -> None:
    old = _plan()
    del old["selection"]
    plan = PruningPlan.from_dict(old)
    assert plan.selection is None and plan.groups


def test_a_plan_whose_tensor_is_missing_from_the_model_is_refused() -> None:
    model, _, _ = traced("resnet20")
    d = _plan()
    name = d["groups"][1]["members"][0]["tensor"]
    d["tensor_shapes"]["renamed.weight"] = d["tensor_shapes"].pop(name)
    for g in d["groups"]:
        for m in g["members"]:
            if m["tensor"] == name:
                m["tensor"] = "renamed.weight"
    with pytest.raises(SlimError, match="does not fit this model.*renamed.weight"):
        apply_plan(model, PruningPlan.from_dict(d))


class _HardCodedSplit(nn.Module):
    """Splits its channels at a literal the surgery cannot see: the planner must not prune before it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(torch.relu(self.bn(self.conv(x))), [16, 16], dim=1)
        return self.fc((a * b).mean((2, 3)))


def test_sizes_in_code_stop_their_groups_and_a_broken_cut_is_caught() -> None:
    model = _HardCodedSplit().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = trace_groups(model, x)
    assert not any(g.prunable for g in plan.groups if g.scored)
    assert any("not held by a module attribute" in r for _, r in plan.unprunable())
    # force a cut anyway, as an edited plan would: the self-check names the group and nothing is returned
    forced = copy.deepcopy(plan)
    for g in forced.groups:
        if g.scored:
            g.keep = list(range(g.size // 2))
    with pytest.raises(SlimError, match="self-check.*group"):
        apply_plan(model, forced)
    with torch.no_grad(), pytest.raises(RuntimeError, match="split_with_sizes"):
        cut(model, forced)(x)  # the check is what stands between the user and this
