"""Removable residual branches, found by one rule over the traced graph: what stops depending on the input.

A group whose BatchNorms have gamma = 0 emits beta there: a constant. Propagating "depends on the
user input" through the exported graph with those BatchNorm outputs held constant shows what the
group feeds. If what loses its dependence ends in one operand of one add whose other operand still
depends on the input -- and nowhere else -- the group lies inside a residual branch: emptied, the
block computes ``stream + c`` and the branch can be replaced by ``c``, exactly.

The branch is that operand with everything used only by it (its exclusive backward cone). We
cannot edit a model's forward, so it is removed by replacing modules: every module all of whose
traced ops lie in the branch (the outermost such). Those whose output the join still reads,
directly or through functional ops that stay, return their recorded constant (``const``); the
others a placeholder that nothing reads (``skip``). A branch with another residual add inside
(nested), one whose constant would be computed outside a module of its own, and a group whose
constant output meets the network elsewhere than in one add (a concatenation, a product) are
not removable, and the plan says why (``Branch.reason``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

from torch import fx

from slim2deploy.prune.plan import Branch, Group
from slim2deploy.prune.trace.layout import node_args, op_name, shape, val
from slim2deploy.prune.trace.state import TraceState

BATCHNORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"}
NO_GROUP = "no prunable BatchNorm-scored group lies only inside one of its operands"


@dataclass
class _Graph:
    """Facts about the exported graph that every group's question reuses."""

    state: TraceState
    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    dep: set[fx.Node]  # depends on the user input
    live: set[fx.Node]  # reaches the output
    stacks: dict[fx.Node, list[tuple[str, str]]]  # live op -> (call, module path) outermost first, root left out
    calls: Counter[str]  # live ops per module path
    joins: set[fx.Node]  # adds of two input-dependent tensors
    bn: dict[str, tuple[fx.Node, int]]  # BatchNorm weight -> (its op, its channels)

    def where(self, node: fx.Node) -> str:
        return self.state.where(node) if node.op == "call_function" else f"the {node.op} {node.name}"


@dataclass
class _Structure:
    """What removing the operand ``b`` of the join ``j`` replaces; the same for every group inside it."""

    reason: str | None = None
    skip: list[str] = field(default_factory=list)
    const: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    batched: bool = False
    read: set[fx.Node] = field(default_factory=set)  # what the join still computes from: must be constant


def find_branches(state: TraceState, groups: list[Group]) -> list[Branch]:
    """Every residual join of the traced graph: removable (with the groups inside it) or why not."""
    graph = _graph(state)
    structures: dict[tuple[fx.Node, fx.Node | None], _Structure] = {}
    found: dict[tuple[fx.Node, fx.Node | None], list[tuple[int, list[str], str | None]]] = {}
    for gi, g in enumerate(groups):
        bns = _batchnorms(g, graph) if g.scored and not g.reasons else []
        if not bns:
            continue
        lost = _lost(bns, graph)
        escapes = sorted(
            {u for n in lost for u in n.users if u not in lost and u in graph.live}, key=graph.index.__getitem__
        )
        if not escapes or any(u.op == "output" for u in escapes):
            continue  # the model's output goes through the group: a layer of the chain, not of a branch
        j = escapes[0]
        inside = [a for a in j.args[:2] if isinstance(a, fx.Node) and a in lost]
        if len(escapes) == 1 and j in graph.joins and len(inside) == 1:
            key: tuple[fx.Node, fx.Node | None] = (j, inside[0])
            if key not in structures:
                structures[key] = _structure(graph, j, inside[0])
            s = structures[key]
            why = s.reason or _still_dependent(graph, s, lost)
            found.setdefault(key, []).append((gi, _gammas(graph, s, bns) if why is None else _names(graph, bns), why))
        else:
            found.setdefault((j, None), []).append((gi, _names(graph, bns), _elsewhere(graph, escapes)))
    branches = [_branch(graph, key, found[key], structures.get(key)) for key in found]
    reached = {key[0] for key in found}
    branches += [Branch(graph.where(j), j.name, reason=NO_GROUP) for j in graph.joins if j not in reached]
    order = {n.name: i for n, i in graph.index.items()}
    return sorted(branches, key=lambda b: order[b.node])


def _graph(state: TraceState) -> _Graph:
    nodes = list(state.ep.graph.nodes)
    dep: set[fx.Node] = set()
    for n in nodes:
        if (n.op == "placeholder" and n.name in state.user_inputs) or (
            n.op == "call_function" and any(a in dep for a in n.all_input_nodes)
        ):
            dep.add(n)
    live: set[fx.Node] = set()
    todo = [n for n in nodes if n.op == "output"]
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    stacks: dict[fx.Node, list[tuple[str, str]]] = {}
    calls: Counter[str] = Counter()
    bn: dict[str, tuple[fx.Node, int]] = {}
    for n in nodes:
        if n.op != "call_function" or n not in live:
            continue
        stack = n.meta.get("nn_module_stack") or {}
        stacks[n] = [(str(k), str(v[0])) for k, v in stack.items() if str(v[0])]
        calls.update({p for _, p in stacks[n]})
        if op_name(n.target) in BATCHNORMS:
            w = node_args(n).get("weight")
            if isinstance(w, fx.Node) and w.name in state.fqn:
                bn[state.fqn[w.name]] = (n, shape(w)[0])
    joins = {
        n
        for n in live
        if n.op == "call_function"
        and op_name(n.target) == "add"
        and sum(isinstance(a, fx.Node) and a in dep for a in n.args[:2]) == 2
    }
    return _Graph(state, nodes, {n: i for i, n in enumerate(nodes)}, dep, live, stacks, calls, joins, bn)


def _batchnorms(g: Group, graph: _Graph) -> list[fx.Node]:
    """The group's BatchNorm ops in graph order; none unless each lies wholly in the group."""
    channels: dict[str, set[int]] = {}
    for m in g.members:
        if m.role == "bn":
            channels.setdefault(m.tensor, set()).update(m.indices(list(range(g.size))))
    ops = []
    for fqn, idx in channels.items():
        if fqn not in graph.bn or len(idx) != graph.bn[fqn][1]:
            return []  # part of a BatchNorm: emptying the group leaves the rest of its output input-dependent
        ops.append(graph.bn[fqn][0])
    return sorted(ops, key=graph.index.__getitem__)


def _gammas(graph: _Graph, s: _Structure, bns: list[fx.Node]) -> list[str]:
    """The BatchNorms whose gamma the surgery zeroes to compute the constant: the group's first ones
    (those no other of them feeds) when that is enough, so that the branch's later BatchNorms keep the
    weights they have (exact when only the first ones are zero); else all of them."""
    reach: set[fx.Node] = set()
    first = []
    for n in graph.nodes[graph.index[bns[0]] : graph.index[bns[-1]] + 1]:
        fed = any(a in reach for a in n.all_input_nodes)
        if n in bns and not fed:
            first.append(n)
        if fed or n in bns:
            reach.add(n)
    enough = len(first) < len(bns) and _still_dependent(graph, s, _lost(first, graph)) is None
    return _names(graph, first if enough else bns)


def _names(graph: _Graph, bns: list[fx.Node]) -> list[str]:
    return [graph.state.fqn[node_args(n)["weight"].name] for n in bns]


def _lost(entries: list[fx.Node], graph: _Graph) -> set[fx.Node]:
    """What stops depending on the input when the ``entries`` BatchNorms emit their beta."""
    lost = set(entries)
    heap = [graph.index[u] for e in entries for u in e.users]
    heapq.heapify(heap)
    seen: set[int] = set()
    while heap:  # in graph order, so that every input is decided before its users
        i = heapq.heappop(heap)
        n = graph.nodes[i]
        if i in seen or n in lost or n.op != "call_function" or n not in graph.dep:
            continue
        seen.add(i)
        if all(a in lost for a in n.all_input_nodes if a in graph.dep):
            lost.add(n)
            for u in n.users:
                heapq.heappush(heap, graph.index[u])
    return lost


def _structure(graph: _Graph, j: fx.Node, b: fx.Node) -> _Structure:
    cone: set[fx.Node] = set()
    todo = [b]
    while todo:
        n = todo.pop()
        if n not in cone and n.op == "call_function":
            cone.add(n)
            todo.extend(n.all_input_nodes)
    branch: set[fx.Node] = set()  # the exclusive cone: used only inside it (or, for b, by the join)
    for n in sorted(cone, key=graph.index.__getitem__, reverse=True):
        users = [u for u in n.users if u in graph.live]
        if n is b or (users and all(u in branch for u in users)):
            branch.add(n)
    nested = sorted((n for n in branch if n in graph.joins), key=graph.index.__getitem__)
    if nested:
        return _Structure(f"another residual add ({graph.where(nested[0])}) lies inside it")
    inside = Counter(p for n in branch for p in {p for _, p in graph.stacks.get(n, [])})
    covered = {p for p, c in inside.items() if c == graph.calls[p]}
    owner: dict[fx.Node, str] = {}  # an op -> the outermost module wholly inside the branch that runs it
    for n in branch:
        p = next((p for _, p in graph.stacks.get(n, []) if p in covered), None)
        if p is not None:
            owner[n] = p
    outputs: dict[str, list[fx.Node]] = {}
    for n, p in owner.items():
        if any(u in graph.live and owner.get(u) != p for u in n.users):
            outputs.setdefault(p, []).append(n)
    for p in outputs:
        try:
            graph.state.model.get_submodule(p)
        except AttributeError:
            return _Structure(f"its layer {p} is not a submodule the surgery can replace")
    s = _Structure(batched=_writes_first(j) and j.args[0] is b)
    consts: set[str] = set()
    todo = [b]
    while todo:  # what the join reads once the branch is constant: up to the replaced modules
        n = todo.pop()
        if n in s.read:
            continue
        s.read.add(n)
        fqn = graph.state.fqn.get(n.name) if n.op == "placeholder" else None
        if fqn is not None and any(fqn.startswith(p + ".") for p in outputs):
            return _Structure(f"{graph.where(j)} reads {fqn}, a weight of a layer the surgery would replace")
        if n in owner:
            consts.add(owner[n])
        elif n.op == "call_function":
            todo.extend(n.all_input_nodes)
    for p in sorted(outputs):
        out = val(outputs[p][0])
        if getattr(out, "dim", lambda: 0)() == 0:
            return _Structure(f"its layer {p} does not return one batched tensor")
        s.shapes[p] = [int(v) for v in out.shape[1:]]
        runs = {k for n, q in owner.items() if q == p for k, path in graph.stacks[n] if path == p}
        if p in consts and (len(runs) > 1 or len(outputs[p]) > 1):
            return _Structure(f"its layer {p} runs {len(runs)} times or returns several values, so no one constant")
    s.const = sorted(consts)
    s.skip = sorted(set(outputs) - consts)
    return s


def _writes_first(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    alias = schema.arguments[0].alias_info if schema is not None and schema.arguments else None
    return bool(alias is not None and alias.is_write)


def _still_dependent(graph: _Graph, s: _Structure, lost: set[fx.Node]) -> str | None:
    """Why emptying this group leaves what the join reads input-dependent (None: it does not)."""
    bad = sorted((n for n in s.read if n in graph.dep and n not in lost), key=graph.index.__getitem__)
    if not bad:
        return None
    return (
        f"its constant would be taken after {graph.where(bad[0])}, which still depends on the input: what follows "
        "runs in a forward, not in modules the surgery can replace"
    )


def _elsewhere(graph: _Graph, escapes: list[fx.Node]) -> str:
    if len(escapes) == 1:
        return f"its constant output meets the network in {graph.where(escapes[0])}, not in an add"
    shown = ", ".join(graph.where(u) for u in escapes[:3]) + (", ..." if len(escapes) > 3 else "")
    return f"its constant output is read by {len(escapes)} ops ({shown}), not by one add"


def _branch(
    graph: _Graph,
    key: tuple[fx.Node, fx.Node | None],
    groups: list[tuple[int, list[str], str | None]],
    s: _Structure | None,
) -> Branch:
    j = key[0]
    ok = [(gi, gammas) for gi, gammas, why in groups if why is None]
    if s is None or not ok:
        first = next(why for _, _, why in groups if why is not None)
        return Branch(graph.where(j), j.name, [gi for gi, _, _ in groups], [g for _, g, _ in groups], reason=first)
    return Branch(
        graph.where(j),
        j.name,
        [gi for gi, _ in ok],
        [gammas for _, gammas in ok],
        s.skip,
        s.const,
        s.shapes,
        s.batched,
    )
