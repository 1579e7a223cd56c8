"""Section encoding ``rans-context`` (format 1.5): tables by neighbour context. Round trips, the rate
it saves where magnitudes come in runs, the declared encoding and version rules (bombs and mutants:
tests/test_rans.py)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import aqformat
from aqformat import rans
from aqformat.errors import AqmFormatError
from tests.craft import Blob, build, split
from tests.spec_reference import _rans as reference_decode
from tests.test_rans import _bursts, _file


def _context_model(v: np.ndarray, n_tables: int) -> rans.Model:
    """A ``rans-context`` model with ``n_tables`` contexts, whatever :func:`rans.plan` would pick."""
    m = rans.plan(v, contexts=False)
    tok = rans._tokens(v, m.e)[0]
    tables, _ = rans._fit_contexts(tok, v.shape[1], int(tok.min()), (1 << m.e) - 1 + 32 - m.e, n_tables)
    return rans.Model(m.e, [lo for lo, _ in tables], [f for _, f in tables], np.zeros(v.shape[0], np.int64), True)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 12), cols=st.integers(1, 900), width=st.sampled_from([1, 2, 4]),
       loud=st.sampled_from([0.0, 0.5, 4.0, 300.0, 1e9]), tables=st.sampled_from([1, 2, 3, 8, 16]),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip_any_values(rows, cols, width, loud, tables, seed):
    """Any shape (lanes whose runs start inside rows, a short last run), width, escapes and count of
    contexts decodes to its values, in numpy and in the spec's reference decoder."""
    info = np.iinfo(f"i{width}")
    v = np.clip(_bursts(rows, cols, seed, loud, np.float64), info.min, info.max).astype(f"<i{width}")
    v.flat[seed % v.size] = [info.min, info.max, 0][seed % 3]
    stream = rans.encode(v, _context_model(v, tables))
    assert stream[3] == 1
    assert rans.decode(stream, v.nbytes, "rans-context").tobytes() == v.tobytes()
    if v.size <= 3000:
        assert reference_decode(stream, v.nbytes, "rans-context") == v.tobytes()


def test_compiled_and_numpy_decoders_agree(monkeypatch):
    """Above the size where the compiled kernel takes over, both decoders give the values; lanes
    whose runs start inside rows (cols 4201 against runs of 2048)."""
    if not rans.compiled():
        pytest.skip("numba is not installed")
    v = _bursts(64, 4201)
    assert v.size >= rans._MIN_KERNEL_SYMBOLS
    stream = rans.encode(v, _context_model(v, 6))
    compiled = rans.decode(stream, v.nbytes, "rans-context")
    monkeypatch.setattr(rans, "_kernel_for", lambda n: None)
    assert np.array_equal(rans.decode(stream, v.nbytes, "rans-context"), compiled)
    assert compiled.view("<i2").reshape(v.shape).tolist() == v.tolist()
    with pytest.raises(AqmFormatError, match="words"):
        rans.decode(stream[:-200], v.nbytes, "rans-context")


def test_contexts_pay_where_magnitudes_come_in_runs_and_plan_picks_the_shorter():
    """On bursty rows the neighbour contexts save over 8% of the per-row stream and the plan
    takes them; on rows of i.i.d. values they save nothing and the plan keeps per-row tables."""
    v = _bursts(64, 900)
    rows = rans.encode(v, rans.plan(v, contexts=False))
    model = rans.plan(v)
    assert model.contexts and model.encoding == "rans-context"
    assert len(rans.encode(v, model)) < 0.92 * len(rows)
    assert rans.estimate_bits(v) / 8 == pytest.approx(len(rans.encode(v, model)), rel=0.02)
    iid = np.rint(np.random.default_rng(1).laplace(0, 3, (64, 900))).astype(np.int16)
    assert not rans.plan(iid).contexts


def test_the_stream_must_match_its_declared_encoding():
    v = _bursts(8, 300)
    ctx, rows = rans.encode(v, _context_model(v, 4)), rans.encode(v, rans.plan(v, contexts=False))
    with pytest.raises(AqmFormatError, match="mode 1 out of range for rans$"):
        rans.decode(ctx, v.nbytes, "rans")
    with pytest.raises(AqmFormatError, match="mode 0 out of range for rans-context"):
        rans.decode(rows, v.nbytes, "rans-context")


def test_writer_records_format_1_5_and_an_older_reader_refuses_the_section_clearly(tmp_path, monkeypatch):
    data = _file(tmp_path, "rans-context")
    assert data[8:12] == bytes([1, 0, 5, 0])
    with aqformat.open(tmp_path / "ok.aqm") as f:
        assert f.section(f.record("t").fields["data"]).encoding == "rans-context"
        f.verify()
        coded = f.read("t")
    with aqformat.Writer(tmp_path / "zstd.aqm") as w:  # the same tensor, its indices zstd-coded
        w.add_lattice("t", (8, 600), _bursts(8, 600, dtype=np.int64), np.full(8, 0.01), seed=2)
    with aqformat.open(tmp_path / "zstd.aqm") as f:
        np.testing.assert_array_equal(coded, f.read("t"))
    monkeypatch.setattr(aqformat.reader, "ENCODINGS", ("raw", "zstd", "rans"))
    with aqformat.open(tmp_path / "ok.aqm") as f:
        assert f.info("t").shape == (8, 600)
        with pytest.raises(aqformat.AqmUnsupportedError, match="encoding 'rans-context'"):
            f.read("t")


def test_a_rans_context_section_declared_rans_is_refused(tmp_path):
    doc, blobs = split(_file(tmp_path, "rans-context"))
    blobs[0] = Blob(blobs[0].data, "rans", blobs[0].size)
    (tmp_path / "bad.aqm").write_bytes(build(doc, blobs, minor=5))
    with aqformat.open(tmp_path / "bad.aqm") as f:
        with pytest.raises(AqmFormatError, match=r"section 0: rans section: .* mode 1 out of range for rans$"):
            f.read("t")
