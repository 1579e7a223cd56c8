"""Single-bit corruption: every flip is detected or provably harmless.

Every bit of a small file holding raw, zstd, AQ (codes, scale, perm),
lattice, codebook and graph sections is flipped in turn. A flip counts as
detected when opening raises, or ``verify()`` raises, naming what failed. A
flip that is not detected must be harmless: every tensor, the graph and all
header information decode exactly as from the original file.

Decision on padding: the zero bytes between sections (and between the last
section and the header) are the only bytes no checksum covers. The spec says
readers must not interpret them, so ``verify()`` does not check them; no
decoded value depends on them, which this test proves flip by flip.
"""
import collections

import msgpack
import numpy as np
import pytest

import aqformat
from aqformat.header import PREAMBLE_SIZE
from tests.craft import split, write_sample


def sections(data: bytes) -> list[dict]:
    hoff = int.from_bytes(data[16:24], "little")
    return msgpack.unpackb(data[hoff:], raw=False)["sections"]


def snapshot(f: aqformat.AqmFile) -> tuple:
    """Everything a user can get out of a file, in comparable form."""
    arrays = tuple((n, f.read(n).tobytes(), f.read(n).dtype.str, f.read(n).shape) for n in f.names())
    return (arrays, f.graph(), f.tensors(), f.codebook_groups, f.metadata, f.source, f.producer, f.version)


def covered_regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges protected by a CRC: preamble, each section, header."""
    hoff = int.from_bytes(data[16:24], "little")
    return [(0, PREAMBLE_SIZE), (hoff, len(data))] + [(e["offset"], e["offset"] + e["length"])
                                                      for e in sections(data)]


def flip_all(tmp_path, data: bytes, positions) -> collections.Counter:
    path = tmp_path / "flip.aqm"
    path.write_bytes(data)
    with aqformat.open(path) as f:
        expected = snapshot(f)
    covered = covered_regions(data)
    counts: collections.Counter[str] = collections.Counter()
    for bit in positions:
        buf = bytearray(data)
        buf[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(buf)
        try:
            with aqformat.open(path) as f:
                try:
                    f.verify()
                except (aqformat.AqmIntegrityError, aqformat.AqmFormatError) as e:
                    assert "\n" not in str(e)
                    counts["detected by verify"] += 1
                    continue
                got = snapshot(f)
        except aqformat.AqmError as e:
            assert "\n" not in str(e)
            counts["detected by open"] += 1
            continue
        in_crc = any(a <= bit // 8 < b for a, b in covered)
        if got != expected:
            counts["UNDETECTED HARMFUL"] += 1
        elif in_crc:
            counts["undetected in checksummed bytes"] += 1
        else:
            counts["harmless (padding)"] += 1
    return counts


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("flip") / "sample.aqm"
    write_sample(path)
    return path.read_bytes()


def test_every_section_kind_is_in_the_sample(sample):
    doc, blobs = split(sample)
    assert {b.encoding for b in blobs} == {"raw", "zstd"}
    assert {t["codec"] for t in doc["tensors"]} == {"raw", "aq", "lattice"}
    assert doc["codebooks"] and doc["graph"] and any("perm" in t and "scale" in t for t in doc["tensors"])


def check_counts(counts: collections.Counter, n: int, size: int) -> None:
    print(f"{n} flips of a {size}-byte file: {dict(counts)}")
    assert counts["UNDETECTED HARMFUL"] == 0
    assert counts["undetected in checksummed bytes"] == 0
    assert counts["detected by open"] + counts["detected by verify"] > 0.8 * n


def test_one_bit_of_every_byte_flipped_is_detected_or_harmless(tmp_path, sample):
    bits = [8 * i + (i * 3) % 8 for i in range(len(sample))]  # a different bit position in each byte
    check_counts(flip_all(tmp_path, sample, bits), len(bits), len(sample))


@pytest.mark.slow
def test_every_single_bit_flip_is_detected_or_harmless(tmp_path, sample):
    check_counts(flip_all(tmp_path, sample, range(len(sample) * 8)), len(sample) * 8, len(sample))


def test_flipped_tensor_is_named_on_read(tmp_path, sample):
    """Without verify(), reading the damaged tensor raises and names it; others still read."""
    doc, _ = split(sample)
    fc = next(t for t in doc["tensors"] if t["name"] == "fc")
    offset = sections(sample)[fc["scale"]]["offset"]
    buf = bytearray(sample)
    buf[offset] ^= 0x10
    path = tmp_path / "x.aqm"
    path.write_bytes(buf)
    with aqformat.open(path) as f:
        with pytest.raises(aqformat.AqmIntegrityError, match="tensor 'fc': section .* checksum mismatch"):
            f.read("fc")
        assert np.isfinite(f.read("w")).all()

