"""Inputs, outputs and in-graph initializers of a stored ONNX graph, read without ``onnx``.

``aqm-info`` shows them, and it must work with the core dependencies alone,
so the graph is read with the same minimal protobuf walk as the weight stubs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..dtypes import ORT_TYPE_NAMES
from ..errors import AqmFormatError
from .onnx_graph import _MAX_TEXT, fields, _tensor, _varint, scan_model

MAX_LISTED = 1 << 16  # inputs, outputs and in-graph initializers described, and dimensions of each



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
    return ORT_TYPE_NAMES.get(code, f"type {code}")


def _name(buf: bytes, start: int, end: int) -> str:
    return buf[start:min(end, start + _MAX_TEXT)].decode("utf-8", "replace")


def _value(buf: bytes, start: int, end: int) -> GraphValue:
    name, elem, shape = "", 0, None
    for num, wt, val, vend, _ in fields(buf, start, end):
        if num == 1 and wt == 2:
            name = _name(buf, val, vend)
        elif num == 2 and wt == 2:  # TypeProto
            for tnum, twt, tval, tend, _ in fields(buf, val, vend):
                if tnum != 1 or twt != 2:  # only tensor_type is described
                    continue
                for fnum, fwt, fval, fend, _ in fields(buf, tval, tend):
                    if fnum == 1 and fwt == 0:
                        elem = fval
                    elif fnum == 2 and fwt == 2:
                        shape = [_dim(buf, d, dend) for dnum, dwt, d, dend, _ in fields(buf, fval, fend)
                                 if dnum == 1 and dwt == 2]
                        if len(shape) > MAX_LISTED:
                            raise AqmFormatError(f"stored ONNX graph: a value has more than {MAX_LISTED} dimensions")
    return GraphValue(name, f"tensor({_type_name(elem)})", shape)


def _dim(buf: bytes, start: int, end: int) -> int | str | None:
    for num, wt, val, vend, _ in fields(buf, start, end):
        if num == 1 and wt == 0:
            return val
        if num == 2 and wt == 2:
            return _name(buf, val, vend)
    return None


def _initializer(buf: bytes, start: int, end: int) -> GraphInitializer:
    name, code, dims = "", 0, []
    for num, wt, val, vend, _ in fields(buf, start, end):
        if num == 1 and wt == 0:
            dims.append(val)
        elif num == 1 and wt == 2:
            p = val
            while p < vend and len(dims) <= MAX_LISTED:
                d, p = _varint(buf, p, vend)
                dims.append(d)
        elif num == 2 and wt == 0:
            code = val
        elif num == 8 and wt == 2:
            name = _name(buf, val, vend)
        if len(dims) > MAX_LISTED:
            raise AqmFormatError(f"stored ONNX graph: an initializer has more than {MAX_LISTED} dimensions")
    return GraphInitializer(name, _type_name(code), dims, end - start)


def graph_io(model_bytes: bytes) -> GraphIO:
    """The main graph's inputs (initializers excluded), outputs and the initializers kept in it.

    At most ``MAX_LISTED`` of each are read: a hostile graph of millions of
    tiny entries would otherwise cost far more memory than its bytes.

    Raises
    ------
    AqmFormatError
        The bytes are not a well-formed protobuf message, list more than
        ``MAX_LISTED`` entries, or refer to external data outside the .aqm.
    """
    buf = bytes(model_bytes)
    scan_model(buf)  # the reference rule, and every length checked
    inputs: list[GraphValue] = []
    outputs: list[GraphValue] = []
    in_graph: list[GraphInitializer] = []
    init_names = set()
    for num, wt, gval, gend, _ in fields(buf, 0, len(buf)):
        if num != 7 or wt != 2:  # ModelProto.graph
            continue
        for gnum, gwt, val, vend, _ in fields(buf, gval, gend):
            if gwt != 2 or gnum not in (5, 11, 12):
                continue
            if len(inputs) + len(outputs) + len(in_graph) >= MAX_LISTED:
                raise AqmFormatError(f"stored ONNX graph lists more than {MAX_LISTED} inputs, outputs and initializers")
            if gnum == 11:
                inputs.append(_value(buf, val, vend))
            elif gnum == 12:
                outputs.append(_value(buf, val, vend))
            else:
                info = _initializer(buf, val, vend)
                init_names.add(info.name)
                if _tensor(buf, val, vend, True) is None:
                    in_graph.append(info)
    return GraphIO([v for v in inputs if v.name not in init_names], outputs, in_graph)
