"""Decode budgets: a tensor (or graph) that needs more memory than the reader may spend is refused first.

Files of a few kilobytes used to expand to gigabytes (AQ at one bit per 256
weights, zstd-coded codebooks and lattice indices) or ask for 8 GiB and end in
a raw MemoryError. Every such tensor is refused, before anything is
allocated, with an error naming the tensor, its need and the budget; the rest
of the file stays readable; the budget is a per-file option and a process-wide
default a device application can change.
"""
from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import aqformat
import aqformat.cli
from aqformat import AqmBudgetError
from aqformat.bitpack import pack
from tests.craft import Blob, build, zstd_blob


def aq_bomb(rows: int, cols: int, d: int = 256) -> bytes:
    """An AQ tensor of ``rows x cols`` at one bit per ``d`` weights, its codes zstd-coded: a few KB."""
    n_codes = rows * (-(-cols // d))
    codes = pack(np.zeros(n_codes, np.uint8), 1)
    doc = {"codebooks": [{"name": "g", "M": 1, "K": 2, "d": d, "dtype": "float16", "section": 0}],
           "tensors": [{"name": "big", "shape": [rows, cols], "dtype": "float32", "codec": "aq", "group": 0,
                        "codes": 1},
                       {"name": "small", "shape": [4], "dtype": "float32", "codec": "raw", "data": 2}]}
    return build(doc, [Blob(np.ones((1, 2, d), np.float16).tobytes()), zstd_blob(codes),
                       Blob(np.arange(4, dtype=np.float32).tobytes())])


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_few_kilobytes_cannot_ask_for_gigabytes(tmp_path):
    path = tmp_path / "bomb.aqm"
    path.write_bytes(aq_bomb(1 << 15, 1 << 15))  # 4 GiB of float32 from ~2 KB
    assert path.stat().st_size < 8192
    before = peak_mib()
    t0 = time.perf_counter()
    with aqformat.open(path) as f:
        with pytest.raises(AqmBudgetError, match=r"tensor 'big' needs \d+ bytes to decode, more than the "
                                                 r"decode budget of 1073741824 bytes") as e:
            f.read("big")
        assert "\n" not in str(e.value)
        np.testing.assert_array_equal(f.read("small"), np.arange(4, dtype=np.float32))  # the rest still reads
        with pytest.raises(AqmBudgetError):
            f.verify()
    assert time.perf_counter() - t0 < 1.0 and peak_mib() - before < 32


def test_budget_per_file_and_per_process(tmp_path):
    path = tmp_path / "b.aqm"
    path.write_bytes(aq_bomb(64, 4096))  # 1 MiB of float32
    with aqformat.open(path, decode_budget=512 << 10) as f:
        assert f.decode_budget == 512 << 10
        with pytest.raises(AqmBudgetError, match="decode budget of 524288 bytes"):
            f.read("big")
        f.decode_budget = 16 << 20
        assert f.read("big").shape == (64, 4096)
    previous = aqformat.set_decode_budget(256 << 10)
    try:
        with aqformat.open(path) as f:
            with pytest.raises(AqmBudgetError, match="decode budget of 262144 bytes"):
                f.read("big")
    finally:
        assert aqformat.set_decode_budget(previous) == 256 << 10
    for bad in (0, -1, 1.5, "1GB", True):
        with pytest.raises(aqformat.AqmInputError, match="decode budget"):
            aqformat.set_decode_budget(bad)
        with pytest.raises(aqformat.AqmInputError, match="decode budget"):
            aqformat.open(path, decode_budget=bad)


@pytest.mark.parametrize("make", ["raw", "lattice", "codebook"])
def test_every_codec_is_budgeted(tmp_path, make):
    rows, cols = 1 << 12, 1 << 12  # 64 MiB as float32
    if make == "raw":
        doc = {"tensors": [{"name": "t", "shape": [rows, cols], "dtype": "float32", "codec": "raw", "data": 0}]}
        blobs = [zstd_blob(bytes(rows * cols * 4))]
    elif make == "lattice":
        doc = {"tensors": [{"name": "t", "shape": [rows, cols], "dtype": "float32", "codec": "lattice", "data": 0,
                            "index_dtype": "int8", "step": 1, "seed": 1}]}
        blobs = [zstd_blob(bytes(rows * cols)), Blob(np.ones(rows, np.float32).tobytes())]
    else:  # a 64 MiB codebook behind zstd, for a tiny tensor
        doc = {"codebooks": [{"name": "g", "M": 64, "K": 1 << 12, "d": 64, "dtype": "float32", "section": 0}],
               "tensors": [{"name": "t", "shape": [1, 64], "dtype": "float32", "codec": "aq", "group": 0,
                            "codes": 1}]}
        blobs = [zstd_blob(bytes(64 * (1 << 12) * 64 * 4)), Blob(bytes(64 * 12 // 8))]
    path = tmp_path / "t.aqm"
    path.write_bytes(build(doc, blobs))
    with aqformat.open(path, decode_budget=32 << 20) as f:
        with pytest.raises(AqmBudgetError, match="tensor 't' needs"):
            f.read("t")


def test_graph_is_budgeted(tmp_path):
    doc = {"tensors": [], "graph": {"format": "onnx", "section": 0}}
    path = tmp_path / "g.aqm"
    path.write_bytes(build(doc, [zstd_blob(b"\x08\x00" * (1 << 17))]))  # 256 KiB
    with aqformat.open(path, decode_budget=64 << 10) as f:
        with pytest.raises(AqmBudgetError, match="the graph needs"):
            f.graph()
    with aqformat.open(path) as f:
        assert len(f.graph()[1]) == 1 << 18


VERIFY = textwrap.dedent("""
    import resource, sys, aqformat
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with aqformat.open(sys.argv[1]) as f:
        f.verify()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
""")


def test_verify_holds_one_tensor_at_a_time(tmp_path):
    path = tmp_path / "many.aqm"
    with aqformat.Writer(path) as w:
        for i in range(24):
            w.add_tensor(f"t{i}", np.full((1024, 1024), i, np.float32))  # 4 MiB each, 96 MiB in all
    grown = int(subprocess.run([sys.executable, "-c", VERIFY, str(path)], capture_output=True, text=True,
                               check=True).stdout)
    assert grown < 40, f"verify grew RSS by {grown} MiB for a 96 MiB file of 4 MiB tensors"
    rc = aqformat.cli.main(["verify", "--decode-budget", "1MiB", str(path)])
    assert rc == 2


def test_shared_codebook_is_decoded_once(tmp_path, monkeypatch):
    """40 tensors of one group with a zstd-coded codebook used to decompress it 40 times."""
    M, K, d = 8, 1 << 12, 8
    doc = {"codebooks": [{"name": "g", "M": M, "K": K, "d": d, "dtype": "float16", "section": 0}],
           "tensors": [{"name": f"t{i}", "shape": [4, 8], "dtype": "float32", "codec": "aq", "group": 0,
                        "codes": 1} for i in range(40)]}
    path = tmp_path / "shared.aqm"
    path.write_bytes(build(doc, [zstd_blob(bytes(M * K * d * 2)), Blob(bytes(4 * M * 12 // 8))]))
    calls = []
    with aqformat.open(path) as f:
        real = f.section_bytes
        monkeypatch.setattr(f, "section_bytes", lambda i, *a: calls.append(i) or real(i, *a))
        for i in range(40):
            f.read(f"t{i}")
    assert calls.count(0) == 1


def test_info_is_linear_in_codebook_groups(tmp_path):
    """aqm-info took 8-11 s on 30,000 groups (quadratic); 4x the groups now take about 4x the time."""
    from aqformat.inspect import describe
    seconds = {}
    for n in (7_500, 30_000):
        doc = {"codebooks": [{"name": f"g{i}", "M": 1, "K": 2, "d": 1, "dtype": "float16", "section": 0}
                             for i in range(n)],
               "tensors": [{"name": f"t{i}", "shape": [1, 1], "dtype": "float32", "codec": "aq", "group": i,
                            "codes": 1} for i in range(n)]}
        path = tmp_path / f"groups{n}.aqm"
        path.write_bytes(build(doc, [Blob(bytes(4)), Blob(bytes(1))]))
        t0 = time.perf_counter()
        report = describe(path, check=False)
        seconds[n] = time.perf_counter() - t0
        assert report["codebook_groups"][-1]["tensors"] == [f"t{n - 1}"]
    assert seconds[30_000] < 10 * seconds[7_500], seconds  # quadratic would be 16x
