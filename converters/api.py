"""Converting PyTorch and ONNX models to .aqm: the public entry points."""
from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aqformat.errors import AqmInputError
from aqformat.header import MAX_NAME_BYTES, MAX_NDIM

from .options import DEFAULT_MIN_ELEMENTS, ConvertOptions, EncoderOptions, FinetuneOptions
from .bn_fold import fold_calibrated, fold_source
from .pipeline import ConversionSummary, run, run_and_finetune
from .sources import Source, open_source

__all__ = ["convert", "from_torch", "from_onnx", "from_torch_via_onnx", "check_output"]


def check_output(source: Source, out_path: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose directory is missing or that is one of the source's files,
    and tensors whose name or rank the format cannot hold.

    The output is compared by device and inode, so another spelling of the
    path or a hard link to the input is caught too: the atomic rename that
    finishes the .aqm file would otherwise replace the input.
    """
    out = os.path.abspath(os.fspath(out_path))
    directory = os.path.dirname(out)
    if not os.path.isdir(directory):
        raise AqmInputError(f"output directory {directory} does not exist")
    if os.path.isdir(out):
        raise AqmInputError(f"output {out} is a directory")
    for spec in source.specs:  # the writer would refuse these, but only after the codebooks are trained
        if len(spec.name.encode()) > MAX_NAME_BYTES or len(spec.shape) > MAX_NDIM:
            raise AqmInputError(f"tensor {spec.name[:60]!r}: .aqm names are at most {MAX_NAME_BYTES} bytes "
                                f"and shapes at most {MAX_NDIM} dimensions")
    for f in _source_files(source):
        try:
            same = os.path.samefile(out, f)
        except OSError:  # the output does not exist yet, or an input went away
            continue
        if same:
            raise AqmInputError(f"output {os.fspath(out_path)} is the input file {f}: writing it would "
                                "replace the model being converted; choose another output path")


def _source_files(source: Source) -> list[str]:
    """The files a source reads: a folder's files, a model file and its external data."""
    if source.path is None:
        return []
    if os.path.isdir(source.path):
        return [e.path for e in os.scandir(source.path) if e.is_file()]
    files = [source.path]
    if source.onnx_model is not None:
        base = os.path.dirname(os.path.abspath(source.path))
        files += [os.path.join(base, e.value) for t in source.onnx_model.graph.initializer
                  for e in t.external_data if e.key == "location"]
    return files


def _torch_axes(module: Any) -> dict[str, tuple[int, ...]]:
    """Matrix-view axes of weights whose rows are not dim 0 (ConvTranspose: [in, out, k...])."""
    import torch
    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):
            ndim = mod.weight.dim()
            out[f"{name}.weight" if name else "weight"] = (1, 0, *range(2, ndim))
    return out


def _memory_errors_as_aqm(fn: Callable[..., ConversionSummary]) -> Callable[..., ConversionSummary]:
    """``fn`` raising AqmInputError where numpy or torch run out of memory (a huge tensor, a bad shape)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> ConversionSummary:
        try:
            return fn(*args, **kwargs)
        except MemoryError as e:
            detail = f" ({str(e)[:160]})" if str(e) else ""
            raise AqmInputError(f"out of memory while converting the model{detail}") from None
    return wrapper


@_memory_errors_as_aqm
def from_torch(model: Any, out_path: str | os.PathLike, *, bits: float = 4.0,
               target_size: int | str | None = None, allocate: bool = False,
               permute: bool = False, grouping: str = "by-kind", calib: Any = None,
               keep: Iterable[str] = (), seed: int = 0, progress: bool = True,
               min_elements: int = DEFAULT_MIN_ELEMENTS, codec: str | None = None,
               codec_for: Iterable[str] = (), encoder: EncoderOptions | Mapping[str, Any] | None = None, finetune_steps: int = 0,
               finetune_lr: float = 1e-3, finetune_raw: str = "all",
               model_code: str | Callable[[], Any] | None = None, strict: bool = False,
               workers: int | None = None, ray: str | None = None, device: str | None = None,
               fold_batchnorm: bool = True) -> ConversionSummary:
    """Convert a PyTorch model to .aqm; tensor names are its ``state_dict`` keys.

    Parameters
    ----------
    model : nn.Module, mapping, or path
        A module, a ``state_dict``, a ``.pt``/``.pth``/``.bin`` checkpoint
        (loaded with ``weights_only=True``), a ``.safetensors`` file or a
        Hugging Face model folder.
    out_path : str or os.PathLike
        The .aqm file to write (replaced atomically; nothing is left on failure).
    bits : float
        Bits per compressed weight (auto: the budget, see ``codec``; AQ: code bits,
        ``M = bits * d / bits_per_code`` codebooks, with the default encoder M 256-entry
        codebooks over 8-vectors, M = bits; lattice: the quantizer's entropy per weight).
    target_size : int or str, optional
        File size budget (e.g. ``"5MB"``): bits are allocated per tensor to fit it.
    allocate : bool
        Allocate bits per tensor (candidates ``bits - 1``, ``bits``, ``bits + 1``) so that
        the compressed tensors take ``bits`` per weight with every byte counted (codes,
        scales, codebooks), by predicted error; with ``calib``, each layer's error is
        weighted by how much it moves the model's output.
    permute : bool
        Search a column permutation per tensor (PQF) so correlated weights share
        vectors; stored with the tensor. Costs a search per tensor.
    grouping : {"shared", "per-layer", "by-kind"}
        Codebook sharing: one codebook group for the model, one per tensor, or
        one per layer kind.
    calib : path or iterable, optional
        Calibration inputs (see :func:`aqformat.converters.calib.calibration_batches`); the
        AQ encoder then minimises each layer's output error instead of its weight error.
    keep : iterable of str
        fnmatch patterns of tensors stored raw.
    seed : int
        Seed of sampling, codebook training and dithers (same inputs, same file).
    progress : bool
        Show progress bars on stderr.
    min_elements : int
        Smallest tensor compressed.
    codec : {"auto", "aq", "lattice"}, optional
        ``"auto"`` (the default): per tensor the codec (AQ, lattice or uniform, affine, float16, raw) and
        setting of least measured error per byte, all within ``bits`` per compressed weight
        (their codes, indices, scales, steps, codebooks and records counted) or ``target_size``
        (every byte of the file) (:mod:`aqformat.converters.codec_choice`); ``"aq"``: additive
        quantization in shared codebooks, ``bits`` code bits per weight (the default when
        ``permute`` or ``allocate`` is set: they are AQ's options; fine-tuning keeps ``"auto"``,
        see :func:`aqformat.converters.options.resolve_codec`); ``"lattice"``: dithered
        uniform scalar quantization with entropy-coded indices, every tensor at ``bits`` (no
        target size, allocation or permutation; calibration only feeds fine-tuning).
    codec_for : iterable of str
        With ``codec="auto"``: ``"PATTERN:CODEC"`` items forcing the codec of the tensors a
        pattern matches (``aq``, ``uniform``, ``lattice``, ``affine``, ``fp16``/``half`` or ``raw``).
    encoder : EncoderOptions or mapping, optional
        AQ encoder settings (:class:`~aqformat.converters.options.EncoderOptions`,
        or a mapping of its field names): ``bits_per_code``, ``d`` (code width,
        vector length), ``beam``, ``iters``, ``feedback``, ``damp`` (search
        effort), ``reservoir`` (training vectors sampled per codebook group) and
        ``perm_iters`` (permutation search rounds).
    finetune_steps : int
        After coding, distil the original model into the codebooks, scales,
        norms, biases and raw tensors for this many steps on ``calib`` (needs the model's
        code: an ``nn.Module`` or a Hugging Face folder); see
        :func:`aqformat.converters.finetune`. Text calibration is batched
        16 sentences of similar length per step.
    finetune_lr : float
        Peak learning rate of that fine-tuning.
    finetune_raw : {"all", "1d"}
        Uncompressed tensors it trains: all float ones (e.g. kept embeddings)
        or norms and biases only (``train_raw`` of :func:`~aqformat.converters.finetune`).
    model_code : str or callable, optional
        The architecture of a ``state_dict`` source (``.pt``, ``.safetensors``,
        a mapping), so that ``calib``, ``allocate`` and ``finetune_steps`` can
        run it: ``"package.module:Callable"``, ``"path/to/model.py:Callable"``
        or a callable, called with no arguments to build an ``nn.Module`` whose
        ``state_dict`` has the checkpoint's names and shapes
        (:func:`~aqformat.converters.model_code.attach_model`).
    strict : bool
        Refuse a conversion that would not make the file smaller than the model's tensors
        (an :class:`AqmInputError`, before encoding where the raw and small tensors alone are
        too many bytes); by default it is written with an :class:`AqmWarning`.
    workers : int, optional
        Train codebook groups and code tensors in this many local processes
        (:mod:`aqformat.converters.parallel`); the file is the same whatever
        the number. Default: everything in this process.
    ray : str, optional
        Run those tasks on a Ray cluster instead (``"auto"``: the cluster this
        machine belongs to, else a local one; or ``HOST:PORT``); needs the
        ``ray`` extra. Tasks whose worker dies are retried.
    device : str, optional
        ``"cpu"`` or ``"cuda"``: where codebooks are trained and codes searched
        (default: CUDA when present, else the CPU).
    fold_batchnorm : bool
        Fold each BatchNorm into the Conv2d/Conv3d before it, and into the Linear/Conv1d before a
        BatchNorm1d where ``calib`` shows that layer's output rank (:mod:`aqformat.converters.bn_fold`;
        needs the module or ``model_code``): the weights are coded as the model applies them,
        and the file loads into the same module. The pairs folded are listed in the file's
        ``source`` metadata under ``batchnorm_folded``.

    Returns
    -------
    ConversionSummary
    """
    opts = ConvertOptions.build(bits=bits, target_size=target_size, allocate=allocate, permute=permute,
                                grouping=grouping, keep=keep, seed=seed, progress=progress,
                                min_elements=min_elements, codec=codec, codec_for=codec_for, encoder=encoder,
                                strict=strict, workers=workers, ray=ray, device=device)
    tuning = FinetuneOptions(steps=finetune_steps, lr=finetune_lr, train_raw=finetune_raw, seed=seed,
                             progress=progress)
    source = open_source(model)
    if source.framework != "pytorch":
        raise AqmInputError("from_torch was given an ONNX model; use from_onnx")
    check_output(source, out_path)
    if model_code is not None:
        from .model_code import attach_model
        source = attach_model(source, model_code)
    from .calib import calibration_batches
    axes = _torch_axes(source.module) if source.module is not None else {}
    # resolved once: fine-tuning runs the same model (loaded once for a Hugging Face folder)
    resolved = calibration_batches(calib, source) if calib is not None else None
    if fold_batchnorm:
        source, resolved = fold_calibrated(source, resolved)
    if not tuning.steps:
        return run(source, out_path, opts, axes, calib=resolved)
    return run_and_finetune(source, out_path, opts, axes, resolved, tuning)


@_memory_errors_as_aqm
def from_onnx(model: Any, out_path: str | os.PathLike, *, bits: float = 4.0,
              target_size: int | str | None = None, allocate: bool = False,
              permute: bool = False, grouping: str = "by-kind", calib: Any = None,
              tokenizer: str | None = None, image: Any = None, keep: Iterable[str] = (),
              seed: int = 0, progress: bool = True, min_elements: int = DEFAULT_MIN_ELEMENTS,
              codec: str | None = None, codec_for: Iterable[str] = (),
              encoder: EncoderOptions | Mapping[str, Any] | None = None,
              finetune_steps: int = 0, finetune_lr: float = 1e-3, finetune_raw: str = "all",
              strict: bool = False, workers: int | None = None, ray: str | None = None,
              device: str | None = None, fold_batchnorm: bool = True) -> ConversionSummary:
    """Convert an ONNX model (path or ``ModelProto``) to .aqm with its graph embedded.

    Initializers (and large Constant nodes) become .aqm tensors of the same
    name; weights of MatMul/Gemm/Conv/ConvTranspose/Gather/LSTM/GRU/RNN are
    viewed with output channels as rows. The stored graph follows the
    contract of :mod:`aqformat.converters.onnx_graph`.

    ``calib`` is a ``.npy``/``.npz`` file, a folder of images, a text file
    with ``tokenizer`` (a folder holding ``tokenizer.json``), or a list of feed
    dicts (see :func:`aqformat.converters.calib_inputs.load_calibration`;
    ``image`` is an :class:`~aqformat.converters.calib_inputs.ImagePreprocess`).
    Its ``X^T X`` statistics are collected through ONNX Runtime; the output
    sensitivity (``allocate``, ``target_size``) and ``finetune_steps`` run the
    graph in torch (:class:`~aqformat.converters.onnx_torch.OnnxModule`), and
    the fine-tuned file still runs with ONNX Runtime alone. ``fold_batchnorm`` removes
    each BatchNormalization that follows a Conv or Gemm, folding it into that layer's
    weight and bias. Other arguments as in :func:`from_torch`.
    """
    from .onnx_graph import weight_axes
    opts = ConvertOptions.build(bits=bits, target_size=target_size, allocate=allocate, permute=permute,
                                grouping=grouping, keep=keep, seed=seed, progress=progress,
                                min_elements=min_elements, codec=codec, codec_for=codec_for, encoder=encoder,
                                strict=strict, workers=workers, ray=ray, device=device)
    source = open_source(model)
    if source.framework != "onnx":
        raise AqmInputError("from_onnx needs an .onnx file or an onnx.ModelProto")
    check_output(source, out_path)
    if fold_batchnorm:
        source = fold_source(source)
    tuning = FinetuneOptions(steps=finetune_steps, lr=finetune_lr, train_raw=finetune_raw, seed=seed,
                             progress=progress)
    resolved = _onnx_calibration(source, calib, tokenizer, image)
    axes = weight_axes(source.onnx_model)
    if not tuning.steps:
        return run(source, out_path, opts, axes, calib=resolved, graph_model=source.onnx_model)
    return run_and_finetune(source, out_path, opts, axes, resolved, tuning, graph_model=source.onnx_model)


def _onnx_calibration(source: Any, calib: Any, tokenizer: str | None, image: Any) -> Any:
    """The resolved calibration of an ONNX source (None without ``calib``)."""
    if calib is None:
        if tokenizer is not None or image is not None:
            raise AqmInputError("--tokenizer and image preprocessing need --calib")
        return None
    from .calib_inputs import load_calibration, model_inputs
    from .onnx_calib import OnnxCalibration
    data = load_calibration(calib, model_inputs(source.onnx_model), tokenizer=tokenizer, image=image)
    return OnnxCalibration(source.onnx_model, source.load, data)


def from_torch_via_onnx(model: Any, example_inputs: Any, out_path: str | os.PathLike, *,
                        input_names: Sequence[str] | None = None,
                        output_names: Sequence[str] | None = None,
                        dynamic_axes: dict[str, Any] | None = None, opset: int = 17,
                        **kwargs: Any) -> ConversionSummary:
    """Export an ``nn.Module`` to ONNX with ``example_inputs`` and convert it in one step.

    The model is traced with the TorchScript exporter (``dynamo=False``, no
    extra dependency) into memory; parameters keep their ``state_dict`` names
    where the exporter preserves them. Other keyword arguments go to
    :func:`from_onnx`.
    """
    import onnx
    import torch
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), args, buf, dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              opset_version=opset)
    except Exception as e:  # noqa: BLE001 - the exporter raises many unrelated types
        raise AqmInputError(f"torch.onnx.export failed: {str(e).strip().splitlines()[0]}") from None
    return from_onnx(onnx.load_from_string(buf.getvalue()), out_path, **kwargs)


def convert(src: Any, out_path: str | os.PathLike, **kwargs: Any) -> ConversionSummary:
    """Convert any supported source (path type from its extension) to .aqm.

    ``.onnx`` files go to :func:`from_onnx`, everything else to :func:`from_torch`.
    Keyword arguments as in :func:`from_torch` (``model_code`` for PyTorch
    sources), plus ``tokenizer`` and ``image`` for ONNX sources.
    """
    source = open_source(src)
    if source.framework == "onnx":
        if kwargs.pop("model_code", None) is not None:
            raise AqmInputError("--model supplies code for .pt/.safetensors state_dicts; "
                                "an ONNX model carries its own graph")
        return from_onnx(source, out_path, **kwargs)
    for key in ("tokenizer", "image"):
        if kwargs.pop(key, None) is not None:
            raise AqmInputError("--tokenizer and image preprocessing apply to ONNX sources "
                                "(a PyTorch source runs its own tokenizer)")
    return from_torch(source, out_path, **kwargs)
