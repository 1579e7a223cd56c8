"""Text from a file made safe to print: control characters (ESC, CR, BEL...) are escaped.

Names, metadata and error messages carry bytes an attacker chose; printed
raw, an ESC sequence could move the cursor, rewrite earlier lines or set the
terminal's title.
"""
from __future__ import annotations

from typing import Any


def printable(value: Any) -> str:
    """``str(value)`` with every non-printable character written as its Python escape (``\\x1b``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
