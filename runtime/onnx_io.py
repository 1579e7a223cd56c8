"""Inputs, outputs and in-graph initializers of a stored ONNX graph, read without ``onnx``.

``aqm-info`` shows them, and it must work with the core dependencies alone,
so the graph is read with the same minimal protobuf walk as the weight stubs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .onnx_graph import _fields, _stub_of, _varint

# ONNX TensorProto.DataType -> the name ONNX Runtime's NodeArg.type uses
ONNX_TYPE_NAMES = {1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
                   8: "string", 9: "bool", 10: "float16", 11: "double", 12: "uint32", 13: "uint64",
                   14: "complex64", 15: "complex128", 16: "bfloat16"}


@dataclass(frozen=True)
class GraphValue:
    """A graph input or output: name, element type and shape (None where unknown, a name where symbolic)."""

    name: str
    type: str
    shape: list[int | str | None] | None


@dataclass(frozen=True)
class GraphInitializer:
    """An initializer whose data stays inside the graph (too small to compress, or not a weight)."""

    name: str
    type: str
    shape: list[int]
    stored_bytes: int


@dataclass(frozen=True)
class GraphIO:
    """What :func:`graph_io` finds in the main graph."""

    inputs: list[GraphValue]
    outputs: list[GraphValue]
    in_graph: list[GraphInitializer]


def _type_name(code: int) -> str:
    return ONNX_TYPE_NAMES.get(code, f"type {code}")


def _ints(wt: int, val: Any) -> list[int]:
    """A repeated int64 field entry: packed (LEN) or one varint."""
    if wt != 2:
        return [val]
    out, p = [], 0
    while p < len(val):
        d, p = _varint(val, p)
        out.append(d)
    return out


def _value(info: memoryview) -> GraphValue:
    name, elem, shape = "", 0, None
    for num, wt, val in _fields(info):
        if num == 1 and wt == 2:
            name = bytes(val).decode("utf-8", "replace")
        elif num == 2 and wt == 2:  # TypeProto
            for tnum, twt, tensor in _fields(val):
                if tnum != 1 or twt != 2:  # only tensor_type is described
                    continue
                for fnum, fwt, fval in _fields(tensor):
                    if fnum == 1 and fwt == 0:
                        elem = fval
                    elif fnum == 2 and fwt == 2:
                        shape = [_dim(d) for dnum, dwt, d in _fields(fval) if dnum == 1 and dwt == 2]
    return GraphValue(name, f"tensor({_type_name(elem)})", shape)


def _dim(dim: memoryview) -> int | str | None:
    for num, wt, val in _fields(dim):
        if num == 1 and wt == 0:
            return val
        if num == 2 and wt == 2:
            return bytes(val).decode("utf-8", "replace")
    return None


def _initializer(tensor: memoryview) -> GraphInitializer:
    name, code, dims = "", 0, []
    for num, wt, val in _fields(tensor):
        if num == 1:
            dims.extend(_ints(wt, val))
        elif num == 2 and wt == 0:
            code = val
        elif num == 8 and wt == 2:
            name = bytes(val).decode("utf-8", "replace")
    return GraphInitializer(name, _type_name(code), dims, len(tensor))


def graph_io(model_bytes: bytes) -> GraphIO:
    """The main graph's inputs (initializers excluded), outputs and the initializers kept in it.

    Raises
    ------
    AqmFormatError
        The bytes are not a well-formed protobuf message.
    """
    inputs, outputs, inits = [], [], []
    for num, wt, graph in _fields(memoryview(model_bytes)):
        if num != 7 or wt != 2:  # ModelProto.graph
            continue
        for gnum, gwt, val in _fields(graph):
            if gwt != 2:
                continue
            if gnum == 11:
                inputs.append(_value(val))
            elif gnum == 12:
                outputs.append(_value(val))
            elif gnum == 5:
                inits.append(val)
    init_names = set()
    in_graph = []
    for t in inits:
        info = _initializer(t)
        init_names.add(info.name)
        if _stub_of(t) is None:
            in_graph.append(info)
    return GraphIO([v for v in inputs if v.name not in init_names], outputs, in_graph)
