"""The pruning plan as plain data: which channel indices every coupled group of a model keeps.

A plan is made by tracing (``prune.trace``), scored (``prune.score``), filled in by a selection
(``prune.select``) and carried out by the surgery (``prune.surgery``). It round-trips through
JSON and lives inside every pruned checkpoint, so ``from_dict`` validates it as data: a file that
was edited by hand or damaged gets one clear error here instead of a traceback in the surgery.

Depth: the tracer also records the residual joins it found (``Branch``). A group that lies only
inside a removable branch may keep no channel at all (``keep == []``): the whole branch is then
replaced by its constant output (``prune.depth``); anywhere else an empty group is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from slim2deploy.base.errors import SlimError
from slim2deploy.base.formats import parse_json
from slim2deploy.prune.rails import DEFAULT_MAX_PRUNE, DEFAULT_MIN_CHANNELS, DEFAULT_ROUND_TO

PLAN_VERSION = 1

# "size" (added after version 1 plans were first written, which never contain it): the member
# names a module attribute holding a channel count -- an int (dim -1) or entry ``dim`` of a list
# -- that the surgery lowers by the number of removed channels (e.g. the sizes a torch.split uses)
ROLES = ("out", "in", "bn", "through", "size")


@dataclass
class Member:
    """One tensor dimension whose indices follow the group's channels.

    Channel ``k`` of the group is index ``start + k * block + j`` (``0 <= j < block``) of
    dimension ``dim`` of the parameter or buffer ``tensor``. Roles: ``out`` (a conv/linear
    output and its bias), ``in`` (a conv/linear input), ``bn`` (a BatchNorm gamma, which gives
    the score), ``through`` (everything else indexed per channel: BatchNorm beta and running
    statistics, a depthwise conv, a per-channel parameter), ``size`` (a channel count held by a
    module attribute, see ``ROLES``). ``fold`` marks an input whose removed channels' constant
    value is added to that layer's bias.
    """

    tensor: str
    dim: int
    role: str
    start: int = 0
    block: int = 1
    fold: bool = False

    @property
    def module(self) -> str:
        return self.tensor.rpartition(".")[0]

    @property
    def attribute(self) -> str:
        return self.tensor.rpartition(".")[2]

    def indices(self, channels: list[int]) -> list[int]:
        return [self.start + k * self.block + j for k in channels for j in range(self.block)]


@dataclass
class Group:
    """Channels that must keep the same indices everywhere; pruned as one."""

    size: int
    members: list[Member]
    keep: list[int]
    scores: list[float] | None = None
    reasons: list[str] = field(default_factory=list)
    # traced with exact=False: layers that read these channels raw, so cutting them changes the outputs
    approximate: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.scores is not None

    @property
    def pruned(self) -> bool:
        return len(self.keep) < self.size

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [k for k in range(self.size) if k not in kept]

    @property
    def scored(self) -> bool:
        """Has a BatchNorm gamma among its members (the channels Network Slimming is about)."""
        return any(m.role == "bn" for m in self.members)

    def modules(self, role: str | None = None) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.members:
            if role is None or m.role == role:
                seen.setdefault(m.module)
        return list(seen)


@dataclass
class Branch:
    """A residual branch: the layers between a fork of a stream and the add that merges it back.

    ``groups`` are the groups inside it: emptying any one of them makes the branch's output
    input-independent, so the branch is removed (``prune.depth``). ``gammas`` gives, per group, the
    BatchNorm weights the surgery sets to zero to compute that constant output (the group's
    BatchNorms that no other of them feeds). The removed branch's modules become ``skip`` (nothing
    reads their output any more) or ``const`` (they return their recorded output); ``shapes`` is
    each one's traced output shape for one sample (the channel cut may change its sizes, not its
    rank). ``batched``: the join adds the stream into the branch's output in place, so a constant
    must be as large as the batch. A join that cannot be removed has a ``reason`` and no modules.
    """

    join: str
    node: str
    groups: list[int] = field(default_factory=list)
    gammas: list[list[str]] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    const: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    batched: bool = False
    reason: str | None = None

    @property
    def removable(self) -> bool:
        return self.reason is None

    def modules(self) -> list[str]:
        return [*self.const, *self.skip]


@dataclass
class PruningPlan:
    """Plain data: groups with their kept indices, the rails used, and what was left alone."""

    groups: list[Group]
    input_shape: list[int]
    tensor_shapes: dict[str, list[int]]
    ratio: float | None = None
    threshold: float | None = None
    min_channels: int = DEFAULT_MIN_CHANNELS
    max_prune: float = DEFAULT_MAX_PRUNE
    round_to: int = DEFAULT_ROUND_TO
    fold: bool = True
    exact: bool = True  # False: groups read raw by some layer were made prunable (see Group.approximate)
    new_biases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION
    selection: dict[str, Any] | None = None  # prune.select.Selection.to_dict(); None in plans before it existed
    branches: list[Branch] = field(default_factory=list)  # residual joins, removable or not (see Branch)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # fields newer than the plan format are written only when they say something, so that a plan
        # without them still loads in an older slim2deploy
        if d["exact"]:
            del d["exact"]
        if not d["branches"]:
            del d["branches"]
        for g in d["groups"]:
            if not g["approximate"]:
                del g["approximate"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> PruningPlan:
        """The plan in ``d``, checked field by field; a damaged or edited plan raises one ``SlimError``."""
        if not isinstance(d, dict) or "groups" not in d:
            raise SlimError("not a pruning plan: expected a mapping with 'groups'; was the file made by slim2deploy?")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise SlimError(f"pruning plan version {d.get('version')!r} is not supported (this is {PLAN_VERSION})")
        _check_keys("the plan", d, cls)
        _check_types("the plan", d, _PLAN_TYPES)
        groups = []
        for i, g in enumerate(d["groups"]):
            where = f"group {i}"
            _check_keys(where, g, Group)
            _check_types(where, g, _GROUP_TYPES)
            members = []
            for j, m in enumerate(g["members"]):
                _check_keys(f"{where} member {j}", m, Member)
                _check_types(f"{where} member {j}", m, _MEMBER_TYPES)
                members.append(Member(**m))
            groups.append(Group(**{**g, "members": members}))
        branches = []
        for i, b in enumerate(d.get("branches", [])):
            _check_keys(f"branch {i}", b, Branch)
            _check_types(f"branch {i}", b, _BRANCH_TYPES)
            branches.append(Branch(**b))
        plan = cls(**{**d, "groups": groups, "branches": branches})
        plan.check()
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        advice = "make the pruned checkpoint again from the sparse one with `slim2deploy prune`"
        return cls.from_dict(parse_json(text, "the pruning plan", advice=advice))

    def check(self) -> None:
        """The plan is consistent in itself: shapes, indices, roles and extents all fit together."""
        if any(s <= 0 for s in self.input_shape):
            raise damaged(f"input_shape {self.input_shape} has a dimension below 1")
        for fqn, shape in self.tensor_shapes.items():
            if any(s < 0 for s in shape):
                raise damaged(f"tensor_shapes gives {fqn} the negative shape {shape}")
        removable = _check_branches(self)
        for i, g in enumerate(self.groups):
            _check_group(self, i, g, i in removable)

    @property
    def prunable_channels(self) -> int:
        return sum(g.size for g in self.groups if g.prunable)

    def removed_branches(self) -> list[Branch]:
        """The removable branches a group of which keeps no channel: the surgery removes them."""
        return [b for b in self.branches if b.removable and any(not self.groups[i].keep for i in b.groups)]

    @property
    def removed_channels(self) -> int:
        return sum(g.size - len(g.keep) for g in self.groups)

    def coverage(self) -> tuple[int, int]:
        """(prunable, all) channels of the groups that hold a BatchNorm gamma."""
        scored = [g for g in self.groups if g.scored]
        return sum(g.size for g in scored if g.prunable), sum(g.size for g in scored)

    def unprunable(self) -> list[tuple[Group, str]]:
        """Groups left alone and why (the first reason of each)."""
        out = []
        for g in self.groups:
            if g.reasons:
                out.append((g, g.reasons[0]))
            elif g.scores is None:
                out.append((g, "no BatchNorm gamma to score it"))
        return out


def damaged(what: str) -> SlimError:
    return SlimError(
        f"the pruning plan is invalid: {what}. The file was probably edited or damaged; "
        "make the pruned checkpoint again from the sparse one with `slim2deploy prune`"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _list_of(check: Any) -> Any:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


_PLAN_TYPES = {
    "groups": (_list_of(lambda g: isinstance(g, dict)), "a list of mappings"),
    "input_shape": (_list_of(_is_int), "a list of integers"),
    "tensor_shapes": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _list_of(_is_int)(s) for k, s in v.items()),
        "a mapping from tensor names to lists of integers",
    ),
    "ratio": (_optional(_is_number), "a number or null"),
    "threshold": (_optional(_is_number), "a number or null"),
    "min_channels": (_is_int, "an integer"),
    "max_prune": (_is_number, "a number"),
    "round_to": (_is_int, "an integer"),
    "fold": (lambda v: isinstance(v, bool), "true or false"),
    "exact": (lambda v: isinstance(v, bool), "true or false"),
    "new_biases": (_list_of(lambda s: isinstance(s, str)), "a list of strings"),
    "notes": (_list_of(lambda s: isinstance(s, str)), "a list of strings"),
    "version": (_is_int, "an integer"),
    "selection": (_optional(lambda v: isinstance(v, dict)), "a mapping or null"),
    "branches": (_list_of(lambda b: isinstance(b, dict)), "a list of mappings"),
}
_GROUP_TYPES = {
    "size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "members": (_list_of(lambda m: isinstance(m, dict)), "a list of mappings"),
    "keep": (_list_of(_is_int), "a list of integers"),
    "scores": (_optional(_list_of(_is_number)), "a list of numbers or null"),
    "reasons": (_list_of(lambda s: isinstance(s, str)), "a list of strings"),
    "approximate": (_list_of(lambda s: isinstance(s, str)), "a list of strings"),
}
_MEMBER_TYPES = {
    "tensor": (lambda v: isinstance(v, str) and v != "", "a tensor name"),
    "dim": (_is_int, "an integer"),
    "role": (lambda v: v in ROLES, f"one of {', '.join(ROLES)}"),
    "start": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "block": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "fold": (lambda v: isinstance(v, bool), "true or false"),
}


_BRANCH_TYPES = {
    "join": (lambda v: isinstance(v, str), "a string"),
    "node": (lambda v: isinstance(v, str) and v != "", "a node name"),
    "groups": (_list_of(lambda v: _is_int(v) and v >= 0), "a list of integers >= 0"),
    "gammas": (_list_of(_list_of(lambda s: isinstance(s, str))), "a list of lists of tensor names"),
    "skip": (_list_of(lambda s: isinstance(s, str) and s != ""), "a list of module names"),
    "const": (_list_of(lambda s: isinstance(s, str) and s != ""), "a list of module names"),
    "shapes": (
        lambda v: isinstance(v, dict) and all(_list_of(lambda n: _is_int(n) and n >= 1)(s) for s in v.values()),
        "a mapping from module names to lists of integers >= 1",
    ),
    "batched": (lambda v: isinstance(v, bool), "true or false"),
    "reason": (_optional(lambda v: isinstance(v, str)), "a string or null"),
}


def _check_keys(where: str, d: Any, cls: type) -> None:
    if not isinstance(d, dict):
        raise damaged(f"{where} is {type(d).__name__}, not a mapping")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown, missing = sorted(set(d) - known), sorted(required - set(d))
    if unknown:
        raise damaged(f"{where} has the unknown field(s) {', '.join(map(repr, unknown))}")
    if missing:
        raise damaged(f"{where} lacks the field(s) {', '.join(map(repr, missing))}")


def _check_types(where: str, d: dict[str, Any], types: dict[str, tuple[Any, str]]) -> None:
    for key, value in d.items():
        ok, expected = types[key]
        if not ok(value):
            raise damaged(f"{where}: {key} must be {expected}, got {value!r:.80}")


def _check_branches(plan: PruningPlan) -> set[int]:
    """The branches fit the groups and each other; returns the groups that may keep no channel."""
    owner: dict[int, int] = {}
    replaced: dict[str, int] = {}
    for i, b in enumerate(plan.branches):
        where = f"branch {i} ({b.join})"
        if len(b.gammas) != len(b.groups):
            raise damaged(f"{where} has {len(b.gammas)} gamma lists for {len(b.groups)} groups")
        for gi, gammas in zip(b.groups, b.gammas, strict=True):
            if gi >= len(plan.groups) or gi in owner:
                raise damaged(f"{where} names group {gi}, which does not exist or lies in another branch")
            owner[gi] = i
            bns = {m.tensor for m in plan.groups[gi].members if m.role == "bn"}
            if not gammas or not set(gammas) <= bns:
                raise damaged(f"{where}: {gammas[:3]} are not BatchNorm weights of group {gi}")
        if not b.removable:
            if b.skip or b.const:
                raise damaged(f"{where} cannot be removed ({b.reason}) yet names modules to replace")
            continue
        paths = b.modules()
        if not b.groups or not b.const or set(b.shapes) != set(paths) or len(set(paths)) != len(paths):
            raise damaged(f"{where}: its groups, skip and const modules and their shapes do not match")
        for p in paths:
            for q, j in replaced.items():
                if p == q or p.startswith(q + ".") or q.startswith(p + "."):
                    raise damaged(f"{where} replaces {p}, which overlaps {q} of branch {j}")
            replaced[p] = i
    return {gi for gi, i in owner.items() if plan.branches[i].removable}


def _check_group(plan: PruningPlan, i: int, g: Group, removable: bool) -> None:
    where = f"group {i} ({', '.join(g.modules())[:80]})"
    if not g.keep:
        if removable:
            return  # the branch it lies in is removed as a whole
        raise damaged(f"{where} keeps no channel")
    if len(set(g.keep)) != len(g.keep) or not all(0 <= k < g.size for k in g.keep):
        raise damaged(f"{where} keeps indices {g.keep[:12]} that are repeated or outside 0..{g.size - 1}")
    if g.scores is not None and len(g.scores) != g.size:
        raise damaged(f"{where} has {len(g.scores)} scores for {g.size} channels")
    for m in g.members:
        if m.role == "size":
            if m.dim < -1:
                raise damaged(f"{where}: the count {m.tensor} has index {m.dim} (-1 for an int, or a list index)")
            continue
        shape = plan.tensor_shapes.get(m.tensor)
        if shape is None:
            if m.tensor in plan.new_biases:
                continue
            raise damaged(f"{where} names {m.tensor}, which is not among the plan's tensor_shapes")
        if not 0 <= m.dim < len(shape):
            raise damaged(f"{where}: dimension {m.dim} of {m.tensor} is out of range for its shape {shape}")
        if m.start + g.size * m.block > shape[m.dim]:
            raise damaged(
                f"{where}: {g.size} channels x {m.block} from index {m.start} do not fit dimension {m.dim} "
                f"of {m.tensor} (size {shape[m.dim]})"
            )


def copy_group(g: Group, **changes: Any) -> Group:
    """A group that can be changed without touching ``g`` (members are never modified in place)."""
    fresh: dict[str, Any] = {
        "members": list(g.members),
        "keep": list(g.keep),
        "reasons": list(g.reasons),
        "approximate": list(g.approximate),
    }
    return replace(g, **{**fresh, **changes})
