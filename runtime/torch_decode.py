"""The torch decoder: .aqm tensors decoded on the target device.

Each tensor is decoded by its codec's torch decoder where the codec has one
(:mod:`aqformat.codecs`; AQ tensors move their compact codes and codebooks to
the device and are rebuilt there, bit-identical to the numpy decoder), and
otherwise read with the numpy decoder and copied over.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np
import torch

from ..codecs import Codec
from ..dtypes import DTYPES
from ..reader import AqmFile

# every .aqm dtype has the torch dtype of the same name
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


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
        Target device; tensors of codecs with a torch decoder are decoded there.
    dtype : torch.dtype, optional
        Result dtype; defaults to the dtype stored in the file.
    codebook_cache : dict, optional
        Holds each codebook group moved to ``device`` (as float32), reused across calls.

    Raises
    ------
    AqmIntegrityError
        A section of the tensor fails its checksum (the message names the tensor).
    AqmUnsupportedError
        The tensor's codec is unknown to this build.
    """
    record = f.record(name)
    cache = {} if codebook_cache is None else codebook_cache

    def decode(codec: Codec) -> torch.Tensor:
        if codec.torch_decode is not None:
            return codec.torch_decode(record, f, device, cache)
        # np.array copies: the reader returns read-only views of the file mapping
        return torch.from_numpy(np.array(f.read(name))).to(device)

    return f.decode_with(name, decode).to(dtype or TORCH_DTYPES[record.dtype])
