"""Matrix products straight from AQ codes: the lookup-table product for a few input rows.

For input rows ``x`` (already permuted and zero-padded to ``cols_p``), the
table ``lut[j, m, k, t] = <C[m][k], x[t, j*d:(j+1)*d]>`` holds the dot product
of every codeword with every chunk of every input row; output ``y[t, r]`` is
the sum over the row's vectors ``j`` and codebooks ``m`` of
``lut[j, m, code[r*nch + j][m], t]``, times the row's scale. The table costs
``M*K*cols_p`` multiply-adds per input row, the sums ``rows*nch*M`` table
reads, against ``rows*cols`` for a decoded weight, so it pays when ``rows`` is
large compared with ``M*K`` and few rows come in.

Results equal ``x @ W.T`` up to float32 rounding (the sums are ordered
differently): relative error about ``1e-6 * sqrt(cols)``.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import compile_kernel, run_parallel, threads


def _lut_block(lut, codes, scale, has_scale, r0, r1, y):  # pragma: no cover - compiled by numba
    """``y[:, r] = sum_j sum_m lut[j, m, code[r*nch + j, m], :] (* scale[r])`` for rows ``r0 .. r1``."""
    nch, M, K, T = lut.shape
    acc = np.empty(T, np.float32)
    for r in range(r0, r1):
        acc[:] = 0
        v0 = r * nch
        for j in range(nch):
            for m in range(M):
                c = codes[v0 + j, m]
                for t in range(T):
                    acc[t] += lut[j, m, c, t]
        s = scale[r] if has_scale else np.float32(1.0)
        for t in range(T):
            y[t, r] = acc[t] * s


def _signatures(ty: Any) -> list[Any]:
    return [ty.void(ty.Array(ty.float32, 4, "C", readonly=True), ty.Array(c, 2, "C", readonly=True),
                    ty.Array(ty.float32, 1, "C", readonly=True), ty.boolean, ty.int64, ty.int64,
                    ty.Array(ty.float32, 2, "C")) for c in (ty.uint8, ty.uint16)]


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    return compile_kernel("lut_matmul", _lut_block, _signatures)


def lut_matmul(lut: np.ndarray, codes: np.ndarray, scale: np.ndarray | None, rows: int) -> np.ndarray:
    """Output ``y[T, rows]`` of the lookup-table product (see the module docstring).

    Parameters
    ----------
    lut : numpy.ndarray
        float32 ``[nch, M, K, T]`` table of codeword-chunk dot products.
    codes : numpy.ndarray
        ``[rows * nch, M]`` uint8/uint16 codes, every one below ``K`` (checked by the caller).
    scale : numpy.ndarray, optional
        float32 ``[rows]``.
    rows : int
        Output rows of the matrix.
    """
    nch, M, K, T = lut.shape
    y = np.empty((T, rows), np.float32)
    k = _kernel()
    if k is None:
        flat = lut.reshape(nch * M * K, T)
        idx = (np.arange(nch * M).reshape(nch, M) * K)[None] + codes.reshape(rows, nch, M)
        y[...] = flat[idx.reshape(rows, -1)].sum(1).T
        if scale is not None:
            y *= scale
        return y
    s = np.zeros(0, np.float32) if scale is None else scale
    tasks = min(threads(), max(1, rows * nch * M // (1 << 15)))
    cuts = [rows * i // tasks for i in range(tasks + 1)]
    run_parallel([(k, (lut, codes, s, scale is not None, a, b, y)) for a, b in zip(cuts, cuts[1:])])
    return y
