"""How a tensor is viewed as a matrix of d-dimensional vectors (spec/FORMAT.md, "Layout").

A logical tensor ``T`` is transposed by ``axes`` and flattened to a matrix
``W[rows, cols]`` (rows = first axis after transposing; a rank-1 tensor is
one row). Its columns are
permuted by ``perm`` (``Wp = W[:, perm]``), rows divided by ``scale``, and
each row is zero-padded to a multiple of ``d`` and cut into consecutive
vectors. Encoders use :func:`to_matrix`; decoders use :func:`from_matrix`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def matrix_shape(shape: Sequence[int], axes: Sequence[int] | None) -> tuple[int, int]:
    """Return ``(rows, cols)`` of the matrix view of a tensor of ``shape``."""
    dims = [int(shape[a]) for a in axes] if axes is not None else [int(x) for x in shape]
    if len(dims) < 2:  # scalars and vectors are one row
        dims = [1] + dims
    cols = 1
    for x in dims[1:]:
        cols *= x
    return dims[0], cols


def to_matrix(t: np.ndarray, axes: Sequence[int] | None = None,
              perm: np.ndarray | None = None) -> np.ndarray:
    """Matrix view ``W[rows, cols]`` of tensor ``t`` with columns permuted by ``perm``."""
    u = np.transpose(t, axes) if axes is not None else t
    w = u.reshape(u.shape[0] if u.ndim >= 2 else 1, -1)
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
