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

from ..dtypes import ONNX_TYPES, dtype_name
from ..errors import AqmFormatError, AqmInputError, StageTooLarge
from ..onnx_stubs import AQM_LOCATION, fill_stub, onnx_numpy_dtype, subgraphs


@dataclass(frozen=True)
class Stub:
    """A graph initializer whose data lives in the .aqm file."""

    name: str
    data_type: int            # ONNX TensorProto.DataType
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * onnx_numpy_dtype(self.data_type).itemsize


# -- minimal protobuf wire-format reading ------------------------------------------
# The stored graph is untrusted: the walk below costs time linear in its bytes (each field
# is read once, none is copied), its memory is bounded by the number of stubs, and every
# length is checked against the enclosing message before use.

MAX_NESTING = 64  # message levels (graphs in If/Loop bodies...); protobuf itself stops at 100

# Message kinds and, for each, the fields holding sub-messages that may contain a TensorProto
# (onnx.proto field numbers). A TensorProto anywhere in these can refer to external data.
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTR},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}


def _tag(num: int) -> bytes:
    """First byte of the key of length-delimited field ``num``."""
    return bytes([(num << 3 | 2) & 0x7F | (0x80 if num > 15 else 0)])


# A message none of whose child tags occurs anywhere in its bytes holds no tensor, so it is
# skipped at the speed of bytes.find; most nodes (no attributes) and tensors (inline data) are.
_TAGS = {kind: tuple(_tag(n) for n in nums) for kind, nums in _CHILDREN.items()}
_EXTERNAL_TAGS = (_tag(13), bytes([14 << 3]))  # TensorProto.external_data, .data_location
_MAX_DIMS = 8  # the .aqm limit: a stub with more dimensions cannot match any tensor
_MAX_TEXT = 1024  # bytes of a stub's name or of an external_data key or value


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos]`` (inside ``[pos, end)``) and the position after it."""
    result = shift = 0
    while True:
        if pos >= end:
            raise AqmFormatError("stored ONNX graph is truncated")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise AqmFormatError("stored ONNX graph has a malformed varint")


def fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Fields of the message ``buf[start:end]`` as ``(number, wire_type, value, value_end, field_start)``.

    For a length-delimited field (wire type 2) ``value`` is where its bytes start;
    for a varint it is the number. Nothing is copied.
    """
    pos = start
    while pos < end:
        field_start = pos
        b = buf[pos]
        if b < 0x80:
            key, pos = b, pos + 1
        else:
            key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:  # not a field: zero bytes (a zstd bomb's favourite) stop here, not a megabyte later
            raise AqmFormatError("stored ONNX graph uses protobuf field number 0")
        if wt == 2:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise AqmFormatError("stored ONNX graph is truncated (a length runs past its message)")
            yield num, 2, pos, pos + n, field_start
            pos += n
        elif wt == 0:
            val, pos = _varint(buf, pos, end)
            yield num, 0, val, pos, field_start
        elif wt in (1, 5):
            pos += 8 if wt == 1 else 4
            if pos > end:
                raise AqmFormatError("stored ONNX graph is truncated")
        else:
            raise AqmFormatError(f"stored ONNX graph uses protobuf wire type {wt}")


def _text(buf: bytes, start: int, end: int, what: str) -> str:
    if end - start > _MAX_TEXT:
        raise AqmFormatError(f"stored ONNX graph: {what} is longer than {_MAX_TEXT} bytes")
    try:
        return buf[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise AqmFormatError(f"stored ONNX graph: {what} is not valid UTF-8") from None


def _safe(text: str) -> str:
    """``text`` quoted, cut short and with control characters escaped (it comes from the file)."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _tensor(buf: bytes, start: int, end: int, main_initializer: bool) -> Stub | None:
    """The stub of TensorProto ``buf[start:end]``, None if it holds its own data.

    Raises AqmFormatError for any other reference to external data: only the
    main graph's initializers may be stubs, and a stub refers to the .aqm alone.
    """
    if all(buf.find(t, start, end) < 0 for t in _EXTERNAL_TAGS):
        return None
    name = (start, start)
    data_type = location_kind = 0
    dims: list[tuple[int, int, int]] = []  # (wire type, value or start, end)
    entries: list[tuple[int, int]] = []
    for num, wt, val, vend, _ in fields(buf, start, end):
        if num == 1 and wt in (0, 2):
            dims.append((wt, val, vend))
        elif num == 2 and wt == 0:
            data_type = val
        elif num == 8 and wt == 2:
            name = (val, vend)
        elif num == 13 and wt == 2:
            entries.append((val, vend))
        elif num == 14 and wt == 0:
            location_kind = val
        elif num in (2, 8, 13, 14):
            raise AqmFormatError(f"stored ONNX graph: tensor field {num} has protobuf wire type {wt}")
    if location_kind == 0 and not entries:
        return None
    label = _safe(_text(buf, *name, "a tensor name"))
    pairs = [_entry(buf, s, e) for s, e in entries]
    if not main_initializer or location_kind != 1 or pairs != [("location", AQM_LOCATION)]:
        where = next((v for k, v in pairs if k == "location"), None)
        raise AqmFormatError(
            f"stored ONNX graph: tensor {label} refers to external data"
            + (f" at {_safe(where)}" if where is not None else "")
            + "; a stored graph may only refer to the .aqm file's own tensors "
              "(main-graph initializers with the one external_data entry location='aqm')")
    return Stub(_text(buf, *name, "a tensor name"), data_type, _dims(buf, dims, label))


def _entry(buf: bytes, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for num, wt, val, vend, _ in fields(buf, start, end):
        if wt != 2 or num not in (1, 2):
            raise AqmFormatError("stored ONNX graph: an external_data entry is malformed")
        text = _text(buf, val, vend, "an external_data entry")
        key, value = (text, value) if num == 1 else (key, text)
    return key, value


def _dims(buf: bytes, items: list[tuple[int, int, int]], label: str) -> tuple[int, ...]:
    dims: list[int] = []
    for wt, val, vend in items:
        if wt == 0:
            dims.append(val)
        else:
            p = val
            while p < vend and len(dims) <= _MAX_DIMS:
                d, p = _varint(buf, p, vend)
                dims.append(d)
        if len(dims) > _MAX_DIMS:
            raise AqmFormatError(f"stored ONNX graph: stub {label} has more than {_MAX_DIMS} dimensions")
    return tuple(dims)


@dataclass(frozen=True)
class GraphScan:
    """Where the weight stubs of a serialized ModelProto are.

    ``graphs`` has one entry per occurrence of ``ModelProto.graph`` (protobuf merges
    repeated occurrences): ``(field_start, value_start, value_end, stubs)`` with
    ``stubs`` a list of ``(field_start, value_start, value_end, Stub)`` of its initializers.
    """

    stubs: list[Stub]
    graphs: list[tuple[int, int, int, list[tuple[int, int, int, Stub]]]]


def scan_model(model_bytes: bytes) -> GraphScan:
    """Find the weight stubs of a serialized ModelProto; refuse any other external reference.

    Every TensorProto the model holds (initializers of the main graph and of
    subgraphs, sparse initializers, tensor attributes of nodes and functions,
    training graphs) is inspected.

    Raises
    ------
    AqmFormatError
        The bytes are not protobuf, nest deeper than ``MAX_NESTING``, or a
        tensor refers to external data other than as a main-graph stub.
    """
    buf = bytes(model_bytes)
    stubs: list[Stub] = []
    graphs: list[tuple[int, int, int, list[tuple[int, int, int, Stub]]]] = []
    # depth-first over the messages that may hold tensors: memory grows with nesting, not size
    stack = [(_CHILDREN[_MODEL], fields(buf, 0, len(buf)), -1)]
    while stack:
        children, pending, main = stack[-1]
        for num, wt, val, vend, fstart in pending:
            child = children.get(num)
            if child is None or wt != 2:
                continue
            if child == _TENSOR:
                stub = _tensor(buf, val, vend, main >= 0)
                if stub is not None:
                    stubs.append(stub)
                    graphs[main][3].append((fstart, val, vend, stub))
                continue
            if all(buf.find(t, val, vend) < 0 for t in _TAGS[child]):
                continue
            if len(stack) >= MAX_NESTING:
                raise AqmFormatError(f"stored ONNX graph nests messages deeper than {MAX_NESTING} levels")
            if len(stack) == 1 and num == 7:  # ModelProto.graph: the main graph
                graphs.append((fstart, val, vend, []))
                stack.append((_CHILDREN[_GRAPH], fields(buf, val, vend), len(graphs) - 1))
            else:
                stack.append((_CHILDREN[child], fields(buf, val, vend), -1))
            break
        else:
            stack.pop()
    names = [s.name for s in stubs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise AqmFormatError(f"stored ONNX graph has two weight stubs named {_safe(dup)}")
    return GraphScan(stubs, graphs)


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

    Raises
    ------
    AqmFormatError
        See :func:`scan_model`.
    """
    return scan_model(model_bytes).stubs


def varint(n: int) -> bytes:
    """The protobuf varint encoding of non-negative ``n``."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def pb_field(num: int, value: int | bytes | str) -> bytes:
    """One protobuf field: a varint for ints, length-delimited for bytes/str."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(num << 3 | 2) + varint(len(data)) + data


def locate_stubs(model_bytes: bytes, files: Mapping[str, str], scan: GraphScan | None = None) -> bytes:
    """Serialized model whose stubs named in ``files`` read their data from external file ``files[name]``.

    Each such stub's ``external_data`` becomes just that ``location`` (offset 0,
    the whole file); everything else is copied unchanged, in slices between the
    stubs. ONNX Runtime is then given the files' contents with
    ``SessionOptions.add_external_initializers_from_files_in_memory``. ``scan``
    is :func:`scan_model`'s result for these bytes, when already made.
    """
    buf = bytes(model_bytes)
    pieces: list[bytes] = []
    pos = 0
    for gstart, vstart, vend, stubs in (scan or scan_model(buf)).graphs:
        graph: list[bytes] = []
        gpos = vstart
        for fstart, tstart, tend, stub in stubs:
            if stub.name not in files:
                continue
            kept, tpos = [], tstart
            for num, _, _, fend, f0 in fields(buf, tstart, tend):
                if num == 13:
                    kept.append(buf[tpos:f0])
                    tpos = fend
            kept.append(buf[tpos:tend])
            location = pb_field(13, pb_field(1, "location") + pb_field(2, files[stub.name]))
            graph += [buf[gpos:fstart], pb_field(5, b"".join(kept) + location)]
            gpos = tend
        graph.append(buf[gpos:vend])
        pieces += [buf[pos:gstart], pb_field(7, b"".join(graph))]
        pos = vend
    pieces.append(buf[pos:])
    return b"".join(pieces)


PROBE_SIZE = 1024  # elements: ONNX Runtime copies tiny initializers whatever it is asked


def probe_model() -> bytes:
    """Serialized ONNX model ``y = x + W`` (float32[PROBE_SIZE]) with ``W`` an 'aqm' stub, built without onnx."""
    stub = (pb_field(1, PROBE_SIZE) + pb_field(2, 1) + pb_field(8, "W")
            + pb_field(13, pb_field(1, "location") + pb_field(2, AQM_LOCATION)) + pb_field(14, 1))
    vec = pb_field(2, pb_field(1, pb_field(1, 1) + pb_field(2, pb_field(1, pb_field(1, PROBE_SIZE)))))  # ValueInfo.type: float[PROBE_SIZE]
    graph = (pb_field(1, pb_field(1, "x") + pb_field(1, "W") + pb_field(2, "y") + pb_field(4, "Add")) + pb_field(2, "probe")
             + pb_field(5, stub) + pb_field(11, pb_field(1, "x") + vec) + pb_field(12, pb_field(1, "y") + vec))
    return pb_field(1, 8) + pb_field(8, pb_field(2, 17)) + pb_field(7, graph)


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
    model = parse_model(model_bytes, "exporting an fp32 ONNX model")
    for init in model.graph.initializer:
        arr = arrays.get(init.name)
        if arr is None:
            continue
        fill_stub(init, np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return model.SerializeToString()


def used_names(node) -> set[str]:
    """Inputs of ``node`` including outer-scope names read inside its subgraphs."""
    names = {n for n in node.input if n}
    for g in subgraphs(node):
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        inner: set[str] = set()
        for sub in g.node:
            inner |= used_names(sub)
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
    uses = [used_names(n) for n in g.node]

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
            needed |= used_names(node) - produced
            produced |= {o for o in node.output if o}
        s.inputs = sorted(needed - produced - weight_bytes.keys() - inline.keys())
        s.outputs = sorted(n for n in produced if n in graph_out or last_use.get(n, -1) > i)
        s.weight_bytes = sum(weight_bytes[k] for k in s.weights)
    del model.graph.node[:]
    return StagePlan(stages, list(g.input), list(g.output), last_use, model)


def stage_model(plan: StagePlan, index: int, feeds: Mapping[str, np.ndarray]) -> bytes:
    """Serialized ModelProto of stage ``index`` for inputs of the dtypes/ranks in ``feeds``."""
    onnx = require_onnx("streaming under memory_budget")
    s = plan.stages[index]
    sig = tuple((n, feeds[n].dtype.str, feeds[n].ndim) for n in s.inputs)
    cached = s.models.get(sig)
    if cached is not None:
        return cached
    t = plan.template
    inputs = [onnx.helper.make_tensor_value_info(n, ONNX_TYPES[dtype_name(feeds[n].dtype)], [None] * feeds[n].ndim)
              for n in s.inputs]
    outputs = [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in s.outputs]
    needed = set(s.weights) | {n for node in s.nodes for n in used_names(node)}
    inits = [init for init in t.graph.initializer if init.name in needed]
    graph = onnx.helper.make_graph(s.nodes, f"{t.graph.name}_stage{index}", inputs, outputs, inits)
    m = onnx.ModelProto()
    m.CopyFrom(t)
    m.graph.CopyFrom(graph)
    s.models[sig] = data = m.SerializeToString()
    return data
