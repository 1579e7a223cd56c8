"""Conversion pipeline: a model source to .aqm, one tensor at a time.

Two streaming passes over the source:

1. *train*: the encoder of the chosen codec
   (:mod:`aqformat.converters.encoders`) learns what its tensors share. For
   AQ, every tensor chosen for compression is read once and a bounded
   reservoir of its (scaled, calibration-weighted) vectors is added to its
   codebook group; then each group's codebooks are trained
   (:mod:`aqformat.converters.planning` chooses the groups). The lattice
   codec has nothing to learn;
2. *encode*: tensors are read again one at a time, coded by the encoder (or
   kept raw) and appended to the :class:`aqformat.Writer`.

Peak memory is about the largest tensor, the codebook reservoirs and the
calibration statistics, whatever the model size, when the source reads lazily.
"""
from __future__ import annotations

import fnmatch
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat import __version__
from aqformat.errors import AqmInputError, AqmWarning
from aqformat.units import format_size, parse_size
from aqformat.writer import Writer

from . import size_target
from .affine import AffinePlan
from .encoders import TensorEncoder
from .half import kept_format, write_kept
from .options import AUTO, CODEBOOK_CODECS, AQConfig, ConvertOptions, EncoderOptions, FinetuneOptions
from .parallel import Executor, Task, ordered
from .planning import ModelTensors, plan_small, select_tensors, size_budget
from .progress import Progress
from .sources import Source, TensorSpec, to_float32

__all__ = ["ConversionSummary", "run", "run_and_finetune", "quantize_weights"]


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
    affine_bits: dict[str, int] = field(default_factory=dict)  # tensors coded by the affine codec: bits
    codebook_bytes: int = 0      # bytes of the codebook groups in the file
    weight_sqnr_db: dict[str, float] = field(default_factory=dict)
    finetune: Any = None         # FinetuneReport when the file was fine-tuned
    target_size: Any = None      # the file size budget as given (e.g. "250kB"), if any
    notes: list[str] = field(default_factory=list)  # what was not used, and why

    @property
    def ratio(self) -> float:
        """Source tensor bytes / .aqm file bytes."""
        return self.source_bytes / self.aqm_bytes if self.aqm_bytes else 0.0

    @property
    def bits_per_weight(self) -> float:
        """.aqm file bits per parameter (every byte counted)."""
        return 8.0 * self.aqm_bytes / self.parameters if self.parameters else 0.0

    def __str__(self) -> str:
        finite = [v for v in self.weight_sqnr_db.values() if np.isfinite(v)]  # a tensor coded exactly is inf
        mean_sqnr = f", weight SQNR {np.mean(finite):.1f} dB mean" if finite else ""
        return (f"{self.path}: {format_size(self.source_bytes)} -> {format_size(self.aqm_bytes)} "
                f"({self.ratio:.2f}x, {self.bits_per_weight:.3f} bits/weight), "
                f"{len(self.compressed)} tensors coded ({len(self.affine_bits)} affine), {len(self.raw)} raw, "
                f"{len(self.groups)} codebook group(s){self._books_note()}{mean_sqnr}, {self.seconds:.1f} s"
                + self._target_note()
                + (f"; {self.finetune}" if self.finetune is not None else "")
                + (f"\nnot used: {'; '.join(self.notes)}" if self.notes else ""))

    def _books_note(self) -> str:
        """The codebooks' bytes and share of the file, when there are any."""
        if not self.codebook_bytes:
            return ""
        return f" ({format_size(self.codebook_bytes)}, {100 * self.codebook_bytes / self.aqm_bytes:.1f}% of the file)"

    def _target_note(self) -> str:
        """How the file landed against ``target_size``, in the units it was given in."""
        if self.target_size is None:
            return ""
        target = parse_size(self.target_size)
        gap = 100.0 * (target - self.aqm_bytes) / target
        where = f"{gap:.1f}% under" if gap >= 0 else f"{-gap:.1f}% OVER"
        return (f"; target {self.target_size}: {format_size(self.aqm_bytes, like=str(self.target_size))} "
                f"({self.aqm_bytes:,} bytes), {where}")


def run(source: Source, out_path: str | os.PathLike, opts: ConvertOptions, axes: dict[str, Any], *,
        calib: tuple[Any, Any, Any] | None = None, graph_model: Any = None) -> ConversionSummary:
    """Convert ``source`` to ``out_path``: train the encoder of ``opts.codec``, then code tensor by tensor.

    ``axes`` are the matrix views whose rows are not dim 0; ``calib`` is the
    resolved ``(module, batches, run)`` calibration
    (:func:`aqformat.converters.calib.calibration_batches`); ``graph_model``
    an ONNX model to embed, its initializers turned into stubs.
    """
    import torch

    from .encoders import make_encoder
    from .parallel import make_executor
    t0 = time.monotonic()
    if (opts.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise AqmInputError("--device cuda: no CUDA device is available to torch (use --device cpu)")
    opts = _resolve_shape(source, opts, axes)
    encoder = make_encoder(opts)
    source_info = {"framework": source.framework, "name": source.name, **source.info}
    with make_executor(opts.workers, opts.ray) as executor:  # an unreachable cluster fails before any work
        tensors, compress = _model_tensors(source, opts, axes, calib if encoder.calibrated else None,
                                           (graph_model, source_info))
        torch.manual_seed(opts.seed)
        encoder.train(tensors, compress, executor)
        source_bytes = sum(s.nbytes for s in source.specs)
        _check_shrinks(sum(tensors.small.nbytes.get(s.name, s.nbytes) for s in source.specs
                           if s.name not in set(encoder.coded)), source_bytes, opts.strict, before=True)
        # --strict writes beside the output first: a refused file never replaces an existing one
        path = _sibling(out_path, ".strict") if opts.strict else out_path

        def write() -> dict[str, float]:
            with Writer(path, producer=f"aqformat {__version__} (aqformat.converters)", source=source_info,
                        alignment=size_target.section_alignment(source_bytes)) as w:
                encoder.write_shared(w)
                sqnr = _encode_all(w, source, encoder, tensors.small, opts.progress, executor, opts.keep_half)
                if graph_model is not None:  # a copy: a --target-size refill reads the source's tensors again
                    from .onnx_graph import stubbed_graph
                    w.set_graph(stubbed_graph(graph_model, {s.name for s in source.specs}).SerializeToString(),
                                format="onnx")
                meta = encoder.metadata()
                w.update_metadata(conversion={**meta, **_affine_metadata(tensors.small),
                                              **_achieved_rate(meta, encoder.groups, tensors)})
            return sqnr
        try:
            sqnr = write()
            for _ in range(REFILLS if opts.target_size is not None and opts.codec == AUTO else 0):
                extra = _shortfall(os.path.getsize(path), opts.target_size)
                if not extra or not encoder.refill(extra):
                    break
                sqnr = write()
            _check_shrinks(os.path.getsize(path), source_bytes, opts.strict, before=False)
            os.replace(path, out_path)
        finally:
            if os.path.lexists(path) and path != out_path:
                os.unlink(path)
    specs = source.specs
    size = os.path.getsize(out_path)
    if opts.target_size is not None and size > opts.target_size:  # the header is estimated before writing
        warnings.warn(f"the file is {size - opts.target_size:,} bytes over --target-size {opts.target_text}",
                      AqmWarning, stacklevel=2)
    return ConversionSummary(
        path=os.fspath(out_path), source_bytes=sum(s.nbytes for s in specs),
        source_file_bytes=source.file_bytes, aqm_bytes=os.path.getsize(out_path),
        parameters=sum(s.numel for s in specs), compressed=encoder.coded + list(tensors.small.coded),
        raw=[s.name for s in specs if s.name not in set(encoder.coded) | set(tensors.small.coded)],
        groups=encoder.groups, affine_bits=tensors.small.bits(), codebook_bytes=_codebook_bytes(out_path),
        seconds=time.monotonic() - t0, weight_sqnr_db=sqnr, target_size=opts.target_text,
        notes=_notes(calib))


#: Times a ``--codec auto`` file that missed its ``--target-size`` window is chosen and written again.
REFILLS = 3


def _shortfall(size: int, target: int) -> int:
    """Bytes to add to (negative: take from) the budget of a file of ``size`` bytes so that it
    lands within :data:`~aqformat.converters.size_target.LANDING` under ``target``, aiming at the
    window's upper quarter (the choice's own byte counts are exact to a few bytes a tensor); 0
    where it lands already."""
    if (1 - size_target.LANDING) * target <= size <= target:
        return 0
    return int(target * (1 - size_target.LANDING / 4) / size_target.SLACK) - size


def _codebook_bytes(path: str | os.PathLike) -> int:
    """Bytes of the codebook groups of the file at ``path`` (its header only is read)."""
    import aqformat
    with aqformat.open(path) as f:
        return sum(f.group_bytes(g.name) for g in f.codebook_groups)


def _sibling(path: str | os.PathLike, suffix: str) -> str:
    """A new hidden file beside ``path`` (same directory, so a rename replaces ``path`` atomically)."""
    import tempfile
    out = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=suffix, dir=os.path.dirname(out))
    os.close(fd)
    return tmp


def _check_shrinks(size: int, source_bytes: int, strict: bool, *, before: bool) -> None:
    """Warn, or with ``strict`` raise :class:`AqmInputError`, when a file of ``size`` bytes (at
    least, ``before`` encoding) is not smaller than the model's tensors."""
    if size < source_bytes:
        return
    what = (f"the .aqm file would take at least {format_size(size)}" if before
            else f"the .aqm file takes {format_size(size)}")
    msg = (f"{what}, not less than the model's {format_size(source_bytes)} of tensors: its tensors are too "
           "small or kept raw (--keep, --min-elements) for compression to pay off")
    if strict:
        raise AqmInputError(msg + " (--strict)")
    if not before:  # said once, when the size is known
        warnings.warn(msg, AqmWarning, stacklevel=3)


def _affine_metadata(small: AffinePlan) -> dict[str, Any]:
    """The affine codec's share of the conversion: how many tensors, their mean code width."""
    if not small.coded:
        return {}
    bits = small.bits()
    return {"small_tensors": {"tensors": len(bits), "mean_bits": round(float(np.mean(list(bits.values()))), 3)}}


def _achieved_rate(meta: Mapping[str, Any], groups: Mapping[str, list[str]], tensors: ModelTensors) -> dict[str, Any]:
    """``code_bits_per_weight``: the code bits the AQ groups give their tensors on average
    (a fractional ``bits`` is reached by mixing widths: this is the rate reached)."""
    widths = meta.get("groups") or {}
    numel = {n: tensors.spec(n).numel for ms in groups.values() for n in ms}
    total = sum(numel.values())
    if not total or not all(g in widths for g in groups):
        return {}
    bits = sum(numel[n] * widths[g]["M"] * widths[g]["b"] / widths[g]["d"] for g, ms in groups.items() for n in ms)
    return {"code_bits_per_weight": round(bits / total, 4)}


def _notes(calib: Any) -> list[str]:
    """What the conversion could not use, and why (one line of the summary)."""
    if calib is None:
        return ["no --calib: coded by weight error, without data (expect lower fidelity)"]
    return list(getattr(calib, "notes", []))


def _model_tensors(source: Source, opts: ConvertOptions, axes: dict[str, Any],
                   calib: tuple[Any, Any, Any] | None, stored: tuple[Any, dict[str, Any]]
                   ) -> tuple[ModelTensors, list[str]]:
    """The source's tensors with their calibration statistics and size budget, and the names
    chosen for compression; ``stored`` is ``(graph model, source description)`` as the file
    will hold them (a size budget counts them). The small tensors are planned first, with
    ``calib`` when given (their output sensitivity: :func:`plan_small`)."""
    from .calib import calibration_stats
    specs = source.specs
    by_name = {s.name: s for s in specs}
    for pattern in opts.keep:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in specs):
            warnings.warn(f"--keep {pattern!r} matches no tensor (tensor names: aqm-info, or the "
                          f"model's state_dict keys / ONNX initializer names)", AqmWarning, stacklevel=2)
    compress = select_tensors(specs, keep=opts.keep, min_elements=opts.min_elements)

    def load(name: str) -> np.ndarray:
        return to_float32(source.load(name), by_name[name].dtype)

    auto = opts.codec == AUTO
    if auto:  # tensors a --codec-for pattern names join the choice, whatever their size
        from .codec_choice import auto_budget, forced_names
        compress = compress + forced_names(specs, compress, opts)
    small, compress = plan_small(specs, compress, opts, axes, load, stored[0], calib)
    budget = (auto_budget(specs, compress, opts, _graph_bytes(stored[0], specs), _known_bytes(stored[1]), small)
              if auto else size_budget(specs, compress, opts, axes, *stored, small=small))  # before training
    H, S = calibration_stats(calib, compress, sensitivity=opts.target_size is not None or opts.allocate or auto)
    return ModelTensors(specs, load, axes, H, S, budget=budget, small=small), compress


def _resolve_shape(source: Source, opts: ConvertOptions, axes: dict[str, Any]) -> ConvertOptions:
    """``opts`` with the AQ codebook shape set (:func:`aqformat.converters.shape_choice.choose_shape`)
    for the tensors chosen for compression, where AQ may code them."""
    if opts.codec not in CODEBOOK_CODECS:
        return opts
    from .shape_choice import choose_shape
    by_name = {s.name: s for s in source.specs}
    names = select_tensors(source.specs, keep=opts.keep, min_elements=opts.min_elements)
    return choose_shape(opts, {n: tuple(by_name[n].shape) for n in names},
                        lambda n: to_float32(source.load(n), by_name[n].dtype), axes)


def _graph_bytes(graph_model: Any, specs: Sequence[Any]) -> int:
    """Bytes the embedded graph will take (0 without one)."""
    if graph_model is None:
        return 0
    from .onnx_graph import stored_graph_bytes
    return stored_graph_bytes(graph_model, {s.name for s in specs})


def _known_bytes(source_info: Mapping[str, Any]) -> int:
    """Header bytes of the source's description."""
    import msgpack
    return len(msgpack.packb(source_info or {}, use_bin_type=True, default=str))


def _encode_all(w: Writer, source: Source, encoder: TensorEncoder, small: AffinePlan,
                progress: bool, executor: Executor, halves: Sequence[tuple[str, str]] = ()) -> dict[str, float]:
    """Pass 2: code (or copy raw) every tensor in source order, those of ``small`` as planned,
    those kept at 16 bits by ``halves`` (``(pattern, format)``) in codec ``half``;
    each coded tensor's SQNR in dB.

    Tensors are coded as tasks on ``executor`` (a large one as several, :meth:`TensorEncoder.tasks`)
    and written in source order as they come back, with at most two tasks per worker read ahead (:func:`~aqformat.converters.parallel.ordered`).
    """
    coded = set(encoder.coded)
    specs = {s.name: s for s in source.specs}
    sqnr: dict[str, float] = {}

    parts: dict[str, int] = {}  # coded tensor -> the tasks it is coded in
    done: list[Any] = []  # results of the current tensor's tasks so far

    def tasks() -> Iterator[Task]:
        for s in source.specs:
            arr = source.load(s.name)
            if s.name in coded:
                todo = encoder.tasks(s.name, to_float32(arr, s.dtype), executor.share)
                parts[s.name] = len(todo)
                yield from ((s.name, fn, args) for fn, args in todo)
            else:
                yield s.name, None, (arr,)
            del arr

    with Progress("encode", sum(s.numel for s in source.specs), len(source.specs), progress) as bar:
        for name, result in ordered(executor, tasks(), executor.read_ahead):
            s = specs[name]
            if name in coded:
                done.append(result)
                if len(done) < parts[name]:
                    continue
                t, sqnr[name] = encoder.join(name, done)
                done.clear()
                encoder.write(w, t, s.dtype)
            elif name in small.coded:  # coded while planning
                small.coded[name].write(w, name, s.shape, s.dtype)
                sqnr[name] = sqnr_db(to_float32(result, s.dtype), small.coded[name].decoded)
            else:
                kept = write_kept(w, name, result, s.dtype, kept_format(name, halves))
                if kept is not None:
                    sqnr[name] = sqnr_db(to_float32(result, s.dtype), kept.decoded)
            del result
            bar.update(s.numel, name)
    return sqnr


def sqnr_from(err: float, sig: float) -> float:
    """SQNR in dB of a squared error ``err`` on weights of squared norm ``sig``: +inf only when
    the error is 0, -inf for all-zero weights decoded with an error."""
    if err == 0:
        return float("inf")
    return 10 * float(np.log10(sig / err)) if sig > 0 else float("-inf")


def sqnr_db(W: np.ndarray, W_hat: np.ndarray) -> float:
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


FT_TEXT_BATCH = 16  # sentences per distillation step


def text_batches(sentences: list[str]) -> list[list[str]]:
    """Fine-tuning batches of text calibration: up to ``FT_TEXT_BATCH`` sentences of similar
    length each, so little of a step is padding (a third fewer tokens on MiniLM's sentences)."""
    ordered = sorted(sentences, key=len)
    return [ordered[i:i + FT_TEXT_BATCH] for i in range(0, len(ordered), FT_TEXT_BATCH)]


def run_and_finetune(source: Source, out_path: str | os.PathLike, opts: ConvertOptions, axes: dict[str, Any],
                     calib: tuple[Any, Any, Any] | None, tuning: FinetuneOptions,
                     graph_model: Any = None) -> ConversionSummary:
    """Convert to a hidden sibling file, distil it into ``out_path``, remove the sibling."""
    from .finetuning import finetune
    if calib is None:
        raise AqmInputError("fine-tuning needs calibration inputs (--calib)")
    module, batches, forward = calib.finetune_inputs() if hasattr(calib, "finetune_inputs") else calib
    if batches and all(isinstance(b, str) for b in batches):
        batches = text_batches(batches)
    tmp = _sibling(out_path, ".coded")
    try:
        summary = run(source, tmp, opts, axes, calib=calib, graph_model=graph_model)
        t0 = time.monotonic()
        report = finetune(tmp, out_path, module, batches, forward=forward, steps=tuning.steps, lr=tuning.lr,
                          train_raw=tuning.train_raw, seed=tuning.seed, progress=tuning.progress)
    finally:
        os.unlink(tmp)
    summary.path, summary.aqm_bytes, summary.finetune = os.fspath(out_path), os.path.getsize(out_path), report
    summary.seconds += time.monotonic() - t0
    return summary


def quantize_weights(weights: Mapping[str, Any], cfg: AQConfig, hessians: Mapping[str, Any] | None = None,
                     grouping: str = "shared", axes: Mapping[str, Sequence[int] | None] | None = None, *,
                     reservoir: int = 1 << 16, seed: int = 0,
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], list[str]]:
    """Code a mapping of weights in memory at one AQ setting, with the pipeline's planning and encoder.

    Returns
    -------
    codebooks : dict group -> C[M, K, d]
    coded : dict name -> :class:`~aqformat.converters.aq_encode.AQTensor`
    group_of : dict name -> group of coded tensors
    raw : names too small for ``cfg`` (left uncoded)
    """
    from .aq_encode import AQEncoder
    arrays = {n: np.asarray(w.detach().cpu() if hasattr(w, "detach") else w, dtype=np.float32)
              for n, w in weights.items()}
    specs = [TensorSpec(n, tuple(a.shape), "float32") for n, a in arrays.items()]
    tensors = ModelTensors(specs, arrays.__getitem__, {n: tuple(a) for n, a in (axes or {}).items() if a is not None},
                           dict(hessians or {}))
    encoder = EncoderOptions(bits_per_code=cfg.b, d=cfg.d, beam=cfg.beam, iters=cfg.iters, feedback=cfg.feedback,
                             damp=cfg.damp, reservoir=reservoir)
    aq = AQEncoder(ConvertOptions(bits_per_weight=cfg.M * cfg.b / cfg.d, grouping=grouping, seed=seed,
                                  progress=False, encoder=encoder))
    aq.train(tensors, list(arrays))
    coded = {n: aq.compute_codes(n, arrays[n]) for n in aq.coded}
    return aq.plan.books, coded, dict(aq.plan.group_of), [n for n in arrays if n not in coded]
