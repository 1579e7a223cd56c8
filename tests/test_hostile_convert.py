"""Hostile converter inputs: every one ends in an AqmError before anything is written, and the input survives.

Covers converting a file onto itself (same path, another spelling, a hard
link), checkpoints with non-string keys or meta tensors, JSON bombs in
safetensors headers and config.json, numbers that are not numbers (1e400,
nan, inf), external-data fields that are not byte counts, an output
directory that does not exist (found before any encoding), and the weight
SQNR of tiny weights.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import aqformat
from aqformat import AqmError, AqmInputError
from aqformat.cli import main as aqm
from aqformat.converters import convert, from_onnx, from_torch
from aqformat.converters.pipeline import sqnr_db
from aqformat.units import parse_size


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(64, 64, generator=g), "fc.bias": torch.randn(64, generator=g)}


def cli(args: list[str], capsys) -> tuple[int, str]:
    rc = aqm(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("aqm: warning:")]
    assert "Traceback" not in err and len(errors) <= 1, err
    return rc, "\n".join(errors)


# -- class 6: the output is the input -----------------------------------------------------

def _spellings(tmp_path, name: str) -> list[str]:
    os.link(tmp_path / name, tmp_path / "hardlink.bin")
    os.symlink(tmp_path / name, tmp_path / "symlink.bin")
    return [str(tmp_path / name), str(tmp_path / "sub" / ".." / name), os.path.relpath(tmp_path / name),
            str(tmp_path / "hardlink.bin"), str(tmp_path / "symlink.bin")]


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_convert_onto_the_input_is_refused_and_the_input_survives(tmp_path, capsys, ext):
    from safetensors.torch import save_file
    src = tmp_path / f"model{ext}"
    (torch.save if ext == ".pt" else lambda sd, p: save_file(sd, p))(small_state(), src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    for out in _spellings(tmp_path, src.name):
        rc, err = cli(["convert", str(src), "-o", out, "--force", "--keep", "*", "--no-progress"], capsys)
        assert rc == 2 and "is the input file" in err, (out, err)
        assert src.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_convert_onto_a_file_of_the_input_folder_or_external_data(tmp_path, capsys):
    from safetensors.torch import save_file
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "x"}))
    save_file(small_state(), folder / "model.safetensors")
    with pytest.raises(AqmInputError, match="is the input file"):
        convert(str(folder), folder / "model.safetensors", keep=["*"], progress=False)
    with pytest.raises(AqmInputError, match="is the input file"):
        convert(str(folder), folder / "config.json", keep=["*"], progress=False)


def test_onnx_convert_and_export_onto_their_inputs(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from aqformat.converters.onnx_graph import export_onnx
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w]))
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    before = (tmp_path / "m.data").read_bytes()
    for out in ("m.onnx", "m.data"):
        with pytest.raises(AqmInputError, match="is the input file"):
            from_onnx(str(tmp_path / "m.onnx"), tmp_path / out, keep=["*"], progress=False)
    assert (tmp_path / "m.data").read_bytes() == before
    from_onnx(str(tmp_path / "m.onnx"), tmp_path / "m.aqm", keep=["*"], progress=False)
    with pytest.raises(AqmInputError, match="is the input file"):
        export_onnx(tmp_path / "m.aqm", tmp_path / "m.aqm")
    aqformat.open(tmp_path / "m.aqm").verify()


# -- class 8: raw exceptions from converter inputs ----------------------------------------

@pytest.mark.parametrize("key", [3, ("a", 1), 2.5, None])
def test_state_dict_keys_that_are_not_strings(tmp_path, key):
    with pytest.raises(AqmInputError, match="is a .*, not a string"):
        from_torch({key: torch.ones(4), "b": torch.ones(4)}, tmp_path / "o.aqm", progress=False)


def test_meta_tensors(tmp_path):
    with pytest.raises(AqmInputError, match="meta device"):
        from_torch({"w": torch.empty(64, 64, device="meta")}, tmp_path / "o.aqm", progress=False)
    with torch.device("meta"):
        module = torch.nn.Linear(64, 64)
    with pytest.raises(AqmInputError, match="meta device"):
        from_torch(module, tmp_path / "o.aqm", progress=False)


def _safetensors(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return str(path)


@pytest.mark.parametrize("header,match", [
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nests too deeply"),
    (b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', "invalid or unsupported entry"),
    (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "invalid or unsupported entry"),
    (b'{"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', "invalid or unsupported entry"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4e400]}}', "invalid or unsupported entry"),
    (b'{"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "invalid or unsupported entry"),
    (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "invalid or unsupported entry"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "key 'w' appears twice"),
])
def test_safetensors_headers(tmp_path, header, match):
    path = _safetensors(tmp_path / "m.safetensors", header, b"\0" * 16)
    with pytest.raises(AqmInputError, match=match) as e:
        convert(path, tmp_path / "o.aqm", keep=["*"], progress=False)
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("config,match", [
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nests too deeply"),
    ('{"model_type": "a", "model_type": "b"}', "appears twice"),
    ("[1, 2]", "not a JSON object"),
])
def test_config_json(tmp_path, config, match):
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(config)
    save_file(small_state(), tmp_path / "model.safetensors")
    with pytest.raises(AqmInputError, match=match):
        convert(str(tmp_path), tmp_path / "o.aqm", keep=["*"], progress=False)


@pytest.mark.parametrize("field,value", [("offset", "abc"), ("offset", "-4"), ("length", "1e400"),
                                         ("offset", "9" * 40), ("length", "٣")])
def test_onnx_external_data_fields_that_are_not_byte_counts(tmp_path, field, value):
    import onnx
    from onnx import TensorProto, helper
    t = onnx.TensorProto(name="W", data_type=1, dims=[64, 64], data_location=1)
    for k, v in {"location": "w.bin", field: value}.items():
        t.external_data.add(key=k, value=v)
    (tmp_path / "w.bin").write_bytes(b"\0" * 64 * 64 * 4)
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [t]))
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(AqmError, match="not a byte count|invalid ONNX model"):
        from_onnx(str(tmp_path / "m.onnx"), tmp_path / "o.aqm", progress=False)


@pytest.mark.parametrize("flag,value", [("--bits", "nan"), ("--bits", "inf"), ("--bits", "1e300"), ("--bits", "-1"),
                                        ("--target-size", "nan"), ("--target-size", "inf"),
                                        ("--target-size", "1e300"), ("--target-size", "-5MB")])
def test_numbers_that_are_not_sizes(tmp_path, capsys, flag, value):
    torch.save(small_state(), tmp_path / "m.pt")
    rc, err = cli(["convert", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.aqm"), f"{flag}={value}",
                   "--no-progress"], capsys)
    assert rc == 2 and ("bits must be" in err or "size must be" in err), err
    assert not (tmp_path / "o.aqm").exists()


def test_parse_size_types():
    assert parse_size("1.5KiB") == 1536 and parse_size(7) == 7
    for bad in (0, -3, True, None, "nan", "-inf", "1e999GB"):
        with pytest.raises(AqmInputError):
            parse_size(bad)


def test_memory_error_becomes_an_aqm_error(tmp_path, monkeypatch):
    from aqformat.converters import sources

    def exhausted(*_a, **_k):
        raise MemoryError()
    monkeypatch.setattr(sources, "_torch_to_numpy", exhausted)
    with pytest.raises(AqmInputError, match="out of memory while converting"):
        from_torch(small_state(), tmp_path / "o.aqm", keep=["*"], progress=False)
    assert os.listdir(tmp_path) == []


# -- class 10: the output directory, and SQNR of tiny weights ------------------------------

def test_missing_output_directory_is_found_before_encoding(tmp_path, monkeypatch):
    from aqformat.converters.grouping import GroupTrainer
    called = []
    monkeypatch.setattr(GroupTrainer, "add", lambda *a, **k: called.append(1))
    with pytest.raises(AqmInputError, match="output directory .* does not exist"):
        from_torch(small_state(), tmp_path / "no" / "o.aqm", progress=False)
    assert not called  # codebooks are not trained for an output that cannot be written


def test_sqnr_of_tiny_weights_is_not_infinite():
    w = np.full((64, 64), 1e-30, np.float32)
    assert sqnr_db(w, np.zeros_like(w)) == pytest.approx(0.0, abs=1e-6)
    assert sqnr_db(w, w * np.float32(1.01)) == pytest.approx(40.0, abs=0.1)
    assert sqnr_db(w, w.copy()) == float("inf")
    assert sqnr_db(np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32)) == float("-inf")
