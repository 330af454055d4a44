"""The ``profile`` stage: a model and a target in, a latency table (``prune.latency``) out.

Which layers: every convolution and linear that reads or produces a prunable group's channels
(``layer_specs``), at its real input size (found by running the model once with hooks).
Which cells: the row and the column of each layer's (c_in, c_out) grid through the full model,
at every kept count the rails allow; then, for a budget, the lines through the solution, solved
again until the solution stops moving (``refine``). The unpruned model is measured whole to
calibrate the part no group changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text, temporary_folder
from slim2deploy.base.formats import read_json
from slim2deploy.deploy.export import export_onnx
from slim2deploy.deploy.precision import to_fp16
from slim2deploy.measure.targets import DEFAULT_CACHE, TIMING_METHOD, CellCache, Target, make_target
from slim2deploy.model.checkpoint import Checkpoint, load_checkpoint
from slim2deploy.pipeline.prune import load_for_pruning, save_pruned
from slim2deploy.prune.latency import BranchSpec, LatencyTable, LayerSpec
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rails import Rails
from slim2deploy.prune.rebuild import model_from_checkpoint
from slim2deploy.prune.select import LatencySelector, Selection, WidthsSelector, select, selection_groups
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups

Log = Callable[[str], None]


@dataclass
class _Call:
    """One convolution or linear as it runs: the input it really sees and its real stride, padding, dilation."""

    in_shape: tuple[int, ...]
    stride: list[int]
    padding: list[int] | None  # None: a padding a standalone probe cannot reproduce (asymmetric 'same')
    dilation: list[int]


def _pairs(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


class _LayerCalls(TorchFunctionMode):
    """Records each convolution and linear call by its weight: a module may pad inside its own forward
    (TF-style 'same' padding in a Conv2d subclass), so the module's attributes and its input are not what
    the convolution sees -- the call's arguments are."""

    def __init__(self, weights: dict[int, str]) -> None:
        super().__init__()
        self.weights = weights
        self.calls: dict[str, _Call] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("conv2d", "linear") and len(args) >= 2 and id(args[1]) in self.weights:
            self._record(name, self.weights[id(args[1])], args, kwargs)
        return func(*args, **kwargs)

    def _record(self, name: str, module: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x, w = args[0], args[1]
        if name == "linear":
            self.calls.setdefault(module, _Call(tuple(x.shape[1:]), [], [], []))
            return
        names = ("stride", "padding", "dilation")
        given = {
            k: args[3 + i] if len(args) > 3 + i else kwargs.get(k, 1 if k != "padding" else 0)
            for i, k in enumerate(names)
        }
        kernel, dilation = list(w.shape[2:]), _pairs(given["dilation"], 2)
        padding: list[int] | None
        if given["padding"] == "valid":
            padding = [0, 0]
        elif given["padding"] == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            padding = [t // 2 for t in total] if all(t % 2 == 0 for t in total) else None
        else:
            padding = _pairs(given["padding"], 2)
        self.calls.setdefault(module, _Call(tuple(x.shape[1:]), _pairs(given["stride"], 2), padding, dilation))


def _calls(model: nn.Module, example_input: torch.Tensor) -> dict[str, _Call]:
    weights = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    recorder = _LayerCalls(weights)
    with torch.no_grad(), recorder:
        model.eval()(example_input[:1])
    return recorder.calls


def layer_specs(model: nn.Module, traced: PruningPlan, example_input: torch.Tensor) -> list[LayerSpec]:
    """The convolutions and linears whose widths a prunable group changes, with the shapes they run at."""
    outs: dict[str, int] = {}
    ins: dict[str, list[list[int]]] = {}
    through: dict[str, int] = {}
    for gi, g in enumerate(traced.groups):
        if not g.prunable:
            continue
        for m in g.members:
            if not m.tensor.endswith(".weight"):
                continue
            if m.role == "out" and m.dim == 0:
                outs[m.module] = gi
            elif m.role == "in" and m.dim == 1:
                ins.setdefault(m.module, []).append([gi, m.block])
            elif m.role == "through" and m.dim == 0:
                through[m.module] = gi
    calls = _calls(model, example_input)
    specs = []
    for name, module in model.named_modules():
        depthwise = name in through and isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
        if (name not in outs and name not in ins and not depthwise) or name not in calls:
            continue
        call = calls[name]
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 and not depthwise:
                continue  # grouped convolutions are never pruned: their cost is in the base
            if call.padding is None:
                continue  # asymmetric padding: a probe cannot reproduce it; its cost stays in the base
            spec = LayerSpec(name, "conv", module.in_channels, [], module.out_channels, None)
            spec.kernel, spec.stride, spec.padding = list(module.kernel_size), call.stride, call.padding
            spec.dilation, spec.in_hw = call.dilation, list(call.in_shape[1:])
        elif isinstance(module, nn.Linear) and len(call.in_shape) == 1:
            spec = LayerSpec(name, "linear", module.in_features, [], module.out_features, None)
        else:
            continue
        if depthwise:
            spec.in_fixed, spec.in_groups, spec.out_fixed, spec.out_group = 0, [[through[name], 1]], 0, through[name]
            spec.depthwise = True
        else:
            spec.in_groups = ins.get(name, [])
            spec.in_fixed -= sum(traced.groups[gi].size * block for gi, block in spec.in_groups)
            if name in outs:
                spec.out_fixed, spec.out_group = 0, outs[name]
        specs.append(spec)
    return specs


def model_artifact(model: nn.Module, ckpt: Checkpoint, src: Path, target: Target, workdir: Path, stem: str) -> Path:
    """``model`` as the file ``target`` runs (an ONNX graph, or the checkpoint itself)."""
    if target.artifact == "checkpoint":
        return src
    if target.artifact != "onnx":
        raise SlimError(f"target {target.name} runs {target.artifact} files, which profiling cannot make")
    path = workdir / f"{stem}.onnx"
    export_onnx(model, torch.zeros(1, *ckpt.input_shape), path)
    if target.precision == "fp16":
        to_fp16(path, path)
    return path


def checkpoint_artifact(path: str | Path, target: Target, workdir: Path, stem: str) -> Path:
    """The checkpoint at ``path`` as the file ``target`` runs."""
    if target.artifact == "checkpoint":
        return Path(path)
    ckpt = load_checkpoint(path)
    return model_artifact(model_from_checkpoint(ckpt), ckpt, Path(path), target, workdir, stem)


def branch_specs(traced: PruningPlan, layers: list[LayerSpec]) -> list[BranchSpec]:
    """The removable branches as a table prices them, with the table layers inside each (every convolution and
    linear under a module the branch replaces). One per join: of two branches joined by one add only the first
    may go (``prune.select``)."""
    specs, joins = [], set()
    for b in traced.branches:
        if not b.removable or b.node in joins:
            continue
        joins.add(b.node)
        inside = [i for i, layer in enumerate(layers) if any(_under(layer.name, p) for p in b.modules())]
        size = sum(math.prod(b.shapes[p]) for p in b.const)  # what the join adds: the constant it keeps
        specs.append(BranchSpec(b.join, list(b.groups), inside, max(1, size)))
    return specs


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def profile(
    model: nn.Module,
    traced: PruningPlan,
    ckpt: Checkpoint,
    src: str | Path,
    target: Target,
    rails: Rails,
    *,
    depth: bool = True,
    cache: CellCache | None = None,
    log: Log | None = None,
) -> LatencyTable:
    """A latency table for ``model`` on ``target``: lines through the full model, calibrated on it and the
    smallest model the rails allow; with ``depth`` also on that one with every removable branch removed, so the
    table prices removing each."""
    x = torch.zeros(1, *ckpt.input_shape)
    sizes = [g.size for g in traced.groups]
    steps = [rails.allowed(g.size) if g.prunable else [] for g in traced.groups]
    meta = {
        **target.key(),
        "model": str(src),
        "arch": ckpt.arch,
        "input_shape": list(ckpt.input_shape),
        "approximate": not traced.exact,
    }
    table = LatencyTable(meta, sizes, steps, layer_specs(model, traced, x), full_ms=0.0, depth=depth)
    if not table.layers:
        raise SlimError(
            f"{src} has no layer whose width a prunable channel group changes: there is nothing to prune, so "
            "nothing to profile"
        )
    if depth:
        table.branches = branch_specs(traced, table.layers)
    cache = cache or CellCache(target)
    cache.measure(target, table.lines_around(sizes), log)
    small, bare = table.anchors()
    counts = [small, bare] if table.branches else [small]
    with temporary_folder("slim2deploy-profile-") as tmp:
        work = Path(tmp)
        base = model_artifact(model, ckpt, Path(src), target, work, "baseline")
        models = [
            _pruned_artifact(model, traced, ckpt, src, target, rails, c, work, f"small{i}")
            for i, c in enumerate(counts)
        ]
        measured = target.latencies([base, *models])
    table.full_ms, table.small_ms = measured[0], measured[1]
    table.bare_ms = measured[2] if table.branches else None
    table.recalibrate()
    if log:
        log(
            f"unpruned model {measured[0]:.4g} ms, smallest {measured[1]:.4g} ms"
            + (f", without its {len(table.branches)} removable branches {measured[2]:.4g} ms" if table.branches else "")
            + f" on {target.describe()}; {len(table.layers)} layers profiled, in-model / standalone cost "
            f"{table.scale:.2f}"
        )
    return table


def _pruned_artifact(
    model: nn.Module,
    traced: PruningPlan,
    ckpt: Checkpoint,
    src: str | Path,
    target: Target,
    rails: Rails,
    counts: list[int],
    work: Path,
    stem: str,
) -> Path:
    """``model`` cut to ``counts`` (0: the branch of that group removed) as the file ``target`` runs."""
    narrow = Selection(WidthsSelector(tuple(counts)), rails)
    plan = select(traced, narrow)
    slim = apply_plan(model, plan)
    save_pruned(ckpt, src, slim, plan, narrow, work / f"{stem}.pt")
    return model_artifact(slim, ckpt, work / f"{stem}.pt", target, work, stem)


def refine(
    table: LatencyTable,
    traced: PruningPlan,
    selection: Selection,
    target: Target,
    *,
    cache: CellCache | None = None,
    rounds: int = 3,
    log: Log | None = None,
) -> list[int]:
    """Solve, measure the lines through the solution, solve again; until it stops moving."""
    if not isinstance(selection.selector, LatencySelector):
        raise SlimError("refine needs a latency selection")
    cache = cache or CellCache(target)
    groups, _, removable = selection_groups(traced, selection)
    counts: list[int] = []
    for _ in range(rounds):
        selector = LatencySelector(
            table.to_dict(), selection.selector.latency_ms, selection.selector.speedup, selection.selector.tolerance
        )
        new, _ = selector.kept_counts(groups, selection.rails, removable)
        if new == counts or not cache.measure(target, table.lines_around(new), log):
            return new
        table.recalibrate()
        counts = new
    return counts


def read_table(
    path: str | Path, traced: PruningPlan, ckpt: Checkpoint, target: Target, depth: bool = True
) -> LatencyTable:
    """The table at ``path`` (``--table``), refused unless profiled for this model -- its channel groups,
    architecture and input size -- measured the way ``target`` measures, and (pruning with ``depth`` a model
    with removable branches) profiled with depth."""
    data = read_json(path, "latency table", advice="profile the model again")
    try:
        table = LatencyTable.from_dict(data)
    except SlimError as exc:
        raise SlimError(f"{path}: {exc}") from None
    table.check_model([g.size for g in traced.groups], [g.prunable for g in traced.groups])
    try:
        table.check_depth({i for b in traced.branches if b.removable for i in b.groups} if depth else set())
    except SlimError as exc:
        raise SlimError(f"{path}: {exc}") from None
    if table.meta.get("timing") != TIMING_METHOD:
        raise SlimError(
            f"{path}: the latency table was timed by an older method of this tool (ONNX Runtime thread pools left "
            "spinning while other sessions were timed, which skews its cells); run 'slim2deploy profile' again"
        )
    how = {"target": target.name, "batch": target.batch, "precision": target.precision, "threads": target.threads}
    try:
        table.check_measured_for(ckpt.arch, ckpt.input_shape, how)
    except SlimError as exc:
        raise SlimError(f"{path}: {exc}") from None
    return table


def profile_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    target: str = "ort-cpu",
    batch: int = 64,
    precision: str = "fp32",
    threads: int | None = None,
    rails: Rails | None = None,
    cache: str | None = str(DEFAULT_CACHE),
    speedup: float | None = None,
    trust_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    exact: bool = True,
    depth: bool = True,
    log: Log | None = print,
) -> LatencyTable:
    """What ``slim2deploy profile`` does: checkpoint in, latency table (JSON) out; ``depth``: priced removing
    residual branches too (``speedup``: refined for a pruning with depth)."""
    rails = rails or Rails()
    tgt = make_target(target, batch, precision, threads)
    ckpt, rebuilt = load_for_pruning(src, trust_code, input_shape)
    rebuilt.check_batch(batch, "`profile_batch`")
    model = rebuilt.model
    traced = trace_groups(model, torch.zeros(1, *ckpt.input_shape), exact=exact)
    cells = CellCache(tgt, cache)
    table = profile(model, traced, ckpt, src, tgt, rails, depth=depth, cache=cells, log=log)
    if speedup is not None:
        selection = Selection(LatencySelector(table.to_dict(), speedup=speedup), rails, depth=depth)
        refine(table, traced, selection, tgt, cache=cells, log=log)
    atomic_write_text(dst, table.to_json())
    return table
