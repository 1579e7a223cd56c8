"""The writer enforces every limit its reader checks, before writing: no file it writes is refused.

A 1,500-character tensor name or a rank-9 tensor used to convert with exit
code 0, and then ``aqm verify`` said "invalid header". Each limit is now met
with an AqmInputError when the offending item is added (or, for the
converter, before any encoding), and the finished header is checked by the
reader's own parser before it is written.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import aqformat
from aqformat import AqmInputError, Writer
from aqformat.header import MAX_GRAPH_RATIO, MAX_NAME_BYTES, MAX_NDIM


def no_output(tmp_path) -> bool:
    return not [n for n in os.listdir(tmp_path) if n.endswith((".aqm", ".tmp"))]


@pytest.mark.parametrize("name", ["x" * 1500, "é" * (MAX_NAME_BYTES // 2 + 1)])
def test_long_names(tmp_path, name):
    with Writer(tmp_path / "a.aqm") as w:
        with pytest.raises(AqmInputError, match="at most 1024 bytes"):
            w.add_tensor(name, np.zeros(3, np.float32))
        with pytest.raises(AqmInputError, match="at most 1024 bytes"):
            w.add_codebooks(name, np.zeros((1, 2, 4), np.float16))
        w.add_tensor("ok", np.zeros(3, np.float32))
    aqformat.open(tmp_path / "a.aqm").verify()
    with pytest.raises(AqmInputError, match="at most 1024 bytes"):
        Writer(tmp_path / "b.aqm", producer=name)
    with Writer(tmp_path / "c.aqm") as w:
        with pytest.raises(AqmInputError, match="at most 1024 bytes"):
            w.set_graph(b"g", format=name)


def test_rank_above_eight(tmp_path):
    with Writer(tmp_path / "a.aqm") as w:
        with pytest.raises(AqmInputError, match=f"at most {MAX_NDIM}"):
            w.add_tensor("t", np.zeros((1,) * (MAX_NDIM + 1), np.float32))


@pytest.mark.parametrize("shape,match", [((65, 2, 4), "M must be"), ((1, 2, 257), "d must be"),
                                         ((1, 1 << 17, 1), "K must be")])
def test_codebook_geometry(tmp_path, shape, match):
    with Writer(tmp_path / "a.aqm") as w:
        with pytest.raises(AqmInputError, match=match):
            w.add_codebooks("g", np.zeros(shape, np.float16))


@pytest.mark.parametrize("key,value", [("x" * 1500, torch.zeros(4)), ("t", torch.zeros((1,) * 9))])
def test_converter_refuses_before_encoding(tmp_path, monkeypatch, key, value):
    from aqformat.converters import from_torch
    from aqformat.converters.grouping import GroupTrainer
    monkeypatch.setattr(GroupTrainer, "add", lambda *a, **k: pytest.fail("codebooks trained for a doomed file"))
    with pytest.raises(AqmInputError, match="at most"):
        from_torch({key: value, "w": torch.randn(64, 64)}, tmp_path / "o.aqm", progress=False)
    assert no_output(tmp_path)


def test_graph_that_compresses_beyond_what_a_reader_accepts_is_stored_raw(tmp_path):
    graph = b"\x08\x00" * (1 << 21)  # 4 MiB that zstd takes to a few hundred bytes
    with Writer(tmp_path / "g.aqm") as w:
        w.set_graph(graph)
    with aqformat.open(tmp_path / "g.aqm") as f:
        s = f.section(0)
        assert s.encoding == "raw" or s.size <= MAX_GRAPH_RATIO * s.length
        assert f.graph()[1] == graph


def test_finished_header_is_checked_by_the_reader(tmp_path, monkeypatch):
    """Whatever slips past the per-item checks is caught before the header is written."""
    from aqformat import header
    monkeypatch.setattr(header, "MAX_HEADER_CONTAINERS", 3)
    with pytest.raises(AqmInputError, match="would not be readable: more than 3 maps and arrays"):
        with Writer(tmp_path / "a.aqm") as w:
            for i in range(4):
                w.add_tensor(f"t{i}", np.zeros(2, np.float32))
    assert no_output(tmp_path)
