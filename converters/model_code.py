"""Model code for weights-only sources: ``--model module:Callable``.

A ``.pt`` or ``.safetensors`` state_dict holds tensors but no architecture, so
calibration, sensitivity-weighted allocation and fine-tuning have nothing to
run. :func:`attach_model` builds the user's module (``Callable()`` with no
arguments: a class or a factory), checks that it takes the checkpoint's
tensors exactly (names, shapes), loads them into it and hands it to the
source, before any encoding starts.

TorchScript and ``torch.export`` files are not accepted as model code: the
calibration statistics come from forward hooks on ``nn.Linear``/``nn.Conv2d``
submodules, which neither kind exposes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from aqformat.errors import AqmInputError

from .sources import Source, to_float32

__all__ = ["resolve_model_code", "attach_model"]

_SHOWN = 3  # names listed in a mismatch message


def resolve_model_code(spec: str | Callable[[], Any]) -> Callable[[], Any]:
    """The callable ``spec`` names: ``"package.module:Name"``, ``"path/to/file.py:Name"``
    (``Name`` may be dotted, e.g. ``Class.factory``), or a callable itself.

    A dotted module is searched on ``sys.path`` and then in the current
    directory, as ``python -m`` would find it.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise AqmInputError(f"--model {spec!r}: expected module:Callable (e.g. mypkg.models:Net "
                            "or path/to/model.py:Net)")
    where, attr = spec.split(":")
    module = _import(where, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AqmInputError(f"--model {spec}: {where} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AqmInputError(f"--model {spec}: {attr} is a {type(obj).__name__}, not a class or function")
    return obj


def _import(where: str, spec: str) -> Any:
    """The module named by a dotted name or a ``.py`` path; any failure is a one-line error."""
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise AqmInputError(f"--model {spec}: no such file {where}")
            name = "_aqm_model_" + os.path.splitext(os.path.basename(where))[0]
            loader_spec = importlib.util.spec_from_file_location(name, where)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
        try:
            return importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name != where.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())  # searched last: the current directory never shadows a package
            return importlib.import_module(where)
    except AqmInputError:
        raise
    except Exception as e:  # noqa: BLE001 - user code raises anything while importing
        raise AqmInputError(f"--model {spec}: cannot import {where} ({type(e).__name__}: "
                            f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"


def attach_model(source: Source, spec: str | Callable[[], Any]) -> Source:
    """Build the module ``spec`` names, load ``source``'s tensors into it and set ``source.module``.

    Raises
    ------
    AqmInputError
        The code cannot be imported or called, does not build an ``nn.Module``,
        or its ``state_dict`` differs from the checkpoint's names or shapes.
    """
    import torch
    if source.framework != "pytorch":
        raise AqmInputError("--model supplies code for .pt/.safetensors state_dicts; "
                            "an ONNX model carries its own graph")
    if source.module is not None:
        raise AqmInputError("--model was given with an nn.Module source, which has its code already")
    factory = resolve_model_code(spec)
    label = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 - user code raises anything
        raise AqmInputError(f"--model {label}: calling it failed ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(module, torch.nn.Module):
        raise AqmInputError(f"--model {label} returned a {type(module).__name__}, not a torch.nn.Module")
    _check_matches(module, source, label)
    dtypes = {s.name: s.dtype for s in source.specs}
    with torch.no_grad():  # one tensor at a time: memory grows by the model, not twice the model
        for name, t in module.state_dict().items():
            t.copy_(torch.from_numpy(_as_module_dtype(source.load(name), dtypes[name])))
    source.module = module.eval()
    return source


def _as_module_dtype(arr: Any, dtype: str) -> Any:
    """A checkpoint tensor as torch can take it (bfloat16 bits decoded to float32; the module casts)."""
    return to_float32(arr, dtype) if dtype == "bfloat16" else arr.copy()


def _check_matches(module: Any, source: Source, label: str) -> None:
    """Refuse a module whose state_dict names or shapes differ from the checkpoint's."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {s.name: s.shape for s in source.specs}
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and expected[k] != given[k]]
    if missing:
        problems.append(f"{len(missing)} missing from the checkpoint ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model ({_names(unexpected)})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of another shape ({k}: checkpoint {list(given[k])}, "
                        f"model {list(expected[k])})")
    if problems:
        raise AqmInputError(f"--model {label} does not accept the checkpoint: tensors "
                            + "; ".join(problems))


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")
