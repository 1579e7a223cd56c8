"""The interface every tensor encoder of a conversion implements, and the encoders by codec name.

Modelled on faiss's ``train`` / ``compute_codes`` / ``decode``: an encoder is
trained once on the tensors chosen for compression (AQ chooses each tensor's
codebook group, and its rate under a budget, and trains the groups'
codebooks; the dithered lattice has nothing to learn), then codes one tensor
at a time and decodes what it coded. It also writes what it produced:
sections shared by many tensors (codebooks) once, then each coded tensor.

Adding an encoder means one class with this interface in its own module and
one entry in :data:`aqformat.converters.options.ENCODERS`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from aqformat.writer import Writer

from .options import ENCODERS, ConvertOptions
from .parallel import Executor
from .planning import ModelTensors

__all__ = ["TensorEncoder", "make_encoder"]


class TensorEncoder(Protocol):
    """What the conversion pipeline needs of an encoder."""

    codec: str
    calibrated: bool               # whether it uses calibration statistics (``H``, ``S``)
    coded: list[str]               # the tensors it codes, known after ``train``
    groups: dict[str, list[str]]   # codebook group -> tensors (empty without codebooks)

    def train(self, tensors: ModelTensors, names: list[str], executor: Executor | None = None) -> None:
        """Learn what is shared (e.g. codebooks) from the candidate tensors ``names``, running
        independent work (one task per codebook group) on ``executor``."""

    def compute_codes(self, name: str, w: np.ndarray) -> Any:
        """Code one tensor (float32, logical shape)."""

    def tasks(self, name: str, w: np.ndarray, share: Callable[[Any], Any]
              ) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        """Module-level functions and their arguments that code tensor ``name`` (``w``, float32)
        wherever they run, one task or (a large tensor) several; large objects many tasks read
        are passed through ``share`` (:meth:`aqformat.converters.parallel.Executor.share`)."""

    def join(self, name: str, results: list[Any]) -> tuple[Any, float]:
        """``(encoded, weight SQNR in dB)`` of tensor ``name`` from the results of its tasks."""

    def decode(self, encoded: Any) -> np.ndarray:
        """The float32 tensor a reader will decode from ``encoded``."""

    def write_shared(self, writer: Writer) -> None:
        """Add the sections shared by the coded tensors (before any tensor)."""

    def write(self, writer: Writer, encoded: Any, dtype: str) -> None:
        """Add one coded tensor; ``dtype`` is its source dtype."""

    def metadata(self) -> dict[str, Any]:
        """The ``conversion`` metadata of the file."""


def make_encoder(opts: ConvertOptions) -> TensorEncoder:
    """The encoder of ``opts.codec``, configured by ``opts``."""
    module, name = ENCODERS[opts.codec].split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)(opts)
