"""PyTorch modules that compute from AQ codes: the weights stay compressed in memory.

:func:`aqformat.runtime.load_torch` with ``resident="compressed"`` replaces
every ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` and ``nn.Embedding`` whose
weight is AQ-coded in the file by the modules here. Each holds an
:class:`~aqformat.runtime.aq_weight.AQWeight` (codes, shared codebooks, scale
and permutation) and never builds its whole float32 weight:

- a Linear computes with the products of :mod:`.aq_weight` (lookup table for
  few input rows, else decoded tiles times BLAS);
- a Conv decodes its weight a block of output channels at a time into a
  reusable buffer and convolves each block with torch;
- an Embedding decodes only the rows it looks up.

Decoding runs in the compiled kernels when numba is installed, else in numpy
(same values). Reading ``module.weight`` still works: it decodes the whole
weight into a new tensor (for code that needs it, e.g. a tied output head).
These modules are for inference: the weight takes no gradient. On the CPU
they compute with numpy and the compiled kernels; moved to another device
(``.to("cuda")``, or ``load_torch(..., device="cuda")``), their codes move
there and they compute with torch operations on that device
(:class:`~aqformat.runtime.aq_weight_torch.DeviceAQWeight`). Traced or exported
(``torch.onnx.export``), they compute with their decoded weight, so the
exported model holds fp32 weights.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AqmInputError
from ..layout import from_matrix, unview
from .aq_weight import AQWeight
from .aq_weight_torch import DeviceAQWeight

_scratch = threading.local()


class _AQModule(torch.nn.Module):
    """Shared behaviour: a decoded ``weight`` on demand, state_dict entries, device moves."""

    aq: AQWeight
    on_device: DeviceAQWeight | None = None  # the codes on a device other than the CPU
    dtype: torch.dtype = torch.float32  # of the outputs (and of ``weight``)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a new tensor on each access: changing it changes nothing)."""
        return self.decoded().to(self.dtype)

    def decoded(self) -> torch.Tensor:
        """The whole float32 weight, decoded where the codes are."""
        return self.on_device.decode() if self.on_device is not None else torch.from_numpy(self.aq.decode())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not getattr(_scratch, "weights_left_out", False):
            destination[prefix + "weight"] = self.weight

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        probe = fn(torch.empty(0))
        if probe.device.type == "meta":
            raise AqmInputError(f"{type(self).__name__} holds compressed weights, which have no meta form; "
                                "load with resident='decoded' for a model on the meta device")
        if probe.device.type == "cpu":
            self.on_device = None
        elif self.on_device is None or self.on_device.device != probe.device:
            self.on_device = DeviceAQWeight.from_weight(self.aq, probe.device)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        if tracing() or (torch.is_grad_enabled() and x2.requires_grad):
            # autograd, tracing and export need torch operations: the whole weight, for this call
            y = F.linear(x2, self.decoded(), bias)
        else:
            y = self._product(x2.detach().contiguous())
            if bias is not None:
                y += bias  # in place: y is this call's own array (one activation fewer at the peak)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ weight.T`` from the codes, on the device that holds them."""
        dev = self.on_device
        if dev is not None:
            return dev.times_rows(x2) if dev.host.axes is None else dev.times_cols(x2)
        x = x2.numpy()
        return torch.from_numpy(self.aq.times_rows(x, _torch_gemm) if self.aq.axes is None else self.aq.times_cols(x))


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
            w = self._block(r0, r1, keep)
            g0, g1 = r0 // per_group, r1 // per_group
            xs = x32 if self.groups == 1 else x32[:, g0 * x32.shape[1] // self.groups: g1 * x32.shape[1] // self.groups]
            b = None if self.bias is None else self.bias[r0:r1].to(torch.float32)
            outs.append(self.conv(xs, w, b, self.stride, padding, self.dilation, g1 - g0))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return y.to(x.dtype)

    def _block(self, r0: int, r1: int, keep: bool) -> torch.Tensor:
        """Output channels ``r0 .. r1`` of the weight, decoded where the codes are (``keep``: a tensor of
        its own, for autograd; else the CPU's reusable buffer)."""
        shape = (r1 - r0, *self.aq.shape[1:])
        if self.on_device is not None:
            return unview(self.on_device.matrix_rows(r0, r1), shape, None, self.on_device.inv_perm)
        return _as_tensor(from_matrix(self.aq.matrix_rows(r0, r1), shape, None, self.aq.perm), keep)


class AQEmbedding(_AQModule):
    """``nn.Embedding`` decoding only the rows it looks up."""

    def __init__(self, emb: torch.nn.Embedding, aq: AQWeight):
        super().__init__()
        self.aq = aq
        self.num_embeddings, self.embedding_dim = aq.shape
        self.padding_idx = emb.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tracing():  # torch operations only (see AQLinear.forward)
            return F.embedding(ids, self.decoded(), self.padding_idx).to(self.dtype)
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.aq.rows):
            raise IndexError(f"index out of range in AQEmbedding of {self.aq.rows} rows")
        if self.on_device is not None:
            return self.on_device.lookup(ids).to(self.dtype)
        return torch.from_numpy(self.aq.lookup(ids.numpy())).to(self.dtype)


def _torch_gemm(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """``out = x @ w.T`` with torch's BLAS and thread pool: numpy's BLAS has a pool of its own, and two pools
    spinning for the same cores slow both (several times over on a loaded machine)."""
    torch.mm(torch.from_numpy(x), torch.from_numpy(w).T, out=torch.from_numpy(out))


def tracing() -> bool:
    """Whether torch is tracing or exporting the model (``torch.onnx.export``, ``torch.jit.trace``,
    ``torch.export``): computing from codes with numpy would be recorded as constants."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


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
