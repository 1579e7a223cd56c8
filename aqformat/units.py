"""Sizes as people type and read them: decimal kB/MB/GB (1000) and binary KiB/MiB/GiB (1024).

Every size a command accepts (``--target-size``, ``--memory-budget``) is parsed
here and every size it prints is formatted here, so the two always agree.
"""
from __future__ import annotations

import math

from .errors import AqmInputError

__all__ = ["UNITS_HELP", "format_size", "parse_size"]

UNITS_HELP = "kB/KB = 1000 bytes, KiB = 1024; MB, MiB, GB, GiB likewise; a bare number is bytes"
_UNITS = {"gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10, "gb": 10**9, "mb": 10**6, "kb": 10**3,
          "g": 10**9, "m": 10**6, "k": 10**3, "b": 1}


def parse_size(text: str | int) -> int:
    """Bytes from ``"5MB"``, ``"1.5GiB"``, ``"800k"``, ``"250 kB"`` or an int.

    Raises
    ------
    AqmInputError
        Not a positive size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise AqmInputError(f"size must be positive, got {text}")
        return text
    s = str(text).strip().lower().replace(" ", "")
    factor = 1
    for unit, mult in _UNITS.items():
        if s.endswith(unit):
            s, factor = s[: -len(unit)], mult
            break
    try:
        value = float(s)
    except ValueError:
        raise AqmInputError(f"cannot parse size {text!r} (e.g. 5MB, 250kB, 1.5GiB; {UNITS_HELP})") from None
    if not value > 0 or value * factor >= 1 << 63:
        raise AqmInputError(f"size must be positive, got {text!r}")
    return int(value * factor)


def format_size(n: float, like: str | None = None, rounding: str = "nearest") -> str:
    """``n`` bytes for reading: in the unit of ``like`` (a size the user typed) when given,
    else in decimal units (kB, MB, GB); about four significant digits, rounded to the
    nearest, or ``"down"``/``"up"`` (a size to type back that stays under or over ``n``)."""
    scale = 1
    label = "B"
    if like is not None:
        s = str(like).strip().lower().replace(" ", "")
        for unit, mult in _UNITS.items():
            if s.endswith(unit) and unit != "b":
                scale = mult
                label = {"k": "kB", "kb": "kB", "m": "MB", "g": "GB"}.get(unit, unit.upper().replace("I", "i"))
                break
    else:
        for label, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3), ("B", 1)):
            if n >= scale:
                break
    v = n / scale
    digits = _digits(v) if scale > 1 else 0
    step = 10.0 ** digits
    v = {"down": math.floor, "up": math.ceil}.get(rounding, round)(v * step) / step
    return f"{v:.{digits}f} {label}"


def _digits(v: float) -> int:
    """Decimals that keep about four significant digits."""
    return 0 if v >= 1000 else 1 if v >= 100 else 2 if v >= 10 else 3
