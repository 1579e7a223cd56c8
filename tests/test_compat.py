"""Forward compatibility (spec section 3): newer minors load, newer majors are refused.

A 1.x reader must read a file written by a later 1.y writer that adds optional
fields anywhere, new codecs and new section encodings: everything it knows
decodes to the same values, and only what it does not know fails, cleanly.
(The frozen-vector test is tests/test_vectors.py.)
"""
import numpy as np
import pytest

import aqformat
from aqformat import AqmUnsupportedError, AqmVersionError
from tests.craft import Blob, rebuild, repreamble, sample_decoded


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("compat") / "sample.aqm"
    expected = sample_decoded(path)
    return path.read_bytes(), expected


def future(doc, blobs):
    """What a 1.9 writer might add: unknown keys in every map, a new codec and a new encoding."""
    doc["checksum_algorithm"] = {"name": "xxh3", "params": [1, 2]}
    doc["tensor_index"] = list(range(5))
    doc["graph"]["opset_hint"] = 21
    for g in doc["codebooks"]:
        g["layout"] = "mkd"
        g["trained_on"] = {"samples": 1000}
    for t in doc["tensors"]:
        t["sparsity"] = 0.0
        t["quant_stats"] = {"mse": 1e-3, "note": "future"}
    for b in blobs:
        b.entry = {"hash": "0" * 16, "compression_level": 19}
    blobs.append(Blob(b"\x04\x22\x4d\x18" + b"\0" * 60, "lz4", 256))  # a new encoding
    doc["tensors"].append({"name": "new", "shape": [8, 8], "dtype": "float32", "codec": "vq2",
                           "data": len(blobs) - 1, "levels": 4})
    doc["tensors"].append({"name": "lz", "shape": [64], "dtype": "float32", "codec": "raw",
                           "data": len(blobs) - 1})
    return doc, blobs


def test_newer_minor_with_unknown_fields_codecs_and_encodings_loads(tmp_path, sample):
    data, expected = sample
    path = tmp_path / "future.aqm"
    path.write_bytes(rebuild(data, future, minor=9))
    with aqformat.open(path) as f:
        assert f.version == (1, 9)
        assert f.names()[-2:] == ["new", "lz"] and f.info("new").codec == "vq2"
        for name, want in expected.items():
            np.testing.assert_array_equal(f.read(name), want)
            assert f.read(name).dtype == want.dtype
        assert f.graph()[0] == "onnx"
        f.check_checksums()  # CRCs of unknown encodings are still checked
        with pytest.raises(AqmUnsupportedError, match="codec 'vq2'"):
            f.read("new")
        with pytest.raises(AqmUnsupportedError, match="encoding 'lz4', unknown"):
            f.read("lz")


def test_future_file_in_aqm_info(tmp_path, sample):
    from aqformat.inspect import describe
    path = tmp_path / "future.aqm"
    path.write_bytes(rebuild(sample[0], future, minor=3))
    report = describe(path)
    assert report["format_version"] == "1.3" and report["integrity"] == "ok"
    assert [t["codec"] for t in report["tensors"]][-2:] == ["vq2", "raw"]


@pytest.mark.parametrize("major,minor", [(2, 0), (2, 7), (65535, 65535), (0, 9)])
def test_other_major_is_refused_naming_both_versions(tmp_path, sample, major, minor):
    path = tmp_path / "major.aqm"
    path.write_bytes(repreamble(sample[0], major=major, minor=minor))
    with pytest.raises(AqmVersionError, match=fr"format {major}\.{minor}; this reader supports 1\.x"):
        aqformat.open(path)


def test_major_is_checked_before_anything_else(tmp_path, sample):
    """A 2.x file may change everything after the version fields: none of it is interpreted."""
    data = bytearray(repreamble(sample[0], major=2))
    data[12:] = b"\xff" * (len(data) - 12)  # flags, offsets, CRCs, header: all garbage
    path = tmp_path / "major.aqm"
    path.write_bytes(bytes(data))
    with pytest.raises(AqmVersionError, match=r"format 2\.0; this reader supports 1\.x"):
        aqformat.open(path)
