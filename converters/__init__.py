"""Convert PyTorch and ONNX models to .aqm, quantize, and fine-tune.

Needs ``aqformat[all]`` (torch; onnx for ONNX sources). Attributes are
imported on first use, so ``aqm`` subcommands that do not convert never
import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "convert": "api", "from_torch": "api", "from_onnx": "api", "from_torch_via_onnx": "api",
    "ConversionSummary": "pipeline",
    "export_onnx": "onnx_graph",
    "finetune": "finetuning", "FinetuneReport": "finetuning",
    "ConvertOptions": "options", "EncoderOptions": "options", "FinetuneOptions": "options",
    "SearchEffort": "options", "AQConfig": "options",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aqformat.converters' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    """The public API (for tab completion), which loads lazily."""
    return list(__all__)
