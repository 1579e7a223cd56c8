"""Codec ``uniform`` (format 1.4): indices times a per-row step, without the lattice's dither; its
decoder, reader bounds, version rules, fuzzing, and what it gains over the dither at low rates."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import aqformat
from aqformat import rans
from aqformat.codecs import uniform
from aqformat.codecs.lattice import decode_lattice
from aqformat.converters.lattice import encode_lattice
from tests.craft import assert_edited_record_refused, assert_listed_but_unreadable_without, mutant
from tests.test_fuzz import check


def _write(path, q, step, shape, axes=None, dtype="float32", **kw):
    with aqformat.Writer(path) as out:
        out.add_encoded("t", uniform.NAME, shape, uniform.fields("t", shape, q, step, axes), dtype=dtype, **kw)


@pytest.mark.parametrize("kw", [{}, {"compress": ("data", "step")}, {"entropy": ("data",)}])
def test_decodes_indices_times_row_steps_bit_for_bit(tmp_path, kw):
    rng = np.random.default_rng(0)
    q = np.rint(rng.laplace(0, 40, (6, 50))).astype(np.int64)
    step = rng.uniform(1e-3, 1e-2, 6).astype(np.float32)
    _write(tmp_path / "u.aqm", q, step, (50, 6), axes=(1, 0), **kw)
    expect = (q.astype(np.float64) * step.astype(np.float64)[:, None]).astype(np.float32).T
    with aqformat.open(tmp_path / "u.aqm") as f:
        assert f.info("t").codec == "uniform"
        np.testing.assert_array_equal(f.read("t"), expect)


def test_encoder_without_a_seed_rounds_to_the_nearest_multiple(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    q, step = encode_lattice(w, np.float32(0.25), None)
    assert (q == np.rint(w / 0.25)).all() and (step == np.float32(0.25)).all()


def test_plain_rounding_beats_the_dither_at_low_rates_and_ties_at_high_rates():
    """At one step, on Laplacian weights, both sets of indices chosen by the same rate-distortion
    rounding: where most weights fall below half a step the dither's noise (step**2 / 12 a weight)
    exceeds the error of rounding them to zero, at about twice the bits; at fine steps the two are
    alike."""
    rng = np.random.default_rng(2)
    w = rng.laplace(0, 1, (64, 512))

    def point(step, seed):
        """(bits per weight under the rans model, mean squared error)."""
        q, s = encode_lattice(w, np.float32(step), seed, rdoq=0.1)
        dec = decode_lattice(q, s, seed, w.shape, None, *w.shape)
        return rans.estimate_bits(q) / w.size, float(np.mean((dec - w) ** 2))
    (r_u, d_u), (r_l, d_l) = point(4.0, None), point(4.0, 7)
    assert r_u < 0.6 * r_l and d_u < 0.8 * d_l, (r_u, d_u, r_l, d_l)  # measured 0.36 vs 0.68 b/w, 1.21 vs 1.65
    (r_u, d_u), (r_l, d_l) = point(0.05, None), point(0.05, 7)
    assert r_u <= r_l * 1.01 and abs(d_l / d_u - 1) < 0.1, (r_u, d_u, r_l, d_l)


def _file_bytes(tmp_path):
    q = np.arange(-30, 30).reshape(5, 12)
    _write(tmp_path / "ok.aqm", q, np.full(5, 0.5, np.float32), (5, 12))
    return (tmp_path / "ok.aqm").read_bytes()


@pytest.mark.parametrize("change,match", [
    ({"index_dtype": "int64"}, "index_dtype"), ({"shape": [5, 13]}, "must hold|holds|expected"),
    ({"shape": [6, 12]}, "must hold|holds|expected"), ({"dtype": "int32"}, "non-float"),
    ({"step": 99}, "does not refer"), ({"axes": [0, 0]}, "permutation")])
def test_reader_refuses_records_that_do_not_match_their_sections(tmp_path, change, match):
    assert_edited_record_refused(tmp_path, _file_bytes(tmp_path), change, match, minor=4)


def test_files_say_1_4_and_a_reader_without_the_codec_refuses_clearly(tmp_path):
    assert _file_bytes(tmp_path)[8:12] == bytes([1, 0, 4, 0])
    assert_listed_but_unreadable_without(tmp_path / "ok.aqm", "uniform")


def test_decode_budget_counts_the_temporaries(tmp_path):
    _write(tmp_path / "u.aqm", np.ones((64, 64), np.int64), np.ones(64, np.float32), (64, 64))
    with aqformat.open(tmp_path / "u.aqm", decode_budget=64 * 64 * 8) as f:
        with pytest.raises(aqformat.AqmBudgetError):
            f.read("t")
    with aqformat.open(tmp_path / "u.aqm", decode_budget=64 * 64 * (26 + 1) + 64 * 4) as f:  # work, then sections
        assert (f.read("t") == 1).all()


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False))
def test_mutants_of_a_uniform_file_fail_cleanly(tmp_path, rng):
    check(tmp_path, mutant(rng, _file_bytes(tmp_path)))
