"""One AQ-coded tensor held as codes on a torch device (a GPU), and the products computed there.

:class:`DeviceAQWeight` is the device twin of
:class:`~aqformat.runtime.aq_weight.AQWeight`: the codes stay compact
(``uint8``, or ``int32`` for wider codes) and the group's codebooks are shared
on the device. A product decodes a block of matrix rows at a time with torch
operations (one gathered codeword per codebook, summed in codebook order, as
:func:`aqformat.codecs.aq.codeword_sum` does, so the decoded values are the
file's, bit for bit) into at most :data:`TILE_BYTES` of scratch on the CPU
(:data:`DEVICE_TILE_BYTES` elsewhere), and multiplies each block with the
device's GEMM. The whole float32 weight never exists, and nothing goes
through the host: the same code serves any torch device, which is how the
CPU tests cover it. On a CUDA device with Triton
installed, the decode and the product for a few input rows run in the
kernels of :mod:`.triton_kernels` instead (same decoded values).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..codecs.aq import codeword_sum
from ..layout import unview
from . import triton_kernels
from .aq_weight import TILE_BYTES, AQWeight

# input rows times codebooks up to which a product reads a lookup table instead of decoding the weight
# (Triton only): the table costs M gathers per d weights and input row, a decode M * d gathers once.
# Measured on an H200 (bench/device_bench.py): with 2 codebooks the table wins up to 8 rows, with 4 up to 4
TRITON_LUT_MAX_GATHERS = 16
# decoded rows a product holds at once off the CPU: a GPU has memory to spare and pays for every launch,
# so its tiles are far larger than the CPU's cache-sized ones (a 4096x11008 weight in 3 tiles, not 43)
DEVICE_TILE_BYTES = 64 << 20

# each codebook group once per device: tensors of one group share a numpy array
_shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclass(eq=False)
class DeviceAQWeight:
    """An :class:`AQWeight`'s parts as tensors on one device (see the module docstring)."""

    codes: torch.Tensor            # [M, rows * nch], uint8 or int32
    codebooks: torch.Tensor        # [M, K, d] float32, shared by the tensors of a group
    scale: torch.Tensor | None     # [rows] float32
    perm: torch.Tensor | None      # [cols] int64: column j of the matrix view is column perm[j] of the tensor
    inv_perm: torch.Tensor | None  # argsort(perm)
    host: AQWeight                 # the layout (axes, rows, cols, shape) and the CPU copy
    triton: bool = False           # compute with the Triton kernels (see triton_kernels.usable)

    @classmethod
    def from_weight(cls, aq: AQWeight, device: torch.device) -> "DeviceAQWeight":
        """``aq`` moved to ``device`` (its codebooks once per group and device)."""
        key = (id(aq.codebooks), str(device))
        cb = _shared.get(key)
        if cb is None:
            cb = _shared[key] = torch.from_numpy(aq.codebooks).to(device)
        wide = aq.codes.dtype != np.uint8  # torch indexes with uint8 and int32/int64, not uint16
        codes = torch.from_numpy(np.ascontiguousarray(aq.codes.T, np.int32 if wide else np.uint8)).to(device)
        scale = None if aq.scale is None else torch.from_numpy(aq.scale).to(device)
        perm = None if aq.perm is None else torch.from_numpy(aq.perm).to(device)
        return cls(codes, cb, scale, perm, None if perm is None else torch.argsort(perm), aq,
                   triton_kernels.usable(torch.device(device)))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def matrix_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0 .. r1`` of the matrix view, scaled, columns still permuted (float32, new)."""
        if self.triton:
            return triton_kernels.decode_rows(self.codes, self.codebooks, self.scale, r0, r1, self.host.cols)
        return self._rows(slice(r0, r1))

    def _rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Matrix rows ``rows`` (a slice or an index tensor), decoded and scaled, columns still permuted."""
        M, _, d = self.codebooks.shape
        nch = -(-self.host.cols // d)
        codes = self.codes.reshape(M, self.host.rows, nch)[:, rows].reshape(M, -1).long()
        w = codeword_sum(self.codebooks, codes).reshape(-1, nch * d)[:, :self.host.cols]
        return w * self.scale[rows, None] if self.scale is not None else w

    def decode(self) -> torch.Tensor:
        """The whole float32 tensor on the device, newly allocated."""
        return unview(self.matrix_rows(0, self.host.rows), self.host.shape, self.host.axes, self.inv_perm).contiguous()

    def tile_rows(self) -> int:
        """Matrix rows decoded at once by a product."""
        return self.host.tile_rows(None if self.device.type == "cpu" else DEVICE_TILE_BYTES)

    def times_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q.T`` for float32 ``x[T, cols]`` in the tensor's column order (rows are outputs)."""
        if self.perm is not None:
            x = x[:, self.perm]
        if self.triton and x.shape[0] * self.codebooks.shape[0] <= TRITON_LUT_MAX_GATHERS:
            return triton_kernels.lut_times_rows(x.contiguous(), self.codes, self.codebooks, self.scale, self.host.rows)
        y = torch.empty(x.shape[0], self.host.rows, dtype=torch.float32, device=self.device)
        step = self.tile_rows()
        for r0 in range(0, self.host.rows, step):
            r1 = min(self.host.rows, r0 + step)
            y[:, r0:r1] = x @ self.matrix_rows(r0, r1).T
        return y

    def times_cols(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` for float32 ``x[T, rows]`` (rows are inputs), columns in the tensor's order."""
        y = torch.zeros(x.shape[0], self.host.cols, dtype=torch.float32, device=self.device)
        step = self.tile_rows()
        for r0 in range(0, self.host.rows, step):
            r1 = min(self.host.rows, r0 + step)
            y += x[:, r0:r1] @ self.matrix_rows(r0, r1)
        if self.perm is None:
            return y
        return y[:, self.inv_perm]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (each in ``[0, rows)``) of a 2-D tensor stored without axes: ``ids.shape + (cols,)``."""
        used, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        w = unview(self._rows(used), (used.numel(), self.host.cols), None, self.inv_perm)
        return w[inverse].reshape(*ids.shape, self.host.cols)
