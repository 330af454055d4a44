"""The safety rails: how few channels a group may keep and which kept counts are allowed (no torch).

Rails are their own data, independent of the rule that decides how much to prune (a ratio, a
latency budget): every selector asks the rails which kept counts a group may have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from slim2deploy.base.errors import SlimError

DEFAULT_MIN_CHANNELS = 8  # below 8 channels a layer is cheap anyway and tensor cores idle
DEFAULT_MAX_PRUNE = 0.9  # keeps a tenth of every group, so no layer is reduced to a sliver
DEFAULT_ROUND_TO = 8  # ORT's blocked conv layout and TensorRT FP16 both want multiples of 8


@dataclass(frozen=True)
class Rails:
    """Keep at least ``min_channels`` and at least ``1 - max_prune`` of a group; kept counts are
    rounded up to a multiple of ``round_to`` (never above the group's size). The rails never empty a
    group (with depth, a selection may empty one inside a removable residual branch, which then goes
    whole: ``prune.select``). ``Rails.paper()`` (1, 1.0, 1) is the paper's plain global threshold."""

    min_channels: int = DEFAULT_MIN_CHANNELS
    max_prune: float = DEFAULT_MAX_PRUNE
    round_to: int = DEFAULT_ROUND_TO

    def __post_init__(self) -> None:
        if not (isinstance(self.min_channels, int) and self.min_channels >= 1):
            raise SlimError(
                f"min_channels must be an integer >= 1 (a group is never emptied), got {self.min_channels!r}"
            )
        if not (isinstance(self.max_prune, int | float) and 0 < self.max_prune <= 1):
            raise SlimError(f"max_prune must be in (0, 1], got {self.max_prune!r}")
        if not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise SlimError(f"round_to must be an integer >= 1 (1 = no rounding), got {self.round_to!r}")

    @classmethod
    def paper(cls) -> Rails:
        return cls(min_channels=1, max_prune=1.0, round_to=1)

    def floor(self, size: int) -> int:
        """The fewest channels a group of ``size`` may keep."""
        return min(size, max(self.min_channels, math.ceil(size * (1.0 - self.max_prune) - 1e-9), 1))

    def fit(self, size: int, kept: int) -> int:
        """``kept`` raised to the floor and rounded up to the step, never above ``size``."""
        k = min(size, max(kept, self.floor(size)))
        return min(size, -(-k // self.round_to) * self.round_to)

    def allowed(self, size: int) -> list[int]:
        """Every kept count the rails allow for a group of ``size``, ascending (``size`` included)."""
        return sorted({self.fit(size, k) for k in range(1, size + 1)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rails:
        if not isinstance(d, dict):
            raise SlimError(f"rails must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"min_channels", "max_prune", "round_to"})
        if unknown:
            raise SlimError(f"unknown rails field(s) {', '.join(unknown)}; expected min_channels, max_prune, round_to")
        return cls(**d)


def check_ratio(ratio: float) -> float:
    """One clear error for a ratio that cannot work."""
    if isinstance(ratio, bool) or not (isinstance(ratio, int | float) and 0 < ratio < 1):
        raise SlimError(f"`ratio` must be between 0 and 1 (the share of prunable channels to remove), got {ratio!r}")
    return float(ratio)
