"""The contract between the converters and the runtime about an ONNX graph stored in an .aqm file.

The stored graph is the ``ModelProto`` in which every initializer whose data
lives in the .aqm is a *stub*: a ``TensorProto`` with the same name,
data_type and dims, no data, ``data_location=EXTERNAL`` and
``external_data=[{"key": "location", "value": "aqm"}]``. The converters make
stubs (:func:`make_stub`); the runtime and ``aqm export`` fill them with the
decoded tensors (:func:`stub_array`, :func:`fill_stub`). Nothing here imports
``onnx``: the functions take its messages as they come.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .dtypes import ONNX_DTYPE_NAMES, ONNX_TYPES, f32_to_bf16, numpy_dtype

__all__ = ["AQM_LOCATION", "EXTERNAL", "BFLOAT16", "ONNX_TYPES", "onnx_numpy_dtype", "is_stub", "make_stub",
           "subgraphs", "all_graphs", "stub_array", "fill_stub"]

AQM_LOCATION = "aqm"
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL (DEFAULT is 0)
BFLOAT16 = ONNX_TYPES["bfloat16"]
_GRAPH, _GRAPHS = 5, 10  # AttributeProto.AttributeType


def onnx_numpy_dtype(data_type: int) -> np.dtype | None:
    """The numpy dtype of ONNX ``data_type``'s elements (bfloat16: uint16 bits), or None if .aqm lacks it."""
    name = ONNX_DTYPE_NAMES.get(data_type)
    return None if name is None else numpy_dtype(name)


def is_stub(t: Any) -> bool:
    """True for a ``TensorProto`` whose data lives in the .aqm."""
    return t.data_location == EXTERNAL and any(e.key == "location" and e.value == AQM_LOCATION
                                               for e in t.external_data)


def make_stub(t: Any) -> None:
    """Turn ``TensorProto`` ``t`` into a stub in place (its data is dropped)."""
    data_type, dims, name = t.data_type, list(t.dims), t.name
    t.Clear()
    t.name, t.data_type = name, data_type
    t.dims.extend(dims)
    t.data_location = EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", AQM_LOCATION


def subgraphs(node: Any) -> list[Any]:
    """The graphs held by ``node``'s attributes (If branches, Loop and Scan bodies)."""
    out = []
    for a in node.attribute:
        if a.type == _GRAPH:
            out.append(a.g)
        elif a.type == _GRAPHS:
            out.extend(a.graphs)
    return out


def all_graphs(graph: Any) -> list[Any]:
    """``graph`` and every graph nested in its nodes, depth first."""
    graphs = [graph]
    for node in graph.node:
        for sub in subgraphs(node):
            graphs.extend(all_graphs(sub))
    return graphs


def stub_array(arr: np.ndarray, data_type: int) -> np.ndarray:
    """A decoded tensor as a contiguous little-endian array of ONNX ``data_type``.

    bfloat16 is given as its uint16 bits: float values are rounded to nearest even.
    """
    if data_type == BFLOAT16 and arr.dtype != np.uint16:
        return f32_to_bf16(arr)
    return np.ascontiguousarray(arr, dtype=onnx_numpy_dtype(data_type))


def fill_stub(t: Any, data: bytes) -> None:
    """Make stub ``t`` hold ``data`` (its little-endian element bytes) inline."""
    t.ClearField("external_data")
    t.data_location = 0
    t.raw_data = data
