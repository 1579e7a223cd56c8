"""PyTorch modules that compute from AQ codes: the weights stay compressed in memory.

:func:`aqformat.runtime.load_torch` with ``resident="compressed"`` replaces
every ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` and ``nn.Embedding`` whose
weight is AQ-coded in the file by the modules here. Each holds its codes
(about the tensor's share of the file), the shared codebooks, its scale and
permutation, and never builds its whole float32 weight:

- a Linear given few input rows uses the lookup-table product of
  :mod:`aqformat.kernels.matmul` (dot products of every input chunk with
  every codeword, summed by code);
- otherwise a Linear or a Conv decodes its weight a block of output rows at a
  time into a reusable buffer of at most :data:`TILE_BYTES` bytes and
  multiplies each block with torch (BLAS);
- an Embedding decodes only the rows it looks up.

Decoding runs in the compiled kernels when numba is installed, else in numpy
(same values). Reading ``module.weight`` still works: it decodes the whole
weight into a new tensor (for code that needs it, e.g. a tied output head).
These modules are for inference: the weight takes no gradient, and they run
on the CPU.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..codecs.aq import parts as aq_parts
from ..errors import AqmInputError
from ..kernels.decode import check_codes, decode_rows
from ..kernels.matmul import lut_matmul
from ..layout import from_matrix
from ..reader import AqmFile

TILE_BYTES = 4 << 20          # decoded rows held at once per module call
# the lookup table pays while its M*K*cols multiply-adds per input row stay below the
# rows*cols a decoded weight costs; LUT_MAX_ROWS bounds the table's memory
LUT_MAX_ROWS = 8
_scratch = threading.local()


def _buffer(n: int) -> np.ndarray:
    """A float32 scratch array of ``n`` values, reused by the calls of this thread."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(max(n, 1), np.float32)
    return buf[:n]


@dataclass(eq=False)
class AQWeight:
    """One AQ tensor's compressed parts, owned (not views of the file)."""

    codes: np.ndarray            # [rows * nch, M] uint8/uint16, read-only
    codebooks: np.ndarray        # [M, K, d] float32, shared by the tensors of a group (never written)
    scale: np.ndarray | None     # [rows] float32
    perm: np.ndarray | None      # [cols] int64
    axes: list[int] | None
    rows: int
    cols: int
    shape: tuple[int, ...]

    @classmethod
    def from_file(cls, f: AqmFile, name: str, codebooks: dict[str, np.ndarray]) -> "AQWeight":
        info = f.info(name)
        p = aq_parts(f, name)
        cb = codebooks.get(info.group)
        if cb is None:
            cb = codebooks[info.group] = np.array(p.codebooks, dtype=np.float32)
        codes = np.array(p.codes)  # owned: the module must not pin the file mapping
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

    def matrix_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0 .. r1`` of the matrix view, scaled, columns still permuted, in the scratch buffer."""
        out = _buffer((r1 - r0) * self.cols).reshape(r1 - r0, self.cols)
        return decode_rows(self.codes, self.codebooks, self.scale, self.cols, out, row_start=r0)

    def decode(self) -> torch.Tensor:
        """The whole float32 tensor, newly allocated."""
        w = decode_rows(self.codes, self.codebooks, self.scale, self.cols)
        return torch.from_numpy(np.ascontiguousarray(from_matrix(w, self.shape, self.axes, self.perm)))

    def tile_rows(self) -> int:
        return max(1, min(self.rows, TILE_BYTES // (4 * max(self.cols, 1))))


class _AQModule(torch.nn.Module):
    """Shared behaviour: a decoded ``weight`` on demand, state_dict entries, CPU only."""

    aq: AQWeight
    dtype: torch.dtype = torch.float32  # of the outputs (and of ``weight``)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a new tensor on each access: changing it changes nothing)."""
        return self.aq.decode().to(self.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not getattr(_scratch, "weights_left_out", False):
            destination[prefix + "weight"] = self.weight

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        probe = fn(torch.empty(0))
        if probe.device.type != "cpu":
            raise AqmInputError(f"{type(self).__name__} computes from compressed weights on the CPU only; "
                                "to run on another device load with resident='decoded'")
        if probe.is_floating_point():
            self.dtype = probe.dtype  # e.g. .half(): outputs follow, the codes stay as they are
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        M, K, d = self.aq.codebooks.shape
        return f"{list(self.aq.shape)}, AQ M={M} K={K} d={d}, {self.aq.nbytes} bytes of codes"


class AQLinear(_AQModule):
    """``nn.Linear`` computing from AQ codes (see the module docstring)."""

    def __init__(self, aq: AQWeight, bias: torch.Tensor | None):
        super().__init__()
        self.aq = aq
        self.out_features, self.in_features = aq.shape
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._lut_ok = aq.axes is None and aq.codes.shape[1] * aq.codebooks.shape[1] * 2 <= aq.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        if self._lut_ok and x2.shape[0] <= LUT_MAX_ROWS:
            y = self._lut(x2)
        elif self.aq.axes is None:
            y = self._tiles_rows_out(x2)
        else:
            y = self._tiles_rows_in(x2)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _lut(self, x2: torch.Tensor) -> torch.Tensor:
        aq = self.aq
        M, K, d = aq.codebooks.shape
        nch = -(-aq.cols // d)
        xp = x2[:, torch.from_numpy(aq.perm)] if aq.perm is not None else x2
        xp = F.pad(xp, (0, nch * d - aq.cols)).reshape(-1, nch, d)
        with torch.no_grad():
            cb = torch.from_numpy(aq.codebooks).reshape(M * K, d)
            lut = torch.matmul(cb, xp.permute(1, 2, 0)).reshape(nch, M, K, -1)  # [nch, M, K, T]
        return torch.from_numpy(lut_matmul(lut.contiguous().numpy(), aq.codes, aq.scale, aq.rows))

    def _tiles_rows_out(self, x2: torch.Tensor) -> torch.Tensor:
        """Matrix rows are output features: ``y[:, r0:r1] = x[:, perm] @ Q[r0:r1].T``."""
        aq = self.aq
        xp = x2[:, torch.from_numpy(aq.perm)] if aq.perm is not None else x2
        step = aq.tile_rows()
        keep = torch.is_grad_enabled() and x2.requires_grad  # autograd keeps the block: no scratch reuse
        if step >= aq.rows:
            return xp @ _as_tensor(aq.matrix_rows(0, aq.rows), keep).T
        y = torch.empty(x2.shape[0], aq.rows, dtype=torch.float32)
        for r0 in range(0, aq.rows, step):
            r1 = min(aq.rows, r0 + step)
            y[:, r0:r1] = xp @ _as_tensor(aq.matrix_rows(r0, r1), keep).T
        return y

    def _tiles_rows_in(self, x2: torch.Tensor) -> torch.Tensor:
        """Matrix rows are input features (``axes = [1, 0]``): ``y[:, perm] = sum x[:, r0:r1] @ Q[r0:r1]``."""
        aq = self.aq
        step = aq.tile_rows()
        keep = torch.is_grad_enabled() and x2.requires_grad
        yp = None
        for r0 in range(0, aq.rows, step):
            r1 = min(aq.rows, r0 + step)
            part = x2[:, r0:r1] @ _as_tensor(aq.matrix_rows(r0, r1), keep)
            yp = part if yp is None else yp + part
        if aq.perm is None:
            return yp
        y = torch.empty_like(yp)
        y[:, torch.from_numpy(aq.perm)] = yp
        return y


class AQConv(_AQModule):
    """``nn.Conv1d``/``nn.Conv2d`` computing from AQ codes, a block of output channels at a time."""

    def __init__(self, conv: torch.nn.Conv1d | torch.nn.Conv2d, aq: AQWeight, bias: torch.Tensor | None):
        super().__init__()
        self.aq = aq
        self.conv = F.conv1d if isinstance(conv, torch.nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed = conv._reversed_padding_repeated_twice
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.aq
        x32 = x.to(torch.float32)
        if self.padding_mode != "zeros":
            x32 = F.pad(x32, self._reversed, mode=self.padding_mode)
            padding: Any = 0
        else:
            padding = self.padding
        per_group = aq.shape[0] // self.groups
        # blocks of whole groups, so that each block is a grouped convolution of its own
        step = max(per_group, aq.tile_rows() // per_group * per_group)
        keep = torch.is_grad_enabled() and x.requires_grad
        outs = []
        for r0 in range(0, aq.shape[0], step):
            r1 = min(aq.shape[0], r0 + step)
            w = _as_tensor(from_matrix(aq.matrix_rows(r0, r1), (r1 - r0, *aq.shape[1:]), None, aq.perm), keep)
            g0, g1 = r0 // per_group, r1 // per_group
            xs = x32 if self.groups == 1 else x32[:, g0 * x32.shape[1] // self.groups: g1 * x32.shape[1] // self.groups]
            b = None if self.bias is None else self.bias[r0:r1].to(torch.float32)
            outs.append(self.conv(xs, w, b, self.stride, padding, self.dilation, g1 - g0))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return y.to(x.dtype)


class AQEmbedding(_AQModule):
    """``nn.Embedding`` decoding only the rows it looks up."""

    def __init__(self, emb: torch.nn.Embedding, aq: AQWeight):
        super().__init__()
        self.aq = aq
        self.num_embeddings, self.embedding_dim = aq.shape
        self.padding_idx = emb.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        aq = self.aq
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= aq.rows):
            raise IndexError(f"index out of range in AQEmbedding of {aq.rows} rows")
        used, inverse = torch.unique(flat, return_inverse=True)
        u = used.numpy()
        M, K, d = aq.codebooks.shape
        nch = -(-aq.cols // d)
        codes = aq.codes.reshape(aq.rows, nch, M)[u].reshape(-1, M)
        scale = None if aq.scale is None else aq.scale[u]
        w = from_matrix(decode_rows(codes, aq.codebooks, scale, aq.cols), (u.size, aq.cols), None, aq.perm)
        return torch.from_numpy(np.ascontiguousarray(w))[inverse].reshape(*ids.shape, aq.cols).to(self.dtype)


@contextlib.contextmanager
def weights_left_out() -> Iterator[None]:
    """Within this block, on this thread, ``state_dict()`` leaves out the compressed weights (no decoding)."""
    _scratch.weights_left_out = True
    try:
        yield
    finally:
        _scratch.weights_left_out = False


def _as_tensor(a: np.ndarray, copy: bool) -> torch.Tensor:
    return torch.from_numpy(np.array(a) if copy else a)


def replaceable(module: torch.nn.Module, aq: AQWeight) -> bool:
    """Whether ``module`` (holding AQ weight ``aq``) can be replaced by a compressed module."""
    if type(module) is torch.nn.Linear:
        return aq.axes is None or aq.axes == [1, 0]
    if type(module) in (torch.nn.Conv1d, torch.nn.Conv2d):
        return aq.axes is None and module.padding_mode in ("zeros", "reflect", "replicate", "circular")
    if type(module) is torch.nn.Embedding:
        return aq.axes is None and module.max_norm is None
    return False


def compress(module: torch.nn.Module, aq: AQWeight, bias: torch.Tensor | None) -> _AQModule:
    """The compressed module standing for ``module`` (see :func:`replaceable`), with ``bias``."""
    if type(module) is torch.nn.Linear:
        new: _AQModule = AQLinear(aq, bias)
    elif type(module) is torch.nn.Embedding:
        new = AQEmbedding(module, aq)
    else:
        new = AQConv(module, aq, bias)
    new.dtype = module.weight.dtype
    return new
