"""Matrix products straight from AQ codes: decode-and-multiply and the lookup-table product, for a few input rows.

:func:`decode_matmul` decodes four matrix rows at a time into a buffer that
stays in the L1 cache and multiplies them with every input row at once, so no
decoded weight ever reaches memory: for a few input rows (a sentence) it runs
at about the speed of decoding, with no second pass over a decoded tile.

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
from .decode import _vectors8, _vectors8_m

_FASTMATH = frozenset({"reassoc", "contract", "nsz"})  # vectorised dot products (sums in another order)
# weights per task when several threads share one product. On the 2-core EPYC, at M = 2, a second
# thread made every MiniLM shape (384..1536 x 384..1536, 1 to 16 input rows) slower, by the 20-25 us
# a task's start costs; 1024 x 1024 too (0.85x at one input row), 4096 x 1024 faster (1.32x).
_MIN_TASK_VALUES = 1 << 21


def _decode_matmul_block(x, codes, cb, scale, has_scale, r0, r1, y):  # pragma: no cover - compiled by numba
    """``y[:, r] = (x @ Q[r]) * scale[r]`` for matrix rows ``r0 .. r1``, decoding ``Q`` four rows at a time (d = 8).

    ``x`` is ``[T, nch * 8]``, zero-padded past the matrix's columns.
    """
    M = cb.shape[0]
    T, width = x.shape
    nch = width // 8
    cbf = cb.reshape(cb.size)
    one = np.float32(1.0)
    w = np.zeros(4 * width, np.float32)
    for rb in range(r0, r1, 4):
        n = min(4, r1 - rb)
        for i in range(n):
            _vectors8_m(codes, cbf, (rb + i) * nch, nch, M, one, False, w[i * width:])
        w[n * width:] = 0
        w0, w1, w2, w3 = w[:width], w[width:2 * width], w[2 * width:3 * width], w[3 * width:]
        for t in range(T):
            xt = x[t]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for c in range(width):
                v = xt[c]
                a0 += v * w0[c]
                a1 += v * w1[c]
                a2 += v * w2[c]
                a3 += v * w3[c]
            for i, a in enumerate((a0, a1, a2, a3)):
                if i < n:
                    y[t, rb + i] = a * scale[rb + i] if has_scale else a


def _decode_matmul_signatures(ty: Any) -> list[Any]:
    ro2 = ty.Array(ty.float32, 2, "C", readonly=True)
    return [ty.void(ro2, ty.Array(c, 2, "C", readonly=True), ty.Array(ty.float32, 3, "C", readonly=True),
                    ty.Array(ty.float32, 1, "C", readonly=True), ty.boolean, ty.int64, ty.int64,
                    ty.Array(ty.float32, 2, "C")) for c in (ty.uint8, ty.uint16)]


@functools.lru_cache(maxsize=None)
def _decode_matmul_kernel() -> Any:
    return compile_kernel("decode_matmul", _decode_matmul_block, _decode_matmul_signatures,
                          helpers=(_vectors8, _vectors8_m), fastmath=_FASTMATH)


def compiled() -> bool:
    """Whether the compiled product kernels are in use (compiling or loading them from the cache on first call)."""
    return _kernel() is not None and _decode_matmul_kernel() is not None


def decode_matmul_ok(codes: np.ndarray, codebooks: np.ndarray) -> bool:
    """Whether :func:`decode_matmul` runs compiled for these codes and codebooks (numba installed,
    uint8/uint16 codes, ``d = 8``)."""
    return codebooks.shape[2] == 8 and codes.dtype in (np.uint8, np.uint16) and _decode_matmul_kernel() is not None


def decode_matmul(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scale: np.ndarray | None,
                  rows: int) -> np.ndarray:
    """``x @ Q.T`` (scaled rows) for a d = 8 AQ matrix ``Q[rows, cols]``, never holding more than 4 decoded rows.

    Parameters
    ----------
    x : numpy.ndarray
        float32 ``[T, nch * 8]`` input rows, zero-padded past ``cols`` (C-contiguous).
    codes : numpy.ndarray
        ``[rows * nch, M]`` uint8/uint16 codes, every one below ``K`` (checked by the caller).
    codebooks : numpy.ndarray
        float32 ``[M, K, 8]``.
    scale : numpy.ndarray, optional
        float32 ``[rows]``.
    rows : int
        Output rows of the matrix.

    Returns
    -------
    numpy.ndarray
        float32 ``[T, rows]``; equal to the product with the decoded matrix up
        to float32 rounding (sums in another order).

    Raises
    ------
    RuntimeError
        The compiled kernel is not available (see :func:`decode_matmul_ok`).
    """
    if not decode_matmul_ok(codes, codebooks):
        raise RuntimeError("decode_matmul needs numba, uint8/uint16 codes and d = 8 (check decode_matmul_ok first)")
    T = x.shape[0]
    y = np.empty((T, rows), np.float32)
    s = np.zeros(0, np.float32) if scale is None else scale
    tasks = min(threads(), max(1, rows * x.shape[1] // _MIN_TASK_VALUES))
    cuts = [rows * i // tasks for i in range(tasks + 1)]
    k = _decode_matmul_kernel()
    run_parallel([(k, (x, codes, codebooks, s, scale is not None, a, b, y)) for a, b in zip(cuts, cuts[1:])])
    return y


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
