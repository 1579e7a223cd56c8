"""Conversion pipeline: a model source to .aqm, one tensor at a time.

Two streaming passes over the source:

1. *sample*: every tensor chosen for compression is read once and a bounded
   reservoir of its (scaled, calibration-weighted) vectors is added to its
   codebook group; then each group's codebooks are trained
   (:mod:`aqformat.converters.planning` chooses the groups);
2. *encode*: tensors are read again one at a time, coded against their
   group's codebooks (or kept raw) and appended to the :class:`aqformat.Writer`.


Peak memory is about the largest tensor, the codebook reservoirs and the
calibration statistics, whatever the model size, when the source reads lazily.
"""
from __future__ import annotations

import fnmatch
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat import __version__
from aqformat.errors import AqmInputError, AqmWarning
from aqformat.units import format_size, parse_size
from aqformat.writer import Writer

from .planning import _GROUPINGS, _config_for_bits, _plan, select_tensors
from .progress import Progress
from .sources import Source, to_float32

__all__ = ["ConversionSummary"]


@dataclass
class ConversionSummary:
    """What a conversion produced (``str()`` gives the CLI's closing summary)."""

    path: str
    source_bytes: int            # bytes of the source tensors in their original dtypes
    source_file_bytes: int | None
    aqm_bytes: int
    parameters: int
    compressed: list[str]
    raw: list[str]
    groups: dict[str, list[str]]
    seconds: float
    weight_sqnr_db: dict[str, float] = field(default_factory=dict)
    finetune: Any = None         # FinetuneReport when the file was fine-tuned

    @property
    def ratio(self) -> float:
        """Source tensor bytes / .aqm file bytes."""
        return self.source_bytes / self.aqm_bytes if self.aqm_bytes else 0.0

    @property
    def bits_per_weight(self) -> float:
        """.aqm file bits per parameter (every byte counted)."""
        return 8.0 * self.aqm_bytes / self.parameters if self.parameters else 0.0

    def __str__(self) -> str:
        mean_sqnr = (f", weight SQNR {np.mean(list(self.weight_sqnr_db.values())):.1f} dB mean"
                     if self.weight_sqnr_db else "")
        return (f"{self.path}: {format_size(self.source_bytes)} -> {format_size(self.aqm_bytes)} "
                f"({self.ratio:.2f}x, {self.bits_per_weight:.3f} bits/weight), "
                f"{len(self.compressed)} tensors coded, {len(self.raw)} raw, "
                f"{len(self.groups)} codebook group(s){mean_sqnr}, {self.seconds:.1f} s"
                + (f"; {self.finetune}" if self.finetune is not None else ""))


def _run(source: Source, out_path: str | os.PathLike, *, bits: float, target_size: int | str | None,
         allocate: bool, permute: bool, codebooks: str, calib: tuple[Any, Any, Any] | None,
         keep: Iterable[str], seed: int,
         progress: bool, min_elements: int, encoder: dict[str, Any] | None, axes: dict[str, Any],
         graph_model: Any = None) -> ConversionSummary:
    import torch

    from . import onnx_graph
    from .aq_encode import decode_tensor, encode_tensor
    from .calib import _calibration_stats
    t0 = time.monotonic()
    if codebooks not in _GROUPINGS:
        raise AqmInputError(f"--codebooks must be one of {', '.join(_GROUPINGS)}, not {codebooks!r}")
    specs = source.specs
    by_name = {s.name: s for s in specs}
    encoder = dict(encoder or {})
    _config_for_bits(bits, encoder)  # validate settings before the expensive steps
    target = parse_size(target_size) if target_size is not None else None
    keep = list(keep)
    for pattern in keep:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in specs):
            warnings.warn(f"--keep {pattern!r} matches no tensor (tensor names: aqm-info, or the "
                          f"model's state_dict keys / ONNX initializer names)", AqmWarning, stacklevel=2)
    compress = select_tensors(specs, keep=keep, min_elements=min_elements)
    H, S = _calibration_stats(calib, compress, sensitivity=target is not None or allocate)

    def weights(name: str) -> np.ndarray:
        return to_float32(source.load(name), by_name[name].dtype)

    torch.manual_seed(seed)
    perms: dict[str, Any] | None = {} if permute else None
    configs, group_of, books = _plan(specs, compress, bits=bits, target=target, allocate=allocate,
                                     codebooks=codebooks, encoder=encoder, axes=axes, H=H, S=S,
                                     perms=perms, weights=weights, seed=seed, progress=progress)
    perms = perms or {}
    sqnr: dict[str, float] = {}
    source_info = {"framework": source.framework, "name": source.name, **source.info}
    with Writer(out_path, producer=f"aqformat {__version__} (aqformat.converters)",
                source=source_info) as w:
        for g in sorted(books):
            w.add_codebooks(g, books[g].numpy(), dtype="float16")
        inits = ({t.name: t for t in graph_model.graph.initializer}
                 if graph_model is not None else {})
        with Progress("encode", sum(s.numel for s in specs), len(specs), progress) as bar:
            for s in specs:
                arr = source.load(s.name)
                g = group_of.get(s.name)
                if g is not None:
                    W = to_float32(arr, s.dtype)
                    t = encode_tensor(s.name, W, books[g], configs[g], H.get(s.name),
                                      axes.get(s.name), perms.get(s.name))
                    w.add_aq(s.name, s.shape, t.codes, group=g, dtype=s.dtype,
                             scale=t.scale, perm=t.perm, axes=axes.get(s.name))
                    sqnr[s.name] = _sqnr_db(W, decode_tensor(t, books[g]))
                else:
                    w.add_tensor(s.name, arr, dtype="bfloat16" if s.dtype == "bfloat16" else None)
                if s.name in inits:  # its data now lives in the .aqm
                    onnx_graph.make_stub(inits[s.name])
                del arr
                bar.update(s.numel, s.name)
        if graph_model is not None:
            w.set_graph(graph_model.SerializeToString(), format="onnx")
        any_cfg = next(iter(configs.values()), _config_for_bits(bits, encoder))
        w.update_metadata(conversion={
            "bits": bits, "target_size": target, "allocated": bool(target is not None or allocate),
            "permuted": sorted(n for n, p in perms.items() if p is not None),
            "groups": {g: {"M": c.M, "b": c.b, "d": c.d} for g, c in sorted(configs.items())},
            "codebooks": codebooks, "calibrated": bool(H), "seed": seed,
            "min_elements": min_elements, "keep": list(keep), "beam": any_cfg.beam,
            "iters": any_cfg.iters, "reservoir": int(encoder.get("reservoir", 1 << 16))})
    size = os.path.getsize(out_path)
    groups: dict[str, list[str]] = {}
    for n, g in group_of.items():
        groups.setdefault(g, []).append(n)
    return ConversionSummary(
        path=os.fspath(out_path), source_bytes=sum(s.nbytes for s in specs),
        source_file_bytes=source.file_bytes, aqm_bytes=size,
        parameters=sum(s.numel for s in specs), compressed=list(group_of),
        raw=[s.name for s in specs if s.name not in group_of], groups=groups,
        seconds=time.monotonic() - t0, weight_sqnr_db=sqnr)


def _sqnr_db(W: np.ndarray, W_hat: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio; +inf only when the decoded tensor is exact.

    Both are divided by the largest magnitude first: squares of weights near
    1e-30 underflow float32 to 0, which used to report "inf dB" for a tensor
    decoded to zeros.
    """
    peak = float(np.max(np.abs(W))) if W.size else 0.0
    if peak == 0.0 or not np.isfinite(peak):
        return float("inf") if np.array_equal(W, W_hat) else float("-inf")
    w, e = (W.ravel() / peak), ((W - W_hat).ravel() / peak)  # two temporaries the size of the tensor
    err, sig = float(np.dot(e, e)), float(np.dot(w, w))
    return 10 * np.log10(sig / err) if err > 0 else float("inf")


_FT_TEXT_BATCH = 16  # sentences per distillation step


def _text_batches(sentences: list[str]) -> list[list[str]]:
    """Fine-tuning batches of text calibration: up to ``_FT_TEXT_BATCH`` sentences of similar
    length each, so little of a step is padding (a third fewer tokens on MiniLM's sentences)."""
    ordered = sorted(sentences, key=len)
    return [ordered[i:i + _FT_TEXT_BATCH] for i in range(0, len(ordered), _FT_TEXT_BATCH)]


def _run_and_finetune(source: Source, out_path: str | os.PathLike, axes: dict[str, Any],
                      opts: dict[str, Any], steps: int, lr: float, train_raw: str) -> ConversionSummary:
    """Convert to a hidden sibling file, distil it into ``out_path``, remove the sibling."""
    import tempfile

    from .finetuning import finetune
    if opts["calib"] is None:
        raise AqmInputError("fine-tuning needs calibration inputs (--calib)")
    if steps < 0:
        raise AqmInputError(f"finetune steps must be >= 0, got {steps}")
    module, batches, run = opts["calib"]
    if batches and all(isinstance(b, str) for b in batches):
        batches = _text_batches(batches)
    out = os.path.abspath(os.fspath(out_path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".coded", dir=os.path.dirname(out))
    os.close(fd)
    try:
        summary = _run(source, tmp, axes=axes, **opts)
        t0 = time.monotonic()
        report = finetune(tmp, out_path, module, batches, forward=run, steps=steps, lr=lr,
                          train_raw=train_raw, seed=opts["seed"], progress=opts["progress"])
    finally:
        os.unlink(tmp)
    summary.path, summary.aqm_bytes, summary.finetune = os.fspath(out_path), os.path.getsize(out_path), report
    summary.seconds += time.monotonic() - t0
    return summary
