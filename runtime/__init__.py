"""Run .aqm models: ONNX Runtime sessions and PyTorch modules with lazily decoded weights.

``import aqformat.runtime`` imports neither torch nor onnx; ``InferenceSession``
needs onnxruntime (and ``onnx`` only to stream a graph in stages), ``load_torch``
needs torch.
"""
from __future__ import annotations

from typing import Any

from .cache import CacheStats, WeightCache
from .ort_session import InferenceSession, IOInfo


def __getattr__(name: str) -> Any:
    # load_torch is the real function (help() shows its signature); torch is imported when it is first asked for
    if name == "load_torch":
        from .torch_loader import load_torch
        return load_torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CacheStats", "InferenceSession", "IOInfo", "WeightCache", "load_torch"]
