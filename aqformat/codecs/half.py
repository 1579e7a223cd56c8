"""Codec ``half`` (spec/FORMAT.md 4.3, 5.6; since format 1.3): a float tensor stored at 16 bits.

The values are stored as IEEE binary16 (``format = "float16"``) or bfloat16
(``"bfloat16"``), C order, in one section, and decode to the tensor's own
dtype (float32 for a float32 model): half the bytes of raw float32, exact for
values that 16 bits hold. For tensors that must not be quantized coarsely (a
first convolution, an STFT basis, norms) but need not be float32 either.

:func:`encode` refuses a tensor with finite values the format cannot hold
(beyond float16's 65504, or rounding to bfloat16's infinity): they would
decode as infinities.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import bf16_to_f32, f32_to_bf16, itemsize, numpy_dtype
from . import Codec, register

if TYPE_CHECKING:
    from ..header import RecordFields, TensorRecord
    from ..reader import AqmFile

NAME = "half"
FORMATS = ("float16", "bfloat16")
_STORED = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def parse(fields: RecordFields) -> dict[str, Any]:
    return {"data": fields.section("data"), "format": fields.choice("format", FORMATS, default="float16")}


def sizes(t: TensorRecord, groups: Any) -> dict[str, int]:
    return {"data": 2 * t.numel}


def widen(stored: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values of stored 16-bit floats (exact)."""
    return stored.astype(np.float32) if fmt == "float16" else bf16_to_f32(stored)


def decode(t: TensorRecord, f: AqmFile) -> np.ndarray:
    """The stored values widened to float32, then converted to the tensor's dtype (bfloat16: float32)."""
    fmt = t.fields["format"]
    out = widen(f.section_array(t.fields["data"], _STORED[fmt], t.shape), fmt)
    return out if t.dtype in ("float32", "bfloat16") else out.astype(numpy_dtype(t.dtype))


def work(t: TensorRecord, groups: Any) -> int:
    """The float32 widening, and a copy in the tensor's dtype when that is not float32."""
    return t.numel * (4 + (itemsize(t.dtype) if t.dtype not in ("float32", "bfloat16") else 0))


def encode(array: np.ndarray, fmt: str = "float16") -> dict[str, Any] | None:
    """The record fields of a float ``array`` stored as ``fmt`` (rounded to nearest even), for
    ``Writer.add_encoded``; None when a finite value would round to an infinity."""
    x = np.ascontiguousarray(array, dtype=np.float32)
    with np.errstate(over="ignore"):
        stored = x.astype("<f2") if fmt == "float16" else f32_to_bf16(x)
    if np.any(np.isinf(widen(stored, fmt)) & np.isfinite(x)):
        return None
    return {"data": stored, "format": fmt}


CODEC = register(Codec(NAME, parse, sizes, decode, work=work, minor=3))
