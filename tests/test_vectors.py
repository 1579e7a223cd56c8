"""The frozen v1 test vectors decode exactly as recorded, in this and every later version."""
import hashlib
import json
import os

import numpy as np
import pytest

import aqformat
from tests.spec_reference import decode_file

VEC = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors")
MANIFEST = json.load(open(os.path.join(VEC, "MANIFEST.json")))


def test_manifest_covers_at_least_eight_files():
    assert len(MANIFEST) >= 8
    codecs = set()
    for name in MANIFEST:
        with aqformat.open(os.path.join(VEC, f"{name}.aqm")) as f:
            codecs |= {t.codec for t in f.tensors()}
    assert codecs == {"raw", "aq", "lattice", "affine", "half", "uniform"}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_vector_decodes_to_recorded_digests(name):
    path = os.path.join(VEC, f"{name}.aqm")
    entry = MANIFEST[name]
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == entry["file_sha256"], "frozen file changed"
    with aqformat.open(path) as f:
        f.verify()
        assert sorted(f.names()) == sorted(entry["tensors"])
        for tname, rec in entry["tensors"].items():
            a = np.ascontiguousarray(f.read(tname))
            assert list(a.shape) == rec["shape"]
            assert hashlib.sha256(a.tobytes()).hexdigest() == rec["sha256"], tname


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_vector_matches_independent_spec_decoder(name):
    path = os.path.join(VEC, f"{name}.aqm")
    ref = decode_file(path)
    with aqformat.open(path) as f:
        assert sorted(ref) == sorted(f.names())
        for tname, expected in ref.items():
            np.testing.assert_array_equal(f.read(tname), expected, err_msg=tname)


def test_vectors_say_the_lowest_minor_version_that_describes_them():
    """A file is written with the lowest minor version describing its codecs and section encodings
    (spec, "Version rules"): affine needs 1.1, rans sections 1.2, half 1.3, uniform 1.4, rans-context
    sections 1.5, the rest 1.0."""
    minor = {"affine": 1, "lattice_rans": 2, "half": 3, "uniform": 4, "rans_context": 5}
    for name in MANIFEST:
        with open(os.path.join(VEC, f"{name}.aqm"), "rb") as fh:
            assert fh.read(12)[8:12] == bytes([1, 0, minor.get(name, 0), 0]), name


def test_rans_vector_covers_its_encoding():
    """Every lattice tensor of lattice_rans.aqm is rans-coded, with one and several tables, escapes,
    a direct range, several lanes and every width."""
    seen = set()
    with aqformat.open(os.path.join(VEC, "lattice_rans.aqm")) as f:
        for t in f.tensors():
            sec, stored = f.stored_section(f.record(t.name).fields["data"])
            assert sec.encoding == "rans", t.name
            width, e, tables = stored[0], stored[1], stored[2]
            lanes, extra = (int(x) for x in stored[8:20].view("<u4")[[0, 2]])
            seen |= {f"w{width}", "several tables" if tables > 1 else "one table", "escapes" if extra else "",
                     "direct" if e else "", "lanes" if lanes > 1 else ""}
    assert seen >= {"w1", "w2", "w4", "several tables", "one table", "escapes", "direct", "lanes"}


def test_rans_context_vector_covers_its_encoding():
    """Every tensor of rans_context.aqm is rans-context-coded, with every width, escapes, a direct
    range and several lanes."""
    seen = set()
    with aqformat.open(os.path.join(VEC, "rans_context.aqm")) as f:
        for t in f.tensors():
            sec, stored = f.stored_section(f.record(t.name).fields["data"])
            assert sec.encoding == "rans-context" and stored[3] == 1, t.name
            width, e = stored[0], stored[1]
            lanes, extra = (int(x) for x in stored[8:20].view("<u4")[[0, 2]])
            seen |= {f"w{width}", "escapes" if extra else "", "direct" if e else "", "lanes" if lanes > 1 else ""}
    assert seen >= {"w1", "w2", "w4", "escapes", "direct", "lanes"}


def test_code_widths_covered():
    widths = set()
    for name in MANIFEST:
        with aqformat.open(os.path.join(VEC, f"{name}.aqm")) as f:
            widths |= {g.bits for g in f.codebook_groups}
    assert {1, 3, 7, 8, 12, 16} <= widths
