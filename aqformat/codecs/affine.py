"""Codec ``affine`` (spec/FORMAT.md 4.3, 5.5; since format 1.1): affine scalar quantization.

Meant for tensors too small for AQ (biases, norms, depthwise kernels, small
linears), where a codebook would cost more than the weights. Element ``j`` of
row ``r`` of the matrix view is ``offset[r] + code * scale[r]``, with
``b``-bit packed codes (1 <= b <= 8) and float16 ``scale``/``offset``: one pair
per row (``scope = "row"``) or one for the whole tensor (``scope =
"tensor"``, cheaper when rows are short). Everything sits in one section
(scales, offsets, codes), because each section costs up to 63 bytes of
alignment, a lot beside a 40-byte bias; writers zstd-encode it when smaller.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bitpack import pack, packed_size, unpack
from ..layout import from_matrix, matrix_shape
from . import Codec, register

if TYPE_CHECKING:
    from ..header import RecordFields, TensorRecord
    from ..reader import AqmFile

NAME = "affine"
SCOPES = ("row", "tensor")
MAX_BITS = 8


def parse(fields: RecordFields) -> dict[str, Any]:
    return {"axes": fields.axes(), "data": fields.section("data"), "bits": fields.integer("bits", 1, MAX_BITS),
            "scope": fields.choice("scope", SCOPES, default="row")}


def layout(shape: Sequence[int], axes: Sequence[int] | None, bits: int, scope: str) -> tuple[int, int, int, int]:
    """``(rows, cols, pairs, section bytes)``: pairs of (scale, offset), 4 bytes each, then the codes."""
    rows, cols = matrix_shape(shape, axes)
    pairs = rows if scope == "row" else 1
    return rows, cols, pairs, 4 * pairs + packed_size(rows * cols, bits)


def sizes(t: TensorRecord, groups: Any) -> dict[str, int]:
    fl = t.fields
    return {"data": layout(t.shape, fl["axes"], fl["bits"], fl["scope"])[3]}


def dequantize(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``float32(offset) + float32(code) * float32(scale)`` in float32, a pair per row (or one in all)."""
    s = scale.astype(np.float32).reshape(-1, 1)
    o = offset.astype(np.float32).reshape(-1, 1)
    return o + codes.astype(np.float32) * s


def decode(t: TensorRecord, f: AqmFile) -> np.ndarray:
    fl = t.fields
    rows, cols, pairs, total = layout(t.shape, fl["axes"], fl["bits"], fl["scope"])
    data = f.section_bytes(fl["data"], total)
    params = data[: 4 * pairs].view("<f2")
    codes = unpack(data[4 * pairs:], rows * cols, fl["bits"]).reshape(rows, cols)
    return from_matrix(dequantize(codes, params[:pairs], params[pairs:]), t.shape, fl["axes"], None)


def fields(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int, scope: str = "row",
           axes: Sequence[int] | None = None) -> dict[str, Any]:
    """The record fields for ``Writer.add_encoded``: ``codes`` of the matrix view, one (scale, offset) per pair."""
    data = np.concatenate([np.asarray(scale).astype("<f2").reshape(-1).view(np.uint8),
                           np.asarray(offset).astype("<f2").reshape(-1).view(np.uint8),
                           np.frombuffer(pack(codes, bits), np.uint8)])
    return {"axes": None if axes is None else [int(a) for a in axes], "data": data, "bits": int(bits),
            "scope": scope}


CODEC = register(Codec(NAME, parse, sizes, decode, minor=1))
