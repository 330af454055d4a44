"""The walk over the exported graph: every node's output layout from its handler.

The model is traced once with ``torch.export`` (eval mode, the example input). The result is an
ATen graph in which modules, functional calls and tensor methods have all become the same small
set of operators, parameters and buffers appear as named inputs, and every value carries its
shape. ``torch.fx.symbolic_trace`` was the alternative; it is faster but leaves a mix of module
calls, functions and methods to interpret, has no shapes without an extra pass, and stops at
data-dependent Python. ``torch.export`` traced every torchvision classifier tried.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.trace.layout import op_name
from slim2deploy.prune.trace.registry import HANDLERS
from slim2deploy.prune.trace.state import TraceState


def export(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return torch.export.export(model, (example_input,))
    except Exception as exc:  # noqa: BLE001 - any tracer failure becomes one explained error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SlimError(
            f"torch.export could not trace {type(model).__name__} with an input of shape "
            f"{tuple(example_input.shape)}: {first}. Check that the model runs on this input, and that its "
            "forward has no data-dependent Python control flow"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training


def walk(state: TraceState) -> None:
    for node in state.ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in state.user_inputs:
                state.env[node] = state.fresh(node, reason="model input")
        elif node.op == "call_function":
            state.env[node] = _visit(state, node)
        elif node.op == "output":
            for n in node.all_input_nodes:
                state.stop(state.env.get(n), "model output")


def _visit(state: TraceState, node: fx.Node) -> Any:
    v = node.meta.get("val")
    if node.target is operator.getitem:
        src = state.lay(node.args[0])
        index: Any = node.args[1]
        return src[index] if isinstance(src, (list, tuple)) else None
    tensors = [t for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]
    if not tensors:
        return None  # shape queries and assertions carry no channels
    inputs = [state.lay(a) for a in node.all_input_nodes]
    if not any(i is not None for i in inputs):
        return None  # computed from parameters and constants only
    name = op_name(node.target)
    handler = HANDLERS.get(name)
    result = handler(state, node, name) if handler is not None else None
    if result is None:
        return _unknown(state, node)
    return result


def _unknown(state: TraceState, node: fx.Node) -> Any:
    why = f"{state.where(node)}: the planner cannot follow channels through it"
    state.stop([state.lay(a) for a in node.all_input_nodes], why)
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        return [state.fresh_val(t, why) for t in v]
    return state.fresh(node, reason=why)
