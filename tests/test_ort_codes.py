"""InferenceSession(resident="compressed"): ONNX Runtime with the AQ weights kept as codes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import aqformat
from aqformat.errors import AqmInputError
from aqformat.runtime import InferenceSession
from aqformat.runtime.ort_codes import HostStep, Segment
from tests.runtime_fixtures import build_aqm, cnn_model, mlp_model, reference_model


def _mixed_model() -> onnx.ModelProto:
    """Every kind of node computed from codes, and an AQ weight ONNX Runtime must read itself.

    Gather (embedding, negative ids allowed), MatMul on a 3-D input, Gemm with
    transA/transB, alpha, beta and a weight bias, Gemm with a computed C, and
    an Add reading a 2-D AQ weight (left to ONNX Runtime, decoded).
    """
    rng = np.random.default_rng(3)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("emb", w(300, 64)), ("w1", w(64, 96)), ("g1", w(40, 96)), ("g1c", w(40)), ("g2", w(40, 24)),
        ("shift", w(6, 24)))]
    nodes = [
        # shapes as Constant nodes: ONNX Runtime's shape inference cannot read a shape stored as a stub
        helper.make_node("Constant", [], ["shape2"], value=numpy_helper.from_array(np.array([-1, 96], np.int64))),
        helper.make_node("Constant", [], ["oshape"], value=numpy_helper.from_array(np.array([-1, 6, 24], np.int64))),
        helper.make_node("Gather", ["emb", "ids"], ["e"]),                          # [B, 6, 64]
        helper.make_node("MatMul", ["e", "w1"], ["h"]),                             # [B, 6, 96]
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Reshape", ["hr", "shape2"], ["h2"]),                      # [B*6, 96]
        helper.make_node("Gemm", ["h2", "g1", "g1c"], ["k"], transB=1, alpha=0.5, beta=2.0),  # [B*6, 40]
        helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
        helper.make_node("MatMul", ["k", "g2"], ["c"]),                             # [B*6, 24] as C below
        helper.make_node("Gemm", ["kt", "g2", "c"], ["o"], transA=1),               # [B*6, 24]
        helper.make_node("Reshape", ["o", "oshape"], ["o3"]),
        helper.make_node("Add", ["o3", "shift"], ["y"]),                            # AQ weight read by ORT
    ]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, 24])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("codes")
    out = {}
    for name, model in (("mlp", mlp_model()), ("mixed", _mixed_model()), ("cnn", cnn_model())):
        path = str(d / f"{name}.aqm")
        build_aqm(model, path, min_aq=100)
        out[name] = (path, ort.InferenceSession(reference_model(model, path)))
    return out


def _close(got, want):
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


@pytest.fixture(params=[False, True], ids=["decoded-for-ort", "host-products"])
def host_products(request, monkeypatch):
    """Both ways of computing MatMul/Gemm: ONNX Runtime on weights decoded just in time, or from codes."""
    monkeypatch.setattr("aqformat.runtime.ort_codes.HOST_PRODUCTS", request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 5, 64])  # lookup table, and decoded tiles
def test_mlp_matches_decoded_reference(files, rows, host_products):
    path, ref = files["mlp"]
    feeds = {"x": np.random.default_rng(rows).standard_normal((rows, 32)).astype(np.float32)}
    with InferenceSession(path, resident="compressed") as s:
        kinds = [type(t) for t in s.codes_plan.steps]
        assert kinds.count(HostStep) == (11 if host_products else 0) and s.num_stages == kinds.count(Segment)
        _close(s.run(None, feeds), ref.run(None, feeds))
        _close(s.run(["y"], feeds), ref.run(["y"], feeds))


def test_every_host_node_kind(files, host_products):
    path, ref = files["mixed"]
    ids = np.array([[0, 5, 299, -1, 17, 5], [3, 3, 3, 2, 1, 0]], np.int64)
    with InferenceSession(path, resident="compressed") as s:
        ops = sorted(t.node.op_type for t in s.codes_plan.steps if isinstance(t, HostStep))
        assert ops == (["Gather", "Gemm", "Gemm", "MatMul", "MatMul"] if host_products else ["Gather"])
        # AQ weights ONNX Runtime reads are decoded before each run; the embedding never is
        fed = sorted(w for seg in s.codes_plan.segments for w in seg.decoded)
        assert fed == (["shift"] if host_products else ["g1", "g2", "shift", "w1"])
        assert not any(w in s.cache for w in ("emb", "g1", "g2", "shift", "w1"))
        _close(s.run(None, {"ids": ids}), ref.run(None, {"ids": ids}))
        with pytest.raises(AqmInputError, match="out of range"):
            s.run(None, {"ids": np.full((1, 6), 300, np.int64)})


def test_conv_model_runs_with_decoded_conv_weights(files):
    path, ref = files["cnn"]
    feeds = {"image": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    with InferenceSession(path, resident="compressed") as s:
        _close(s.run(None, feeds), ref.run(None, feeds))


def test_codes_not_fp32_weights_are_held(files):
    path, _ = files["mlp"]
    with InferenceSession(path, resident="compressed") as s:
        s.run(None, {"x": np.ones((3, 32), np.float32)})
        with aqformat.open(path) as f:
            coded = [n for n in f.names() if f.info(n).codec == "aq"]
            assert s.code_bytes < sum(4 * f.info(n).numel for n in coded) / 3
        assert not any(n in s.cache for n in coded)  # no coded weight was decoded whole
        assert s.cache.stats.resident_bytes < s.weight_bytes / 10  # the biases alone


def test_settings_and_whole_session_methods(files):
    path, _ = files["mlp"]
    with pytest.raises(AqmInputError, match="resident must be"):
        InferenceSession(path, resident="codes")
    with pytest.raises(AqmInputError, match="too small.*needs memory_budget >= 65536 bytes"):
        InferenceSession(path, resident="compressed", memory_budget=1000)
    with InferenceSession(path, resident="compressed") as s:
        assert [i.name for i in s.get_inputs()] == ["x"]
        assert [o.name for o in s.get_outputs()] == ["y", "h5"]
        with pytest.raises(AqmInputError, match="resident='compressed'"):
            s.io_binding()
        with pytest.raises(AqmInputError, match="expected tensor\\(float\\)"):
            s.run(None, {"x": np.ones((2, 32), np.float64)})
        s.set_providers(["CPUExecutionProvider"])
        assert s.run(None, {"x": np.ones((2, 32), np.float32)})[0].shape == (2, 8)


@pytest.mark.parametrize("budget", [None, 65536, 200_000])
def test_budget_bounds_the_weights_decoded_at_once(files, budget):
    """Each segment decodes at most memory_budget bytes of weights; any cut gives the same outputs."""
    path, ref = files["mlp"]
    feeds = {"x": np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)}
    with InferenceSession(path, resident="compressed", memory_budget=budget) as s:
        sizes = s.stage_weight_bytes
        assert max(sizes) <= (budget or 4 << 20)
        assert len(sizes) == {None: 1, 65536: 11, 200_000: 4}[budget]
        _close(s.run(None, feeds), ref.run(None, feeds))


def test_shape_arithmetic_runs_beside_its_consumer(tmp_path):
    """A node reading no AQ weight runs in the segment of its first consumer, not the first that could.

    ``Shape(x)`` could run first, but only the last ``Reshape`` reads it: run
    early, its result would cross the cut as an extra output and input.
    """
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal(s) / 6).astype(np.float32), n)
             for n, s in (("w1", (32, 64)), ("w2", (64, 32)))]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Reshape", ["o", "s"], ["y"])]
    g = helper.make_graph(nodes, "shape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "shape.aqm")
    build_aqm(model, path, min_aq=100)
    feeds = {"x": rng.standard_normal((5, 32)).astype(np.float32)}
    with InferenceSession(path, resident="compressed", memory_budget=32 * 64 * 4) as s:
        first, second = s.codes_plan.segments
        assert [n.op_type for n in first.nodes] == ["MatMul"] and first.outputs == ["h"]
        assert [n.op_type for n in second.nodes] == ["Shape", "Relu", "MatMul", "Reshape"]
        _close(s.run(None, feeds), ort.InferenceSession(reference_model(model, path)).run(None, feeds))


@pytest.mark.slow
def test_minilm_codes_resident_matches_decoded(tmp_path):
    """MiniLM's ONNX export: the compressed session agrees with the decoded one and holds codes, not weights."""
    from tests.minilm import export_minilm_onnx, load_minilm, sentences
    model, tok = load_minilm()
    onnx_path, path = str(tmp_path / "minilm.onnx"), str(tmp_path / "minilm.aqm")
    export_minilm_onnx(model, tok, onnx_path)
    build_aqm(onnx.load(onnx_path), path, name="all-MiniLM-L6-v2")  # axes, scales and permutations mixed
    enc = tok(sentences("eval", 8), padding=True, return_tensors="np")
    feeds = {n: enc[n] for n in ("input_ids", "attention_mask", "token_type_ids")}
    with InferenceSession(path) as dec, InferenceSession(path, resident="compressed") as comp:
        want, got = dec.run(None, feeds)[0], comp.run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
        assert comp.code_bytes < comp.weight_bytes / 8
        assert comp.cache.stats.resident_bytes < comp.weight_bytes / 20  # biases and norms only
        # the embedding Gathers on untransposed tables decode only the rows looked up
        gathers = [s.node.input[0] for s in comp.codes_plan.steps if isinstance(s, HostStep)]
        assert "bert.embeddings.word_embeddings.weight" in gathers and len(gathers) >= 2
