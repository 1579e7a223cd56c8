"""The ONNX graph stored in an .aqm file: find its weight stubs, split it into stages, inline weights.

Finding the stubs (initializers with ``external_data`` location ``"aqm"``) and
pointing them at in-memory files is done by a minimal protobuf walk so that
building an ordinary session needs neither the ``onnx`` package nor torch.
Splitting a graph into stages and writing an fp32 ONNX model edit protobuf
messages and therefore use ``onnx``, imported only when those are asked for.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import AqmFormatError, AqmInputError

AQM_LOCATION = "aqm"

# ONNX TensorProto.DataType -> numpy dtype (BFLOAT16 is carried as its uint16 bits)
ONNX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("float32"), 2: np.dtype("uint8"), 3: np.dtype("int8"), 4: np.dtype("uint16"),
    5: np.dtype("int16"), 6: np.dtype("int32"), 7: np.dtype("int64"), 9: np.dtype("bool"),
    10: np.dtype("float16"), 11: np.dtype("float64"), 12: np.dtype("uint32"), 13: np.dtype("uint64"),
    16: np.dtype("uint16"),
}
BFLOAT16 = 16
# .aqm dtype name -> ONNX data type
AQM_TO_ONNX = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7,
               "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13, "bfloat16": 16}


@dataclass(frozen=True)
class Stub:
    """A graph initializer whose data lives in the .aqm file."""

    name: str
    data_type: int            # ONNX TensorProto.DataType
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * ONNX_DTYPES[self.data_type].itemsize


# -- minimal protobuf wire-format reading ------------------------------------------

def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise AqmFormatError("stored ONNX graph is truncated")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise AqmFormatError("stored ONNX graph has a malformed varint")


def _spans(buf: memoryview) -> Iterator[tuple[int, int, Any, memoryview]]:
    """Yield ``(field_number, wire_type, value, encoded_field)``; LEN values are memoryviews."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise AqmFormatError("stored ONNX graph is truncated")
            val, pos = buf[pos: pos + n], pos + n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            val, pos = bytes(buf[pos: pos + n]), pos + n
        else:
            raise AqmFormatError(f"stored ONNX graph uses protobuf wire type {wt}")
        yield num, wt, val, buf[start: pos]


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field_number, wire_type, value)``; LEN values are memoryviews."""
    for num, wt, val, _ in _spans(buf):
        yield num, wt, val


def _stub_of(tensor: memoryview) -> Stub | None:
    name, data_type, dims, external, location = "", 0, [], False, None
    for num, wt, val in _fields(tensor):
        if num == 1:  # dims: packed or one varint per entry
            if wt == 2:
                p = 0
                while p < len(val):
                    d, p = _varint(val, p)
                    dims.append(d)
            else:
                dims.append(val)
        elif num == 2:
            data_type = val
        elif num == 8:
            name = bytes(val).decode("utf-8")
        elif num == 14:
            external = val == 1
        elif num == 13:
            entry = {k: bytes(v).decode("utf-8") for k, _, v in _fields(val)}
            if entry.get(1) == "location":
                location = entry.get(2)
    if external and location == AQM_LOCATION:
        return Stub(name, data_type, tuple(dims))
    return None


def external_stubs(model_bytes: bytes) -> list[Stub]:
    """Main-graph initializers of a serialized ModelProto whose data lives in the .aqm.

    Parameters
    ----------
    model_bytes : bytes
        Serialized ONNX ModelProto as stored in the .aqm file.

    Returns
    -------
    list of Stub
        In graph order.
    """
    stubs = []
    buf = memoryview(model_bytes)
    for num, wt, graph in _fields(buf):
        if num == 7 and wt == 2:  # ModelProto.graph
            for gnum, gwt, init in _fields(graph):
                if gnum == 5 and gwt == 2:  # GraphProto.initializer
                    stub = _stub_of(init)
                    if stub is not None:
                        stubs.append(stub)
    return stubs


def _pb(num: int, value: int | bytes | str) -> bytes:
    """One protobuf field: a varint for ints, length-delimited for bytes/str."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(num << 3 | 2) + varint(len(data)) + data


def locate_stubs(model_bytes: bytes, files: Mapping[str, str]) -> bytes:
    """Serialized model whose stubs named in ``files`` read their data from external file ``files[name]``.

    Each such stub's ``external_data`` becomes just that ``location`` (offset 0,
    the whole file); everything else is copied unchanged. ONNX Runtime is then
    given the files' contents with
    ``SessionOptions.add_external_initializers_from_files_in_memory``.
    """
    def tensor(t: memoryview) -> bytes:
        stub = _stub_of(t)
        if stub is None or stub.name not in files:
            return bytes(t)
        kept = b"".join(raw for num, _, _, raw in _spans(t) if num != 13)
        return kept + _pb(13, _pb(1, "location") + _pb(2, files[stub.name]))

    def graph(g: memoryview) -> bytes:
        return b"".join(_pb(5, tensor(v)) if num == 5 and wt == 2 else raw for num, wt, v, raw in _spans(g))

    return b"".join(_pb(7, graph(v)) if num == 7 and wt == 2 else raw
                    for num, wt, v, raw in _spans(memoryview(model_bytes)))


PROBE_SIZE = 1024  # elements: ONNX Runtime copies tiny initializers whatever it is asked


def probe_model() -> bytes:
    """Serialized ONNX model ``y = x + W`` (float32[PROBE_SIZE]) with ``W`` an 'aqm' stub, built without onnx."""
    stub = (_pb(1, PROBE_SIZE) + _pb(2, 1) + _pb(8, "W")
            + _pb(13, _pb(1, "location") + _pb(2, AQM_LOCATION)) + _pb(14, 1))
    vec = _pb(2, _pb(1, _pb(1, 1) + _pb(2, _pb(1, _pb(1, PROBE_SIZE)))))  # ValueInfo.type: float[PROBE_SIZE]
    graph = (_pb(1, _pb(1, "x") + _pb(1, "W") + _pb(2, "y") + _pb(4, "Add")) + _pb(2, "probe")
             + _pb(5, stub) + _pb(11, _pb(1, "x") + vec) + _pb(12, _pb(1, "y") + vec))
    return _pb(1, 8) + _pb(8, _pb(2, 17)) + _pb(7, graph)


# -- editing with the onnx package -------------------------------------------------

def require_onnx(purpose: str):
    """Import ``onnx`` or raise AqmInputError explaining what needs it."""
    try:
        import onnx
    except ImportError:
        raise AqmInputError(f"{purpose} needs the 'onnx' package (pip install onnx)") from None
    return onnx


def parse_model(model_bytes: bytes, purpose: str):
    onnx = require_onnx(purpose)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(model_bytes)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise AqmFormatError(f"stored ONNX graph does not parse: {e}") from None
    return model


def inline_weights(model_bytes: bytes, arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialized ONNX model with the stubs named in ``arrays`` replaced by their data.

    Used to run the decoded model with plain ONNX Runtime (``aqm bench``) or to
    save it as an ordinary ``.onnx`` file. bfloat16 arrays are given as uint16 bits.
    """
    onnx = require_onnx("exporting an fp32 ONNX model")
    model = parse_model(model_bytes, "exporting an fp32 ONNX model")
    for init in model.graph.initializer:
        arr = arrays.get(init.name)
        if arr is None:
            continue
        t = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=list(init.dims))
        t.raw_data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        init.CopyFrom(t)
    return model.SerializeToString()


def _used_names(node) -> set[str]:
    """Inputs of ``node`` including outer-scope names read inside its subgraphs."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            inner: set[str] = set()
            for sub in g.node:
                inner |= _used_names(sub)
                local |= set(sub.output)
            names |= inner - local
    return names


@dataclass
class Stage:
    """A run of consecutive nodes executed as one ONNX Runtime session."""

    nodes: list[Any]
    weights: list[str]                  # .aqm tensors it needs
    inputs: list[str]                   # values it reads from earlier stages or the feeds
    outputs: list[str]                  # values later stages or the caller need
    weight_bytes: int
    models: dict[tuple, bytes] = field(default_factory=dict)  # input signature -> serialized stage


@dataclass
class StagePlan:
    """A graph cut into stages, with what it needs to build them."""

    stages: list[Stage]
    graph_inputs: list[Any]             # ValueInfoProto of the real inputs
    graph_outputs: list[Any]
    last_use: dict[str, int]            # value name -> index of the last stage reading it
    template: Any                       # the ModelProto (nodes and initializers are taken per stage)


def plan_stages(model_bytes: bytes, weight_bytes: Mapping[str, int], limit: int) -> StagePlan:
    """Cut the graph into consecutive stages whose weights each fit ``limit`` bytes.

    Nodes are taken in the stored (topological) order and packed greedily.
    A node with subgraphs (If, Loop, Scan) is indivisible: its stage holds
    every weight its branches read.

    Raises
    ------
    AqmInputError
        A single node needs more than ``limit`` bytes; the message gives the size.
    """
    model = parse_model(model_bytes, "streaming under memory_budget")
    g = model.graph
    inline = {t.name: t for t in g.initializer if t.name not in weight_bytes}
    uses = [_used_names(n) for n in g.node]

    weights = [used & weight_bytes.keys() for used in uses]
    needs = [sum(weight_bytes[k] for k in w) for w in weights]
    worst = int(np.argmax(needs)) if needs else 0
    if needs and needs[worst] > limit:
        node = g.node[worst]
        kind = "a control-flow node, which cannot be split" if any(
            a.HasField("g") or len(a.graphs) for a in node.attribute) else "one node"
        raise StageTooLarge(node.name or node.op_type, node.op_type, needs[worst], kind)

    stages: list[Stage] = []
    cur_nodes: list[Any] = []
    cur_w: set[str] = set()
    for node, w in zip(g.node, weights):
        merged = cur_w | w
        if cur_nodes and sum(weight_bytes[k] for k in merged) > limit:
            stages.append(Stage(cur_nodes, sorted(cur_w), [], [], 0))
            cur_nodes, merged = [], set(w)
        cur_nodes.append(node)
        cur_w = merged
    if cur_nodes or not stages:
        stages.append(Stage(cur_nodes, sorted(cur_w), [], [], 0))

    graph_out = {o.name for o in g.output}
    last_use: dict[str, int] = {}
    stage_of_node = [i for i, s in enumerate(stages) for _ in s.nodes]
    for i, used in zip(stage_of_node, uses):
        for name in used:
            last_use[name] = i
    for i, s in enumerate(stages):
        produced: set[str] = set()
        needed: set[str] = set()
        for node in s.nodes:
            needed |= _used_names(node) - produced
            produced |= {o for o in node.output if o}
        s.inputs = sorted(needed - produced - weight_bytes.keys() - inline.keys())
        s.outputs = sorted(n for n in produced if n in graph_out or last_use.get(n, -1) > i)
        s.weight_bytes = sum(weight_bytes[k] for k in s.weights)
    del model.graph.node[:]
    return StagePlan(stages, list(g.input), list(g.output), last_use, model)


class StageTooLarge(AqmInputError):
    """One node needs more weight bytes than a stage may hold (``need``)."""

    def __init__(self, node: str, op: str, need: int, kind: str):
        super().__init__(f"node {node!r} ({op}) needs {need} bytes of weights at once, {kind}")
        self.need = need


def stage_model(plan: StagePlan, index: int, feeds: Mapping[str, np.ndarray]) -> bytes:
    """Serialized ModelProto of stage ``index`` for inputs of the dtypes/ranks in ``feeds``."""
    onnx = require_onnx("streaming under memory_budget")
    s = plan.stages[index]
    sig = tuple((n, feeds[n].dtype.str, feeds[n].ndim) for n in s.inputs)
    cached = s.models.get(sig)
    if cached is not None:
        return cached
    t = plan.template
    elem = {v: k for k, v in ONNX_DTYPES.items() if k != BFLOAT16}
    inputs = [onnx.helper.make_tensor_value_info(n, elem[feeds[n].dtype], [None] * feeds[n].ndim)
              for n in s.inputs]
    outputs = [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in s.outputs]
    needed = set(s.weights) | {n for node in s.nodes for n in _used_names(node)}
    inits = [init for init in t.graph.initializer if init.name in needed]
    graph = onnx.helper.make_graph(s.nodes, f"{t.graph.name}_stage{index}", inputs, outputs, inits)
    m = onnx.ModelProto()
    m.CopyFrom(t)
    m.graph.CopyFrom(graph)
    s.models[sig] = data = m.SerializeToString()
    return data
