"""aqformat.runtime.InferenceSession against onnxruntime.InferenceSession: the same calls, compared.

The ONNX Runtime side runs the original graph with every weight replaced by
aqformat's numpy decode of it (an ordinary .onnx model), so both sides must
give the same numbers; every call a user makes on one is made on the other.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import aqformat
from aqformat.errors import AqmInputError
from aqformat.runtime import InferenceSession, IOInfo
from aqformat.runtime.onnx_graph import external_stubs
from tests.runtime_fixtures import build_aqm, mlp_model, reference_model, silero_feeds, silero_path

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (.aqm path, the reference .onnx bytes, feeds, streaming budget)."""
    d = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    out = {}
    for name, model, feeds in [("mlp", mlp_model(), {"x": rng.standard_normal((3, 32)).astype(np.float32)}),
                               ("silero", onnx.load(silero_path()), silero_feeds(batch=1))]:
        model.producer_name, model.model_version = f"parity-{name}", 7
        onnx.helper.set_model_props(model, {"origin": name})
        path = str(d / f"{name}.aqm")
        build_aqm(model, path, name=name)
        stubs = external_stubs(aqformat.open(path).graph()[1])
        out[name] = (path, reference_model(model, path), feeds, sum(s.nbytes for s in stubs))
    return out


def _options(threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def _same_io(ours, theirs):
    assert all(isinstance(i, IOInfo) for i in ours)
    assert [(i.name, i.type, list(i.shape)) for i in ours] == [(i.name, i.type, list(i.shape)) for i in theirs]


@pytest.mark.parametrize("name", ["mlp", "silero"])
def test_constructor_forms_and_metadata(pair, name):
    path, ref, feeds, _ = pair[name]
    so = _options(2)
    theirs = ort.InferenceSession(ref, so, CPU, [{}])
    for ours in (InferenceSession(path, so), InferenceSession(path, so, CPU),
                 InferenceSession(path, so, CPU, [{}]),
                 InferenceSession(path, sess_options=so, providers=CPU, provider_options=[{}]),
                 InferenceSession(open(path, "rb").read(), so, CPU)):
        _same_io(ours.get_inputs(), theirs.get_inputs())
        _same_io(ours.get_outputs(), theirs.get_outputs())
        assert ours.get_providers() == theirs.get_providers()
        assert ours.get_provider_options() == theirs.get_provider_options()
        assert ours.get_session_options().intra_op_num_threads == 2
        a, b = ours.get_modelmeta(), theirs.get_modelmeta()
        for field in ("producer_name", "graph_name", "domain", "description", "version", "custom_metadata_map"):
            assert getattr(a, field) == getattr(b, field), field
        for x, y in zip(ours.run(None, feeds), theirs.run(None, feeds)):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(Exception):  # the caller's options were copied, not given the weights
        so.get_session_config_entry("session.use_external_initializer_file_buffers_directly")


def test_old_order_gets_a_clear_error(pair):
    path = pair["mlp"][0]
    with pytest.raises(AqmInputError, match="sess_options must be an onnxruntime.SessionOptions.*providers"):
        InferenceSession(path, CPU)
    with pytest.raises(AqmInputError, match="an .aqm path or its bytes"):
        InferenceSession(1234)


@pytest.mark.parametrize("streaming", [False, True])
def test_runs_match(pair, streaming):
    path, ref, feeds, total = pair["mlp"]
    theirs = ort.InferenceSession(ref, _options(), CPU)
    ours = InferenceSession(path, _options(), CPU, memory_budget=total // 4 if streaming else None)
    assert ours.streaming == streaming
    _same_io(ours.get_inputs(), theirs.get_inputs())
    out_name = theirs.get_outputs()[0].name
    for names in (None, [out_name]):
        for x, y in zip(ours.run(names, feeds), theirs.run(names, feeds)):
            np.testing.assert_array_equal(x, y)
    ort_feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    a = ours.run_with_ort_values([out_name], ort_feeds)
    b = theirs.run_with_ort_values([out_name], ort_feeds)
    assert all(isinstance(v, ort.OrtValue) for v in a)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    ours.set_providers(CPU)
    theirs.set_providers(CPU)
    np.testing.assert_array_equal(ours.run(None, feeds)[0], theirs.run(None, feeds)[0])
    assert ours.get_providers() == theirs.get_providers()


def test_io_binding_and_profiling_resident(pair, tmp_path):
    path, ref, feeds, _ = pair["mlp"]
    so = _options()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    results = []
    for sess in (InferenceSession(path, so, CPU), ort.InferenceSession(ref, so, CPU)):
        binding = sess.io_binding()
        binding.bind_cpu_input("x", feeds["x"])
        binding.bind_output(sess.get_outputs()[0].name)
        sess.run_with_iobinding(binding)
        results.append(binding.copy_outputs_to_cpu()[0])
        assert sess.get_profiling_start_time_ns() > 0
        trace = sess.end_profiling()
        assert os.path.isfile(trace) and os.path.getsize(trace) > 0
    np.testing.assert_array_equal(*results)


def test_streaming_refuses_what_it_cannot_serve(pair):
    path, _, feeds, total = pair["mlp"]
    sess = InferenceSession(path, _options(), CPU, memory_budget=total // 4)
    for method in ("io_binding", "end_profiling", "get_overridable_initializers"):
        with pytest.raises(AqmInputError, match=rf"{method}\(\) needs the whole model.*streams in \d+ stages"):
            getattr(sess, method)()


@pytest.mark.parametrize("streaming", [False, True])
def test_closed_session(pair, streaming):
    path, _, feeds, total = pair["mlp"]
    sess = InferenceSession(path, memory_budget=total // 4 if streaming else None)
    with sess:
        sess.run(None, feeds)
    sess.close()  # twice is harmless
    assert "closed" in repr(sess)
    for call in (lambda: sess.run(None, feeds), sess.get_inputs, sess.get_modelmeta, sess.io_binding):
        with pytest.raises(AqmInputError, match="this InferenceSession is closed"):
            call()


def test_bad_feeds_raise_on_both(pair):
    path, ref, feeds, _ = pair["mlp"]
    theirs, ours = ort.InferenceSession(ref, providers=CPU), InferenceSession(path, providers=CPU)
    for feed in ({"y": feeds["x"]}, {"x": feeds["x"].astype(np.float64)}, {}):
        with pytest.raises(Exception):
            theirs.run(None, feed)
        with pytest.raises(AqmInputError):
            ours.run(None, feed)
