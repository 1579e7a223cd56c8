"""Conversion pipeline: PyTorch or ONNX models to .aqm, one tensor at a time.

Two streaming passes over the source:

1. *sample*: every tensor chosen for compression is read once and a bounded
   reservoir of its (scaled, calibration-weighted) vectors is added to its
   codebook group; then each group's codebooks are trained;
   (with a size target or ``allocate``, every tensor joins one candidate group
   per bit width, and an *allocate* pass predicts each tensor's output error
   per candidate from a few rows and picks one per tensor under the budget);
2. *encode*: tensors are read again one at a time, coded against their
   group's codebooks (or kept raw) and appended to the :class:`aqformat.Writer`.

Peak memory is about the largest tensor, the codebook reservoirs and the
calibration statistics, whatever the model size, when the source reads lazily.

Which tensors are compressed (``select``): floating-point tensors with at
least 2 dimensions and at least ``min_elements`` (default 4096) elements,
not matching a ``keep`` pattern. This includes embedding tables. Everything
else (biases, norms, small or integer tensors) is stored raw in its original
dtype, so it round-trips bit-exactly.
"""
from __future__ import annotations

import fnmatch
import functools
import io
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat import __version__
from aqformat.dtypes import FLOAT_DTYPES
from aqformat.errors import AqmInputError, AqmWarning
from aqformat.units import format_size, parse_size
from aqformat.writer import Writer

from .progress import Progress
from .sources import Source, TensorSpec, open_source, to_float32

__all__ = ["ConversionSummary", "DEFAULT_MIN_ELEMENTS", "convert", "from_torch", "from_onnx",
           "from_torch_via_onnx", "select_tensors", "parse_size"]

DEFAULT_MIN_ELEMENTS = 4096
_GROUPINGS = ("shared", "per-layer", "by-kind")


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


def check_output(source: Source, out_path: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose directory is missing or that is one of the source's files.

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


# ------------------------------------------------------------------ selection

def select_tensors(specs: Sequence[TensorSpec], *, keep: Iterable[str] = (),
                   min_elements: int = DEFAULT_MIN_ELEMENTS) -> list[str]:
    """Names of the tensors to compress (see the module docstring for the rule).

    Parameters
    ----------
    specs : sequence of TensorSpec
        The model's tensors.
    keep : iterable of str
        fnmatch patterns of tensor names to keep raw.
    min_elements : int
        Smallest tensor compressed.
    """
    keep = list(keep)
    return [s.name for s in specs
            if s.dtype in FLOAT_DTYPES and len(s.shape) >= 2 and s.numel >= min_elements
            and not any(fnmatch.fnmatchcase(s.name, p) for p in keep)]


def _torch_axes(module: Any) -> dict[str, tuple[int, ...]]:
    """Matrix-view axes of weights whose rows are not dim 0 (ConvTranspose: [in, out, k...])."""
    import torch
    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):
            ndim = mod.weight.dim()
            out[f"{name}.weight" if name else "weight"] = (1, 0, *range(2, ndim))
    return out


# ------------------------------------------------------------------ calibration

def _calibration_batches(calib: Any, source: Source) -> tuple[Any, Any, Any]:
    """``(module, batches, run)`` for ``collect_hessians`` from a ``calib`` argument.

    ``calib`` is a path (``.npy``: one input array, rows are samples; ``.npz``:
    arrays named after the model's forward arguments; ``.txt``: one sentence
    per line, for Hugging Face text models) or an iterable of batches (tensors,
    tuples or dicts of forward arguments).
    """
    import torch
    module = source.module
    tokenizer = None
    if module is None and source.info.get("hf_config") is not None and source.path:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel
        module = AutoModel.from_pretrained(source.path).float().eval()
    if module is None:
        raise AqmInputError("calibration needs the model's code: pass an nn.Module or a "
                            "Hugging Face folder (a bare state_dict cannot be run)")
    if isinstance(calib, (str, os.PathLike)):
        path = os.fspath(calib)
        if not os.path.isfile(path):
            raise AqmInputError(f"no such calibration file: {path}")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
            batches: Any = [torch.from_numpy(arr[i:i + 1]) for i in range(len(arr))]
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            n = min(len(v) for v in data.values())
            batches = [{k: torch.from_numpy(v[i:i + 1]) for k, v in data.items()} for i in range(n)]
        elif ext in (".txt", ".text"):
            with open(path, encoding="utf-8") as fh:
                batches = [line.strip() for line in fh if line.strip()]
        else:
            raise AqmInputError(f"{path}: calibration data must be .npy, .npz or .txt")
        if not batches:
            raise AqmInputError(f"{path}: no calibration samples")
    else:
        batches = list(calib)
    if tokenizer is None and any(isinstance(b, str) for b in batches):
        if source.info.get("hf_config") is None or not source.path:
            raise AqmInputError("text calibration needs a Hugging Face model folder (for its tokenizer)")
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(source.path)

    def run(m: Any, batch: Any) -> Any:
        if isinstance(batch, str):  # one unpadded sentence: padding would bias H
            batch = tokenizer([batch], truncation=True, max_length=512, return_tensors="pt")
        elif isinstance(batch, list) and batch and all(isinstance(b, str) for b in batch):
            batch = tokenizer(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            return m(**batch)
        if isinstance(batch, (tuple, list)):
            return m(*batch)
        return m(batch)

    return module, batches, run


def _calibration_stats(calib: tuple[Any, Any, Any] | None, names: Sequence[str],
                       sensitivity: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``H`` per weight in ``names`` and, if ``sensitivity``, each weight's output-channel
    sensitivity (:func:`~aqformat.converters.calib.collect_output_sensitivity`), from
    resolved ``(module, batches, run)`` calibration."""
    if calib is None:
        return {}, {}
    from .calib import collect_hessians, collect_output_sensitivity
    module, batches, run = calib
    wanted = set(names)

    def include(n: str, _m: Any) -> bool:
        return f"{n}.weight" in wanted
    try:
        H = collect_hessians(module, run, batches, include=include)
        S = collect_output_sensitivity(module, run, batches, include=include) if sensitivity else {}
    except (RuntimeError, TypeError, ValueError) as e:
        raise AqmInputError(f"calibration forward pass failed: {str(e).splitlines()[0]}") from None
    if not H:
        raise AqmInputError("calibration found no Linear/Conv2d weight among the tensors to compress")
    return H, S


# ------------------------------------------------------------------ bit allocation

_ENCODER_KEYS = ("b", "d", "beam", "iters", "feedback", "damp", "reservoir", "perm_iters")
_PIPELINE_KEYS = ("reservoir", "perm_iters")  # used by the pipeline, not by AQConfig


def _config_for_bits(bits: float, encoder: dict[str, Any]):
    """The AQ configuration of about ``bits`` code bits per weight: ``M = bits * d / b``.

    ``encoder`` may set ``b`` (bits per code, default 8), ``d`` (vector length,
    default 8) and the search effort ``beam``/``iters``/``feedback``/``damp``
    (defaults of :class:`aqformat.converters.aq.AQConfig`).
    """
    from .aq import AQConfig
    if isinstance(bits, (bool, str)) or not isinstance(bits, (int, float, np.number)) or not 0 < bits <= 64:
        raise AqmInputError(f"bits must be a number of bits per weight in (0, 64], got {bits!r}")
    unknown = set(encoder) - set(_ENCODER_KEYS)
    if unknown:
        raise AqmInputError(f"unknown encoder option(s) {sorted(unknown)} (known: {', '.join(_ENCODER_KEYS)})")
    opts = {k: v for k, v in encoder.items() if k not in _PIPELINE_KEYS}
    b, d = int(opts.pop("b", 8)), int(opts.pop("d", 8))
    M = int(round(bits * d / b))
    if not 1 <= M <= 64:
        raise AqmInputError(f"bits={bits} gives {M} codebooks of {b} bits over {d}-vectors (1..64 allowed)")
    return AQConfig(M=M, b=b, d=d, **opts)


def _reserved(n_tensors: int) -> int:
    """Bytes of header, metadata and alignment padding reserved under a budget.

    Measured: 19.6 KB for MiniLM's 104 tensors, 1.6 KB for an 8-tensor model.
    """
    return 1024 + 224 * n_tensors


def _sample_and_train(configs: dict[str, Any], members: dict[str, list[str]], weights: Any,
                      H: dict[str, Any], axes: dict[str, Any], perms: dict[str, Any] | None,
                      encoder: dict[str, Any], seed: int, numel: dict[str, int], progress: bool
                      ) -> dict[str, Any]:
    """Pass 1: read each tensor once, sample it into every group it may join, train the groups.

    With ``perms`` (a dict to fill), each tensor's column permutation is searched
    first (:func:`aqformat.converters.permute.search_permutation`) and used from then on.
    """
    from .aq import GroupTrainer
    reservoir = int(encoder.get("reservoir", 1 << 16))
    trainers = {g: GroupTrainer(cfg, reservoir=reservoir, seed=seed) for g, cfg in configs.items()}
    with Progress("sample", sum(numel[n] for n in members), len(members), progress) as bar:
        for n, groups in members.items():
            W = weights(n)
            if perms is not None:
                from .permute import search_permutation
                perms[n] = search_permutation(W, configs[groups[0]].d, axes.get(n), seed=seed,
                                              iters=int(encoder.get("perm_iters", 2000))).perm
            for g in groups:
                trainers[g].add(n, W, H.get(n), axes.get(n), (perms or {}).get(n))
            bar.update(numel[n], n)
    books = {}
    with Progress("train", len(trainers), len(trainers), progress, unit="group") as bar:
        for g, tr in trainers.items():
            books[g] = tr.train()
            bar.update(1, g)
    return books


def _allocate(budget: int, configs: dict[str, Any], members: dict[str, list[str]], books: dict[str, Any],
              weights: Any, specs: dict[str, TensorSpec], H: dict[str, Any], S: dict[str, Any],
              axes: dict[str, Any], perms: dict[str, Any], seed: int, progress: bool,
              trial_rows: int = 64) -> dict[str, str]:
    """Pass 2: predict each tensor's error under every candidate group from a random subset
    of its rows, then let :func:`aqformat.converters.allocate.allocate` pick one group (or
    ``"raw"``) per tensor within ``budget`` bytes (codes, scales and codebooks counted).

    A row's predicted error is its output error ``(E H E^T)_ii`` weighted by the output
    sensitivity ``s_i`` of ``S`` (the predicted change of the model's output). Tensors
    without ``S`` (no calibration, or not a Linear/Conv2d) are weighted relative to their
    own energy ``tr(W H W^T)``, scaled by the median sensitivity-weighted energy of the
    others so both kinds compare (measured on MiniLM: absolute errors starve sensitive
    layers)."""
    import torch

    from . import aq
    from .allocate import allocate, aq_tensor_bytes
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    energy: dict[str, float] = {}
    with Progress("allocate", sum(specs[n].numel for n in members), len(members), progress) as bar:
        for n, groups in members.items():
            W = weights(n)
            Wm = aq.as_matrix(n, W, axes.get(n), perms.get(n))
            s = S.get(n)
            energy[n] = aq.output_error(Wm, 0.0, H.get(n), s)
            sub = torch.randperm(Wm.shape[0], generator=gen)[:trial_rows]
            errors[n], nbytes[n] = {"raw": 0.0}, {"raw": specs[n].nbytes}
            for g in groups:
                t = aq.encode_tensor(n, W, books[g], configs[g], H.get(n), axes.get(n), perms.get(n),
                                     rows=sub)
                Wh = aq.decode_rows(t, books[g], Wm.shape[1])
                errors[n][g] = aq.output_error(Wm[sub], Wh, H.get(n), None if s is None else s[sub]) \
                    * Wm.shape[0] / len(sub)
                nbytes[n][g] = aq_tensor_bytes(specs[n].shape, configs[g], axes.get(n), perms.get(n) is not None)
            bar.update(specs[n].numel, n)
    weighted = [energy[n] for n in members if n in S]
    ref = float(np.median(weighted)) if weighted else 1.0
    sensitivity = {n: 1.0 if n in S else ref / max(energy[n], 1e-30) for n in members}
    return allocate(errors, nbytes, budget, {g: cfg.codebook_bytes() for g, cfg in configs.items()},
                    sensitivity)


def _plan(specs: list[TensorSpec], compress: list[str], *, bits: float, target: int | None,
          allocate: bool, codebooks: str, encoder: dict[str, Any], axes: dict[str, Any],
          H: dict[str, Any], S: dict[str, Any], perms: dict[str, Any] | None, weights: Any, seed: int, progress: bool
          ) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Choose every compressed tensor's codebook group and train the groups.

    Without ``target`` or ``allocate``, every tensor gets the ``bits`` setting,
    in groups by ``codebooks`` mode. Otherwise each ``codebooks`` group is
    offered candidates of ``bits - 1``, ``bits`` and ``bits + 1`` code bits and the
    allocator picks per tensor under the budget: ``target`` bytes, or ``bits``
    per compressed weight with every byte counted (codes, scales, codebooks).

    Returns ``(configs by group, group of each coded tensor, codebooks by group)``.
    """
    from . import aq
    by_name = {s.name: s for s in specs}
    shapes = {s.name: s.shape for s in specs}
    numel = {s.name: s.numel for s in specs}
    uniform = _config_for_bits(bits, encoder)
    if target is None and not allocate:
        compress = [n for n in compress if aq.aq_eligible(shapes[n], uniform, axes.get(n))]
        groups = aq.group_tensors(compress, codebooks, shapes)
        configs = {g: uniform for g in groups}
        group_of = {n: g for g, ms in groups.items() for n in ms}
        books = _sample_and_train(configs, {n: [g] for n, g in group_of.items()}, weights, H, axes,
                                  perms, encoder, seed, numel, progress)
        return configs, group_of, books
    b, d = int(encoder.get("b", 8)), int(encoder.get("d", 8))
    configs, members = {}, {}
    for key, names in aq.group_tensors(compress, codebooks, shapes).items():
        for M in range(max(1, uniform.M - d // b), uniform.M + d // b + 1):
            cfg = _config_for_bits(M * b / d, encoder)
            gid = f"{key}:{M}x{b}d{d}"
            for n in names:
                if aq.aq_eligible(shapes[n], cfg, axes.get(n)):
                    configs[gid] = cfg
                    members.setdefault(n, []).append(gid)
    if target is not None:
        fixed = sum(s.nbytes for s in specs if s.name not in members)
        budget = int((target - _reserved(len(specs))) / 1.002) - fixed
        if budget <= 0:
            raise AqmInputError(f"target size {target:,} bytes is below the smallest reachable "
                                f"(raw tensors alone take {fixed:,} bytes)")
    else:
        allowed = int(bits * sum(numel[n] for n in members) / 8)
        budget = allowed - _reserved(len(specs))
        if budget <= 0:
            raise AqmInputError(f"--allocate at {bits} bits/weight gives {allowed:,} bytes, less than the "
                                f"{_reserved(len(specs)):,} reserved for the header: use more bits or no --allocate")
    books = _sample_and_train(configs, members, weights, H, axes, perms, encoder, seed, numel,
                              progress)
    choice = _allocate(budget, configs, members, books, weights, by_name, H, S, axes, perms or {},
                       seed, progress)
    group_of = {n: g for n, g in choice.items() if g != "raw"}
    used = set(group_of.values())
    return ({g: c for g, c in configs.items() if g in used}, group_of,
            {g: c for g, c in books.items() if g in used})


# ------------------------------------------------------------------ pipeline

def _run(source: Source, out_path: str | os.PathLike, *, bits: float, target_size: int | str | None,
         allocate: bool, permute: bool, codebooks: str, calib: tuple[Any, Any, Any] | None,
         keep: Iterable[str], seed: int,
         progress: bool, min_elements: int, encoder: dict[str, Any] | None, axes: dict[str, Any],
         graph_model: Any = None) -> ConversionSummary:
    import torch

    from . import aq
    from . import onnx_graph
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
                    t = aq.encode_tensor(s.name, W, books[g], configs[g], H.get(s.name),
                                         axes.get(s.name), perms.get(s.name))
                    w.add_aq(s.name, s.shape, t.codes, group=g, dtype=s.dtype,
                             scale=t.scale, perm=t.perm, axes=axes.get(s.name))
                    sqnr[s.name] = _sqnr_db(W, aq.decode_tensor(t, books[g]))
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


def _options(bits: float, target_size: Any, allocate: bool, permute: bool, codebooks: str,
             calib: Any, keep: Iterable[str], seed: int, progress: bool, min_elements: int,
             encoder: Any) -> dict[str, Any]:
    return {"bits": bits, "target_size": target_size, "allocate": allocate, "permute": permute,
            "codebooks": codebooks, "calib": calib,
            "keep": tuple(keep), "seed": seed, "progress": progress, "min_elements": min_elements,
            "encoder": encoder}


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
               permute: bool = False, codebooks: str = "by-kind", calib: Any = None,
               keep: Iterable[str] = (), seed: int = 0, progress: bool = True,
               min_elements: int = DEFAULT_MIN_ELEMENTS,
               encoder: dict[str, Any] | None = None, finetune_steps: int = 0,
               finetune_lr: float = 1e-3, finetune_raw: str = "all") -> ConversionSummary:
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
        Code bits per compressed weight (M 256-entry codebooks over 8-vectors: M = bits).
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
    codebooks : {"shared", "per-layer", "by-kind"}
        One codebook group for the model, one per tensor, or one per layer kind.
    calib : path or iterable, optional
        Calibration inputs (see :func:`_calibration_batches`); the encoder then
        minimises each layer's output error instead of its weight error.
    keep : iterable of str
        fnmatch patterns of tensors stored raw.
    seed : int
        Seed of sampling and codebook training (same inputs, same file).
    progress : bool
        Show progress bars on stderr.
    min_elements : int
        Smallest tensor compressed.
    encoder : dict, optional
        Encoder settings: ``b``, ``d`` (code bits, vector length), ``beam``,
        ``iters``, ``feedback``, ``damp`` (search effort) and ``reservoir``
        (training vectors sampled per codebook group), ``perm_iters``
        (permutation search rounds).
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

    Returns
    -------
    ConversionSummary
    """
    source = open_source(model)
    if source.framework != "pytorch":
        raise AqmInputError("from_torch was given an ONNX model; use from_onnx")
    check_output(source, out_path)
    axes = _torch_axes(source.module) if source.module is not None else {}
    # resolved once: fine-tuning runs the same model (loaded once for a Hugging Face folder)
    resolved = _calibration_batches(calib, source) if calib is not None else None
    opts = _options(bits, target_size, allocate, permute, codebooks, resolved, keep, seed, progress,
                    min_elements, encoder)
    if not finetune_steps:
        return _run(source, out_path, axes=axes, **opts)
    return _run_and_finetune(source, out_path, axes, opts, finetune_steps, finetune_lr, finetune_raw)


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


@_memory_errors_as_aqm
def from_onnx(model: Any, out_path: str | os.PathLike, *, bits: float = 4.0,
              target_size: int | str | None = None, allocate: bool = False,
              permute: bool = False, codebooks: str = "by-kind", keep: Iterable[str] = (), seed: int = 0, progress: bool = True,
              min_elements: int = DEFAULT_MIN_ELEMENTS,
              encoder: dict[str, Any] | None = None) -> ConversionSummary:
    """Convert an ONNX model (path or ``ModelProto``) to .aqm with its graph embedded.

    Initializers (and large Constant nodes) become .aqm tensors of the same
    name; weights of MatMul/Gemm/Conv/ConvTranspose/Gather/LSTM/GRU/RNN are
    viewed with output channels as rows. The stored graph follows the
    contract of :mod:`aqformat.converters.onnx_graph`. Other arguments as in
    :func:`from_torch` (calibration is not supported for ONNX sources yet).
    """
    from .onnx_graph import weight_axes
    source = open_source(model)
    if source.framework != "onnx":
        raise AqmInputError("from_onnx needs an .onnx file or an onnx.ModelProto")
    check_output(source, out_path)
    return _run(source, out_path, axes=weight_axes(source.onnx_model), graph_model=source.onnx_model,
                **_options(bits, target_size, allocate, permute, codebooks, None, keep, seed, progress, min_elements,
                           encoder))


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

    ``.onnx`` files go to :func:`from_onnx` (which takes no ``calib``),
    everything else to :func:`from_torch`. Keyword arguments as in :func:`from_torch`.
    """
    source = open_source(src)
    if source.framework == "onnx":
        if kwargs.pop("calib", None) is not None:
            raise AqmInputError("calibration is supported for PyTorch sources only")
        return from_onnx(source, out_path, **kwargs)
    return from_torch(source, out_path, **kwargs)
