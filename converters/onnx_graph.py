"""ONNX graphs in .aqm files: lift constants, find weights, strip and restore initializers.

The stored graph follows the contract shared with the runtime
(:mod:`aqformat.onnx_stubs`): every initializer whose data lives in the .aqm
is a data-less stub. Large Constant nodes, in the main graph or in If/Loop subgraphs,
are first turned into main-graph initializers (subgraphs see outer-scope
values), so their data can live in the .aqm too.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from aqformat import tempfiles
from aqformat.dtypes import ONNX_DTYPE_NAMES, itemsize, numpy_dtype
from aqformat.errors import AqmFormatError, AqmInputError, AqmIOError
from aqformat.onnx_stubs import AQM_LOCATION, all_graphs, fill_stub, is_stub, make_stub, stub_array, subgraphs

__all__ = ["AQM_LOCATION", "CONSTANT_MIN_ELEMENTS", "load_model", "lift_constants", "prune_unused", "internalize", "dtype_name",
           "tensor_array", "weight_axes", "make_stub", "is_stub", "stubbed_graph", "export_onnx", "restore_model",
           "model_file_bytes"]

#: Constant nodes and initializers with at least this many elements live in the
#: .aqm; smaller ones (shapes, axes, scalars) stay inline in the graph, where
#: ONNX Runtime needs their values for shape inference and constant folding.
CONSTANT_MIN_ELEMENTS = 64
#: Above this many bytes of weights, ``export_onnx`` writes an external data file
#: (protobuf messages are limited to 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


# op_type -> {input index: axes of the matrix view (rows = output channels)}.
_WEIGHT_INPUTS: dict[str, dict[int, tuple[int, ...] | None]] = {
    "MatMul": {0: None, 1: (1, 0)},   # B is [in, out]
    "Conv": {1: None},                # [out, in/g, k...]
    "ConvTranspose": {1: "swap01"},   # [in, out/g, k...]
    "Gather": {0: None},              # embedding table [vocab, dim]
    "LSTM": {1: "swap01", 2: "swap01"},  # W, R: [dirs, gates*hidden, in]
    "GRU": {1: "swap01", 2: "swap01"},
    "RNN": {1: "swap01", 2: "swap01"},
}


def _onnx():
    import onnx
    return onnx


def load_model(model: Any) -> tuple[Any, str, str | None]:
    """Load and check an ONNX model without reading its external data.

    Returns ``(ModelProto, base directory for external data, path or None)``.

    Raises
    ------
    AqmInputError
        Missing file, not an ONNX protobuf, or the model fails ``onnx.checker``.
    """
    onnx = _onnx()
    from google.protobuf.message import DecodeError
    if isinstance(model, onnx.ModelProto):
        proto, base, path = model, os.getcwd(), None
    else:
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise AqmInputError(f"no such file: {path}")
        try:
            proto = onnx.load(path, load_external_data=False)
        except (DecodeError, ValueError, RuntimeError, OSError) as e:
            raise AqmInputError(f"{path}: not an ONNX model ({_first_line(e)})") from None
        base = os.path.dirname(os.path.abspath(path))
    try:
        # A path lets the checker handle external data and models > 2 GiB.
        onnx.checker.check_model(path if path is not None else proto)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise AqmInputError(f"{path or 'model'}: invalid ONNX model: {_first_line(e)}") from None
    return proto, base, path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _rename_uses(graph: Any, old: str, new: str) -> None:
    """Rename references to ``old`` in ``graph`` and its nested subgraphs."""
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
        for sub in subgraphs(node):
            _rename_uses(sub, old, new)
    for o in graph.output:
        if o.name == old:
            o.name = new


def lift_constants(model: Any, min_elements: int = CONSTANT_MIN_ELEMENTS) -> int:
    """Turn large Constant nodes and subgraph initializers into main-graph initializers.

    Works in place. A lifted name that is defined elsewhere in the model too
    (e.g. in both branches of an If) is renamed within its own scope.
    Returns the number of tensors lifted.
    """
    main = model.graph
    defined: dict[str, int] = {}
    for g in all_graphs(main):
        for n in [i.name for i in g.input] + [t.name for t in g.initializer] + [o for nd in g.node for o in nd.output]:
            defined[n] = defined.get(n, 0) + 1
    taken = set(defined)
    lifted = 0

    def unique(name: str) -> str:
        if defined.get(name, 0) <= 1:
            return name
        k = 1
        while f"{name}__{k}" in taken:
            k += 1
        taken.add(f"{name}__{k}")
        return f"{name}__{k}"

    for g in all_graphs(main):
        moved = []
        if g is not main:
            moved = list(g.initializer)
            del g.initializer[:]
        keep = []
        for node in g.node:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == 4), None)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None \
                    and int(np.prod(value.dims)) >= min_elements and value.data_type in ONNX_DTYPE_NAMES:
                t = type(value)()
                t.CopyFrom(value)
                t.name = node.output[0]
                moved.append(t)
            else:
                keep.append(node)
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
        for t in moved:
            new = unique(t.name)
            if new != t.name:
                _rename_uses(g, t.name, new)
                t.name = new
            main.initializer.append(t)
            lifted += 1
    return lifted


def prune_unused(model: Any) -> list[str]:
    """Drop main-graph initializers no node or graph output uses (ORT would drop them too,
    and then reject them as external initializers). Returns the dropped names."""
    used = {o.name for o in model.graph.output}
    for g in all_graphs(model.graph):
        used.update(x for node in g.node for x in node.input)
        used.update(o.name for o in g.output)
    dropped = [t.name for t in model.graph.initializer if t.name not in used]
    if dropped:
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return dropped


def internalize(model: Any, keep_external: set[str], base_dir: str) -> None:
    """Inline the data of external initializers not in ``keep_external`` (in place).

    Tensors that stay in the stored graph must carry their data: the source's
    external data files do not travel with the .aqm.
    """
    onnx = _onnx()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in keep_external:
            if dtype_name(t) is None:
                raise AqmInputError(f"initializer {t.name!r}: external data of type {t.data_type} "
                                    "is not supported")
            data = tensor_array(t, base_dir)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = np.ascontiguousarray(data).tobytes()


def dtype_name(t: Any) -> str | None:
    """aqformat dtype name of a ``TensorProto``, or None when aqformat cannot store it."""
    return ONNX_DTYPE_NAMES.get(t.data_type)


def _external_int(info: dict[str, str], key: str, name: str) -> int:
    """External-data field ``key`` (default 0) as a non-negative integer below 2**63."""
    text = info.get(key, "0")
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise AqmInputError(f"initializer {name!r}: external data {key} {text[:40]!r} is not a byte count")
    return int(text)


def tensor_array(t: Any, base_dir: str) -> np.ndarray:
    """Data of initializer ``t`` (bfloat16 as uint16 bits); external data read lazily from disk."""
    onnx = _onnx()
    name = dtype_name(t)
    shape = tuple(int(d) for d in t.dims)
    dt = numpy_dtype(name)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
            raise AqmInputError(f"initializer {t.name!r}: unsafe external data location {loc!r}")
        file = os.path.join(base_dir, loc)
        offset, count = _external_int(info, "offset", t.name), math.prod(shape)
        if "length" in info and _external_int(info, "length", t.name) != count * dt.itemsize:
            raise AqmInputError(f"initializer {t.name!r}: external data length does not match its shape")
        try:
            arr = np.fromfile(file, dtype=dt, count=count, offset=offset)
        except OSError as e:
            raise AqmInputError(f"initializer {t.name!r}: cannot read {file}: {e.strerror}") from None
        if arr.size != count:
            raise AqmInputError(f"initializer {t.name!r}: external data file {file} is truncated")
        return arr.reshape(shape)
    if name == "bfloat16":
        arr = (np.frombuffer(t.raw_data, dtype=dt) if t.raw_data
               else np.asarray(t.int32_data, dtype=np.uint32).astype(np.uint16))
        return arr.reshape(shape)
    return onnx.numpy_helper.to_array(t).astype(dt, copy=False).reshape(shape)


def weight_axes(model: Any) -> dict[str, tuple[int, ...] | None]:
    """Initializers used as layer weights, mapped to the axes of their matrix view.

    A weight is an initializer at a weight input of MatMul, Gemm (respecting
    ``transA``/``transB``), Conv, ConvTranspose, Gather (the table) or
    LSTM/GRU/RNN (W and R), in the main graph or any subgraph. Rows of the
    matrix view are output channels. The first use found decides.
    """
    inits = {t.name: len(t.dims) for t in model.graph.initializer}
    found: dict[str, tuple[int, ...] | None] = {}
    for g in all_graphs(model.graph):
        for node in g.node:
            slots = dict(_WEIGHT_INPUTS.get(node.op_type, {}))
            if node.op_type == "Gemm":
                attrs = {a.name: a.i for a in node.attribute}
                slots = {0: None if not attrs.get("transA") else (1, 0),
                         1: (1, 0) if not attrs.get("transB") else None}
            for i, axes in slots.items():
                if i >= len(node.input) or node.input[i] not in inits or node.input[i] in found:
                    continue
                ndim = inits[node.input[i]]
                if ndim < 2:
                    continue
                if axes == "swap01":
                    axes = (1, 0, *range(2, ndim))
                elif axes == (1, 0) and ndim > 2:  # batched MatMul: [..., in, out]
                    axes = (ndim - 1, *range(ndim - 1))
                found[node.input[i]] = axes
    return found


def stubbed_graph(model: Any, names: set[str]) -> Any:
    """A copy of ``model`` whose initializers ``names`` are stubs (their data lives in the .aqm file):
    only the graph's structure is copied, not those initializers' data; ``model`` is left as it is."""
    onnx = _onnx()
    m = onnx.ModelProto()
    _copy_fields(model, m, skip="graph")
    _copy_fields(model.graph, m.graph, skip="initializer")
    for t in model.graph.initializer:
        if t.name in names:
            make_stub(m.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims))
        else:
            m.graph.initializer.add().CopyFrom(t)
    return m


def stored_graph_bytes(model: Any, names: set[str]) -> int:
    """Bytes the graph of ``model`` takes in an .aqm file once its initializers ``names`` are
    stubs (:func:`stubbed_graph`), compressed as the writer stores it: a size budget counts them
    before any encoding."""
    import zstandard

    from aqformat.writer import ZSTD_LEVEL
    raw = stubbed_graph(model, names).SerializeToString()
    return min(len(raw), len(zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False).compress(raw)))


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` but ``skip``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def restore_model(aqm: Any, external: tuple[Any, str] | None = None) -> Any:
    """The stored graph with every stub filled from the .aqm's decoded tensors.

    Parameters
    ----------
    aqm : AqmFile
        An open .aqm file with an ONNX graph.
    external : (binary file, location), optional
        Write tensor data to this file and reference it as external data
        (location relative to the model) instead of inlining it.
    """
    from aqformat.runtime.onnx_graph import external_stubs
    onnx = _onnx()
    graph = aqm.graph()
    if graph is None or graph[0] != "onnx":
        raise AqmInputError(f"{aqm.path}: holds no ONNX graph (convert from an ONNX model, "
                            "or pass example inputs when converting a PyTorch model)")
    external_stubs(graph[1])  # refuses external data other than the .aqm's own tensors
    model = onnx.ModelProto()
    try:
        model.ParseFromString(graph[1])
    except Exception as e:  # noqa: BLE001 - protobuf raises several types on bad bytes
        raise AqmFormatError(f"{aqm.path}: stored ONNX graph is corrupt ({_first_line(e)})") from None
    offset = 0
    for t in model.graph.initializer:
        if not is_stub(t):
            continue
        if t.name not in aqm:
            raise AqmFormatError(f"{aqm.path}: initializer {t.name!r} has no tensor in the file")
        data = stub_array(aqm.read(t.name), t.data_type).tobytes()
        if external is None:
            fill_stub(t, data)
            continue
        fh, location = external
        pad = -offset % 4096  # page-align tensors so ORT can mmap them
        fh.write(b"\0" * pad)
        offset += pad
        fh.write(data)
        del t.external_data[:]
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        offset += len(data)
    return model


def export_onnx(aqm_path: str | os.PathLike, out_path: str | os.PathLike) -> dict[str, Any]:
    """Write a plain ONNX model with the .aqm's decoded weights.

    Weights above :data:`EXTERNAL_DATA_THRESHOLD` bytes in total go to
    ``<out>.data`` next to the model. Files are replaced atomically.

    Returns
    -------
    dict with ``path``, ``bytes`` and ``external_data`` (path or None).
    """
    from aqformat.reader import open as open_aqm
    from aqformat.writer import finished_file_mode
    out = os.fspath(out_path)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise AqmInputError(f"output directory {directory} does not exist")
    for target in (out, out + ".data"):
        if os.path.exists(target) and os.path.exists(aqm_path) and os.path.samefile(target, aqm_path):
            raise AqmInputError(f"output {target} is the input file {os.fspath(aqm_path)}; choose another output path")
    with open_aqm(aqm_path) as f:
        total = sum(t.numel * itemsize(t.dtype) for t in f.tensors())
        tmps: list[str] = []
        try:
            data_path = None
            if total > EXTERNAL_DATA_THRESHOLD:
                data_path = out + ".data"
                fd, tmp_data = tempfiles.create(data_path)
                tmps.append(tmp_data)
                with os.fdopen(fd, "wb") as fh:
                    model = restore_model(f, (fh, os.path.basename(data_path)))
                    fh.flush()
                    os.fsync(fh.fileno())
                    os.fchmod(fh.fileno(), finished_file_mode())
            else:
                model = restore_model(f)
            fd, tmp_model = tempfiles.create(out)
            tmps.append(tmp_model)
            with os.fdopen(fd, "wb") as fh:
                fh.write(model.SerializeToString())
                fh.flush()
                os.fsync(fh.fileno())
                os.fchmod(fh.fileno(), finished_file_mode())
            if data_path is not None:
                os.replace(tmp_data, data_path)
            os.replace(tmp_model, out)
            for p in tmps:
                tempfiles.release(p)
            tmps.clear()
        except OSError as e:
            raise AqmIOError(f"cannot write {out}: {e.strerror or e}") from None
        finally:
            for p in tmps:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                tempfiles.release(p)
    return {"path": out, "bytes": os.path.getsize(out), "external_data": data_path}


def model_file_bytes(model: Any, path: str, base_dir: str) -> int:
    """Bytes on disk of an ONNX model file plus the external data files it references."""
    locations = {e.value for t in model.graph.initializer if t.data_location == 1
                 for e in t.external_data if e.key == "location" and e.value != AQM_LOCATION}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(base_dir, loc))
                                       for loc in locations
                                       if os.path.isfile(os.path.join(base_dir, loc)))
