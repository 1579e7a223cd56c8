"""Codec ``lattice`` (spec/FORMAT.md 4.3, 5.3): dithered uniform-lattice indices and per-row steps."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dither import dither
from ..dtypes import itemsize, numpy_dtype
from ..errors import AqmInputError
from ..layout import from_matrix, matrix_shape
from . import Codec, register

if TYPE_CHECKING:
    from ..header import RecordFields, TensorRecord
    from ..reader import AqmFile

NAME = "lattice"
INDEX_DTYPES = ("int8", "int16", "int32")


def parse_indices(fields: RecordFields) -> dict[str, Any]:
    """The fields of integer indices and per-row steps, which ``lattice`` and ``uniform`` share."""
    return {"axes": fields.axes(), "data": fields.section("data"),
            "index_dtype": fields.choice("index_dtype", INDEX_DTYPES), "step": fields.section("step")}


def parse(fields: RecordFields) -> dict[str, Any]:
    return {**parse_indices(fields), "seed": fields.integer("seed")}


def sizes(t: TensorRecord, groups: Any) -> dict[str, int]:
    rows, cols = matrix_shape(t.shape, t.fields["axes"])
    return {"data": rows * cols * itemsize(t.fields["index_dtype"]), "step": rows * 4}


def decode_lattice(q: np.ndarray, step: np.ndarray, seed: int | None, shape: Sequence[int],
                   axes: Sequence[int] | None, rows: int, cols: int) -> np.ndarray:
    """``W = (q - u) * step[row]`` with ``u`` the seeded dither, as float32; ``seed`` None: no dither
    (``W = q * step[row]``, codec ``uniform``)."""
    q = q.reshape(rows, cols).astype(np.float64)
    if seed is not None:
        q -= dither(seed, rows * cols).reshape(rows, cols)
    w = (q * step.astype(np.float64)[:, None]).astype(np.float32)
    return from_matrix(w, shape, axes, None)


def read_indices(t: TensorRecord, f: AqmFile) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(q [rows, cols], step [rows], rows, cols)`` of a ``lattice`` or ``uniform`` record."""
    fl = t.fields
    rows, cols = matrix_shape(t.shape, fl["axes"])
    q = f.section_array(fl["data"], numpy_dtype(fl["index_dtype"]), (rows, cols))
    return q, f.section_array(fl["step"], np.dtype("<f4"), (rows,)), rows, cols


def decode(t: TensorRecord, f: AqmFile) -> np.ndarray:
    q, step, rows, cols = read_indices(t, f)
    return decode_lattice(q, step, t.fields["seed"], t.shape, t.fields["axes"], rows, cols)


def index_fields(name: str, shape: Sequence[int], q: np.ndarray, step: np.ndarray,
                 axes: Sequence[int] | None = None) -> dict[str, Any]:
    """The index and step fields of a ``lattice`` or ``uniform`` record, indices in the narrowest
    dtype that holds them: ``q`` the integer indices of the matrix view (``[rows, cols]``),
    ``step`` the per-row step."""
    rows, cols = matrix_shape([int(x) for x in shape], axes)
    q = np.asarray(q)
    step = np.asarray(step, dtype=np.float32).reshape(-1)
    if q.size != rows * cols or step.shape != (rows,):
        raise AqmInputError(f"{name}: lattice indices/steps do not match shape {list(shape)}")
    lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    index_dtype = next((t for t in INDEX_DTYPES if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), None)
    if index_dtype is None:
        raise AqmInputError(f"{name}: lattice indices exceed int32")
    return {"axes": None if axes is None else [int(a) for a in axes], "data": q.reshape(rows, cols).astype(numpy_dtype(index_dtype)),
            "index_dtype": index_dtype, "step": step.astype("<f4")}


def fields(name: str, shape: Sequence[int], q: np.ndarray, step: np.ndarray, seed: int,
           axes: Sequence[int] | None = None) -> dict[str, Any]:
    """The record fields for ``Writer.add_encoded`` (:func:`index_fields` and the dither ``seed``,
    see spec, "Dither")."""
    if not 0 <= int(seed) < 1 << 64:
        raise AqmInputError(f"{name}: the lattice seed must be an unsigned 64-bit integer")
    return {**index_fields(name, shape, q, step, axes), "seed": int(seed)}


def work(t: TensorRecord, groups: Any) -> int:
    """Decoder memory: three float64 arrays (dither, difference, product), float32 output,
    a layout copy and a float16 copy, per element."""
    return t.numel * 34


CODEC = register(Codec(NAME, parse, sizes, decode, work=work))
