"""Op handlers by ATen operator name: a new op family is one decorated function.

A handler ``f(state, node, name)`` returns the layout of ``node``'s output (a list of layouts for
ops with several outputs) or ``None`` when it cannot follow the channels, in which case the walk
makes every group the op touches unprunable, naming the op and its module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from slim2deploy.prune.trace.state import TraceState

Handler = Callable[[TraceState, fx.Node, str], Any]

HANDLERS: dict[str, Handler] = {}


def handles(*names: str) -> Callable[[Handler], Handler]:
    """Decorator: ``@handles("add", "sub")`` registers the function for those operator names."""

    def register(fn: Handler) -> Handler:
        for name in names:
            if name in HANDLERS:
                raise ValueError(f"two handlers for the operator {name!r}")
            HANDLERS[name] = fn
        return fn

    return register
