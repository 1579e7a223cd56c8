"""The codec registry: a codec is added in one place, and only the registry names codecs."""
from __future__ import annotations

import ast
import json
import pathlib

import numpy as np
import pytest

import aqformat
from aqformat import codecs
from aqformat.cli import main as aqm_main
from aqformat.codecs import Codec
from aqformat.inspect import describe

ROOT = pathlib.Path(__file__).resolve().parent.parent
HALF = "half-test"


# -- a toy codec, declared entirely here: float32 weights stored as float16 --------------------
def _parse(fields):
    return {"data": fields.section("data")}


def _sizes(t, groups):
    return {"data": t.numel * 2}


def _decode(t, f):
    return f.section_array(t.fields["data"], "<f2", t.shape).astype(np.float32)


def encode_half(w: np.ndarray) -> dict:
    """The toy codec's encoder: the record fields ``Writer.add_encoded`` stores."""
    return {"data": np.asarray(w, np.float32).astype("<f2")}


@pytest.fixture
def half():
    codec = codecs.register(Codec(HALF, _parse, _sizes, _decode))
    yield codec
    codecs.unregister(HALF)


def test_a_registered_codec_is_written_read_listed_and_verified(tmp_path, half, capsys):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    path = tmp_path / "half.aqm"
    with aqformat.Writer(path) as out:
        out.add_encoded("w", HALF, w.shape, encode_half(w))
        out.add_tensor("b", np.ones(32, np.float32))
    expected = w.astype(np.float16).astype(np.float32)
    with aqformat.open(path) as f:
        np.testing.assert_array_equal(f.read("w"), expected)
        info = f.info("w")
        assert info.codec == HALF and info.stored_bytes == w.size * 2 and info.bits_per_weight == 16.0
        f.verify()
    report = describe(path)
    assert report["integrity"] == "ok"
    assert [(t["name"], t["codec"], t["bits_per_weight"]) for t in report["tensors"]] == [
        ("w", HALF, 16.0), ("b", "raw", 32.0)]
    assert aqm_main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"][0]["codec"] == HALF
    torch = pytest.importorskip("torch")
    from aqformat.runtime.torch_decode import decode_tensor
    with aqformat.open(path) as f:
        assert torch.equal(decode_tensor(f, "w"), torch.from_numpy(expected))
    # Without the codec the file still opens and lists; only reading its tensor fails.
    codecs.unregister(HALF)
    with aqformat.open(path) as f:
        assert f.info("w").codec == HALF and f.read("b").shape == (32,)
        with pytest.raises(aqformat.AqmUnsupportedError, match=f"codec {HALF!r}"):
            f.read("w")


def test_the_writer_checks_a_record_by_its_codec(tmp_path, half):
    with aqformat.Writer(tmp_path / "x.aqm") as out:
        with pytest.raises(aqformat.AqmInputError, match="section 'data' must hold 24 bytes, got 12"):
            out.add_encoded("w", HALF, (3, 4), {"data": np.zeros(12, np.uint8)})
        with pytest.raises(aqformat.AqmInputError, match="lacks required field 'data'"):
            out.add_encoded("w", HALF, (3, 4), {})
        with pytest.raises(aqformat.AqmInputError, match="non-float dtype int32"):
            out.add_encoded("w", HALF, (3, 4), encode_half(np.zeros((3, 4))), dtype="int32")
        with pytest.raises(aqformat.AqmInputError, match="unknown codec 'nope'"):
            out.add_encoded("w", "nope", (3, 4), {})
        out.add_encoded("w", HALF, (3, 4), encode_half(np.zeros((3, 4))))  # the name was not taken
    assert aqformat.open(tmp_path / "x.aqm").names() == ["w"]


def _codec_name_uses(path: pathlib.Path, names: set[str]) -> list[str]:
    """Places in ``path`` that name a codec: ``x.codec == "..."``-style tests, or the literal
    name of a codec no other concept shares (``"raw"`` is also a section encoding)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            codec_side = any(isinstance(s, ast.Attribute) and s.attr == "codec"
                             or isinstance(s, ast.Subscript) and getattr(s.slice, "value", None) == "codec"
                             for s in sides)
            literal = any(isinstance(s, (ast.Constant, ast.Tuple, ast.List, ast.Set)) for s in sides)
            if codec_side and literal:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares a codec name")
        elif isinstance(node, ast.Constant) and node.value in names:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    return found


def test_only_the_registry_and_the_encoders_name_codecs():
    """Header, reader, writer, aqm-info, the runtimes and the pipeline dispatch through the registry."""
    builtin = set(codecs.names()) - {"raw"}
    assert builtin == {"aq", "lattice", "affine", "half", "uniform"}
    encoders = {ROOT / "converters" / "aq_encode.py", ROOT / "converters" / "lattice.py", ROOT / "converters" / "affine.py"}
    assert all(p.exists() for p in encoders)  # the exemptions follow the encoders when they move
    files = [p for d in ("aqformat", "runtime", "converters") for p in sorted((ROOT / d).rglob("*.py"))
             if (ROOT / "aqformat" / "codecs") not in p.parents]
    uses = [u for p in files for u in _codec_name_uses(p, set() if p in encoders else builtin)]
    assert uses == []


def test_every_builtin_codec_is_registered_once_with_its_module():
    for name in codecs.names():
        codec = codecs.get(name)
        assert codec.name == name and callable(codec.parse) and callable(codec.sizes) and callable(codec.decode)
    with pytest.raises(ValueError, match="already registered"):
        codecs.register(Codec("aq", _parse, _sizes, _decode))


@pytest.mark.parametrize("shape,axes,permute", [((24, 40), None, False), ((300,), None, False),
                                                ((6, 4, 5, 3), (1, 0, 2, 3), True), ((33, 17), (1, 0), True)])
def test_predicted_aq_bytes_are_the_bytes_on_disk(tmp_path, shape, axes, permute):
    """The allocator's, the encoder's and the codec's byte counts are the file's."""
    torch = pytest.importorskip("torch")
    from aqformat.codecs import aq
    from aqformat.converters.allocate import aq_tensor_bytes
    from aqformat.converters.aq_encode import aq_eligible, encode_tensor
    from aqformat.converters.options import AQConfig
    from aqformat.layout import matrix_shape

    cfg = AQConfig(M=2, b=4, d=4, beam=2)
    assert aq_eligible(shape, cfg, axes)
    rng = np.random.default_rng(0)
    W = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    C = torch.from_numpy(rng.standard_normal((cfg.M, cfg.K, cfg.d)).astype(np.float16).astype(np.float32))
    cols = matrix_shape(shape, axes)[1]
    t = encode_tensor("w", W, C, cfg, axes=axes, perm=rng.permutation(cols) if permute else None, device="cpu")
    path = tmp_path / "w.aqm"
    with aqformat.Writer(path) as w:
        w.add_codebooks("g", C.numpy())
        w.add_aq("w", shape, t.codes, group="g", scale=t.scale, perm=t.perm, axes=axes)
    with aqformat.open(path) as f:
        on_disk = f.info("w").stored_bytes
        assert on_disk == sum(f.section(i).length for i in f.tensor_sections("w"))
    assert on_disk == t.nbytes() == aq_tensor_bytes(shape, cfg, axes, permute)
    assert on_disk == aq.stored_bytes(shape, axes, M=cfg.M, bits=cfg.b, d=cfg.d, perm=permute)


def test_predicted_section_sizes_are_the_sizes_in_the_file(tmp_path):
    """Every codec's ``sizes`` is what the writer stores, raw and lattice included."""
    from aqformat.codecs import lattice, raw
    rng = np.random.default_rng(1)
    path = tmp_path / "m.aqm"
    with aqformat.Writer(path) as w:
        w.add_tensor("r", rng.standard_normal((7, 5)).astype(np.float16))
        w.add_tensor("b", rng.integers(0, 2**16, 9).astype(np.uint16), dtype="bfloat16")
        w.add_lattice("l", (6, 10), rng.integers(-300, 300, (10, 6)), np.full(10, 0.1), seed=3, axes=(1, 0))
    with aqformat.open(path) as f:
        for name, codec in (("r", raw), ("b", raw), ("l", lattice)):
            rec = f.record(name)
            want = codec.sizes(rec, f.codebook_groups)
            assert {k: f.section(rec.fields[k]).size for k in want} == want, name
