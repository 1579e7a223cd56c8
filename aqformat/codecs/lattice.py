"""Dithered uniform-lattice decoder (spec/FORMAT.md, codec "lattice")."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..dither import dither
from ..layout import from_matrix


def decode_lattice(q: np.ndarray, step: np.ndarray, seed: int, shape: Sequence[int],
                   axes: Sequence[int] | None, rows: int, cols: int) -> np.ndarray:
    """``W = (q - u) * step[row]`` with ``u`` the seeded dither, as float32."""
    u = dither(seed, rows * cols).reshape(rows, cols)
    w = ((q.reshape(rows, cols) - u) * step.astype(np.float64)[:, None]).astype(np.float32)
    return from_matrix(w, shape, axes, None)
