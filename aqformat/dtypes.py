"""The element types of .aqm tensors (spec/FORMAT.md, "Data types") and the bfloat16 helpers.

numpy has no bfloat16: such tensors travel as their ``uint16`` bit patterns
and are widened to float32 when read.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DTYPES", "FLOAT_DTYPES", "ONNX_TYPES", "ONNX_DTYPE_NAMES", "ORT_TYPE_NAMES", "numpy_dtype",
           "itemsize", "dtype_name", "bf16_to_f32", "f32_to_bf16"]

DTYPES = {  # name -> (little-endian numpy dtype string of the stored elements, itemsize)
    "float32": ("<f4", 4), "float16": ("<f2", 2), "bfloat16": ("<u2", 2), "float64": ("<f8", 8),
    "int8": ("i1", 1), "uint8": ("u1", 1), "int16": ("<i2", 2), "uint16": ("<u2", 2),
    "int32": ("<i4", 4), "uint32": ("<u4", 4), "int64": ("<i8", 8), "uint64": ("<u8", 8),
    "bool": ("?", 1),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# name -> ONNX TensorProto.DataType, and back
ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7,
              "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13, "bfloat16": 16}
ONNX_DTYPE_NAMES = {code: name for name, code in ONNX_TYPES.items()}
# ONNX TensorProto.DataType -> the element name ONNX Runtime's NodeArg.type uses (``tensor(<name>)``),
# including the types .aqm files do not store
ORT_TYPE_NAMES = {1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
                  8: "string", 9: "bool", 10: "float16", 11: "double", 12: "uint32", 13: "uint64",
                  14: "complex64", 15: "complex128", 16: "bfloat16"}

_NAME_OF = {(np.dtype(code).kind, np.dtype(code).itemsize): name
            for name, (code, _) in DTYPES.items() if name != "bfloat16"}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype the elements of dtype ``name`` are stored as (bfloat16: ``uint16``)."""
    return np.dtype(DTYPES[name][0])


def itemsize(name: str) -> int:
    """Bytes per element of dtype ``name``."""
    return DTYPES[name][1]


def dtype_name(dtype: np.dtype) -> str | None:
    """The .aqm name of a numpy dtype (``uint16`` for bfloat16 bits), or None if it has none."""
    dtype = np.dtype(dtype)
    return _NAME_OF.get((dtype.kind, dtype.itemsize))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of float32 values, rounded to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
