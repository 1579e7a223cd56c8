"""Codec ``uniform`` (spec/FORMAT.md 4.3, 5.7; format 1.4): integer indices times a per-row step.

The lattice codec without its dither: ``W = q * step[row]``. At low rates a
deterministic rounding (zero for the many small weights) has far less error
than the dither's ``step**2 / 12`` a weight, at fewer bits; at high rates the
two are alike. The fields and the index section are the lattice codec's less
its seed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import Codec, register
from .lattice import decode_lattice, parse_indices, read_indices, sizes
from .lattice import index_fields as fields

if TYPE_CHECKING:
    from ..reader import AqmFile

NAME = "uniform"
__all__ = ["NAME", "CODEC", "decode", "fields"]


def decode(t: Any, f: AqmFile) -> np.ndarray:
    q, step, rows, cols = read_indices(t, f)
    return decode_lattice(q, step, None, t.shape, t.fields["axes"], rows, cols)


def work(t: Any, groups: Any) -> int:
    """Decoder memory: two float64 arrays (indices, product), float32 output, a layout copy and a
    float16 copy, per element."""
    return t.numel * 26


CODEC = register(Codec(NAME, parse_indices, sizes, decode, work=work, minor=4))
