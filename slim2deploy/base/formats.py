"""Numbers for people: one formatter for counts (params, MACs, bytes) and one for memory sizes."""

from __future__ import annotations


def si(n: float | None, unit: str = "", digits: int = 2) -> str:
    """``1234567`` -> ``1.23M``; None -> ``-``. Decimal prefixes, for counts."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{suffix}{unit}"
    return f"{n:g}{unit}"


def binary_size(n: int | None) -> str:
    """``3 << 20`` -> ``3.0 MiB``; None -> ``-``. Binary prefixes, for memory and files."""
    if n is None:
        return "-"
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
