"""Codec ``affine`` (format 1.1): encoder accuracy, reader bounds, version rules, fuzzing, conversion."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import aqformat
from aqformat import codecs
from aqformat.converters.affine import RECORD_BYTES, encode_affine, plan_affine, small_bits
from tests.craft import build, mutant, split
from tests.test_fuzz import check


def _write(path, w, bits, axes=None, dtype="float32"):
    t = encode_affine(w, bits, axes)
    with aqformat.Writer(path) as out:
        t.write(out, "t", w.shape, dtype)
    return t


@pytest.mark.parametrize("shape,axes", [((16, 1, 3, 3), None), ((40, 200), None), ((300,), None),
                                        ((30, 7), (1, 0))])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_decode_within_half_a_step_and_equal_to_encoder(tmp_path, shape, axes, bits):
    w = np.random.default_rng(bits).standard_normal(shape).astype(np.float32)
    t = _write(tmp_path / "a.aqm", w, bits, axes)
    with aqformat.open(tmp_path / "a.aqm") as f:
        got = f.read("t")
        f.verify()
    np.testing.assert_array_equal(got, t.decoded)
    # Half a step of the widest range, plus the float16 rounding of offset and scale.
    span = np.ptp(w)
    assert np.max(np.abs(got - w)) <= span / ((1 << bits) - 1) * 0.5 * 1.02 + 1e-3 * span


def test_short_rows_share_one_scale_long_rows_get_their_own():
    rng = np.random.default_rng(0)
    depthwise = rng.standard_normal((64, 1, 3, 3)).astype(np.float32)
    linear = rng.standard_normal((16, 256)).astype(np.float32) * rng.uniform(0.01, 1, (16, 1)).astype(np.float32)
    assert encode_affine(depthwise, 4).fields["scope"] == "tensor"
    assert encode_affine(linear, 4).fields["scope"] == "row"


def test_values_beyond_float16_and_non_finite_stay_raw():
    assert encode_affine(np.array([1e6, -3.0], np.float32), 8) is None
    assert encode_affine(np.array([np.nan, 1.0], np.float32), 8) is None


def test_small_bits_follow_bits_and_keep_fractions():
    assert [small_bits(b) for b in (1, 2, 2.5, 3, 4, 5, 6, 8)] == [4, 4, 4.5, 5, 6, 7, 8, 8]


def test_plan_codes_what_shrinks_within_its_budget():
    rng = np.random.default_rng(0)
    arrays = {"bias": np.ones(4, np.float32), "conv": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
              "fc": rng.standard_normal((16, 64)).astype(np.float32)}
    cands = {n: (a.shape, None, 6.0, a.nbytes) for n, a in arrays.items()}
    plan = plan_affine(cands, arrays.__getitem__)
    assert sorted(plan.coded) == ["conv", "fc"]  # 4 floats are smaller raw than a record
    assert plan.nbytes["bias"] == 16 and sum(plan.nbytes.values()) <= plan.budget
    for n, t in plan.coded.items():
        assert plan.nbytes[n] == t.stored_bytes() + RECORD_BYTES
    # a rate between two widths mixes them: more bytes, lower error than the lower width alone
    low = plan_affine({n: (a.shape, None, 4.0, a.nbytes) for n, a in arrays.items()}, arrays.__getitem__)
    mid = plan_affine({n: (a.shape, None, 4.5, a.nbytes) for n, a in arrays.items()}, arrays.__getitem__)
    assert sum(low.nbytes.values()) < sum(mid.nbytes.values()) <= mid.budget


def _affine_file(tmp_path, **change):
    doc, blobs = split(_file_bytes(tmp_path))
    doc["tensors"][0].update(change)
    return build(doc, blobs, minor=1)


def _file_bytes(tmp_path):
    w = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    w *= np.array([[0.01], [0.1], [1], [10], [0.5]], np.float32)  # rows of unequal range: one scale each
    assert _write(tmp_path / "ok.aqm", w, 5).fields["scope"] == "row"
    return (tmp_path / "ok.aqm").read_bytes()


@pytest.mark.parametrize("change,match", [
    ({"bits": 9}, "bits"), ({"bits": 0}, "bits"), ({"scope": "column"}, "scope"),
    ({"bits": 4}, "must hold|holds|expected"), ({"scope": "tensor"}, "must hold|holds|expected"),
    ({"shape": [50, 12]}, "must hold|holds|expected"), ({"axes": [0, 0]}, "permutation"),
    ({"dtype": "int32"}, "non-float")])
def test_reader_refuses_records_that_do_not_match_their_section(tmp_path, change, match):
    path = tmp_path / "bad.aqm"
    path.write_bytes(_affine_file(tmp_path, **change))
    with pytest.raises(aqformat.AqmFormatError, match=match):
        with aqformat.open(path) as f:
            f.read("t")


def test_files_say_1_1_and_a_reader_without_the_codec_refuses_clearly(tmp_path):
    data = _file_bytes(tmp_path)
    assert data[8:12] == bytes([1, 0, 1, 0])
    codec = codecs.get("affine")
    codecs.unregister("affine")
    try:
        with aqformat.open(tmp_path / "ok.aqm") as f:
            assert f.info("t").codec == "affine" and f.info("t").shape == (5, 12)
            with pytest.raises(aqformat.AqmUnsupportedError, match="codec 'affine'"):
                f.read("t")
    finally:
        codecs.register(codec)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False))
def test_mutants_of_an_affine_file_fail_cleanly(tmp_path, rng):
    check(tmp_path, mutant(rng, _file_bytes(tmp_path)))

