"""How a tensor is viewed as a matrix of d-dimensional vectors (spec/FORMAT.md, "Layout").

A logical tensor ``T`` is transposed by ``axes`` and flattened to a matrix
``W[rows, cols]`` (rows = first axis after transposing). Its columns are
permuted by ``perm`` (``Wp = W[:, perm]``), rows divided by ``scale``, and
each row is zero-padded to a multiple of ``d`` and cut into consecutive
vectors. Encoders use :func:`to_matrix`; decoders use :func:`from_matrix`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def matrix_shape(shape: Sequence[int], axes: Sequence[int] | None) -> tuple[int, int]:
    """Return ``(rows, cols)`` of the matrix view of a tensor of ``shape``."""
    dims = [shape[a] for a in axes] if axes is not None else list(shape)
    if not dims:
        return 1, 1
    rows = int(dims[0])
    cols = 1
    for x in dims[1:]:
        cols *= int(x)
    return rows, cols


def to_matrix(t: np.ndarray, axes: Sequence[int] | None = None,
              perm: np.ndarray | None = None) -> np.ndarray:
    """Matrix view ``W[rows, cols]`` of tensor ``t`` with columns permuted by ``perm``."""
    u = np.transpose(t, axes) if axes is not None else t
    w = u.reshape(u.shape[0] if u.ndim else 1, -1)
    return w[:, perm] if perm is not None else w


def from_matrix(w: np.ndarray, shape: Sequence[int], axes: Sequence[int] | None = None,
                perm: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`to_matrix`: rebuild the tensor of ``shape`` from ``W``."""
    if perm is not None:
        out = np.empty_like(w)
        out[:, perm] = w
        w = out
    if axes is None:
        return w.reshape(shape)
    u = w.reshape([shape[a] for a in axes])
    return np.transpose(u, np.argsort(axes))
