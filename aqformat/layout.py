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
from typing import Any

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
    return unview(w, shape, axes, None if perm is None else np.argsort(perm))


def unview(w: Any, shape: Sequence[int], axes: Sequence[int] | None = None, inv_perm: Any = None) -> Any:
    """:func:`from_matrix` given the inverse permutation, for numpy arrays and torch tensors alike.

    Columns are gathered by ``inv_perm`` (``argsort(perm)``, computed once by callers that
    rebuild a tensor repeatedly), then the matrix is reshaped and its axes transposed back.
    On torch tensors every step is differentiable.
    """
    if inv_perm is not None:
        w = w[:, inv_perm]
    if axes is None:
        return w.reshape(tuple(shape))
    u = w.reshape([shape[a] for a in axes])
    order = tuple(int(i) for i in np.argsort(axes))
    return u.permute(order) if hasattr(u, "permute") else u.transpose(order)
