"""Hostile runtime arguments and file text: AqmErrors, not AttributeErrors; nothing reaches the terminal raw.

Wrong argument types given to ``InferenceSession.run`` and ``load_torch``
end in one-line AqmInputErrors; names chosen by a file's author (graph
outputs, tensor names in error messages) are printed with control
characters escaped; ``aqm info --json`` is valid JSON whatever floats the
metadata holds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import aqformat
from aqformat import AqmInputError
from aqformat.cli import main as aqm
from aqformat.runtime import InferenceSession, load_torch
from aqformat.onnx_stubs import AQM_LOCATION

ESC_NAME = "y\x1b[2J\x1b]0;owned\x07\r"


def mlp_file(path, output_name: str = "y"):
    """A one-MatMul model whose weight lives in the .aqm; its output has ``output_name``."""
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    stub = numpy_helper.from_array(w, "W")
    stub.ClearField("raw_data")
    stub.data_location = TensorProto.EXTERNAL
    stub.external_data.add(key="location", value=AQM_LOCATION)
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], [output_name])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [2, 4])], [stub]),
        opset_imports=[helper.make_opsetid("", 17)])
    with aqformat.Writer(path, metadata={"nan": float("nan"), "inf": [float("inf"), -float("inf")]}) as wr:
        wr.add_tensor("W", w)
        wr.set_graph(m.SerializeToString())
    return path


@pytest.mark.parametrize("feed", [[np.ones((2, 8), np.float32)], None, "x", 3])
def test_run_with_a_feed_that_is_not_a_dict(tmp_path, feed):
    sess = InferenceSession(mlp_file(tmp_path / "m.aqm"))
    with pytest.raises(AqmInputError, match="input_feed must be a dict"):
        sess.run(None, feed)


@pytest.mark.parametrize("names", ["y", 5, [5], (b"y",)])
def test_run_with_output_names_that_are_not_a_list_of_names(tmp_path, names):
    sess = InferenceSession(mlp_file(tmp_path / "m.aqm"))
    with pytest.raises(AqmInputError, match="output_names must be None or a list"):
        sess.run(names, {"x": np.ones((2, 8), np.float32)})


def test_session_options_of_the_wrong_type(tmp_path):
    with pytest.raises(AqmInputError, match="sess_options must be an onnxruntime.SessionOptions"):
        InferenceSession(mlp_file(tmp_path / "m.aqm"), "x")


def _saved(m: torch.nn.Module, path) -> str:
    """``m``'s state_dict written raw to ``path``."""
    with aqformat.Writer(path) as w:
        for k, v in m.state_dict().items():
            w.add_tensor(k, v.numpy())
    return path


def test_load_torch_arguments(tmp_path):
    m = torch.nn.Linear(4, 3)
    path = _saved(m, tmp_path / "t.aqm")
    with pytest.raises(AqmInputError, match="model must be a torch.nn.Module, got dict"):
        load_torch(path, model={})
    for device in ["bogus", 5.5, "cpu:x"]:
        with pytest.raises(AqmInputError, match="device .* is not usable here"):
            load_torch(path, model=torch.nn.Linear(4, 3), device=device)
    load_torch(path, model=m, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("resident", ["decoded", "compressed"])
def test_load_torch_on_cuda_without_cuda(tmp_path, resident):
    """torch built without CUDA raises a bare AssertionError; loading says what is wrong in one line."""
    path = _saved(torch.nn.Linear(64, 64), tmp_path / "t.aqm")
    with pytest.raises(AqmInputError, match="device 'cuda' is not usable here"):
        load_torch(path, model=torch.nn.Linear(64, 64), device="cuda", resident=resident)


def test_aqm_run_escapes_names_from_the_file(tmp_path, capsys):
    path = mlp_file(tmp_path / "m.aqm", ESC_NAME)
    assert aqm(["run", str(path), "--random-input"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out


def test_error_messages_are_escaped(tmp_path, capsys):
    """A one-line error quotes paths and names, which may hold ESC sequences."""
    for args in (["info", str(tmp_path / "missing\x1b[31m.aqm")], ["verify", str(tmp_path / "x\x1b]0;t\x07.aqm")]):
        assert aqm(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("aqm: error: ") and "\x1b" not in err and "\\x1b" in err


def test_info_json_is_valid_json_with_nan_and_infinity(tmp_path, capsys):
    path = mlp_file(tmp_path / "m.aqm")
    assert aqm(["info", "--json", str(path)]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["metadata"] == {"nan": "NaN", "inf": ["Infinity", "-Infinity"]}
