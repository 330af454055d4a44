"""The safety rails of the pruning plan: their defaults and their checks (no torch needed)."""

from __future__ import annotations

from slim2deploy.base.errors import SlimError

DEFAULT_MIN_CHANNELS = 8  # below 8 channels a layer is cheap anyway and tensor cores idle
DEFAULT_MAX_PRUNE = 0.9  # keeps a tenth of every group, so no layer is reduced to a sliver
DEFAULT_ROUND_TO = 8  # ORT's blocked conv layout and TensorRT FP16 both want multiples of 8


def check_rails(ratio: float, min_channels: int, max_prune: float, round_to: int) -> None:
    """One clear error for a ratio or rail that cannot work."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise SlimError(f"ratio must be a fraction between 0 and 1 (exclusive), got {ratio!r}")
    if not (isinstance(min_channels, int) and min_channels >= 1):
        raise SlimError(f"min_channels must be an integer >= 1 (a group is never emptied), got {min_channels!r}")
    if not (isinstance(max_prune, (int, float)) and 0 < max_prune <= 1):
        raise SlimError(f"max_prune must be in (0, 1], got {max_prune!r}")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise SlimError(f"round_to must be an integer >= 1 (1 = no rounding), got {round_to!r}")
