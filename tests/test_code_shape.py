"""Shape of the library code: short functions with few positional parameters.

Limits: no function body over 60 lines (its docstring not counted) and no
function with more than 8 parameters other than keyword-only ones (``self``
and ``cls`` not counted). Private functions (a name starting with ``_``) pass
settings as typed options, so for them keyword-only parameters count too;
public functions keep readable keyword arguments. A Triton kernel
(``@triton.jit``) is exempt from the parameter count: its parameters are its
launch signature (pointers, sizes, compile-time constants), which a kernel
cannot take grouped in an object.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aqformat", "runtime", "converters")
MAX_LINES = 60
MAX_PARAMS = 8


def _functions(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = fn.body[0]
    doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
           and isinstance(first.value.value, str))
    start = fn.body[1].lineno if doc and len(fn.body) > 1 else first.lineno
    return fn.end_lineno - start + 1


def _kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(ast.unparse(d) == "triton.jit" for d in fn.decorator_list)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int]:
    """``(positional, keyword-only)`` parameter counts, ``self``/``cls`` and ``*args``/``**kw`` included."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    if positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + (a.vararg is not None) + (a.kwarg is not None), len(a.kwonlyargs)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_long_functions(package):
    long = [f"{where} ({_body_lines(fn)} lines)" for where, fn in _functions(package)
            if _body_lines(fn) > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_long_parameter_lists(package):
    wide = []
    for where, fn in _functions(package):
        positional, keyword_only = _params(fn)
        counted = positional + keyword_only if fn.name.startswith("_") else positional
        if counted > MAX_PARAMS and not _kernel(fn):
            wide.append(f"{where} ({positional} positional, {keyword_only} keyword-only)")
    assert not wide, f"functions over {MAX_PARAMS} parameters: {wide}"


def test_the_checks_see_long_and_wide_functions():
    src = ("def f(a, b, c, d, e, f, g, h, i):\n    '''doc'''\n" + "    x = 1\n" * 61
           + "def _g(a, *, b, c, d, e, f, g, h, i):\n    pass\n")
    fns = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)]
    assert [_body_lines(fn) for fn in fns] == [61, 1]
    assert [_params(fn) for fn in fns] == [(9, 0), (1, 8)]
    kernel = ast.parse("@triton.jit\ndef k(a, b, c, d, e, f, g, h, i):\n    pass\n").body[0]
    assert _kernel(kernel) and not any(_kernel(fn) for fn in fns)
