"""Hostile embedded ONNX graphs: the runtime's stub scan is bounded and the graph cannot reach outside the file.

The stored graph is untrusted protobuf. Finding its weight stubs must cost
time linear in its bytes and memory bounded by the stubs it holds, refuse
malformed lengths, wire types and names with an AqmError, and refuse every
reference to external data other than the .aqm's own stubs: ONNX Runtime
would otherwise read that path relative to the current directory.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import aqformat
from aqformat import AqmFormatError
from aqformat.runtime import InferenceSession
from aqformat.runtime.onnx_graph import MAX_NESTING, external_stubs, locate_stubs, pb_field

SECRET = b"PRIVATE KEY material that must never reach an output" * 4


def stub_tensor(name: str | bytes = "W", dims=(4,), data_type: int = 1, entries=((b"location", b"aqm"),),
                location_kind: int = 1) -> bytes:
    """TensorProto bytes written by hand, so that any field can be wrong."""
    raw_name = name if isinstance(name, bytes) else name.encode()
    out = b"".join(pb_field(1, d) for d in dims) + pb_field(2, data_type) + pb_field(8, raw_name)
    out += b"".join(pb_field(13, pb_field(1, k) + pb_field(2, v)) for k, v in entries)
    return out + (pb_field(14, location_kind) if location_kind is not None else b"")


def model_with(initializers: list[bytes], nodes: bytes = b"") -> bytes:
    graph = nodes + pb_field(2, "g") + b"".join(pb_field(5, t) for t in initializers)
    return pb_field(1, 8) + pb_field(8, pb_field(2, 17)) + pb_field(7, graph)


def aqm_with_graph(path, graph: bytes, tensors: dict[str, np.ndarray] | None = None):
    with aqformat.Writer(path) as w:
        for name, arr in (tensors or {}).items():
            w.add_tensor(name, arr)
        w.set_graph(graph)
    return path


# -- class 1: the scan's cost and its refusals -------------------------------------------

def test_a_valid_stub_is_found():
    assert [(s.name, s.dims) for s in external_stubs(model_with([stub_tensor()]))] == [("W", (4,))]


def test_length_written_as_a_varint_number_allocates_nothing():
    """A name field given wire type 0 used to reach bytes(n): 1 GB, or MemoryError at 2**40."""
    bad = pb_field(8, 1 << 40) + pb_field(14, 1) + pb_field(13, pb_field(1, "location") + pb_field(2, "aqm"))
    tracemalloc.start()
    try:
        with pytest.raises(AqmFormatError, match="wire type"):
            external_stubs(model_with([bad]))
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    with pytest.raises(AqmFormatError, match="external_data entry is malformed"):
        external_stubs(model_with([pb_field(8, "W") + pb_field(14, 1) + pb_field(13, pb_field(2, 1 << 30))]))


@pytest.mark.parametrize("name", [b"\xff\xfe", b"W\xc3", b"\xed\xa0\x80"])
def test_non_utf8_stub_name(name):
    with pytest.raises(AqmFormatError, match="not valid UTF-8"):
        external_stubs(model_with([stub_tensor(name)]))


@pytest.mark.parametrize("graph,match", [
    (pb_field(7, b"\x2a\xff\xff\xff\xff\x0f"), "truncated"),          # a length past the message's end
    (b"\x3a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "malformed varint|truncated"),
    (b"\x3b", "wire type 3"),                                    # protobuf groups: not ONNX
    (b"\x09\x00\x00", "truncated"),                              # a fixed64 cut short
    (b"\x00" * (1 << 20), "field number 0"),                      # zeros: refused at the first byte
])
def test_malformed_protobuf(graph, match):
    with pytest.raises(AqmFormatError, match=match):
        external_stubs(graph)


def test_packed_dims_are_not_materialised():
    """1 MiB of packed dims used to become a million Python ints; stubs have at most 8 dimensions."""
    t = pb_field(1, b"\x01" * (1 << 20)) + pb_field(2, 1) + pb_field(8, "W") + pb_field(13, pb_field(1, "location") + pb_field(2, "aqm")) + pb_field(14, 1)
    t0 = time.perf_counter()
    with pytest.raises(AqmFormatError, match="more than 8 dimensions"):
        external_stubs(model_with([t]))
    assert time.perf_counter() - t0 < 0.5


def test_nesting_is_bounded():
    """Subgraphs nested past MAX_NESTING are refused, without recursion."""
    inner = pb_field(2, "leaf")
    for _ in range(MAX_NESTING):
        inner = pb_field(1, pb_field(4, "If") + pb_field(5, pb_field(1, "then_branch") + pb_field(6, inner)))  # node.attribute.g
    with pytest.raises(AqmFormatError, match="deeper than"):
        external_stubs(pb_field(7, inner))


def test_scan_and_relocation_cost_is_linear_and_copies_nothing_per_field():
    """Rewriting the stubs of a graph of 2**16 nodes allocates about the graph's size, not 145x it."""
    node = pb_field(1, pb_field(1, "x") + pb_field(2, "y") + pb_field(4, "Relu") + pb_field(5, pb_field(1, "alpha") + pb_field(20, 1)))
    graphs = {n: model_with([stub_tensor()], node * n) for n in (1 << 14, 1 << 16)}
    seconds = {}
    for n, g in graphs.items():
        tracemalloc.start()
        t0 = time.perf_counter()
        out = locate_stubs(g, {"W": "aqm.0"})
        seconds[n] = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 3 * len(g) + (1 << 20), f"{peak / len(g):.1f}x the graph's bytes"
        assert len(out) == len(g) + 2 and b"aqm.0" in out
    assert seconds[1 << 16] < 8 * seconds[1 << 14] + 0.2  # linear: 4x the bytes, not 16x the time


def test_relocation_keeps_every_other_byte():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "B")]))
    stub = onnx.TensorProto(name="W", data_type=1, dims=[4], data_location=1)
    stub.external_data.add(key="location", value="aqm")
    m.graph.initializer.append(stub)
    out = onnx.load_from_string(locate_stubs(m.SerializeToString(), {"W": "aqm.7"}))
    m.graph.initializer[-1].external_data[0].value = "aqm.7"
    assert out == m


# -- class 3: external data outside the .aqm ---------------------------------------------

def _identity_model(init: onnx.TensorProto) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(
        [helper.make_node("Identity", [init.name], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [len(SECRET)])], [init]),
        opset_imports=[helper.make_opsetid("", 17)])


def _external(name: str, location: str, **extra: str) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=TensorProto.UINT8, dims=[len(SECRET)], data_location=1)
    for k, v in {"location": location, **extra}.items():
        t.external_data.add(key=k, value=v)
    return t


def test_graph_without_stubs_cannot_read_a_file_beside_it(tmp_path, monkeypatch):
    """The crafted file that returned the first bytes of ~/.ssh/id_rsa: refused before ORT sees it."""
    (tmp_path / "id_rsa").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    path = aqm_with_graph(tmp_path / "evil.aqm", _identity_model(_external("k", "id_rsa")).SerializeToString())
    with pytest.raises(AqmFormatError, match="tensor 'k' refers to external data at 'id_rsa'"):
        InferenceSession(path)


def _in_subgraph(init: onnx.TensorProto) -> onnx.ModelProto:
    branch = helper.make_graph([helper.make_node("Identity", [init.name], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.UINT8, [len(SECRET)])], [init])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    return helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [len(SECRET)])]))


def _in_constant(init: onnx.TensorProto) -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["y"], value=init)
    return helper.make_model(helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", 2, None)]))


def _sparse(init: onnx.TensorProto) -> onnx.ModelProto:
    m = _identity_model(numpy_helper.from_array(np.zeros(1, np.uint8), "z"))
    idx = numpy_helper.from_array(np.zeros(1, np.int64), "i")
    m.graph.sparse_initializer.append(onnx.SparseTensorProto(values=init, indices=idx, dims=[len(SECRET)]))
    return m


def _in_function(init: onnx.TensorProto) -> onnx.ModelProto:
    m = _identity_model(numpy_helper.from_array(np.zeros(1, np.uint8), "z"))
    m.functions.append(helper.make_function("d", "f", [], ["y"], [helper.make_node("Constant", [], ["y"], value=init)],
                                            [helper.make_opsetid("", 17)]))
    return m


def _in_training(init: onnx.TensorProto) -> onnx.ModelProto:
    m = _identity_model(numpy_helper.from_array(np.zeros(1, np.uint8), "z"))
    m.training_info.add().algorithm.CopyFrom(helper.make_graph([], "t", [], [], [init]))
    return m


@pytest.mark.parametrize("where", [_identity_model, _in_subgraph, _in_constant, _sparse, _in_function, _in_training])
@pytest.mark.parametrize("tensor", [
    _external("k", "id_rsa"),
    _external("k", "../../etc/passwd", offset="0", length="16"),
    _external("k", "aqm", offset="4"),              # an .aqm stub may hold nothing but its location
    _external("k", "/proc/self/environ"),
])
def test_every_external_reference_is_refused(where, tensor):
    with pytest.raises(AqmFormatError, match="refers to external data"):
        external_stubs(where(tensor).SerializeToString())


def test_stub_outside_the_main_graph_is_refused():
    """ORT would read a file named 'aqm' in the current directory for it: only main-graph stubs are filled."""
    for where in (_in_subgraph, _in_constant, _sparse, _in_function, _in_training):
        with pytest.raises(AqmFormatError, match="refers to external data at 'aqm'"):
            external_stubs(where(_external("k", "aqm")).SerializeToString())


def test_external_entries_without_the_location_kind_are_refused():
    with pytest.raises(AqmFormatError, match="refers to external data at 'id_rsa'"):
        external_stubs(model_with([stub_tensor(entries=((b"location", b"id_rsa"),), location_kind=None)]))
    assert external_stubs(model_with([stub_tensor(entries=(), location_kind=None)])) == []  # inline data


def test_duplicate_stub_names_are_refused():
    with pytest.raises(AqmFormatError, match="two weight stubs named 'W'"):
        external_stubs(model_with([stub_tensor(), stub_tensor()]))


def test_export_refuses_a_graph_reaching_outside(tmp_path):
    from aqformat.converters.onnx_graph import export_onnx
    path = aqm_with_graph(tmp_path / "evil.aqm", _identity_model(_external("k", "id_rsa")).SerializeToString())
    with pytest.raises(AqmFormatError, match="refers to external data at 'id_rsa'"):
        export_onnx(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
