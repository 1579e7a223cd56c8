"""One AQ-coded tensor held as codes, and the products computed from them (numpy, no torch).

:class:`AQWeight` holds a tensor's codes (about its share of the file), the
shared codebooks, its scale and permutation, and never builds its whole
float32 value for a product:

- given few input rows (at most :data:`DECODE_MATMUL_ROWS`), a product whose
  matrix rows are the outputs runs in one compiled pass that decodes four
  rows at a time into the L1 cache and multiplies them there
  (:func:`aqformat.kernels.matmul.decode_matmul`; d = 8 and numba), else,
  for a matrix of many rows, the lookup-table kernel (dot products of every
  input chunk with every codeword, summed by code);
- otherwise the matrix is decoded a block of rows at a time into a reusable
  buffer of at most :data:`TILE_BYTES` bytes and each block is multiplied
  with BLAS (the caller's: see :meth:`AQWeight.times_rows`);
- a row lookup (an embedding) decodes only the rows asked for.

Both the PyTorch modules (:mod:`.compressed`) and the codes-resident ONNX
Runtime session (:mod:`.ort_codes`) compute with these.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..codecs.aq import parts as aq_parts
from ..kernels.decode import check_codes, compiled, decode_rows
from ..kernels.matmul import decode_matmul, decode_matmul_ok, lut_matmul
from ..layout import from_matrix
from ..reader import AqmFile

TILE_BYTES = 4 << 20          # decoded rows held at once per product
# the lookup table pays while its M*K*cols multiply-adds per input row stay below the
# rows*cols a decoded weight costs; LUT_MAX_ROWS bounds the table's memory
LUT_MAX_ROWS = 8
# up to this many input rows, a product decodes and multiplies in one compiled pass
# (aqformat.kernels.matmul.decode_matmul); above it, BLAS on decoded tiles is faster
DECODE_MATMUL_ROWS = 16
_scratch = threading.local()
# gemm(x, w, out) writes x @ w.T into out (float32 x[T, k], w[n, k]; out[T, n] is a block of columns)
Gemm = Callable[[np.ndarray, np.ndarray, np.ndarray], object]


def _numpy_gemm(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    if out.flags.c_contiguous:
        np.matmul(x, w.T, out=out)
    else:  # numpy's BLAS path needs a contiguous output
        out[...] = x @ w.T


def _buffer(n: int) -> np.ndarray:
    """A float32 scratch array of ``n`` values, reused by the calls of this thread."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(max(n, 1), np.float32)
    return buf[:n]


@dataclass(eq=False)
class AQWeight:
    """One AQ tensor's compressed parts, owned (not views of the file)."""

    codes: np.ndarray            # [rows * nch, M] uint8/uint16, read-only, every code checked below K
    codebooks: np.ndarray        # [M, K, d] float32, shared by the tensors of a group (never written)
    scale: np.ndarray | None     # [rows] float32
    perm: np.ndarray | None      # [cols] int64
    axes: list[int] | None
    rows: int
    cols: int
    shape: tuple[int, ...]

    @classmethod
    def from_file(cls, f: AqmFile, name: str, codebooks: dict[str, np.ndarray]) -> "AQWeight":
        """Tensor ``name`` of ``f``; ``codebooks`` caches each group's codebooks (shared between tensors).

        Loads the compiled decode kernel where numba is installed: a compressed
        weight is decoded on every product, so the kernel pays for its loading.
        """
        compiled()
        info = f.info(name)
        p = aq_parts(f, name)
        cb = codebooks.get(info.group)
        if cb is None:
            cb = codebooks[info.group] = np.array(p.codebooks, dtype=np.float32)
        codes = np.array(p.codes)  # owned: the weight must not pin the file's buffers
        check_codes(codes, cb.shape[1])
        codes.flags.writeable = False
        scale = None if p.scale is None else np.array(p.scale, dtype=np.float32)
        perm = None if p.perm is None else p.perm.astype(np.int64)
        return cls(codes, cb, scale, perm, None if p.axes is None else list(p.axes), p.rows, p.cols,
                   tuple(info.shape))

    @property
    def nbytes(self) -> int:
        """Bytes this tensor holds itself (codebooks are shared and not counted)."""
        return self.codes.nbytes + sum(a.nbytes for a in (self.scale, self.perm) if a is not None)

    def matrix_rows(self, r0: int, r1: int, out: np.ndarray | None = None, max_threads: int | None = None) -> np.ndarray:
        """Rows ``r0 .. r1`` of the matrix view, scaled, columns still permuted, in ``out`` (float32
        ``[r1 - r0, cols]``, C-contiguous; default: this thread's scratch buffer), decoded on at most
        ``max_threads`` threads."""
        if out is None:
            out = _buffer((r1 - r0) * self.cols).reshape(r1 - r0, self.cols)
        return decode_rows(self.codes, self.codebooks, self.scale, self.cols, out, row_start=r0,
                           max_threads=max_threads)

    def decode(self) -> np.ndarray:
        """The whole float32 tensor, newly allocated."""
        w = decode_rows(self.codes, self.codebooks, self.scale, self.cols)
        return np.ascontiguousarray(from_matrix(w, self.shape, self.axes, self.perm))

    def tile_rows(self, tile_bytes: int | None = None) -> int:
        """Matrix rows decoded at once by a tiled product holding ``tile_bytes`` (default :data:`TILE_BYTES`)."""
        return max(1, min(self.rows, (tile_bytes or TILE_BYTES) // (4 * max(self.cols, 1))))

    def lut_ok(self) -> bool:
        """Whether the lookup table can pay for this matrix (rows are outputs and outnumber ``2*M*K``)."""
        return self.axes is None and self.codes.shape[1] * self.codebooks.shape[1] * 2 <= self.rows

    def times_rows(self, x: np.ndarray, gemm: Gemm | None = None) -> np.ndarray:
        """``x @ Q.T`` for float32 ``x[T, cols]`` and the matrix view ``Q[rows, cols]`` (rows are outputs).

        With a column permutation, ``x``'s columns are taken in the tensor's
        order: the product is that of the tensor's own 2-D layout. ``gemm``
        multiplies decoded tiles (default: numpy's BLAS); a caller whose
        framework has its own thread pool passes that framework's product,
        so that two pools never compete for the cores.
        """
        T = x.shape[0]
        if T <= DECODE_MATMUL_ROWS and decode_matmul_ok(self.codes, self.codebooks):
            d = self.codebooks.shape[2]
            xp = np.zeros((T, -(-self.cols // d) * d), np.float32)
            xp[:, :self.cols] = x[:, self.perm] if self.perm is not None else x
            return decode_matmul(xp, self.codes, self.codebooks, self.scale, self.rows)
        x = np.ascontiguousarray(x[:, self.perm] if self.perm is not None else x, dtype=np.float32)
        if self.lut_ok() and T <= LUT_MAX_ROWS:
            return self._lut(x)
        gemm = gemm or _numpy_gemm
        step = self.tile_rows()
        y = np.empty((T, self.rows), np.float32)
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            # one thread: the decode is under 1/16 of the product's work, and waiting on a second
            # thread (descheduled on a busy machine) would cost more than it saves
            gemm(x, self.matrix_rows(r0, r1, max_threads=1), y[:, r0:r1])
        return y

    def times_cols(self, x: np.ndarray) -> np.ndarray:
        """``x @ Q`` for float32 ``x[T, rows]`` (rows are inputs), columns put back in the tensor's order."""
        x = np.asarray(x, dtype=np.float32)
        step = self.tile_rows()
        y = np.zeros((x.shape[0], self.cols), np.float32)
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            y += x[:, r0:r1] @ self.matrix_rows(r0, r1)
        if self.perm is None:
            return y
        out = np.empty_like(y)
        out[:, self.perm] = y
        return out

    def _lut(self, x: np.ndarray) -> np.ndarray:
        M, K, d = self.codebooks.shape
        nch = -(-self.cols // d)
        xp = np.zeros((x.shape[0], nch * d), np.float32)
        xp[:, :self.cols] = x
        xp = xp.reshape(-1, nch, d).transpose(1, 2, 0)                      # [nch, d, T]
        lut = np.matmul(self.codebooks.reshape(M * K, d), xp)                # [nch, M*K, T]
        return lut_matmul(lut.reshape(nch, M, K, -1), self.codes, self.scale, self.rows)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any shape, each in ``[0, rows)``) of a 2-D tensor stored without axes: ``ids.shape + (cols,)``."""
        flat = ids.reshape(-1)
        used, inverse = np.unique(flat, return_inverse=True)
        M = self.codebooks.shape[0]
        nch = -(-self.cols // self.codebooks.shape[2])
        codes = self.codes.reshape(self.rows, nch, M)[used].reshape(-1, M)
        scale = None if self.scale is None else self.scale[used]
        w = from_matrix(decode_rows(codes, self.codebooks, scale, self.cols), (used.size, self.cols), None, self.perm)
        return np.ascontiguousarray(w)[inverse.reshape(-1)].reshape(*ids.shape, self.cols)
