"""aqformat.runtime.InferenceSession and the weight cache, on real ONNX models."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import aqformat
from aqformat.errors import AqmFormatError, AqmInputError, AqmIntegrityError
from aqformat.runtime import InferenceSession, WeightCache
from aqformat.runtime.cli import build_feeds
from aqformat.dtypes import ONNX_TYPES
from aqformat.runtime.onnx_graph import Stub, external_stubs
from aqformat.runtime.ort_session import decode_for_ort

from tests.runtime_fixtures import (build_aqm, cnn_model, mlp_model, reference_model, silero_feeds, silero_path,
                              stub_graph)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (onnx model, .aqm path, feeds)."""
    d = tmp_path_factory.mktemp("rt")
    rng = np.random.default_rng(0)
    out = {"mlp": (mlp_model(), {"x": rng.standard_normal((5, 32)).astype(np.float32)}),
           "silero": (onnx.load(silero_path()), silero_feeds(batch=2)),
           "cnn": (cnn_model(), {"image": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)})}
    result = {}
    for name, (model, feeds) in out.items():
        path = str(d / f"{name}.aqm")
        codecs = build_aqm(model, path, name=name)
        assert "aq" in codecs.values() and "raw" in codecs.values()
        result[name] = (model, path, feeds)
    return result


def _reference(model, path, feeds):
    return ort.InferenceSession(reference_model(model, path)).run(None, feeds)


def _total_bytes(path):
    fmt, graph = aqformat.open(path).graph()
    return sum(s.nbytes for s in external_stubs(graph))


@pytest.mark.parametrize("name", ["mlp", "silero", "cnn"])
def test_session_matches_ort_on_decoded_weights(models, name):
    model, path, feeds = models[name]
    sess = InferenceSession(path)
    assert not sess.streaming and sess.num_stages == 1
    assert sess.pinned_weight_bytes == sess.weight_bytes  # ORT reads them in place (probed), so they are kept
    assert [i.name for i in sess.get_inputs()] == [i.name for i in model.graph.input
                                                   if i.name not in {t.name for t in model.graph.initializer}]
    assert [o.name for o in sess.get_outputs()] == [o.name for o in model.graph.output]
    out = sess.run(None, feeds)
    ref = _reference(model, path, feeds)
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # an output subset, in the order asked
    names = [o.name for o in sess.get_outputs()][::-1]
    sub = sess.run(names, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(sub, ref[::-1]))


def test_stored_graph_has_no_weight_data(models):
    _, path, _ = models["mlp"]
    fmt, graph = aqformat.open(path).graph()
    stubs = external_stubs(graph)
    assert fmt == "onnx" and len(stubs) == 22 and len(graph) < 4096
    assert {s.name for s in stubs} == set(aqformat.open(path).names())


def test_ort_borrow_probe():
    from aqformat.runtime.onnx_graph import PROBE_SIZE, locate_stubs, probe_model
    from aqformat.runtime.ort_session import ort_borrows_weights
    model = onnx.load_from_string(probe_model())
    g = model.graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [("Add", ["x", "W"], ["y"])]
    assert [v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)] == [1, 1]
    assert external_stubs(probe_model()) == [Stub("W", 1, (PROBE_SIZE,))]
    located = onnx.load_from_string(locate_stubs(probe_model(), {"W": "w.bin"}))
    g.initializer[0].external_data[0].value = "w.bin"
    assert located == model
    with pytest.raises(aqformat.AqmFormatError, match="refers to external data at 'w.bin'"):
        external_stubs(located.SerializeToString())  # a stored graph may not point outside the .aqm
    assert ort_borrows_weights()  # onnxruntime 1.32 reads the arrays in place; if not, they are freed after the build


def test_no_torch_or_onnx_imported(models):
    _, path, _ = models["mlp"]
    code = ("import sys, numpy as np, aqformat.runtime as r\n"
            f"s = r.InferenceSession({path!r})\n"
            "y = s.run(None, {'x': np.ones((2, 32), np.float32)})[0]\n"
            "bad = [m for m in ('torch', 'onnx') if m in sys.modules]\n"
            "print(y.shape, bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "(2, 8) []"


def test_streaming_is_identical_and_bounded(models):
    model, path, feeds = models["mlp"]
    total = _total_bytes(path)
    budget = total // 4
    full = InferenceSession(path).run(None, feeds)
    sess = InferenceSession(path, memory_budget=budget)
    assert sess.streaming and sess.num_stages >= 4
    assert max(sess.stage_weight_bytes) <= budget // 2
    for _ in range(2):
        out = sess.run(None, feeds)
        assert all(np.array_equal(a, b) for a, b in zip(out, full))
    st = sess.cache.stats
    assert st.misses >= 2 * 22 and st.evictions > 0 and st.resident_bytes <= budget // 2
    assert [i.name for i in sess.get_inputs()] == ["x"] and sess.get_inputs()[0].shape == ["N", 32]
    # a generous budget keeps the whole model resident
    assert not InferenceSession(path, memory_budget=4 * total).streaming


def test_streaming_control_flow_model(models):
    model, path, feeds = models["silero"]
    total = _total_bytes(path)
    with pytest.raises(AqmInputError, match=r"control-flow node.*memory_budget >= \d+ bytes"):
        InferenceSession(path, memory_budget=total // 2)
    sess = InferenceSession(path, memory_budget=total)
    assert sess.streaming and sess.num_stages >= 2
    out = sess.run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(out, InferenceSession(path).run(None, feeds)))


def test_budget_below_one_node(models):
    _, path, _ = models["cnn"]
    with pytest.raises(AqmInputError) as e:
        InferenceSession(path, memory_budget=1000)
    msg = str(e.value)
    assert "\n" not in msg and "memory_budget=1000 bytes (1.000 kB) is too small" in msg
    need = int(msg.rsplit(">= ", 1)[1].split()[0])
    InferenceSession(path, memory_budget=need)  # exactly the size named is enough


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_feeds(models, streaming):
    _, path, feeds = models["mlp"]
    sess = InferenceSession(path, memory_budget=_total_bytes(path) // 4 if streaming else None)
    x = feeds["x"]
    cases = [({"y": x}, "invalid input name"), ({}, "missing"), ({"x": x.astype(np.float64)}, r"tensor\(double\)"),
             ({"x": x[0]}, "rank 1"), ({"x": x[:, :31]}, "dimension 1 differs")]
    for feed, match in cases:
        with pytest.raises(AqmInputError, match=match) as e:
            sess.run(None, feed)
        assert "\n" not in str(e.value)
    with pytest.raises(AqmInputError, match="invalid output name"):
        sess.run(["nope"], feeds)
    with pytest.raises(AqmInputError, match="positive number of bytes"):
        InferenceSession(path, memory_budget=-5)


def _corrupt_codes(path, name):
    f = aqformat.open(path)
    offset = f.section(f.record(name).fields["codes"]).offset
    f.close()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_corruption_found_at_decode(models, tmp_path):
    model, _, feeds = models["mlp"]
    path = str(tmp_path / "bad.aqm")
    build_aqm(model, path)
    _corrupt_codes(path, "w7")
    with pytest.raises(AqmIntegrityError, match="'w7'"):
        InferenceSession(path)
    sess = InferenceSession(path, memory_budget=_total_bytes(path) // 4)  # streaming decodes lazily
    with pytest.raises(AqmIntegrityError, match="'w7'.*checksum"):
        sess.run(None, feeds)


def test_file_without_graph_or_with_mismatched_stub(tmp_path, models):
    p = str(tmp_path / "nograph.aqm")
    with aqformat.Writer(p) as w:
        w.add_tensor("a", np.zeros(3, np.float32))
    with pytest.raises(AqmInputError, match="stores no ONNX graph"):
        InferenceSession(p)
    model, _, _ = models["mlp"]
    p = str(tmp_path / "mismatch.aqm")
    with aqformat.Writer(p) as w:
        for t in model.graph.initializer:
            arr = onnx.numpy_helper.to_array(t)
            w.add_tensor(t.name, arr.T.copy() if t.name == "w0" else arr)
        w.set_graph(stub_graph(model, {t.name for t in model.graph.initializer}))
    with pytest.raises(AqmFormatError, match=r"'w0' is float\[32, 128\] but the .aqm tensor is float32\[128, 32\]"):
        InferenceSession(p)


def test_session_reads_each_stub_dtype_in_place(tmp_path):
    """bfloat16, float16 and int64 stubs, aq-coded and raw (views of the file mapping), reach ORT intact."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(4)
    cb = rng.standard_normal((2, 16, 4)).astype(np.float32)
    names = {"aq_bf16": 16, "raw_bf16": 16, "aq_f16": 10, "raw_i64": 7}
    nodes = [helper.make_node("Cast", [n], [n + "_f"], to=1) for n in names]
    nodes.append(helper.make_node("Sum", ["x"] + [n + "_f" for n in names], ["y"]))
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("x", 1, [6, 64])], [vi("y", 1, [6, 64])],
                              [TensorProto(name=n, data_type=t, dims=[6, 64]) for n, t in names.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    p = str(tmp_path / "dtypes.aqm")
    with aqformat.Writer(p) as w:
        w.add_codebooks("g", cb, dtype="float32")
        for name, dt in (("aq_bf16", "bfloat16"), ("aq_f16", "float16")):
            w.add_aq(name, (6, 64), rng.integers(0, 16, (6 * 16, 2)), group="g", dtype=dt)
        w.add_tensor("raw_bf16", (rng.standard_normal((6, 64)).astype(np.float32).view(np.uint32) >> 16)
                     .astype(np.uint16), dtype="bfloat16")
        w.add_tensor("raw_i64", rng.integers(-9, 9, (6, 64)))
        w.set_graph(stub_graph(model, set(names)))
    f = aqformat.open(p)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    # ORT sees each tensor as decode_for_ort gives it (bfloat16 rounded to nearest even)
    as_float = {n: (decode_for_ort(f, Stub(n, t, (6, 64))).astype(np.uint32) << 16).view(np.float32) if t == 16
                else f.read(n).astype(np.float32) for n, t in names.items()}
    out = InferenceSession(p).run(None, {"x": x})[0]
    assert np.allclose(out, x + sum(as_float.values()), rtol=1e-6, atol=1e-5)

def test_decode_for_ort_dtypes(tmp_path):
    rng = np.random.default_rng(3)
    cb = rng.standard_normal((2, 16, 4)).astype(np.float32)
    codes = rng.integers(0, 16, (6 * 3, 2))
    p = str(tmp_path / "dt.aqm")
    with aqformat.Writer(p) as w:
        w.add_codebooks("g", cb, dtype="float32")
        for dt in ("float32", "float16", "bfloat16"):
            w.add_aq(f"aq_{dt}", (6, 10), codes, group="g", dtype=dt)
        w.add_tensor("raw_bf16", (rng.standard_normal(7).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16),
                     dtype="bfloat16")
        w.add_tensor("raw_i64", np.arange(5, dtype=np.int64))
    f = aqformat.open(p)
    for name in f.names():
        info = f.info(name)
        arr = decode_for_ort(f, Stub(name, ONNX_TYPES[info.dtype], info.shape))
        ref = np.asarray(f.read(name))
        assert arr.flags.c_contiguous and arr.shape == info.shape
        if info.dtype == "bfloat16":
            back = (arr.astype(np.uint32) << 16).view(np.float32)
            assert arr.dtype == np.uint16 and np.allclose(back, ref, rtol=2 ** -8, atol=0)
            if info.codec == "raw":
                assert np.array_equal(back, ref)
        else:
            assert arr.dtype == ref.dtype and np.array_equal(arr, ref)


def test_session_options_copied_not_mutated(models):
    _, path, feeds = models["cnn"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    b = InferenceSession(path, sess_options=so)  # reusing it must work: nothing was added to it
    assert a.get_providers() == ["CPUExecutionProvider"]
    assert np.array_equal(a.run(None, feeds)[0], b.run(None, feeds)[0])


def test_build_feeds_random_and_files(models, tmp_path):
    sess = InferenceSession(models["silero"][1])
    feeds = build_feeds(sess.get_inputs(), None, ["batch=3"])
    assert feeds["input"].dtype == np.float32 and feeds["sr"].dtype == np.int64
    np.save(tmp_path / "a.npy", np.ones((1, 512), np.float32))
    with pytest.raises(AqmInputError, match=r"no --input for \['state'\].*--random-input"):
        build_feeds(sess.get_inputs(), [str(tmp_path / "a.npy"), f"sr={tmp_path / 'a.npy'}"], [])
    # files for some inputs, random values for the others
    got = build_feeds(sess.get_inputs(), [str(tmp_path / "a.npy")], ["batch=3"], random=True)
    assert got["input"].shape == (1, 512) and got["state"].shape[1] == 3 and set(got) == {"input", "state", "sr"}
    with pytest.raises(AqmInputError, match="no input 'nope'"):
        build_feeds(sess.get_inputs(), [f"nope={tmp_path / 'a.npy'}"], [])


def test_cli_run(models, capsys):
    from aqformat.cli import main
    _, path, _ = models["mlp"]
    assert main(["run", path, "--random-input", "--dim", "N=3", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "y: shape [3, 8] float32" in out and "peak RSS" in out and "cache: 0 hits, 22 misses" in out
    assert main(["run", path, "--random-input", "--memory-budget", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too small" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_bench(models, capsys):
    from aqformat.cli import main
    _, path, _ = models["cnn"]
    assert main(["bench", path, "--random-input", "--repeats", "1", "--iters", "3"]) == 0
    out = capsys.readouterr().out
    assert "steady latency" in out and "peak RSS (MB)" in out


# -- WeightCache ------------------------------------------------------------------------

def test_cache_lru_budget_pins_and_counters():
    evicted = []
    c = WeightCache(300, on_evict=evicted.append)
    arr = lambda: np.zeros(100, np.uint8)  # noqa: E731
    for k in "abc":
        c.get(k, arr)
    c.get("a", arr)                       # a becomes most recent
    c.get("d", arr)                       # evicts b (least recent)
    assert evicted == ["b"] and "b" not in c and len(c) == 3
    c.pin(["c"])
    c.get("e", arr)                       # c is pinned: evicts a instead
    assert evicted == ["b", "a"]
    c.unpin(["c"])
    s = c.stats
    assert (s.hits, s.misses, s.evictions, s.resident_bytes) == (1, 5, 2, 300)
    assert s.decode_seconds > 0 and s.peak_bytes == 400


def test_cache_thread_safe():
    c = WeightCache(50 * 8)
    calls = []

    def decode(k):
        calls.append(k)
        return np.full(8, k, np.int8)

    def work(seed):
        rng = np.random.default_rng(seed)
        for k in rng.integers(0, 100, 2000):
            assert c.get(str(k), lambda k=k: decode(k))[0] == k

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = c.stats
    assert s.hits + s.misses == 8000 and len(calls) == s.misses
    assert s.resident_bytes == len(c) * 8 <= 400 and 0 < s.evictions <= s.misses - len(c)


def test_benchmark_compare_reports_ratios_and_an_rss_trace(models, tmp_path):
    from aqformat.runtime.benchmark import compare
    model, path, feeds = models["mlp"]
    onnx_path = str(tmp_path / "mlp.onnx")
    onnx.save(model, onnx_path)
    r = compare(path, onnx_path, feeds, repeats=1, iters=2)
    for v in ("aqm", "onnx"):
        trace = r[v]["rss_trace"]
        t = [p[0] for p in trace]
        assert len(trace) >= 2 and t == sorted(t)
        # the trace spans load and first output (then five more runs); until then it stays under the peak
        assert t[-1] >= r[v]["first_output_s"]
        assert all(rss <= r[v]["peak_rss"] for s, rss in trace if s <= r[v]["first_output_s"])
    assert set(r["ratios"]) == {"load_s", "first_output_s", "steady_s", "peak_rss", "rss_after_first_output"}
    assert r["ratios"]["steady_s"] == r["aqm"]["steady_s"] / r["onnx"]["steady_s"]
