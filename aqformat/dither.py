"""Reproducible dither for the lattice codec (spec/FORMAT.md, "Dither").

The generator is SplitMix64 evaluated at counter ``seed + i``, so any
implementation reproduces it from the spec and any element can be computed
without generating the ones before it.
"""
from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def dither(seed: int, count: int, start: int = 0) -> np.ndarray:
    """Return ``count`` uniform values in [-0.5, 0.5) as float64.

    Parameters
    ----------
    seed : int
        Unsigned 64-bit seed stored in the tensor record.
    count : int
        Number of values.
    start : int
        Index of the first value (lets a decoder produce any slice).
    """
    i = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (i + np.uint64(1)) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) - 0.5
