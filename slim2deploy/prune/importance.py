"""The names of the scores that rank channels (``prune.score`` holds the functions); torch-free, so the
command line can list them without importing torch."""

from __future__ import annotations

GAMMA = "gamma"  # the paper's |gamma|
GAMMA_OUT = "gamma-out"  # |gamma| times the channel's relative weight norm in the layers that read it
NAMES = (GAMMA, GAMMA_OUT)
DEFAULT_IMPORTANCE = GAMMA
