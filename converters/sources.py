"""Tensor sources: read a model's tensors lazily, one at a time.

A :class:`Source` lists every tensor (name, shape, dtype) up front without
reading data, and :meth:`Source.load` reads one tensor in its original dtype
(bfloat16 as its ``uint16`` bit pattern). Converters walk a source tensor by
tensor, so peak memory stays near the largest tensor when the backing store
can be read lazily (safetensors, ``torch.load(mmap=True)``, ONNX external
data).

Supported inputs: ``nn.Module``, ``state_dict`` mappings, ``.pt``/``.pth``/
``.bin`` checkpoints (``torch.load(weights_only=True)`` only: no arbitrary
pickles), ``.safetensors`` files, Hugging Face folders (``config.json`` plus
``*.safetensors`` or ``pytorch_model*.bin``), and ``.onnx`` models (including
external data and Constant nodes, see :mod:`aqformat.converters.onnx_graph`).
"""
from __future__ import annotations

import glob
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat.dtypes import bf16_to_f32, itemsize, numpy_dtype
from aqformat.errors import AqmInputError

__all__ = ["TensorSpec", "Source", "open_source", "torch_source", "safetensors_source",
           "hf_folder_source", "onnx_source", "to_float32"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and aqformat dtype name (``"float32"``, ``"bfloat16"``...) of a tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass
class Source:
    """A model's tensors, readable one at a time.

    Attributes
    ----------
    specs : list of TensorSpec
        Every tensor, in model order.
    load : callable
        ``load(name) -> numpy.ndarray`` in the original dtype (bfloat16 as uint16 bits).
    framework : str
        ``"pytorch"`` or ``"onnx"``.
    name : str
        Model name (for the file's ``source`` metadata).
    info : dict
        Extra ``source`` metadata (e.g. a Hugging Face ``config``).
    module : object, optional
        The ``nn.Module`` when known (needed for calibration and per-module layout).
    onnx_model : object, optional
        The ONNX ``ModelProto`` (Constant nodes already lifted to initializers).
    file_bytes : int, optional
        Size of the source on disk.
    """

    specs: list[TensorSpec]
    load: Callable[[str], np.ndarray]
    framework: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    module: Any = None
    onnx_model: Any = None
    file_bytes: int | None = None
    path: str | None = None


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 values of a tensor loaded from a :class:`Source` (bfloat16 bits decoded)."""
    return bf16_to_f32(array) if dtype == "bfloat16" else np.asarray(array, dtype=np.float32)


# ------------------------------------------------------------------ PyTorch

def _torch_dtype_name(t) -> str:
    import torch
    names = {getattr(torch, n): n for n in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                            "int16", "int8", "uint8", "bool")}
    try:
        return names[t.dtype]
    except KeyError:
        raise AqmInputError(f"unsupported tensor dtype {t.dtype}") from None


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def torch_source(obj: Any, *, name: str | None = None) -> Source:
    """Source over an ``nn.Module`` or a ``state_dict``-like mapping of tensors."""
    import torch
    module = obj if isinstance(obj, torch.nn.Module) else None
    tensors = obj.state_dict() if module is not None else obj
    if not isinstance(tensors, Mapping) or not tensors:
        raise AqmInputError("expected an nn.Module or a non-empty state_dict of tensors")
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AqmInputError(f"state_dict entry {_short(bad[0])} is not a tensor")
    specs = []
    for k, t in tensors.items():
        if not isinstance(k, str):  # .aqm tensor names are strings; str(k) would not find it again
            raise AqmInputError(f"state_dict key {_short(k)} is a {type(k).__name__}, not a string")
        if t.is_sparse or t.is_quantized:
            raise AqmInputError(f"tensor {k!r} is sparse or quantized; only dense tensors are supported")
        if t.is_meta:
            raise AqmInputError(f"tensor {k!r} is on the meta device: it has no values to convert")
        specs.append(TensorSpec(k, tuple(int(s) for s in t.shape), _torch_dtype_name(t)))
    return Source(specs, lambda n: _torch_to_numpy(tensors[n]), "pytorch",
                  name or (type(module).__name__ if module is not None else "state_dict"),
                  module=module)


def _short(value: Any) -> str:
    """``repr(value)``, cut short: it names a user's key in a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no key twice (readers differ on which duplicate wins)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {_short(dup)} appears twice")
    return out


def _unwrap_checkpoint(obj: Any, path: str) -> Mapping:
    """The tensor mapping of a checkpoint: the dict itself or its ``state_dict``/``model`` entry."""
    import torch
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise AqmInputError(f"{path}: checkpoint holds no state_dict of tensors")


def _torch_file_source(path: str) -> Source:
    import pickle

    import torch
    if not zipfile.is_zipfile(path):
        # Legacy (non-zip) checkpoints cannot be memory-mapped; they are still loaded safely.
        kwargs: dict[str, Any] = {}
    else:
        kwargs = {"mmap": True}
    try:
        with warnings.catch_warnings():
            # a checkpoint pickled by something other than torch.save: refused or loaded just the same
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise AqmInputError(f"{path}: checkpoint contains arbitrary Python objects, which are "
                                "refused (only tensors are loaded, weights_only=True)") from None
        raise AqmInputError(f"{path}: not a PyTorch checkpoint ({first})") from None
    except Exception as e:  # noqa: BLE001 - the unpickler raises arbitrary types on junk bytes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AqmInputError(f"{path}: not a PyTorch checkpoint ({first})") from None
    src = torch_source(_unwrap_checkpoint(obj, path), name=_stem(path))
    src.file_bytes, src.path = os.path.getsize(path), path
    return src


# ------------------------------------------------------------------ safetensors

# safetensors dtype -> (aqformat dtype name, stored numpy dtype)
_ST_DTYPES = {st: (name, numpy_dtype(name)) for st, name in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"))}
_ST_MAX_HEADER = 100 << 20


def _safetensors_index(path: str) -> dict[str, tuple[TensorSpec, str, int]]:
    """Parse and bounds-check a safetensors header: name -> (spec, numpy dtype, file offset)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            raw = fh.read(n) if size >= 8 and 2 <= n <= min(_ST_MAX_HEADER, size - 8) else None
    except OSError as e:
        raise AqmInputError(f"{path}: cannot read ({e.strerror})") from None
    if raw is None:
        raise AqmInputError(f"{path}: not a safetensors file (bad header length)")
    header = _json_object(raw, path, "not a safetensors file")
    out = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, code = _ST_DTYPES[rec["dtype"]]
            shape = tuple(_json_count(x) for x in rec["shape"])
            begin, end = (_json_count(x) for x in rec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise AqmInputError(f"{path}: tensor {_short(name)} has an invalid or unsupported entry") from None
        spec = TensorSpec(name, shape, dt)
        if end - begin != spec.nbytes or 8 + n + end > size:
            raise AqmInputError(f"{path}: tensor {_short(name)} lies outside the file or has the wrong size")
        out[name] = (spec, code, 8 + n + begin)
    return out


def _json_count(x: Any) -> int:
    """A JSON integer in [0, 2**63): a shape or offset (``1e400``, ``2.5``, ``true`` are refused)."""
    if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < 1 << 63:
        raise ValueError(x)
    return x


def safetensors_source(paths: str | list[str], *, name: str | None = None) -> Source:
    """Lazy source over one or more ``.safetensors`` files (shards of one model).

    Tensors are read with plain file reads, not a memory map, so pages of
    tensors already converted do not stay in the process's resident memory.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    where: dict[str, tuple[TensorSpec, str, int, str]] = {}
    for p in paths:
        for k, (spec, code, offset) in _safetensors_index(p).items():
            if k in where:
                raise AqmInputError(f"tensor {k!r} appears in two safetensors files")
            where[k] = (spec, code, offset, p)
    # Model order: by position in the files, as written.
    order = sorted(where, key=lambda k: (paths.index(where[k][3]), where[k][2]))

    def load(n: str) -> np.ndarray:
        spec, code, offset, p = where[n]
        arr = np.fromfile(p, dtype=code, count=spec.numel, offset=offset)
        if arr.size != spec.numel:
            raise AqmInputError(f"{p}: tensor {n!r} is truncated")
        return arr.reshape(spec.shape)

    return Source([where[k][0] for k in order], load, "pytorch", name or _stem(paths[0]),
                  file_bytes=sum(os.path.getsize(p) for p in paths), path=paths[0])


def _json_object(raw: bytes, path: str, what: str) -> dict[str, Any]:
    """The JSON object in ``raw`` (duplicate keys refused); invalid or deeply nested JSON
    and non-objects are one-line AqmInputErrors ``"<path>: <what> (<why>)"``."""
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise AqmInputError(f"{path}: {what} ({str(e)[:200]})") from None
    except RecursionError:
        raise AqmInputError(f"{path}: {what} (it nests too deeply)") from None
    if not isinstance(value, dict):
        raise AqmInputError(f"{path}: {what} (not a JSON object)")
    return value


_ST_INDEX = "model.safetensors.index.json"


def _index_map(folder: str) -> dict[str, str] | None:
    """The ``weight_map`` (tensor name -> shard file) of ``model.safetensors.index.json``, None
    without an index; every shard must be a ``.safetensors`` file name present in the folder
    (shards are read in file-name order: ``model-00001-of-00003.safetensors`` first)."""
    path = os.path.join(folder, _ST_INDEX)
    if not os.path.isfile(path):
        return None
    try:
        if os.path.getsize(path) > _ST_MAX_HEADER:
            raise AqmInputError(f"{path}: larger than {_ST_MAX_HEADER >> 20} MiB")
        with open(path, "rb") as fh:
            index = _json_object(fh.read(), path, "unreadable safetensors index")
    except OSError as e:
        raise AqmInputError(f"{path}: cannot read ({e.strerror})") from None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise AqmInputError(f"{path}: no weight_map of tensor name -> shard file")
    for f in dict.fromkeys(weight_map.values()):
        if os.path.basename(f) != f or not f.endswith(".safetensors"):
            raise AqmInputError(f"{path}: shard {_short(f)} is not a .safetensors file name in the folder")
        if not os.path.isfile(os.path.join(folder, f)):
            raise AqmInputError(f"{path}: shard {f} is missing")
    return weight_map


def _check_index(folder: str, weight_map: dict[str, str]) -> None:
    """Each shard holds exactly the tensors the index maps to it (headers only are read)."""
    for f in dict.fromkeys(weight_map.values()):
        have = set(_safetensors_index(os.path.join(folder, f)))
        listed = {n for n, shard in weight_map.items() if shard == f}
        if have != listed:
            n = sorted(listed - have or have - listed)[0]
            why = f"the index puts it in {f}, which lacks it" if n in listed else f"{f} holds it, the index does not"
            raise AqmInputError(f"{os.path.join(folder, _ST_INDEX)}: tensor {_short(n)}: {why}")


def hf_folder_source(folder: str) -> Source:
    """Source over a Hugging Face model folder (``config.json`` + weights)."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise AqmInputError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        with open(cfg_path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise AqmInputError(f"{cfg_path}: unreadable config ({e.strerror})") from None
    config = _json_object(raw, cfg_path, "unreadable config")
    name = config.get("_name_or_path") or os.path.basename(os.path.normpath(folder))
    # With an index, exactly the shards it names (not a consolidated copy lying beside them).
    weight_map = _index_map(folder)
    shards = ([os.path.join(folder, f) for f in sorted(set(weight_map.values()))] if weight_map
              else sorted(glob.glob(os.path.join(folder, "*.safetensors"))))
    if weight_map:
        _check_index(folder, weight_map)
    if shards:
        src = safetensors_source(shards, name=name)
    else:
        bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        if not bins:
            raise AqmInputError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
        if len(bins) > 1:
            raise AqmInputError(f"{folder}: sharded .bin checkpoints are not supported; "
                                "convert them to safetensors")
        src = _torch_file_source(bins[0])
        src.name = name
    src.info = {"hf_config": config}
    src.path = folder
    return src


# ------------------------------------------------------------------ ONNX

def onnx_source(model: Any, *, name: str | None = None) -> Source:
    """Source over an ONNX model (path or ``ModelProto``); external data is read lazily."""
    from . import onnx_graph
    proto, base_dir, path = onnx_graph.load_model(model)
    onnx_graph.lift_constants(proto)
    onnx_graph.prune_unused(proto)
    # Small initializers and types aqformat cannot store (strings...) stay inline in the graph.
    inits = {t.name: t for t in proto.graph.initializer if onnx_graph.dtype_name(t) is not None
             and math.prod(t.dims) >= onnx_graph.CONSTANT_MIN_ELEMENTS}
    onnx_graph.internalize(proto, set(inits), base_dir)
    specs = [TensorSpec(t.name, tuple(int(d) for d in t.dims), onnx_graph.dtype_name(t))
             for t in inits.values()]
    src = Source(specs, lambda n: onnx_graph.tensor_array(inits[n], base_dir), "onnx",
                 name or proto.graph.name or (_stem(path) if path else "onnx_model"),
                 onnx_model=proto)
    if path:
        src.file_bytes, src.path = onnx_graph.model_file_bytes(proto, path, base_dir), path
    return src


# ------------------------------------------------------------------ dispatch

def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def open_source(src: Any) -> Source:
    """A :class:`Source` for a path (type from its extension) or an in-memory model.

    Raises
    ------
    AqmInputError
        Missing path, unknown extension, or a file that is not a model of its type.
    """
    if isinstance(src, Source):
        return src
    if not isinstance(src, (str, os.PathLike)):
        if type(src).__name__ == "ModelProto":
            return onnx_source(src)
        return torch_source(src)
    path = os.fspath(src)
    if not os.path.exists(path):
        raise AqmInputError(f"no such file or directory: {path}")
    if os.path.isdir(path):
        return hf_folder_source(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth", ".bin", ".ckpt"):
        return _torch_file_source(path)
    if ext == ".safetensors":
        return safetensors_source(path)
    if ext == ".onnx":
        return onnx_source(path)
    raise AqmInputError(f"{path}: unknown model type {ext or '(no extension)'!r} "
                        "(expected .pt/.pth/.bin, .safetensors, .onnx or a Hugging Face folder)")
