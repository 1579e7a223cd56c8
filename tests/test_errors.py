"""One error hierarchy: every class lives in aqformat/errors.py, and one fault is one class everywhere."""
import ast
import inspect
import pathlib

import numpy as np
import pytest

import aqformat
from aqformat import errors

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = [p for d in ("aqformat", "runtime", "converters") for p in (ROOT / d).rglob("*.py")]


def test_every_error_class_is_in_errors_and_exported():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert {c.__name__ for c in classes} == set(errors.__all__)
    for c in classes:
        assert getattr(aqformat, c.__name__) is c
        assert issubclass(c, aqformat.AqmError) or c is aqformat.AqmWarning


def test_no_exception_class_is_defined_outside_errors():
    stray = []
    for path in LIBRARY:
        if path.name == "errors.py" and path.parent.name == "aqformat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception", "Warning")) or b.id in errors.__all__)
                    for b in node.bases):
                stray.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert stray == []


def _aqm_with_graph(path, graph: bytes) -> str:
    with aqformat.Writer(path) as w:
        w.add_tensor("w", np.ones((4, 4), np.float32))
        w.set_graph(graph)
    return str(path)


@pytest.mark.parametrize("graph", [b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0a\x05ab"])
def test_a_stored_graph_that_does_not_parse_is_a_format_error_everywhere(tmp_path, graph):
    pytest.importorskip("onnxruntime")
    from aqformat.converters.onnx_graph import export_onnx
    from aqformat.runtime import InferenceSession

    path = _aqm_with_graph(tmp_path / "m.aqm", graph)
    with pytest.raises(aqformat.AqmFormatError, match="stored ONNX graph"):
        InferenceSession(path)
    with pytest.raises(aqformat.AqmFormatError, match="stored ONNX graph"):
        export_onnx(path, tmp_path / "m.onnx")
