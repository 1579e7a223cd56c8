"""Codec ``half`` (format 1.3): 16-bit storage of float tensors, reader bounds, version rules, fuzzing,
``--keep PATTERN:fp16`` in conversions."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import aqformat
from aqformat.converters.half import encode_half, split_keep
from tests.craft import assert_edited_record_refused, assert_listed_but_unreadable_without, mutant
from tests.test_fuzz import check


def _write(path, w, fmt="float16", dtype="float32", name="t"):
    t = encode_half(w, fmt)
    with aqformat.Writer(path) as out:
        t.write(out, name, w.shape, dtype)
    return t


@pytest.mark.parametrize("fmt,dtype", [("float16", "float32"), ("bfloat16", "float32"), ("float16", "float64"),
                                       ("bfloat16", "float16")])
def test_values_decode_to_their_16_bit_rounding_in_the_tensor_dtype(tmp_path, fmt, dtype):
    w = np.random.default_rng(0).standard_normal((7, 3, 5)).astype(np.float32)
    t = _write(tmp_path / "h.aqm", w, fmt, dtype)
    with aqformat.open(tmp_path / "h.aqm") as f:
        got = f.read("t")
        f.verify()
        assert f.version == (1, 3) and f.info("t").codec == "half" and f.info("t").bits_per_weight <= 16
    assert got.dtype == np.dtype(dtype) and got.shape == w.shape
    np.testing.assert_array_equal(got, t.decoded.astype(dtype))
    rel = 2.0 ** -11 if fmt == "float16" else 2.0 ** -8  # half an ulp of the 10- or 7-bit mantissa
    assert np.all(np.abs(t.decoded - w) <= rel * np.abs(w) + 2.0 ** -25)


def test_values_beyond_float16_are_refused_not_made_infinite():
    big = np.float32(65519.0)  # rounds to 65504, the largest float16
    assert encode_half(np.array([big, -big], np.float32)).decoded.tolist() == [65504.0, -65504.0]
    assert encode_half(np.array([1.0, 65520.0], np.float32)) is None  # would round to inf
    assert encode_half(np.array([-1e30], np.float32)) is None
    assert encode_half(np.array([1e30, 3e38], np.float32), "bfloat16") is not None
    assert encode_half(np.array([3.4e38], np.float32), "bfloat16") is None      # rounds past bfloat16's max
    kept = encode_half(np.array([np.inf, -np.inf, 1.0], np.float32))        # already infinite: kept so
    assert kept.decoded[:2].tolist() == [np.inf, -np.inf]


def test_record_bytes_is_the_header_cost_beyond_a_raw_tensor(tmp_path):
    from aqformat.converters.half import RECORD_BYTES
    w = np.random.default_rng(0).standard_normal((40, 25)).astype(np.float32)
    with aqformat.Writer(tmp_path / "r.aqm") as out:
        out.add_tensor("t", w)
    _write(tmp_path / "h.aqm", w)
    lengths = [int.from_bytes((tmp_path / n).read_bytes()[24:32], "little") for n in ("r.aqm", "h.aqm")]
    assert abs(lengths[1] - lengths[0] - RECORD_BYTES) <= 2


def test_keep_suffixes_split_and_onnx_names_with_colons_stay_whole():
    assert split_keep(["conv1.*:fp16", "stft*:bf16", "onnx::Conv_12", "a:b"]) == (
        ("conv1.*", "stft*", "onnx::Conv_12", "a:b"), (("conv1.*", "float16"), ("stft*", "bfloat16")))


def _file_bytes(tmp_path):
    _write(tmp_path / "ok.aqm", np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32))
    return (tmp_path / "ok.aqm").read_bytes()


@pytest.mark.parametrize("change,match", [
    ({"format": "float8"}, "format"), ({"format": 16}, "format"), ({"shape": [5, 13]}, "must hold|holds|expected"),
    ({"shape": [6, 12]}, "must hold|holds|expected"), ({"dtype": "int32"}, "non-float"), ({"data": 7}, "does not refer")])
def test_reader_refuses_records_that_do_not_match_their_section(tmp_path, change, match):
    assert_edited_record_refused(tmp_path, _file_bytes(tmp_path), change, match, minor=3)


def test_files_say_1_3_and_a_reader_without_the_codec_refuses_clearly(tmp_path):
    assert _file_bytes(tmp_path)[8:12] == bytes([1, 0, 3, 0])
    assert_listed_but_unreadable_without(tmp_path / "ok.aqm", "half")


def test_decode_budget_counts_the_widened_copy(tmp_path):
    _write(tmp_path / "h.aqm", np.ones((64, 64), np.float32), dtype="float64")
    with aqformat.open(tmp_path / "h.aqm", decode_budget=64 * 64 * 8) as f:
        with pytest.raises(aqformat.AqmBudgetError):
            f.read("t")
    with aqformat.open(tmp_path / "h.aqm", decode_budget=64 * 64 * 16) as f:
        assert f.read("t").dtype == np.float64


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False))
def test_mutants_of_a_half_file_fail_cleanly(tmp_path, rng):
    check(tmp_path, mutant(rng, _file_bytes(tmp_path)))


# ------------------------------------------------------------------ conversions

torch = pytest.importorskip("torch")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3),
                               torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 10)).eval()


def test_keep_fp16_stores_matching_tensors_at_16_bits_and_the_rest_as_before(tmp_path):
    from aqformat.converters import from_torch
    from aqformat.runtime import load_torch
    net = _net()
    s = from_torch(net, tmp_path / "h.aqm", bits=4, keep=["0.*:fp16", "4.bias"], progress=False)
    plain = from_torch(net, tmp_path / "p.aqm", bits=4, keep=["0.*", "4.bias"], progress=False)
    with aqformat.open(tmp_path / "h.aqm") as f, aqformat.open(tmp_path / "p.aqm") as g:
        codec = {t.name: t.codec for t in f.tensors()}
        assert codec["0.weight"] == codec["0.bias"] == "half" and codec["4.bias"] == "raw"
        assert {t.name: t.codec for t in g.tensors()}["0.weight"] == "raw"
        w = net.state_dict()["0.weight"].numpy()
        np.testing.assert_array_equal(f.read("0.weight"), w.astype(np.float16).astype(np.float32))
        assert f.info("0.weight").stored_bytes <= w.size * 2 == g.info("0.weight").stored_bytes // 2
    assert s.aqm_bytes < plain.aqm_bytes and np.isfinite(s.weight_sqnr_db["0.weight"])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # the other tensors are coded alike: the files differ by the 16-bit rounding
        ref = load_torch(str(tmp_path / "p.aqm"), model=_net(), lazy=False)(x)
        got = load_torch(str(tmp_path / "h.aqm"), model=_net(), lazy=False)(x)
    assert 0 < float((got - ref).norm() / ref.norm()) < 1e-3


def test_finetuning_trains_tensors_kept_at_16_bits_and_stores_them_so(tmp_path):
    from aqformat.converters import from_torch
    net = _net()
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32))
    kw = dict(bits=4, keep=["0.*:fp16"], calib=str(tmp_path / "calib.npy"), progress=False,
              encoder={"bits_per_code": 4, "d": 4})
    from_torch(net, tmp_path / "c.aqm", **kw)
    s = from_torch(net, tmp_path / "t.aqm", finetune_steps=5, finetune_lr=1e-2, **kw)
    assert s.finetune.held_out == 0 and s.finetune.kept_step is None  # too few items to hold any out
    with aqformat.open(tmp_path / "t.aqm") as f, aqformat.open(tmp_path / "c.aqm") as c:
        assert f.info("0.weight").codec == f.info("0.bias").codec == "half"
        assert not np.array_equal(f.read("0.bias"), c.read("0.bias"))


def test_keep_fp16_of_a_tensor_beyond_float16_keeps_it_float32_and_says_so(tmp_path):
    from aqformat.converters import from_torch
    net = _net()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = 1e6
    with pytest.warns(aqformat.AqmWarning, match="'0.weight' has values beyond float16"):
        from_torch(net, tmp_path / "h.aqm", bits=4, keep=["0.*:fp16"], progress=False)
    with aqformat.open(tmp_path / "h.aqm") as f:
        assert f.info("0.weight").codec == "raw" and f.read("0.weight")[0, 0, 0, 0] == 1e6
        assert f.info("0.bias").codec == "half"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_onnx_keep_bf16_runs_in_onnx_runtime_and_the_cli_takes_the_suffix(tmp_path):
    from aqformat.cli import main
    from aqformat.runtime import InferenceSession
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    torch.onnx.export(net, (x,), str(tmp_path / "n.onnx"), dynamo=False, input_names=["x"], output_names=["y"])
    assert main(["convert", str(tmp_path / "n.onnx"), "-o", str(tmp_path / "n.aqm"), "--bits", "4",
                 "--keep", "*:bf16", "-q"]) == 0
    with aqformat.open(tmp_path / "n.aqm") as f:
        assert {t.codec for t in f.tensors()} == {"half"}
    with torch.no_grad():
        ref = net(x).numpy()
    got = InferenceSession(str(tmp_path / "n.aqm")).run(None, {"x": x.numpy()})[0]
    assert np.max(np.abs(got - ref)) < 0.02 * np.max(np.abs(ref))
