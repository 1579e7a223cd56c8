"""Run .aqm models: ONNX Runtime sessions and PyTorch modules with lazily decoded weights.

``import aqformat.runtime`` imports neither torch nor onnx; ``InferenceSession``
needs onnxruntime (and ``onnx`` only to stream a graph in stages), ``load_torch``
needs torch.
"""
from __future__ import annotations

from typing import Any

from .cache import CacheStats, WeightCache
from .ort_session import InferenceSession, IOInfo


def load_torch(*args: Any, **kwargs: Any) -> Any:
    """Fill a torch module from an .aqm file; see :func:`aqformat.runtime.torch_loader.load_torch`."""
    from .torch_loader import load_torch as _load_torch
    return _load_torch(*args, **kwargs)


__all__ = ["CacheStats", "InferenceSession", "IOInfo", "WeightCache", "load_torch"]
