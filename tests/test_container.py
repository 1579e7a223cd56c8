"""Writer, reader, bit packing and aqm-info on real files."""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import aqformat
from aqformat.codecs.aq import parts as aq_parts
from aqformat.bitpack import pack, packed_size, unpack
from aqformat.layout import from_matrix, to_matrix
from tests.spec_reference import decode_file

AQM = [sys.executable, "-m", "aqformat.cli"]


def _ref_pack(codes: np.ndarray, b: int) -> bytes:
    bits = ((codes.reshape(-1, 1).astype(np.uint32) >> np.arange(b, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_matches_lsb_first_reference(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1000, 4097):
        codes = rng.integers(0, 1 << bits, n)
        packed = pack(codes, bits)
        assert len(packed) == packed_size(n, bits)
        assert packed == _ref_pack(codes, bits)
        np.testing.assert_array_equal(unpack(packed, n, bits), codes)


def test_spec_bit_order_example():
    assert pack(np.array([5, 1, 7]), 3) == bytes([0xCD, 0x01])


def test_pack_rejects_codes_too_wide():
    with pytest.raises(ValueError):
        pack(np.array([8]), 3)


def _aq_tensor(rng, shape, M, K, d, axes=None, with_perm=False, with_scale=False):
    """Random codes for a tensor, and the tensor they must decode to (computed without aqformat's decoder)."""
    t = np.zeros(shape, np.float32)
    w = to_matrix(t, axes)
    rows, cols = w.shape
    cols_p = -(-cols // d) * d
    cb = rng.standard_normal((M, K, d)).astype(np.float16)
    codes = rng.integers(0, K, (rows * cols_p // d, M))
    vec = sum(cb[m].astype(np.float32)[codes[:, m]] for m in range(M))
    q = vec.reshape(rows, cols_p)[:, :cols]
    scale = rng.uniform(0.5, 2, rows).astype(np.float16) if with_scale else None
    if scale is not None:
        q = q * scale.astype(np.float32)[:, None]
    perm = rng.permutation(cols) if with_perm else None
    return cb, codes, scale, perm, from_matrix(np.ascontiguousarray(q), shape, axes, perm)


@pytest.mark.parametrize("shape,axes,M,K,d,perm,scale", [
    ((32, 64), None, 2, 256, 8, False, True),
    ((10, 6), (1, 0), 3, 8, 4, True, True),
    ((4, 3, 3, 3), None, 2, 128, 9, False, False),
    ((5, 12), None, 1, 4096, 4, True, False),
    ((17,), None, 4, 2, 3, False, True),
    ((3, 4, 5), (2, 0, 1), 2, 16, 7, True, True),
])
def test_aq_roundtrip(tmp_path, shape, axes, M, K, d, perm, scale):
    rng = np.random.default_rng(0)
    cb, codes, s, p, expected = _aq_tensor(rng, shape, M, K, d, axes, perm, scale)
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path) as w:
        w.add_codebooks("g", cb)
        w.add_aq("t", shape, codes, group="g", scale=s, perm=p, axes=axes)
    with aqformat.open(path) as f:
        got = f.read("t")
        assert got.shape == tuple(shape) and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        parts = aq_parts(f, "t")
        np.testing.assert_array_equal(parts.codes, codes)
    np.testing.assert_array_equal(decode_file(str(path))["t"], expected)


def test_shared_group_and_info(tmp_path):
    rng = np.random.default_rng(1)
    cb, c1, _, _, e1 = _aq_tensor(rng, (16, 32), 2, 256, 8)
    c2 = rng.integers(0, 256, (8 * 8, 2))
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path, source={"framework": "numpy", "name": "toy"}) as w:
        w.add_codebooks("shared", cb)
        w.add_aq("a", (16, 32), c1, group="shared")
        w.add_aq("b", (8, 64), c2, group=0, dtype="float16")
        w.add_tensor("bias", np.arange(8, dtype=np.float32))
    with aqformat.open(path) as f:
        assert f.names() == ["a", "b", "bias"]
        assert [t.group for t in f.tensors()] == ["shared", "shared", None]
        assert f.info("a").bits_per_weight == pytest.approx(2.0)
        assert f.read("b").dtype == np.float16
        np.testing.assert_array_equal(f.read("a"), e1)
        assert f.source["name"] == "toy"


def test_raw_tensors_are_the_callers_own_and_outlive_the_file(tmp_path):
    """Not views of a mapping (spec 6.2): they survive close(), and writing to one changes nothing else."""
    path = tmp_path / "m.aqm"
    a = np.arange(1000, dtype=np.float32).reshape(10, 100)
    with aqformat.Writer(path) as w:
        w.add_tensor("a", a)
        w.add_tensor("z", np.zeros(5000, np.int16), compress=True)
    f = aqformat.open(path)
    got = f.read("a")
    assert got.flags.writeable
    f.close()
    np.testing.assert_array_equal(got, a)
    got[:] = 7
    with aqformat.open(path) as f:
        np.testing.assert_array_equal(f.read("a"), a)
        assert f.info("z").stored_bytes < 200
        np.testing.assert_array_equal(f.read("z"), np.zeros(5000, np.int16))
    with pytest.raises(aqformat.AqmInputError, match="is closed"):
        f.read("a")


def test_sections_are_aligned_and_file_is_deterministic(tmp_path):
    def write(p):
        with aqformat.Writer(p, metadata={"k": [1, "x"]}) as w:
            w.add_tensor("x", np.ones(3, np.float64))
            w.add_lattice("l", (4, 5), np.arange(20).reshape(4, 5) - 10, np.full(4, 0.5), seed=7)
            w.set_graph(b"\x08\x07")
    write(tmp_path / "a.aqm")
    write(tmp_path / "b.aqm")
    a, b = (tmp_path / "a.aqm").read_bytes(), (tmp_path / "b.aqm").read_bytes()
    assert a == b
    hoff = struct.unpack_from("<Q", a, 16)[0]
    assert hoff % 64 == 0
    with aqformat.open(tmp_path / "a.aqm") as f:
        assert f.graph() == ("onnx", b"\x08\x07") and f.graph_bytes == 2
    with aqformat.Writer(tmp_path / "c.aqm") as w:
        w.add_tensor("x", np.ones(3))
    with aqformat.open(tmp_path / "c.aqm") as f:
        assert f.graph() is None and f.graph_bytes == 0


@pytest.mark.parametrize("alignment", [8, 16, 4096])
def test_a_writer_aligns_sections_as_asked_and_the_reader_reports_it(tmp_path, alignment):
    with aqformat.Writer(tmp_path / "a.aqm", alignment=alignment) as w:
        w.add_tensor("x", np.arange(3, dtype=np.float64))
        w.add_tensor("y", np.ones((5, 7), np.float32))
    with aqformat.open(tmp_path / "a.aqm") as f:
        assert f.alignment == alignment
        assert all(f.section(f.record(n).fields["data"]).offset % alignment == 0 for n in ("x", "y"))
        assert (f.read("x") == np.arange(3)).all() and (f.read("y") == 1).all()
    assert struct.unpack_from("<Q", (tmp_path / "a.aqm").read_bytes(), 16)[0] % alignment == 0


@pytest.mark.parametrize("alignment", [4, 12, 1 << 17, "64"])
def test_a_writer_refuses_an_alignment_the_format_does_not_allow(tmp_path, alignment):
    with pytest.raises(aqformat.AqmInputError, match="power of two in \\[8, 65536\\]"):
        aqformat.Writer(tmp_path / "a.aqm", alignment=alignment)
    assert not list(tmp_path.iterdir())


def test_corrupted_section_is_found_lazily_and_named(tmp_path):
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path) as w:
        w.add_tensor("good", np.ones(64, np.float32))
        w.add_tensor("bad", np.ones(64, np.float32))
    with aqformat.open(path) as f:
        off = f.section(1).offset
    data = bytearray(path.read_bytes())
    data[off + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with aqformat.open(path) as f:  # opening parses the header only
        np.testing.assert_array_equal(f.read("good"), np.ones(64, np.float32))
        with pytest.raises(aqformat.AqmIntegrityError, match="'bad'"):
            f.read("bad")
        with pytest.raises(aqformat.AqmIntegrityError):
            f.verify()


def test_writer_is_atomic_on_error(tmp_path):
    path = tmp_path / "m.aqm"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with aqformat.Writer(path) as w:
            w.add_tensor("x", np.ones(10, np.float32))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.aqm"]


@pytest.mark.parametrize("call,msg", [
    (lambda w: w.add_tensor("x", np.ones(2, np.complex64)), "unsupported array dtype"),
    (lambda w: (w.add_tensor("x", np.ones(2)), w.add_tensor("x", np.ones(2))), "duplicate"),
    (lambda w: w.add_codebooks("g", np.ones((2, 3, 4))), "power of two"),
    (lambda w: w.add_aq("t", (4, 4), np.zeros((2, 1)), group="nope"), "unknown codebook group"),
    (lambda w: (w.add_codebooks("g", np.ones((1, 4, 2))), w.add_aq("t", (4, 4), np.zeros((3, 1)), group="g")), "codes must have shape"),
    (lambda w: (w.add_codebooks("g", np.ones((1, 4, 2))), w.add_aq("t", (4, 4), np.zeros((8, 1)), group="g", perm=[0, 0, 1, 2])), "permutation"),
])
def test_writer_rejects_bad_input(tmp_path, call, msg):
    with pytest.raises(aqformat.AqmInputError, match=msg):
        with aqformat.Writer(tmp_path / "m.aqm") as w:
            call(w)
    assert not (tmp_path / "m.aqm").exists()


def test_writer_needs_existing_directory(tmp_path):
    with pytest.raises(aqformat.AqmInputError, match="does not exist"):
        aqformat.Writer(tmp_path / "missing" / "m.aqm")


def _patch_preamble(path, offset, fmt, value):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    struct.pack_into("<I", data, 60, zlib.crc32(bytes(data[:60])))
    path.write_bytes(bytes(data))


def test_newer_major_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path) as w:
        w.add_tensor("x", np.ones(2, np.float32))
    _patch_preamble(path, 8, "<H", 2)
    with pytest.raises(aqformat.AqmVersionError, match=r"2\.0.*1\.x"):
        aqformat.open(path)


def test_newer_minor_is_read(tmp_path):
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path) as w:
        w.add_tensor("x", np.ones(2, np.float32))
    _patch_preamble(path, 10, "<H", 7)
    with aqformat.open(path) as f:
        assert f.version == (1, 7)
        np.testing.assert_array_equal(f.read("x"), np.ones(2, np.float32))


@pytest.mark.parametrize("content,msg", [(b"", "too small"), (b"x" * 100, "bad magic")])
def test_not_an_aqm_file(tmp_path, content, msg):
    p = tmp_path / "x.aqm"
    p.write_bytes(content)
    with pytest.raises(aqformat.AqmFormatError, match=msg):
        aqformat.open(p)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path) as w:
        w.add_tensor("x", np.ones(100, np.float32))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(aqformat.AqmFormatError, match="truncated"):
        aqformat.open(path)


def test_aqm_info_text_json_and_verify(tmp_path):
    rng = np.random.default_rng(2)
    cb, codes, s, _, _ = _aq_tensor(rng, (16, 32), 2, 256, 8, with_scale=True)
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path, source={"framework": "numpy"}) as w:
        w.add_codebooks("shared", cb)
        w.add_aq("layer.weight", (16, 32), codes, group="shared", scale=s)
        w.add_tensor("layer.bias", np.zeros(16, np.float32))
    out = subprocess.run(AQM + ["info", str(path)], capture_output=True, text=True, check=True).stdout
    for needle in ("1.0", "layer.weight", "shared", "bits/weight", "x vs fp32", "integrity     ok"):
        assert needle in out
    r = json.loads(subprocess.run([sys.executable, "-c", "from aqformat.cli import info_main; raise SystemExit(info_main())",
                                   str(path), "--json"], capture_output=True, text=True, check=True).stdout)
    assert r["parameters"] == 16 * 32 + 16 and r["tensor_count"] == 2
    assert r["codebook_groups"][0]["tensors"] == ["layer.weight"]
    assert r["file_bytes"] == os.path.getsize(path)
    assert r["compression_ratio_fp32"] == pytest.approx(4 * r["parameters"] / r["file_bytes"])
    v = subprocess.run(AQM + ["verify", str(path)], capture_output=True, text=True)
    assert v.returncode == 0 and "OK" in v.stdout


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.aqm"
    bad.write_bytes(b"\x89AQM\r\n\x1a\n" + b"\0" * 80)
    for args in (["info", str(bad)], ["verify", str(bad)], ["info", str(tmp_path / "missing.aqm")], ["info", str(tmp_path)]):
        r = subprocess.run(AQM + args, capture_output=True, text=True)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_import_does_not_pull_heavy_frameworks():
    code = "import sys, aqformat, aqformat.cli; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_writer_refuses_a_header_over_the_limit(tmp_path, monkeypatch):
    import aqformat.writer
    monkeypatch.setattr(aqformat.writer, "MAX_HEADER_BYTES", 200)
    with pytest.raises(aqformat.AqmInputError, match="header of"):
        with aqformat.Writer(tmp_path / "m.aqm", metadata={"note": "x" * 300}) as w:
            w.add_tensor("x", np.ones(2, np.float32))
    assert not (tmp_path / "m.aqm").exists()


def test_aqm_info_escapes_control_characters(tmp_path):
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path, producer="evil\x1b[2J") as w:
        w.add_tensor("name\x1b[31mred", np.ones(2, np.float32))
    out = subprocess.run(AQM + ["info", str(path)], capture_output=True, text=True, check=True).stdout
    assert "\x1b" not in out and "\\x1b[31mred" in out
