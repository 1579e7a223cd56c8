"""Triton kernels for AQ codes on a GPU: a decode and a lookup-table product, where Triton is installed.

:class:`~aqformat.runtime.aq_weight_torch.DeviceAQWeight` computes with
torch operations on any device. On a CUDA device with Triton present it uses
these two kernels instead, which replace a chain of gathers, adds and
products (a dozen launches and as many intermediate tensors per tile) by one
launch each:

- :func:`decode_rows`: matrix rows from codes, one program per block of
  ``d``-vectors, adding the codewords in codebook order and then scaling, so
  the values are the numpy decoder's bit for bit;
- :func:`lut_times_rows`: ``x @ Q.T`` for a few input rows without decoding
  the weight. Per input row and ``d``-chunk of columns, the dot products with
  every codeword form a table (one small GEMM); each output is then the sum
  of ``M`` table entries per chunk, picked by the codes. It reads the codes
  (``M`` bytes per ``d`` weights) instead of a decoded weight.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU
tensors, which is how the tests cover them without a GPU. Codes reach these
kernels only from an :class:`~aqformat.runtime.aq_weight.AQWeight`, whose
codes were checked below ``K`` when it was read, so every gather is in bounds.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_kernel(codes, cb, scale, out, n_vec, code_stride, first_vec, nch,
                       K: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, M: tl.constexpr,
                       HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        vmask = v < n_vec
        e = tl.arange(0, DP)
        mask = vmask[:, None] & (e < D)[None, :]
        code = tl.load(codes + first_vec + v, mask=vmask, other=0).to(tl.int32)
        acc = tl.load(cb + code[:, None] * D + e[None, :], mask=mask, other=0.0)
        for m in tl.static_range(1, M):  # codebook order: the numpy decoder's float32 additions
            code = tl.load(codes + m * code_stride + first_vec + v, mask=vmask, other=0).to(tl.int32)
            acc = acc + tl.load(cb + (m * K + code[:, None]) * D + e[None, :], mask=mask, other=0.0)
        if HAS_SCALE:
            row = (first_vec + v) // nch
            acc = acc * tl.load(scale + row, mask=vmask, other=0.0)[:, None]
        tl.store(out + v[:, None] * D + e[None, :], acc, mask=mask)

    @triton.jit
    def _lut_kernel(codes, lut, scale, y, rows, nch, code_stride,
                    K: tl.constexpr, M: tl.constexpr, HAS_SCALE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEPS: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        t = tl.program_id(1)
        rmask = r < rows
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        table = lut + t * nch * M * K  # lut[t, c, m, k]
        # a compile-time trip count (one kernel per count of chunk blocks): Triton's interpreter, which the
        # CPU tests use, cannot loop to a runtime bound under numpy 2.4
        for step in range(STEPS):
            c = step * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = rmask[:, None] & (c < nch)[None, :]
            at = r[:, None] * nch + c[None, :]
            for m in tl.static_range(M):
                code = tl.load(codes + m * code_stride + at, mask=mask, other=0).to(tl.int32)
                acc += tl.load(table + (c[None, :] * M + m) * K + code, mask=mask, other=0.0)
        out = tl.sum(acc, axis=1)
        if HAS_SCALE:
            out = out * tl.load(scale + r, mask=rmask, other=0.0)
        tl.store(y + t * rows + r, out, mask=rmask)
else:
    triton = None

BLOCK_VECTORS = 128         # d-vectors decoded per program
LUT_BLOCK_ROWS = 32         # output rows per program of the table product
LUT_BLOCK_CHUNKS = 64       # d-chunks of columns per step of a program


def usable(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: Triton is installed and the device is CUDA (or, under
    Triton's interpreter, the CPU)."""
    return triton is not None and (device.type == "cuda" or (_INTERPRET and device.type == "cpu"))


def decode_rows(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor | None,
                r0: int, r1: int, cols: int) -> torch.Tensor:
    """Matrix rows ``r0 .. r1`` (float32 ``[r1 - r0, cols]``, new), columns still permuted.

    ``codes[M, rows * nch]`` (uint8 or int32) and ``codebooks[M, K, d]`` float32
    are on the device; ``scale[rows]`` too, if any. Bit-identical to
    :func:`aqformat.codecs.aq.codeword_sum` followed by the row scale.
    """
    M, K, d = codebooks.shape
    nch = -(-cols // d)
    n_vec = (r1 - r0) * nch
    out = torch.empty(n_vec * d, dtype=torch.float32, device=codes.device)
    grid = (triton.cdiv(n_vec, BLOCK_VECTORS),)
    _decode_kernel[grid](codes, codebooks, scale if scale is not None else out, out, n_vec, codes.shape[1],
                         r0 * nch, nch, K=K, D=d, DP=triton.next_power_of_2(d), M=M,
                         HAS_SCALE=scale is not None, BLOCK=BLOCK_VECTORS)
    return out.view(r1 - r0, nch * d)[:, :cols]


def lut_times_rows(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                   scale: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``x @ Q.T`` for float32 ``x[T, cols]`` (columns already permuted) from the codes: ``[T, rows]``."""
    M, K, d = codebooks.shape
    T, cols = x.shape
    nch = -(-cols // d)
    if cols % d:
        x = torch.nn.functional.pad(x, (0, nch * d - cols))  # zero inputs against the padded columns
    # lut[t, c, m, k] = x[t, c-th chunk] . codebooks[m, k]: one GEMM of [T * nch, d] by [d, M * K]
    lut = (x.reshape(T * nch, d) @ codebooks.reshape(M * K, d).T).contiguous()
    y = torch.empty(T, rows, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, LUT_BLOCK_ROWS), T)
    _lut_kernel[grid](codes, lut, scale if scale is not None else y, y, rows, nch, codes.shape[1],
                      K=K, M=M, HAS_SCALE=scale is not None, BLOCK_R=LUT_BLOCK_ROWS, BLOCK_C=LUT_BLOCK_CHUNKS,
                      STEPS=triton.cdiv(nch, LUT_BLOCK_CHUNKS))
    return y
