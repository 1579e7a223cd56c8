"""Hand-crafted hostile files: each attack class known from GGUF/safetensors loader bugs.

Every file here has correct CRCs (tests/craft.py recomputes them), so what is
exercised is the structural validation in aqformat/header.py and reader.py.
Every failure must be an AqmError subclass with a one-line message, raised
before anything is allocated from an unchecked field.
"""
import copy
import os
import resource

import msgpack
import numpy as np
import pytest
import zstandard

import aqformat
from aqformat import AqmError, AqmFormatError, AqmUnsupportedError, AqmVersionError
from aqformat.header import MAX_HEADER_BYTES, MAX_NDIM, MAX_ZSTD_RATIO
from tests.craft import Blob, aq_only, build, nested, rebuild, repreamble, split, write_sample, zstd_blob


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "sample.aqm"
    write_sample(path)
    return path.read_bytes()


def load(tmp_path, data: bytes) -> None:
    """Open ``data`` as a file, read every tensor and the graph, and verify it."""
    path = tmp_path / "x.aqm"
    path.write_bytes(data)
    with aqformat.open(path) as f:
        for name in f.names():
            f.read(name)
        f.graph()
        f.verify()


def reject(tmp_path, data: bytes, match: str, exc: type = AqmFormatError) -> AqmError:
    with pytest.raises(exc, match=match) as e:
        load(tmp_path, data)
    assert "\n" not in str(e.value) and len(str(e.value)) < 1500
    return e.value


def raw_doc(shape, dtype="float32", n=None) -> tuple[dict, list[Blob]]:
    itemsize = aqformat.dtypes.itemsize(dtype)
    n = int(np.prod(shape)) * itemsize if n is None else n
    return ({"tensors": [{"name": "t", "shape": list(shape), "dtype": dtype, "codec": "raw", "data": 0}]},
            [Blob(b"\1" * n)])


def test_crafted_baselines_load(tmp_path, sample):
    """The unmodified crafts decode, so each rejection below is caused by its one edit."""
    load(tmp_path, build(*raw_doc((2, 3))))
    load(tmp_path, build(*aq_only()))
    assert build(*split(sample)) == sample
    load(tmp_path, sample)


# -- dimensions and sizes that wrap or exceed the limits (ggml #709, llama.cpp #18674, mlx #4136) --

def test_too_many_dimensions(tmp_path):
    reject(tmp_path, build(*raw_doc((1,) * (MAX_NDIM + 1))), "shape must be a list of at most 8")


@pytest.mark.parametrize("shape", [[1 << 32, 1 << 32], [1 << 24, 1 << 24, 2], [1 << 48, 2],
                                   [0, 1 << 48, 1 << 48], [(1 << 64) - 1], [1 << 63, 0]])
def test_element_count_that_would_wrap_64_bits(tmp_path, shape):
    doc, blobs = raw_doc((1,))
    doc["tensors"][0]["shape"] = shape
    reject(tmp_path, build(doc, blobs), "2\\*\\*48|dimension must be")


def test_bytes_that_would_wrap_after_itemsize(tmp_path):
    # 2**48 elements passes the element limit; 2**51 bytes cannot be in the file.
    doc, blobs = raw_doc((1,), "float64")
    doc["tensors"][0]["shape"] = [1 << 24, 1 << 24]
    reject(tmp_path, build(doc, blobs), "needs 2251799813685248 bytes in section 0")


def test_zstd_section_cannot_claim_the_bytes_either(tmp_path):
    doc, _ = raw_doc((1,), "float64")
    doc["tensors"][0]["shape"] = [1 << 24, 1 << 24]
    reject(tmp_path, build(doc, [zstd_blob(b"\0" * 64, size=1 << 51)]), "size must be an integer in")
    reject(tmp_path, build(doc, [zstd_blob(b"\0" * 64, size=1 << 40)]), "decompression bomb")


def test_aq_code_count_that_would_overflow(tmp_path):
    # rows * ceil(cols/d) * M * bits would wrap a 64-bit product: 2**48 * 64 * 16.
    doc, blobs = aq_only(K=1 << 16, M=64, d=1, shape=(1, 1))
    doc["tensors"][0]["shape"] = [1 << 24, 1 << 24]
    reject(tmp_path, build(doc, [Blob(b"\0" * (64 * (1 << 16) * 2)), blobs[1]]), "needs \\d+ bytes in section 1")


@pytest.mark.parametrize("dim", [-1, 1.0, True, "4", None, [2]])
def test_dimension_of_wrong_type(tmp_path, dim):
    doc, blobs = raw_doc((1,))
    doc["tensors"][0]["shape"] = [dim]
    reject(tmp_path, build(doc, blobs), "dimension must be an integer")


# -- offsets and lengths outside the file or wrapping back inside it (gguf-tools #25/#28, CVE-2025-62609) --

@pytest.mark.parametrize("entry,match", [
    ({"offset": 0}, "offset must be an integer in \\[64,"),
    ({"offset": 32}, "offset must be an integer in \\[64,"),
    ({"offset": 1 << 40}, "offset must be an integer"),
    ({"offset": (1 << 64) - 1, "length": 2}, "offset must be an integer"),
    ({"offset": (1 << 63) + 64}, "offset must be an integer"),
    ({"length": (1 << 64) - 1}, "length must be an integer"),
    ({"length": 4096}, "length must be an integer"),  # runs into the header
    ({"offset": 65}, "not a multiple of the alignment"),
    ({"offset": -64}, "offset must be an integer"),
])
def test_section_outside_the_data_area(tmp_path, entry, match):
    doc, blobs = raw_doc((4,))
    blobs[0].entry = entry
    reject(tmp_path, build(doc, blobs), match)


def test_section_overlapping_the_header(tmp_path):
    doc, blobs = raw_doc((4,))
    data = build(doc, blobs)
    hoff = int.from_bytes(data[16:24], "little")
    blobs[0].entry = {"offset": hoff}  # starts exactly at the header, length 16 runs into it
    reject(tmp_path, build(doc, blobs), "length must be an integer in \\[0, 0\\]")


def test_overlapping_sections(tmp_path):
    doc, blobs = raw_doc((16,))
    doc["tensors"].append({"name": "u", "shape": [16], "dtype": "float32", "codec": "raw", "data": 1})
    blobs.append(Blob(b"\2" * 64, entry={"offset": 64 + 0}))  # the same bytes as section 0
    reject(tmp_path, build(doc, blobs), "sections overlap at byte 64")


@pytest.mark.parametrize("ref", [1, 7, -1, True, 0.0, "0", None])
def test_reference_to_a_missing_section(tmp_path, ref):
    doc, blobs = raw_doc((4,))
    doc["tensors"][0]["data"] = ref
    reject(tmp_path, build(doc, blobs), "does not refer to one of the 1 entries")


# -- preamble fields --

@pytest.mark.parametrize("alignment", [0, 1, 3, 4, 48, 96, 1 << 17, (1 << 32) - 1])
def test_alignment_not_a_power_of_two_in_range(tmp_path, alignment):
    reject(tmp_path, repreamble(build(*raw_doc((4,))), alignment=alignment), f"alignment {alignment} is not")


def test_larger_alignment_is_honoured(tmp_path):
    load(tmp_path, build(*raw_doc((4,)), alignment=4096))
    doc, blobs = raw_doc((4,))
    blobs.insert(0, Blob(b"\0"))
    doc["tensors"][0]["data"] = 1  # section 1 lands at offset 128: aligned to 64, not to 256
    reject(tmp_path, repreamble(build(doc, blobs), alignment=256), "not a multiple of the alignment 256|misaligned")


@pytest.mark.parametrize("fields,match,exc", [
    ({"magic": b"\x89AQM\r\n\x1a\x00"}, "bad magic", AqmFormatError),
    ({"major": 2, "minor": 3}, "format 2.3; this reader supports 1.x", AqmVersionError),
    ({"major": 0}, "format 0.0; this reader supports 1.x", AqmVersionError),
    ({"flags": 1}, "unknown preamble flags", AqmFormatError),
    ({"header_length": MAX_HEADER_BYTES + 1}, f"exceeds the {MAX_HEADER_BYTES}-byte limit", AqmFormatError),
    ({"header_offset": 0}, "does not end the file", AqmFormatError),
    ({"header_offset": (1 << 64) - 1}, "does not end the file", AqmFormatError),
    ({"header_length": (1 << 63)}, "exceeds", AqmFormatError),
    ({"file_length": 1 << 40}, "truncated or extended", AqmFormatError),
])
def test_bad_preamble_fields(tmp_path, fields, match, exc):
    reject(tmp_path, repreamble(build(*raw_doc((4,))), **fields), match, exc)


@pytest.mark.parametrize("cut", [0, 10, 63, 64, 100])
def test_truncated_and_extended_files(tmp_path, sample, cut):
    reject(tmp_path, sample[:cut], "too small|truncated or extended")
    reject(tmp_path, sample + b"\0" * (cut or 1), "truncated or extended")


def test_not_a_regular_file(tmp_path):
    with pytest.raises(AqmError, match="is a directory"):
        aqformat.open(tmp_path)
    with pytest.raises(AqmError, match="no such file"):
        aqformat.open(tmp_path / "missing.aqm")
    os.mkfifo(tmp_path / "fifo.aqm")  # used to block open() forever, waiting for a writer
    with pytest.raises(AqmError, match="fifo.aqm is not a regular file"):
        aqformat.open(tmp_path / "fifo.aqm")
    with pytest.raises(AqmError, match="is not a regular file"):
        aqformat.open("/dev/zero")
    os.symlink(tmp_path / "loop.aqm", tmp_path / "loop.aqm")
    with pytest.raises(AqmError, match="cannot open .*loop.aqm: Too many levels of symbolic links"):
        aqformat.open(tmp_path / "loop.aqm")


# -- header as a whole --

@pytest.mark.parametrize("header,match", [
    (msgpack.packb([1, 2, 3]), "header must be a map"),
    (msgpack.packb(7), "header must be a map"),
    (msgpack.packb(b"bytes"), "header must be a map"),
    (msgpack.packb({1: "int key"}), "not valid msgpack|must be a map with string keys"),
    (b"\xc1", "not valid msgpack"),  # the one never-used msgpack byte
    (b"\xdd\xff\xff\xff\xff", "not valid msgpack|more than 4194304 entries"),  # array claiming 2**32-1 items
    (b"\xdb\xff\xff\xff\xf0abc", "not valid msgpack"),  # str claiming 4 GiB
    (msgpack.packb({"sections": []}) + b"\x00", "not valid msgpack"),  # trailing data
    (b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0", "not valid msgpack"),  # nesting beyond the stack
    (msgpack.packb({"sections": [], "tensors": [], "x": b"\xff"})[:-3] + b"\xa1\xff", "not valid msgpack"),
    (msgpack.packb({"tensors": []}), "lacks required field 'sections'"),
    (msgpack.packb({"sections": []}), "lacks required field 'tensors'"),
    (msgpack.packb({"sections": {}, "tensors": []}), "sections must be a list"),
    (msgpack.packb({"sections": [], "tensors": [None]}), "tensor 0 must be a map"),
])
def test_header_that_is_not_a_valid_map(tmp_path, header, match):
    reject(tmp_path, build(None, header=header), match)


@pytest.mark.parametrize("field", ["metadata", "source"])
@pytest.mark.parametrize("value,match", [
    (b"\0\1", "type bytes"), (msgpack.ExtType(5, b"x"), "type bytes"), ([{"a": b""}], "type bytes"),
    (nested(33), "deeper than 32"), (nested(900), "deeper than 32"),
    ({"k": {"x": {b"k": 1}}}, "not valid msgpack|non-string keys"),
])
def test_metadata_must_be_printable_json(tmp_path, field, value, match):
    # aqm info prints metadata as text and JSON; bytes or 900 levels used to crash it with a traceback.
    doc, blobs = raw_doc((4,))
    doc[field] = {"v": value}
    reject(tmp_path, build(doc, blobs), match)
    doc[field] = {"v": nested(30), "x": [1, 2.5, None, True, "s", {"k": -1}]}
    load(tmp_path, build(doc, blobs))


def test_writer_refuses_metadata_the_reader_would_refuse(tmp_path):
    with pytest.raises(aqformat.AqmInputError, match="type bytes"):
        aqformat.Writer(tmp_path / "m.aqm", metadata={"b": b"x"})
    with aqformat.Writer(tmp_path / "m.aqm") as w:
        with pytest.raises(aqformat.AqmInputError, match="deeper than 32"):
            w.update_metadata(deep=nested(40))
    assert not list(tmp_path.glob(".*tmp"))


def test_duplicate_tensor_names(tmp_path):
    doc, blobs = raw_doc((4,))
    doc["tensors"].append(dict(doc["tensors"][0]))
    reject(tmp_path, build(doc, blobs), "duplicate tensor name 't'")


def test_duplicate_codebook_group_names(tmp_path):
    doc, blobs = aq_only()
    doc["codebooks"].append(dict(doc["codebooks"][0]))
    reject(tmp_path, build(doc, blobs), "duplicate codebook group name")


def test_one_bad_tensor_fails_the_whole_open(tmp_path):
    """A rejected record never silently shortens the tensor list."""
    doc, blobs = raw_doc((4,))
    good = doc["tensors"][0]
    doc["tensors"] = [dict(good, name="a"), dict(good, name="b", dtype="complex64"), dict(good, name="c")]
    reject(tmp_path, build(doc, blobs), "tensor 'b' dtype 'complex64' is not one of")


# -- wrong types everywhere --

BASE_PATHS = {  # (record kind, key) of every field in the sample file's header
    ("section", "offset"), ("section", "length"), ("section", "size"), ("section", "encoding"), ("section", "crc32"),
    ("group", "name"), ("group", "M"), ("group", "K"), ("group", "d"), ("group", "dtype"), ("group", "section"),
    ("raw", "name"), ("raw", "shape"), ("raw", "dtype"), ("raw", "data"),
    ("aq", "group"), ("aq", "codes"), ("aq", "scale"), ("aq", "scale_dtype"), ("aq", "perm"), ("aq", "axes"),
    ("lattice", "data"), ("lattice", "step"), ("lattice", "seed"), ("lattice", "index_dtype"),
    ("graph", "format"), ("graph", "section"), ("top", "producer"), ("top", "source"), ("top", "codebooks"),
}
WRONG = [True, False, -1, -(1 << 63), 1.5, float("nan"), "x" * 1025, "0", None, [0], {"a": 0}, b"\x00",
         (1 << 64) - 1]


def _record(doc, kind):
    if kind == "section":
        return doc["sections"][0]
    if kind == "group":
        return doc["codebooks"][0]
    if kind == "graph":
        return doc["graph"]
    if kind == "top":
        return doc
    return next(t for t in doc["tensors"] if t["codec"] == kind and (kind != "aq" or "perm" in t))


@pytest.mark.parametrize("kind,key", sorted(BASE_PATHS))
def test_wrong_types_everywhere(tmp_path, sample, kind, key):
    """Each field set to each wrong-typed value either fails cleanly or (when the value happens
    to be legal for that field, e.g. perm=None) still loads; nothing else escapes."""
    doc, blobs = split(sample)
    refused = 0
    for value in WRONG:
        d = copy.deepcopy(doc)
        if kind == "section":
            blobs2 = [Blob(b.data, b.encoding, b.size) for b in blobs]
            blobs2[0].entry = {key: value}
            data = build(d, blobs2)
        else:
            _record(d, kind)[key] = value
            data = build(d, blobs)
        try:
            load(tmp_path, data)
        except AqmError as e:
            assert "\n" not in str(e) and len(str(e)) < 1500
            refused += 1
    assert refused >= len(WRONG) - 2  # only None (optional fields) and perhaps 0-like values may pass


# -- codebooks, codes and permutations --

@pytest.mark.parametrize("field,value,match", [
    ("K", 12, "K=12 is not a power of two"), ("K", 1 << 17, "K must be an integer in \\[2, 65536\\]"),
    ("K", 1, "K must be an integer"), ("K", 0, "K must be an integer"), ("K", 1 << 40, "K must be an integer"),
    ("M", 0, "M must be an integer in \\[1, 64\\]"), ("M", 65, "M must be"), ("M", 1 << 62, "M must be"),
    ("d", 0, "d must be an integer in \\[1, 256\\]"), ("d", 257, "d must be"), ("d", (1 << 64) - 1, "d must be"),
    ("dtype", "float64", "dtype 'float64' is not one of"),
])
def test_codebook_geometry_out_of_range(tmp_path, field, value, match):
    doc, blobs = aq_only()
    doc["codebooks"][0][field] = value
    reject(tmp_path, build(doc, blobs), match)


def test_codebook_section_too_small_for_its_geometry(tmp_path):
    doc, blobs = aq_only(K=16, M=2, d=4)
    blobs[0] = Blob(blobs[0].data[:-2])
    reject(tmp_path, build(doc, blobs), "codebook group 'g' needs 256 bytes in section 0, which holds 254")


@pytest.mark.parametrize("K", [2, 8, 256, 4096, 1 << 16])
def test_every_code_width_stays_inside_its_codebook(tmp_path, K):
    """Codes are log2(K) bits, so even all-ones codes index entry K-1: no out-of-range gather."""
    doc, blobs = aq_only(K=K, M=1, d=2, shape=(2, 4))
    cb = np.arange(K * 2, dtype=np.float16) if K <= 1024 else np.zeros(K * 2, np.float16)
    cb[-2:] = [7, 9]  # the last codeword
    blobs[0] = Blob(cb.tobytes())
    blobs[1] = Blob(b"\xff" * len(blobs[1].data))
    path = tmp_path / "x.aqm"
    path.write_bytes(build(doc, blobs))
    np.testing.assert_array_equal(aqformat.open(path).read("t"), np.tile([7, 9], (2, 2)).astype(np.float32))


def test_codes_section_of_the_wrong_size(tmp_path):
    doc, blobs = aq_only(K=16, M=2, d=4, shape=(4, 8))  # 16 codes of 4 bits = 8 bytes
    blobs[1] = Blob(blobs[1].data + b"\0")
    reject(tmp_path, build(doc, blobs), "tensor 't' needs 8 bytes in section 1, which holds 9")


@pytest.mark.parametrize("perm,match", [
    ([0, 0, 1, 2, 3, 4, 5, 6], "not a permutation"),
    ([0, 1, 2, 3, 4, 5, 6, 8], "not a permutation"),
    ([0, 1, 2, 3, 4, 5, 6, (1 << 32) - 1], "not a permutation"),
])
def test_perm_that_is_not_a_permutation(tmp_path, perm, match):
    doc, blobs = aq_only(shape=(4, 8))
    doc["tensors"][0]["perm"] = 2
    blobs.append(Blob(np.array(perm, "<u4").tobytes()))
    e = reject(tmp_path, build(doc, blobs), match)
    assert "'t'" in str(e)


def test_perm_of_the_wrong_length(tmp_path):
    doc, blobs = aq_only(shape=(4, 8))
    doc["tensors"][0]["perm"] = 2
    blobs.append(Blob(np.arange(7, dtype="<u4").tobytes()))
    reject(tmp_path, build(doc, blobs), "needs 32 bytes in section 2, which holds 28")


@pytest.mark.parametrize("axes,match", [([0, 0], "not a permutation"), ([0, 2], "not a permutation"),
                                        ([1], "not a permutation"), ([0, "1"], "axis must be an integer"),
                                        ([0.0, 1.0], "axis must be an integer"), ([False, True], "axis must be"),
                                        ([-1, 0], "axis must be"), ([0, 1, 2, 3, 4, 5, 6, 7, 8], "at most 8")])
def test_axes_that_are_not_a_permutation(tmp_path, axes, match):
    doc, blobs = aq_only(shape=(4, 8))
    doc["tensors"][0]["axes"] = axes
    reject(tmp_path, build(doc, blobs), match)


def test_aq_on_an_integer_or_empty_tensor(tmp_path):
    doc, blobs = aq_only()
    doc["tensors"][0]["dtype"] = "int8"
    reject(tmp_path, build(doc, blobs), "non-float dtype int8")
    doc["tensors"][0].update(dtype="float32", shape=[0, 8])
    reject(tmp_path, build(doc, blobs), "empty or a scalar")


def test_unknown_codec_is_listed_and_refused_on_read(tmp_path, sample):
    def edit(doc, blobs):
        next(t for t in doc["tensors"] if t["name"] == "lat")["codec"] = "lattice2"
        return doc, blobs
    path = tmp_path / "u.aqm"
    path.write_bytes(rebuild(sample, edit))
    f = aqformat.open(path)
    assert "lat" in f.names() and f.info("lat").codec == "lattice2" and f.info("lat").shape == (4, 5)
    with pytest.raises(AqmUnsupportedError, match="tensor 'lat' uses codec 'lattice2', unknown"):
        f.read("lat")
    f.read("fc")  # the rest of the file stays readable
    with pytest.raises(AqmUnsupportedError):
        f.verify()


# -- decompression bombs --

def test_declared_size_beyond_what_zstd_can_produce(tmp_path):
    doc, _ = raw_doc((1,), "uint8")
    n = (1 << 20) + 100 * MAX_ZSTD_RATIO + 1  # more than the largest real ratio allows for 100 bytes
    doc["tensors"][0]["shape"] = [n]
    blob = zstd_blob(b"\0" * 64, size=n)
    blob.data = blob.data.ljust(100, b"\0")
    reject(tmp_path, build(doc, [blob]), "decompression bomb")


@pytest.mark.parametrize("content_size", [True, False])
def test_frame_larger_than_its_section_is_not_inflated(tmp_path, content_size):
    """A 16-byte section whose frame holds 256 MiB: refused without allocating the 256 MiB."""
    doc, _ = raw_doc((16,), "uint8")
    # Compressed in 1 MiB pieces, so the test itself never holds the 256 MiB it guards against.
    z = zstandard.ZstdCompressor(level=3, write_content_size=content_size).compressobj(
        size=(256 << 20) if content_size else -1)
    chunk = bytes(1 << 20)
    blob = Blob(b"".join(z.compress(chunk) for _ in range(256)) + z.flush(), "zstd", 16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reject(tmp_path, build(doc, [blob]), "declares 268435456 bytes, expected 16|not a valid zstd frame")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_frame_smaller_than_its_section(tmp_path):
    doc, _ = raw_doc((4096,), "uint8")
    reject(tmp_path, build(doc, [zstd_blob(b"\0" * 4000, content_size=False, size=4096)]),
           "decompresses to 4000 bytes, expected 4096")
    reject(tmp_path, build(doc, [zstd_blob(b"\0" * 4000, size=4096)]), "declares 4000 bytes, expected 4096")


def test_zstd_section_of_garbage_or_with_trailing_data(tmp_path):
    doc, _ = raw_doc((64,), "uint8")
    reject(tmp_path, build(doc, [Blob(b"\x28\xb5\x2f\xfd" + b"\xff" * 60, "zstd", 64)]), "not a valid zstd frame")
    blob = zstd_blob(b"\1" * 64)
    blob.data += b"junk"
    reject(tmp_path, build(doc, [blob]), "not a valid zstd frame")
    empty = zstd_blob(b"", content_size=False, size=0)
    doc["tensors"][0]["shape"] = [0]
    reject(tmp_path, build(doc, [Blob(empty.data + zstd_blob(b"\0" * 4096, content_size=False).data,
                                      "zstd", 0)]), "not a valid zstd frame")


def test_highly_compressible_writer_output_is_not_mistaken_for_a_bomb(tmp_path):
    """zstd reaches ~32000:1 on zeros; the old 4096:1 limit refused the Writer's own files."""
    q = np.zeros((2048, 2048), np.int8)
    path = tmp_path / "z.aqm"
    with aqformat.Writer(path) as w:
        w.add_lattice("z", q.shape, q, np.full(2048, 0.5, np.float32), seed=3)
        w.add_tensor("r", np.zeros(1 << 22, np.uint8), compress=True)
    with aqformat.open(path) as f:
        f.verify()
        assert f.read("r").sum() == 0


def test_header_with_millions_of_entries_stays_bounded(tmp_path):
    # MAX_SECTIONS + 1 entries are refused after parsing; the header limit bounds the parse itself.
    header = msgpack.packb({"sections": [0] * ((1 << 22) + 1), "tensors": []})
    assert len(header) < MAX_HEADER_BYTES
    reject(tmp_path, build(None, header=header), "an array or map has more than 4194304 entries")


def test_verify_decodes_the_graph(tmp_path, sample):
    """A graph section whose CRC matches but whose zstd frame is broken fails verify(), not a later run."""
    def edit(doc, blobs):
        g = blobs[doc["graph"]["section"]]
        blobs[doc["graph"]["section"]] = Blob(g.data[:-1] + bytes([g.data[-1] ^ 1]), "zstd", g.size)
        return doc, blobs
    path = tmp_path / "g.aqm"
    path.write_bytes(rebuild(sample, edit))
    with aqformat.open(path) as f:
        f.check_checksums()
        with pytest.raises(AqmFormatError, match="section 13 is not a valid zstd frame"):
            f.verify()


# -- bounded work per header byte, bounded messages, one value per key ----------------------

def test_header_of_empty_maps_is_refused_with_bounded_memory(tmp_path):
    """16 MiB of empty maps used to cost 1.2 GB just to open; the container count stops it early."""
    from aqformat.header import MAX_HEADER_CONTAINERS
    n = 1 << 22  # as many as an array may hold
    header = b"\x82\xa8sections\xdd" + n.to_bytes(4, "big") + b"\x80" * n + b"\xa7tensors\x90"
    data = build(None, header=header)  # built first: its own bytes are not what is measured
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reject(tmp_path, data, f"more than {MAX_HEADER_CONTAINERS} maps and arrays")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 160, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_many_small_arrays_in_metadata_are_counted_too(tmp_path):
    from aqformat.header import MAX_HEADER_CONTAINERS
    doc, blobs = raw_doc((4,))
    doc["metadata"] = {f"k{i}": [[] for _ in range(1 << 16)] for i in range(MAX_HEADER_CONTAINERS >> 16)}
    reject(tmp_path, build(doc, blobs), f"more than {MAX_HEADER_CONTAINERS} maps and arrays")


@pytest.mark.parametrize("byte", [2, 255])
def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path, byte):
    """A bool is one byte, 0 or 1: another reader could take 2 as true, or refuse it."""
    doc = {"tensors": [{"name": "t", "shape": [4], "dtype": "bool", "codec": "raw", "data": 0}]}
    ok = build(doc, [Blob(bytes([0, 1, 1, 0]))])
    (tmp_path / "ok.aqm").write_bytes(ok)
    with aqformat.open(tmp_path / "ok.aqm") as f:
        assert f.read("t").tolist() == [False, True, True, False]
    reject(tmp_path, build(doc, [Blob(bytes([0, 1, byte, 0]))]), "bool byte is neither 0 nor 1")


@pytest.mark.parametrize("where", ["top", "tensor", "section", "metadata"])
def test_duplicate_map_keys_are_refused(tmp_path, where):
    """msgpack maps that name a key twice: another language's reader could pick the other value."""
    doc, blobs = raw_doc((4,))
    data = build(doc, blobs)
    hoff = int.from_bytes(data[16:24], "little")
    header = data[hoff:]
    if where == "top":  # {"tensors": [...], "sections": [...], "tensors": []}
        d = msgpack.unpackb(header, raw=False)
        body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in d.items())
        header = bytes([0x80 | (len(d) + 1)]) + body + msgpack.packb("tensors") + msgpack.packb([])
    elif where == "tensor":  # the data field twice
        header = header.replace(b"\x85\xa4name", b"\x86\xa4data\x00\xa4name")
    elif where == "section":
        header = header.replace(b"\x85\xa6offset", b"\x86\xa4size\x10\xa6offset", 1)
    else:
        header = msgpack.packb(dict(msgpack.unpackb(header, raw=False), metadata={}))
        header = header.replace(b"\xa8metadata\x80", b"\xa8metadata\x82\xa1a\x01\xa1a\x02")
    assert header != data[hoff:]
    reject(tmp_path, build(None, header=header), "names the key .* twice")


@pytest.mark.parametrize("value", [nested(1000), nested(5000), [list(range(100000))], "x" * 100_000,
                                   {"k" * 5000: nested(900)}])
def test_messages_show_a_bounded_value(tmp_path, value):
    """A 1,000-deep value in a checked field used to raise RecursionError from repr() in the message."""
    for key in ("data", "dtype", "name"):
        doc, blobs = raw_doc((4,))
        doc["tensors"][0][key] = value
        try:
            data = build(doc, blobs)
        except (ValueError, OverflowError):  # msgpack's packer stops at 511 levels
            continue
        e = reject(tmp_path, data, "invalid header")
        assert len(str(e)) < 400


def test_graph_section_cannot_expand_like_zeros(tmp_path):
    """A 1.25 KB file whose zstd graph expands 32,768x cost 44 s and 4.6 GB; graphs expand 1024x at most
    (above 256 KiB)."""
    from aqformat.header import MAX_GRAPH_RATIO
    doc, blobs = raw_doc((4,))
    doc["graph"] = {"format": "onnx", "section": 1}
    raw = b"\x08\x00" * (8 << 20)
    blobs.append(zstd_blob(raw))
    assert len(raw) > MAX_GRAPH_RATIO * len(blobs[1].data)
    t0 = __import__("time").perf_counter()
    reject(tmp_path, build(doc, blobs), "more than a graph expands")
    assert __import__("time").perf_counter() - t0 < 1.0
    blobs[1] = zstd_blob(b"\x08\x00" * (1 << 17))  # 256 KiB: allowed whatever the ratio
    load(tmp_path, build(doc, blobs))
