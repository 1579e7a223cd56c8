"""The torch decoder: .aqm tensors decoded on the target device.

For AQ tensors the bit-unpacked codes and the codebooks are moved to the
device as compact torch tensors and the weights are rebuilt there, following
aqformat/layout.py exactly: one gathered codeword per codebook summed in
codebook order (the same float32 additions, in the same order, as the numpy
decoder, so results are bit-identical), padding columns dropped, rows
multiplied by ``scale``, columns un-permuted, axes transposed back. Raw and
lattice tensors are read with aqformat's numpy decoders and copied over.
"""
from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np
import torch

from ..errors import AqmIntegrityError
from ..reader import AqmFile, AQParts

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
                "uint16": torch.uint16, "int32": torch.int32, "uint32": torch.uint32, "int64": torch.int64,
                "uint64": torch.uint64, "bool": torch.bool}


def assemble_aq(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor | None,
                inv_perm: torch.Tensor | None, axes: Sequence[int] | None, shape: Sequence[int],
                rows: int, cols: int) -> torch.Tensor:
    """Rebuild an AQ tensor from its parts, all on one device; differentiable.

    The one torch implementation of the format's AQ layout (spec/FORMAT.md):
    the runtime decodes with it and fine-tuning trains through it.

    Parameters
    ----------
    codes : torch.Tensor
        ``[M, n_vectors]`` integer codes.
    codebooks : torch.Tensor
        ``[M, K, d]`` float codebooks.
    scale : torch.Tensor, optional
        ``[rows]`` per-row scale.
    inv_perm : torch.Tensor, optional
        ``argsort`` of the stored column permutation, on the same device
        (callers that decode repeatedly compute it once).
    axes : sequence of int, optional
        Axes order of the matrix view.
    shape : sequence of int
        Logical shape of the tensor.
    rows, cols : int
        Matrix view size (before padding to a multiple of ``d``).

    Returns
    -------
    torch.Tensor
        Of ``shape``, contiguous.
    """
    w = codebooks[0].index_select(0, codes[0])
    for m in range(1, codebooks.shape[0]):
        w = w + codebooks[m].index_select(0, codes[m])
    w = w.reshape(rows, -1)[:, :cols]
    if scale is not None:
        w = w * scale[:, None]
    if inv_perm is not None:
        w = w.index_select(1, inv_perm)
    if axes is None:
        return w.reshape(tuple(shape)).contiguous()
    u = w.reshape([shape[a] for a in axes])
    return u.permute(tuple(int(i) for i in np.argsort(axes))).contiguous()


def decode_aq(parts: AQParts, shape: Sequence[int], device: torch.device | str = "cpu",
              codebooks: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild an AQ tensor as float32 on ``device``.

    Parameters
    ----------
    parts : AQParts
        From :meth:`aqformat.AqmFile.aq_parts`.
    shape : sequence of int
        Logical shape of the tensor.
    device : torch.device or str
        Where to decode.
    codebooks : torch.Tensor, optional
        ``parts.codebooks`` already on ``device`` as float32 (shared groups are
        moved once by the caller).

    Returns
    -------
    torch.Tensor
        float32, contiguous, of ``shape``.
    """
    if codebooks is None:
        codebooks = _device_codebooks(parts, device)
    # moved compact (uint8/uint16), widened on the device; int32 indices gather as fast as int64.
    # A writable copy: with M = 1 the transpose is still the read-only memory map.
    codes = torch.from_numpy(np.require(parts.codes.T, requirements="CW")).to(device).int()  # [M, n]
    scale = None if parts.scale is None else torch.from_numpy(parts.scale.astype(np.float32)).to(device)
    inv = None if parts.perm is None else torch.from_numpy(np.argsort(parts.perm)).to(device)
    with torch.no_grad():
        return assemble_aq(codes, codebooks, scale, inv, parts.axes, shape, parts.rows, parts.cols)


def decode_tensor(f: AqmFile, name: str, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None,
                  codebook_cache: MutableMapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode tensor ``name`` of ``f`` to a torch tensor on ``device``.

    Parameters
    ----------
    f : AqmFile
        The open file.
    name : str
        Tensor name.
    device : torch.device or str
        Target device; AQ tensors are decoded there.
    dtype : torch.dtype, optional
        Result dtype; defaults to the dtype stored in the file.
    codebook_cache : dict, optional
        Holds each codebook group moved to ``device`` (as float32), reused across calls.

    Raises
    ------
    AqmIntegrityError
        A section of the tensor fails its checksum (the message names the tensor).
    """
    info = f.info(name)
    target = dtype or TORCH_DTYPES[info.dtype]
    try:
        if info.codec == "aq":
            parts = f.aq_parts(name)
            cb = None
            if codebook_cache is not None:
                cb = codebook_cache.get(info.group)
                if cb is None:
                    cb = codebook_cache[info.group] = _device_codebooks(parts, device)
            t = decode_aq(parts, info.shape, device, cb)
        else:
            # np.array copies: the reader returns read-only views of the file mapping
            t = torch.from_numpy(np.array(f.read(name))).to(device)
    except AqmIntegrityError as e:
        msg = str(e)
        raise AqmIntegrityError(msg if name in msg else f"tensor {name!r}: {msg}") from None
    return t.to(target)


def _device_codebooks(parts: AQParts, device: torch.device | str) -> torch.Tensor:
    # np.array copies the (small) codebooks out of the read-only file mapping
    return torch.from_numpy(np.array(parts.codebooks)).to(device).float()
