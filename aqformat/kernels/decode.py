"""AQ decode kernel: codes -> float32 matrix rows, summing codewords in codebook order.

The compiled kernel computes exactly what :func:`aqformat.codecs.aq.decode_aq`
computes with numpy (spec/FORMAT.md 5.2 steps 1-3: float32 additions in
increasing ``m``, padding columns dropped, then one float32 multiply by the
row's scale), so its output is bit-identical. It is multi-threaded over rows
(numba ``prange``) and checks every code against ``K`` before it indexes a
codebook.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..codecs.aq import decode_vectors
from ..errors import AqmIntegrityError
from . import compile_kernel, requested, run_parallel, threads


def _vectors8(codes, cbf, v0, n, M, s, has_scale, out):  # pragma: no cover - compiled by numba
    """Decode the ``n`` d = 8 vectors coded in rows ``v0 .. v0 + n`` of ``codes`` into ``out[: 8n]``
    (``M`` flat codebooks ``cbf``), each times ``s`` when ``has_scale``.

    A codeword's 8 floats are kept in scalar variables, which the SLP
    vectoriser turns into single vector loads, additions and stores. Indices
    are unsigned so that numba emits no negative-index wraparound.
    """
    u8 = np.uint64(8)
    uK = np.uint64(cbf.size // (8 * M))
    for j in range(n):
        o = np.uint64(codes[v0 + j, 0]) * u8
        a0, a1, a2, a3 = cbf[o], cbf[o + np.uint64(1)], cbf[o + np.uint64(2)], cbf[o + np.uint64(3)]
        a4, a5, a6, a7 = cbf[o + np.uint64(4)], cbf[o + np.uint64(5)], cbf[o + np.uint64(6)], cbf[o + np.uint64(7)]
        for m in range(1, M):
            o = (np.uint64(m) * uK + np.uint64(codes[v0 + j, m])) * u8
            a0 += cbf[o]
            a1 += cbf[o + np.uint64(1)]
            a2 += cbf[o + np.uint64(2)]
            a3 += cbf[o + np.uint64(3)]
            a4 += cbf[o + np.uint64(4)]
            a5 += cbf[o + np.uint64(5)]
            a6 += cbf[o + np.uint64(6)]
            a7 += cbf[o + np.uint64(7)]
        if has_scale:  # x * 1 == x, but the spec multiplies only when there is a scale
            a0, a1, a2, a3, a4, a5, a6, a7 = a0 * s, a1 * s, a2 * s, a3 * s, a4 * s, a5 * s, a6 * s, a7 * s
        e = np.uint64(j) * u8
        out[e], out[e + np.uint64(1)], out[e + np.uint64(2)], out[e + np.uint64(3)] = a0, a1, a2, a3
        out[e + np.uint64(4)], out[e + np.uint64(5)], out[e + np.uint64(6)], out[e + np.uint64(7)] = a4, a5, a6, a7


def _vectors8_m(codes, cbf, v0, n, M, s, has_scale, out):  # pragma: no cover - compiled by numba
    """:func:`_vectors8` with ``M`` a constant for the usual 2 and 4 codebooks (their loop then unrolled)."""
    if M == 4:
        _vectors8(codes, cbf, v0, n, 4, s, has_scale, out)
    elif M == 2:
        _vectors8(codes, cbf, v0, n, 2, s, has_scale, out)
    else:
        _vectors8(codes, cbf, v0, n, M, s, has_scale, out)


def _decode_block(codes, cb, scale, has_scale, r0, r1, out):  # pragma: no cover - compiled by numba
    """Decode matrix rows ``r0 .. r1`` into ``out[0 : r1 - r0]``; every code must be below ``K``.

    The caller checks the codes (a branch per code here would halve the
    speed: it stops the additions being vectorised).
    """
    M, K, d = cb.shape
    cols = out.shape[1]
    nch = (cols + d - 1) // d
    cbf = cb.reshape(cb.size)
    of = out.reshape(out.size)
    full = cols // d if d == 8 else 0
    for r in range(r0, r1):
        s = scale[r] if has_scale else np.float32(1.0)
        v0 = r * nch
        _vectors8_m(codes, cbf, v0, full, M, s, has_scale, of[(r - r0) * cols:])
        for j in range(full, nch):  # any d, and the last (partial) vector of a row
            base = j * d
            width = min(d, cols - base)
            i = r - r0
            c = codes[v0 + j, 0]
            for t in range(width):
                out[i, base + t] = cb[0, c, t]
            for m in range(1, M):
                c = codes[v0 + j, m]
                for t in range(width):
                    out[i, base + t] += cb[m, c, t]
            if has_scale:
                for t in range(width):
                    out[i, base + t] *= s


# codeword additions (values x M) per task when several threads decode one tensor: handing a task
# to the pool costs about 40-50 us, about what one thread needs for 1M additions (2-core EPYC:
# 384 x 1536 at M = 2 ran 0.87x as fast on two threads as on one, at M = 4 1.59x)
_MIN_TASK_ADDS = 1 << 20
# smaller decodes stay in numpy even with the kernel loaded: as fast there
_MIN_KERNEL_VALUES = 1 << 14


def _signatures(ty: Any) -> list[Any]:
    ro = {n: ty.Array(ty.float32, n, "C", readonly=True) for n in (1, 3)}  # inputs may be file mappings
    return [ty.void(ty.Array(c, 2, "C", readonly=True), ro[3], ro[1], ty.boolean, ty.int64, ty.int64,
                    ty.Array(ty.float32, 2, "C")) for c in (ty.uint8, ty.uint16)]


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    return compile_kernel("decode", _decode_block, _signatures, helpers=(_vectors8, _vectors8_m))


def compiled() -> bool:
    """Whether the compiled decode kernel is in use (compiling or loading it from the cache on first call).

    Calling it also makes :func:`decode_rows` use the kernel from then on; until
    then, only ``AQFORMAT_KERNELS=numba`` does (see :mod:`aqformat.kernels`).
    """
    return _kernel() is not None


def _loaded_kernel() -> Any:
    """The compiled kernel if :func:`compiled` has loaded it or the environment asks for it, else None."""
    return _kernel() if _kernel.cache_info().currsize or requested() else None


def decode_rows(codes: np.ndarray, codebooks: np.ndarray, scale: np.ndarray | None, cols: int,
                out: np.ndarray | None = None, row_start: int = 0, max_threads: int | None = None) -> np.ndarray:
    """Decode rows of an AQ matrix view (spec 5.2 steps 1-3) into ``out``.

    Parameters
    ----------
    codes : numpy.ndarray
        ``[n_vectors, M]`` uint8/uint16 codes of the whole matrix.
    codebooks : numpy.ndarray
        ``[M, K, d]`` float32 codebooks.
    scale : numpy.ndarray, optional
        ``[rows]`` per-row scale of the whole matrix.
    cols : int
        Columns of the matrix view (before padding to a multiple of ``d``).
    out : numpy.ndarray, optional
        float32 ``[n_rows, cols]``, C-contiguous; rows ``row_start ..
        row_start + n_rows`` are decoded into it. Default: every row.
    row_start : int
        First row to decode.
    max_threads : int, optional
        At most this many threads (default: :func:`aqformat.kernels.threads`).

    Returns
    -------
    numpy.ndarray
        ``out``.

    Raises
    ------
    AqmIntegrityError
        A code is not below ``K`` (the code section is corrupted).
    """
    M, K, d = codebooks.shape
    nch = -(-cols // d)
    rows = codes.shape[0] // max(nch, 1)
    if out is None:
        out = np.empty((rows - row_start, cols), np.float32)
    n = out.shape[0]
    if codes.ndim != 2 or codes.shape[1] != M or codes.shape[0] != rows * nch or out.shape[1] != cols or \
            not 0 <= row_start <= rows - n or (scale is not None and scale.shape != (rows,)):
        raise ValueError(f"decode_rows: codes {codes.shape}, codebooks {codebooks.shape}, cols {cols}, "
                         f"out {out.shape} at row {row_start} do not match")
    sub = codes[row_start * nch:(row_start + n) * nch]
    check_codes(sub, K)
    cb = np.ascontiguousarray(codebooks, dtype=np.float32)
    k = _loaded_kernel() if n * cols >= _MIN_KERNEL_VALUES else None
    if k is None or sub.dtype not in (np.uint8, np.uint16) or out.dtype != np.float32 or not out.flags.c_contiguous:
        w = decode_vectors(sub, cb).reshape(n, nch * d)[:, :cols]
        if scale is not None:
            w *= scale[row_start:row_start + n, None].astype(np.float32)
        out[...] = w
        return out
    codes = np.ascontiguousarray(codes)
    s = np.zeros(0, np.float32) if scale is None else np.ascontiguousarray(scale, dtype=np.float32)
    tasks = min(max_threads or threads(), threads(), max(1, n * cols * M // _MIN_TASK_ADDS))
    cuts = [row_start + n * i // tasks for i in range(tasks + 1)]
    run_parallel([(k, (codes, cb, s, scale is not None, a, b, out[a - row_start:b - row_start]))
                  for a, b in zip(cuts, cuts[1:])])
    return out


def check_codes(codes: np.ndarray, K: int) -> None:
    """Raise AqmIntegrityError unless every code is below ``K`` (free when the dtype cannot exceed it)."""
    if codes.dtype.kind == "u" and 1 << (8 * codes.dtype.itemsize) <= K:
        return
    if codes.size and (int(codes.max()) >= K or int(codes.min()) < 0):
        bad = int(np.count_nonzero((codes >= K) | (codes < 0)))
        raise AqmIntegrityError(f"{bad} code(s) are not in [0, {K}), the codebook size (corrupted code section)")
