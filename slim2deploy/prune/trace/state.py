"""The tracer's state: coupled groups as a union-find, the layouts of the graph's values, members.

Handlers (``prune.trace.ops_*``) read and change it through a few verbs: ``fresh`` (a new group
for a layer's outputs), ``union`` (two groups keep the same indices), ``cut`` (one group becomes
two, so that a slice or a split can take a part of it), ``add`` (a tensor dimension follows a
group), ``stop`` (a group becomes unprunable, with the reason).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from slim2deploy.prune.plan import Group, Member
from slim2deploy.prune.trace.layout import OPAQUE, Layout, Seg, op_name, val

_PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
RAW_READ = "reads these channels without a BatchNorm of the group in between"


class TraceState:
    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram, fold: bool, exact: bool = True):
        self.model = model
        self.fold = fold
        self.exact = exact
        self.ep = ep
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: dict[int, list[Member]] = {}
        self.reasons: dict[int, list[str]] = {}
        self.approx: dict[int, list[str]] = {}  # exact=False: why cutting the group changes the outputs
        self.pieces: dict[int, tuple[int, int, int]] = {}  # a cut group -> (first piece, its length, second)
        self.env: dict[fx.Node, Any] = {}
        self.fqn: dict[str, str] = {}  # placeholder name -> parameter/buffer FQN
        self.user_inputs: set[str] = set()
        for spec in ep.graph_signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if spec.kind.name in ("PARAMETER", "BUFFER") and name is not None:
                self.fqn[name] = str(spec.target)
            elif spec.kind.name == "USER_INPUT" and name is not None:
                self.user_inputs.add(name)

    # -- union-find over groups of equal size
    def new(self, size: int, reason: str | None = None) -> int:
        g = len(self.parent)
        self.parent.append(g)
        self.size.append(size)
        self.members[g] = []
        self.reasons[g] = [reason] if reason else []
        self.approx[g] = []
        return g

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = sorted((self.find(a), self.find(b)))
        if ra == rb:
            return
        assert self.size[ra] == self.size[rb], "only groups of one size are coupled"
        self.parent[rb] = ra
        # both sides may hold the same count (a slice and a split that use one attribute)
        self.members[ra] += [m for m in self.members.pop(rb) if m not in self.members[ra]]
        self.reasons[ra] += [r for r in self.reasons.pop(rb) if r not in self.reasons[ra]]
        self.approx[ra] += [r for r in self.approx.pop(rb) if r not in self.approx[ra]]

    def add(self, gid: int, member: Member) -> None:
        group = self.members[self.find(gid)]
        if member not in group:
            group.append(member)

    def cut(self, gid: int, k: int) -> None:
        """Group ``gid`` becomes two: its channels [0, k) and [k, size); every member is cut with it."""
        r = self.find(gid)
        a, b = self.new(k), self.new(self.size[r] - k)
        for m in self.members[r]:
            self.members[a].append(m)
            self.members[b].append(m if m.role == "size" else replace(m, start=m.start + k * m.block))
        self.reasons[a], self.reasons[b] = list(self.reasons[r]), list(self.reasons[r])
        self.approx[a], self.approx[b] = list(self.approx[r]), list(self.approx[r])
        self.members[r], self.reasons[r], self.approx[r] = [], [], []
        self.pieces[r] = (a, k, b)

    def resolve(self, x: Any) -> Any:
        """``x`` with every segment of a cut group replaced by its pieces."""
        if isinstance(x, Layout):
            return replace(x, segs=tuple(p for s in x.segs for p in self._pieces(s)))
        if isinstance(x, (list, tuple)):
            return [self.resolve(v) for v in x]
        return x

    def _pieces(self, s: Seg) -> list[Seg]:
        r = self.find(s.gid)
        if r not in self.pieces:
            return [replace(s, gid=r)]
        a, k, b = self.pieces[r]
        return self._pieces(replace(s, gid=a, length=k)) + self._pieces(replace(s, gid=b, length=s.length - k))

    def cut_at(self, lay: Layout, points: list[int]) -> Layout:
        """``lay`` with its groups cut so that no segment crosses one of the channel offsets ``points``."""
        for p in sorted(set(points)):
            for s, off in lay.offsets():
                if off < p < off + s.length:
                    self.cut(s.gid, p - off)
                    break
            lay = self.resolve(lay)
        return lay

    def couple(self, layouts: list[Layout], where: str) -> Layout:
        """Union the layouts' groups channel by channel, cutting groups where their boundaries differ.

        The layouts must have the same number of channels; returns the first one, coupled. If the
        boundaries do not settle (they always have so far), every group involved becomes unprunable.
        """
        full = [self.resolve(f) for f in layouts]
        for _ in range(4):  # a cut made for one layout can move a boundary in another
            points = sorted({off for f in full for _, off in f.offsets()} - {0})
            for i in range(len(full)):
                full[i] = self.cut_at(self.resolve(full[i]), points)
            full = [self.resolve(f) for f in full]
            if all(_lengths(f) == _lengths(full[0]) for f in full[1:]):
                break
        else:
            self.stop(full, f"{where}: channel groups that could not be aligned")
            return full[0]
        for f in full[1:]:
            for a, b in zip(full[0].segs, f.segs, strict=True):
                self.union(a.gid, b.gid)
        return self.resolve(full[0])

    def stop(self, layout: Any, reason: str) -> None:
        """Every group in ``layout`` (a layout, or lists of them) becomes unprunable for ``reason``."""
        layout = self.resolve(layout)
        if isinstance(layout, Layout):
            for s in layout.segs:
                r = self.reasons[self.find(s.gid)]
                if reason not in r:
                    r.append(reason)
        elif isinstance(layout, (list, tuple)):
            for item in layout:
                self.stop(item, reason)

    def lay(self, x: Any) -> Any:
        return self.resolve(self.env.get(x)) if isinstance(x, fx.Node) else None

    def fresh(self, node: fx.Node, size: int | None = None, dim: int | None = None, reason: str | None = None) -> Any:
        """A new group for the channels of ``node``'s output (dim 1, or the only dim)."""
        return self.fresh_val(val(node), reason, size, dim)

    def fresh_val(self, v: Any, reason: str | None, size: int | None = None, dim: int | None = None) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return OPAQUE
        d = dim if dim is not None else min(1, v.dim() - 1)
        n = size if size is not None else int(v.shape[d])
        return Layout(d, (Seg(self.new(n, reason), n),))

    # -- parameters, modules and attributes
    def param(self, x: Any) -> str | None:
        """FQN of a parameter/buffer used by exactly one op, else None."""
        if isinstance(x, fx.Node) and x.op == "placeholder" and x.name in self.fqn and len(x.users) == 1:
            return self.fqn[x.name]
        return None

    def module_path(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        return str(list(stack.values())[-1][0]) if stack else ""

    def where(self, node: fx.Node) -> str:
        return f"{op_name(node.target)} in {self.module_path(node) or 'the top-level forward'}"

    def plain_module(self, weight_fqn: str) -> bool:
        module = self.model.get_submodule(weight_fqn.rpartition(".")[0])
        return type(module).forward in {t.forward for t in _PLAIN_LAYERS} and weight_fqn.endswith(".weight")

    def size_attribute(self, node: fx.Node, sizes: list[int], index: int) -> Member | None:
        """A member for the attribute of the module running ``node`` that holds ``sizes[index]``.

        Either a list/tuple attribute equal to ``sizes`` (entry ``index``) or the one int
        attribute equal to ``sizes[index]``; None if there is no such attribute, or several.
        """
        path = self.module_path(node)
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            return None
        prefix = f"{path}." if path else ""
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        lists = [k for k, v in attrs.items() if isinstance(v, (list, tuple)) and list(v) == list(sizes)]
        if len(lists) == 1:
            return Member(prefix + lists[0], index, "size")
        ints = [k for k, v in attrs.items() if type(v) is int and v == sizes[index]]
        return Member(prefix + ints[0], -1, "size") if len(ints) == 1 else None

    # -- layers reading and making channels
    def consume(self, lay: Layout, wname: str, dim: int, foldable: bool, where: str) -> None:
        """A layer reads ``lay``. Channels it reads raw (not zeroed by a BatchNorm of their group, nor
        foldable) make the group unprunable; with ``exact=False`` they only make cutting it approximate."""
        for s, off in lay.offsets():
            fold = foldable and s.const
            if not (s.zero or fold):
                raw = f"{where} {RAW_READ}"
                if self.exact:
                    self.stop(Layout(lay.dim, (s,)), raw)
                else:
                    notes = self.approx[self.find(s.gid)]
                    if raw not in notes:
                        notes.append(raw)
            self.add(s.gid, Member(wname, dim, "in", off * lay.per_channel, lay.per_channel, fold))

    def produce(self, node: fx.Node, wname: str, bname: str | None, dim: int) -> Layout:
        out = self.fresh(node, dim=dim)
        assert isinstance(out, Layout)
        gid = out.segs[0].gid
        self.add(gid, Member(wname, 0, "out"))
        if bname:
            self.add(gid, Member(bname, 0, "out"))
        return out

    def groups(self) -> list[Group]:
        out = []
        for g in sorted(self.members):
            if self.find(g) != g or not self.members[g]:
                continue
            group = Group(
                size=self.size[g],
                members=self.members[g],
                keep=list(range(self.size[g])),
                reasons=list(self.reasons[g]),
                approximate=list(self.approx[g]),
            )
            if group.reasons and group.scored and all(r.endswith(RAW_READ) for r in group.reasons):
                # raw reads are all that stops a group BatchNorm can score: say how to prune it anyway
                group.reasons[0] += " (`approximate=True` prunes them anyway)"
            out.append(group)
        return out


def _lengths(lay: Layout) -> tuple[int, ...]:
    return tuple(s.length for s in lay.segs)
