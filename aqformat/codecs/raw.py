"""Codec ``raw`` (spec/FORMAT.md 4.3): the C-order array itself, in one section."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import bf16_to_f32, itemsize, numpy_dtype
from ..errors import AqmFormatError
from . import Codec, register

if TYPE_CHECKING:
    from ..header import RecordFields, TensorRecord
    from ..reader import AqmFile

NAME = "raw"


def parse(fields: RecordFields) -> dict[str, Any]:
    return {"data": fields.section("data")}


def sizes(t: TensorRecord, groups: Any) -> dict[str, int]:
    return {"data": t.numel * itemsize(t.dtype)}


def decode(t: TensorRecord, f: AqmFile) -> np.ndarray:
    """The stored array (bfloat16 widened to float32); bool bytes must be 0 or 1."""
    arr = f.section_array(t.fields["data"], numpy_dtype(t.dtype), t.shape)
    if t.dtype == "bool" and arr.size and int(arr.view(np.uint8).max()) > 1:
        raise AqmFormatError(f"tensor {t.name!r}: a bool byte is neither 0 nor 1")
    return bf16_to_f32(arr) if t.dtype == "bfloat16" else arr


def fields(array: np.ndarray, dtype: str) -> dict[str, Any]:
    """The record fields of ``array`` stored as ``dtype``, for ``Writer.add_encoded``."""
    return {"data": np.asarray(array).astype(numpy_dtype(dtype), copy=False)}


def work(t: TensorRecord, groups: Any) -> int:
    """The decoded section is the tensor; bfloat16 is widened to a float32 copy."""
    return t.numel * 4 if t.dtype == "bfloat16" else 0


CODEC = register(Codec(NAME, parse, sizes, decode, float_only=False, verbatim=True, work=work))
