"""Additive-quantization decoder (spec/FORMAT.md, codec "aq")."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..layout import from_matrix

_CHUNK_VECTORS = 1 << 16  # bounds temporaries and keeps the running sum in cache


def decode_vectors(codes: np.ndarray, codebooks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Sum one codeword per codebook for every vector.

    Parameters
    ----------
    codes : numpy.ndarray
        Integer codes, shape ``(n, M)``.
    codebooks : numpy.ndarray
        float32 codebooks, shape ``(M, K, d)``.
    out : numpy.ndarray, optional
        float32 output of shape ``(n, d)``.

    Returns
    -------
    numpy.ndarray
        Decoded vectors, shape ``(n, d)``, float32.
    """
    n, M = codes.shape
    d = codebooks.shape[2]
    if out is None:
        out = np.empty((n, d), dtype=np.float32)
    # Viewing each codeword as one opaque d*4-byte item makes the gather a plain
    # item copy instead of d separate element copies.
    rows = np.ascontiguousarray(codebooks, dtype=np.float32).view(np.dtype((np.void, 4 * d)))
    rows = rows.reshape(M, -1)
    out_items = out.view(np.dtype((np.void, 4 * d))).reshape(n)
    tmp = np.empty((min(n, _CHUNK_VECTORS), d), dtype=np.float32)
    for s in range(0, n, _CHUNK_VECTORS):
        e = min(n, s + _CHUNK_VECTORS)
        np.take(rows[0], codes[s:e, 0], out=out_items[s:e])
        for m in range(1, M):
            t = tmp[: e - s]
            np.take(rows[m], codes[s:e, m], out=t.view(np.dtype((np.void, 4 * d))).reshape(e - s))
            out[s:e] += t
    return out


def decode_aq(codes: np.ndarray, codebooks: np.ndarray, shape: Sequence[int],
              scale: np.ndarray | None, perm: np.ndarray | None,
              axes: Sequence[int] | None, rows: int, cols: int) -> np.ndarray:
    """Rebuild a float32 tensor from its codes (see spec, "Layout")."""
    d = codebooks.shape[2]
    cols_p = -(-cols // d) * d
    w = decode_vectors(codes, codebooks).reshape(rows, cols_p)[:, :cols]
    if scale is not None:
        w *= scale.astype(np.float32)[:, None]
    return from_matrix(np.ascontiguousarray(w), shape, axes, perm)
