"""Section encoding ``rans`` (format 1.2): round trips, rate, bounds checks, version rules, budget, fuzzing
(the file-level checks also for ``rans-context``, format 1.5)."""
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

import aqformat
from aqformat import rans
from aqformat.errors import AqmBudgetError, AqmFormatError
from tests.craft import Blob, build, mutant, split
from tests.test_fuzz import check


def _numpy_only(monkeypatch):
    monkeypatch.setattr(rans, "_kernel_for", lambda n: None)


def _laplace_rows(rows=64, cols=900, seed=0, dtype=np.int16):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-1, 3, (rows, 1)))  # rows of very different spread (one global step)
    return np.rint(rng.laplace(0, 1, (rows, cols)) * scale).astype(dtype)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 12), cols=st.integers(1, 700), width=st.sampled_from([1, 2, 4]),
       spread=st.sampled_from([0.0, 0.3, 3.0, 300.0, 1e9]), seed=st.integers(0, 2**32 - 1))
def test_round_trip_any_values(rows, cols, width, spread, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(f"i{width}")
    v = np.clip(np.rint(rng.laplace(0, 1, (rows, cols)) * spread), info.min, info.max).astype(f"<i{width}")
    v.flat[rng.integers(0, v.size)] = rng.choice([info.min, info.max, 0])
    stream = rans.encode(v)
    assert rans.decode(stream, v.nbytes).tobytes() == v.tobytes()


def test_compiled_and_numpy_decoders_agree(monkeypatch):
    v = _laplace_rows(rows=64, cols=4200)  # above the size where the compiled kernel takes over
    assert v.size >= rans._MIN_KERNEL_SYMBOLS
    if not rans.compiled():
        pytest.skip("numba is not installed")
    stream = rans.encode(v)
    compiled = rans.decode(stream, v.nbytes)
    _numpy_only(monkeypatch)
    assert np.array_equal(rans.decode(stream, v.nbytes), compiled)
    assert compiled.view("<i2").reshape(v.shape).tolist() == v.tolist()


def test_within_three_percent_of_the_model_entropy_and_below_zstd():
    """Bits per index (tables, row classes, lane states and escape bits included) are within 3% of the
    indices' code length under the chosen model, and below zstd when rows differ in spread."""
    v = _laplace_rows()
    model = rans.plan(v)
    stream = rans.encode(v, model)
    assert 8 * len(stream) <= 1.03 * rans.model_bits(v, model)
    assert len(model.freqs) > 1  # rows of different spread get tables of their own
    # and the model is no worse than one table for the whole matrix (the empirical order-0 entropy)
    _, counts = np.unique(v, return_counts=True)
    h0 = -(counts * np.log2(counts / v.size)).sum()
    assert 8 * len(stream) < h0
    assert len(stream) < 0.97 * len(zstandard.ZstdCompressor(level=19).compress(v.tobytes()))


def test_writer_keeps_the_smallest_and_records_format_1_2(tmp_path):
    rng = np.random.default_rng(1)
    v = _laplace_rows(rows=16, cols=300, dtype=np.int64)
    with aqformat.Writer(tmp_path / "a.aqm") as w:
        w.add_lattice("coded", (16, 300), v, np.full(16, 0.01), seed=1, entropy=True)
        w.add_lattice("tiny", (1, 3), np.array([[1, 0, -1]]), np.full(1, 0.01), seed=1, entropy=True)
    with aqformat.open(tmp_path / "a.aqm") as f:
        assert f.version == (1, 2)
        assert f.section(f.record("coded").fields["data"]).encoding == "rans"
        assert f.section(f.record("tiny").fields["data"]).encoding != "rans"  # tables cost more than 3 bytes
        f.verify()
    with aqformat.Writer(tmp_path / "b.aqm") as w:  # not asked: zstd as before, and format 1.0
        w.add_lattice("coded", (16, 300), v, np.full(16, 0.01), seed=1)
    assert (tmp_path / "b.aqm").read_bytes()[8:12] == bytes([1, 0, 0, 0])


def _bursts(rows: int, cols: int, seed: int = 0, loud: float = 4.0, dtype=np.int16) -> np.ndarray:
    """Rows of quiet and loud stretches: the magnitude of a weight predicts its neighbour's (what
    ``rans-context`` codes better than tables per row)."""
    rng = np.random.default_rng(seed)
    on = np.sin(rng.uniform(0, 2 * np.pi, (rows, 1)) + np.arange(cols) * rng.uniform(0.05, 0.3, (rows, 1))) > 0
    return np.rint(rng.laplace(0, np.where(on, loud, 0.2))).astype(dtype)


def _file(tmp_path, encoding="rans"):
    """A file of one lattice tensor ``t`` whose indices the writer codes with ``encoding``."""
    if encoding not in _FILES:
        v = (_laplace_rows if encoding == "rans" else _bursts)(8, 600, dtype=np.int64)
        with aqformat.Writer(tmp_path / "first.aqm") as w:
            w.add_lattice("t", (8, 600), v, np.full(8, 0.01), seed=2, entropy=True)
        _FILES[encoding] = (tmp_path / "first.aqm").read_bytes()
        with aqformat.open(tmp_path / "first.aqm") as f:
            assert f.section(f.record("t").fields["data"]).encoding == encoding
    (tmp_path / "ok.aqm").write_bytes(_FILES[encoding])
    return _FILES[encoding]


_FILES: dict[str, bytes] = {}  # written once: encoding is what the mutants test is not about


def test_an_older_reader_lists_the_tensor_and_refuses_it_clearly(tmp_path, monkeypatch):
    data = _file(tmp_path)
    monkeypatch.setattr(aqformat.reader, "ENCODINGS", ("raw", "zstd"))
    with aqformat.open(tmp_path / "ok.aqm") as f:
        assert f.info("t").shape == (8, 600)
        with pytest.raises(aqformat.AqmUnsupportedError, match="encoding 'rans'"):
            f.read("t")
    assert data[8:12] == bytes([1, 0, 2, 0])


def test_budget_counts_the_decoder_and_bombs_are_refused_at_open(tmp_path):
    data = _file(tmp_path)
    with aqformat.open(tmp_path / "ok.aqm") as f:
        sec = f.section(f.record("t").fields["data"])
        need = f.decode_need("t")
        assert need >= sec.size + sec.length + rans.work_bound(sec.size)
    with aqformat.open(tmp_path / "ok.aqm", decode_budget=need - 1) as f:
        with pytest.raises(AqmBudgetError, match="tensor 't' needs"):
            f.read("t")


@pytest.mark.parametrize("encoding,minor", [("rans", 2), ("rans-context", 5)])
def test_bombs_are_refused_at_open(tmp_path, encoding, minor):
    doc, blobs = split(_file(tmp_path, encoding))
    blobs[0] = Blob(blobs[0].data[:40], encoding, (1 << 17) * 40 + (1 << 20))
    doc["tensors"][0]["shape"] = [1, blobs[0].size]
    with pytest.raises(AqmFormatError, match="decompression bomb"):
        aqformat.open(_write(tmp_path, build(doc, blobs, minor=minor)))


def _write(tmp_path, data):
    path = tmp_path / "bad.aqm"
    path.write_bytes(data)
    return path


def _stream():
    v = _laplace_rows(rows=6, cols=700, dtype=np.int16)
    v[0, 0] = 30000  # an escape
    return v, bytearray(rans.encode(v))


def _patch(offset, fmt, value):
    def edit(s):
        struct.pack_into(fmt, s, offset, value)
        return s
    return edit


@pytest.mark.parametrize("edit,match", [
    (_patch(0, "<B", 3), "width"), (_patch(1, "<B", 15), "exponent"), (_patch(2, "<B", 0), "tables"),
    (_patch(2, "<B", 17), "tables"), (_patch(3, "<B", 2), "mode 2 out of range"), (_patch(4, "<I", 0), "rows of"),
    (_patch(4, "<I", 701), "rows of"), (_patch(8, "<I", 0), "lanes"), (_patch(8, "<I", 10 ** 6), "lanes"),
    (_patch(12, "<I", 2 ** 31), "past the end"), (_patch(16, "<I", 0), "escape|follow|end"),
    (_patch(20, "<h", -20000), "outside the tokens"), (_patch(22, "<H", 1), "outside the tokens"),
    (_patch(24, "<B", 0x7F), "sum"), (_patch(24, "<B", 0xFF), "longer than two bytes|sum|past the end"),
    (lambda s: s[:-1], "past the end|escape"), (lambda s: s + b"\0", "follow"),
])
def test_malformed_streams_are_refused_with_one_line(edit, match):
    v, s = _stream()
    with pytest.raises(AqmFormatError, match=match) as e:
        rans.decode(np.frombuffer(bytes(edit(bytearray(s))), np.uint8), v.nbytes)
    assert "\n" not in str(e.value)


def test_a_stream_must_end_in_the_initial_states():
    v, s = _stream()
    n_extra = struct.unpack_from("<I", s, 16)[0]
    s[len(s) - n_extra - 3] ^= 0x10  # in the last words: the lanes end elsewhere
    with pytest.raises(AqmFormatError, match="rans section"):
        rans.decode(np.frombuffer(bytes(s), np.uint8), v.nbytes)


def test_a_stream_decodes_only_to_the_size_it_was_made_for():
    v = np.zeros((4, 8), np.int8)
    v[:2] = 100
    v[2:, ::2] = -100
    s = np.frombuffer(rans.encode(v), np.uint8)
    assert rans.decode(s, v.nbytes).view(np.int8).reshape(4, 8).tolist() == v.tolist()
    for size in (v.nbytes - 8, v.nbytes + 8, 2 * v.nbytes, 4 * v.nbytes):
        with pytest.raises(AqmFormatError, match="rans section"):
            rans.decode(s, size)


def test_reader_names_the_section(tmp_path):
    data = _file(tmp_path)
    doc, blobs = split(data)
    b = bytearray(blobs[0].data)
    b[0] = 3
    blobs[0] = Blob(bytes(b), "rans", blobs[0].size)
    with aqformat.open(_write(tmp_path, build(doc, blobs, minor=2))) as f:
        with pytest.raises(AqmFormatError, match=r"section 0: rans section: width 3"):
            f.read("t")


@pytest.mark.parametrize("encoding", ["rans", "rans-context"])
@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False))
def test_mutants_of_a_rans_file_fail_cleanly(tmp_path, encoding, rng):
    check(tmp_path, mutant(rng, _file(tmp_path, encoding)))
