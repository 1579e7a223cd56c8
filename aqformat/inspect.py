"""What ``aqm-info`` reports: sizes, bits per weight, codecs and sharing of a file."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from .errors import AqmError, AqmIntegrityError
from .reader import open as open_aqm
from .units import format_size
from .terminal import printable


def describe(path: str | os.PathLike, check: bool = True) -> dict[str, Any]:
    """Summarise an .aqm file as a JSON-serialisable dict.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    check : bool
        Verify every section checksum (reads the whole file once).
    """
    with open_aqm(path) as f:
        tensors = f.tensors()
        groups = f.codebook_groups
        group_bytes = {g.name: f.group_bytes(g.name) for g in groups}
        users = f.group_tensors()  # one pass: per-group scans of the tensors were quadratic
        params = sum(t.numel for t in tensors)
        integrity = "not checked"
        if check:
            try:
                f.check_checksums()
                integrity = "ok"
            except AqmIntegrityError as e:
                integrity = "corrupted"
                integrity_error = str(e)
        weight_bytes = sum(t.stored_bytes for t in tensors) + sum(group_bytes.values())
        report: dict[str, Any] = {
            "file": os.fspath(path),
            "format_version": f"{f.version[0]}.{f.version[1]}",
            "producer": f.producer,
            "source": f.source,
            "metadata": f.metadata,
            "file_bytes": f.size,
            "tensor_count": len(tensors),
            "parameters": params,
            "bits_per_weight": 8.0 * f.size / params if params else 0.0,
            "weight_bits_per_weight": 8.0 * weight_bytes / params if params else 0.0,
            "compression_ratio_fp32": 4.0 * params / f.size if f.size else 0.0,
            "codebook_bytes": sum(group_bytes.values()),
            "codebook_share": sum(group_bytes.values()) / f.size if f.size else 0.0,
            "graph": f.graph_format,
            "integrity": integrity,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "codec": t.codec,
                         "bits_per_weight": round(t.bits_per_weight, 4), "stored_bytes": t.stored_bytes,
                         "offset": min((f.section(i).offset for i in f.tensor_sections(t.name)), default=None),
                         "group": t.group, **_choice(f.metadata, t.name)}
                        for t in tensors],
            "codebook_groups": [{"name": g.name, "M": g.M, "K": g.K, "d": g.d, "dtype": g.dtype,
                                 "bytes": group_bytes[g.name], "offset": f.section(g.section).offset,
                                 "tensors": users[g.name]}
                                for g in groups],
        }
        if f.graph_format == "onnx":
            report["graph_io"] = _onnx_io(f)
        if integrity == "corrupted":
            report["integrity_error"] = integrity_error
    return report


def _choice(metadata: Any, name: str) -> dict[str, Any]:
    """``{"choice": ...}``: why ``--codec auto`` gave tensor ``name`` its codec, from the file's
    ``conversion.choice`` metadata (``[codec, setting, bytes, relative error, {other codec: [bytes,
    relative error]}]``); empty when the file has no such valid entry."""
    conversion = metadata.get("conversion") if isinstance(metadata, dict) else None
    table = conversion.get("choice") if isinstance(conversion, dict) else None
    entry = table.get(name) if isinstance(table, dict) else None
    if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[4], dict)
            and all(isinstance(v, (int, float)) for v in entry[2:4])):
        return {}
    others = {str(k): v for k, v in entry[4].items()
              if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)}
    return {"choice": {"codec": str(entry[0]), "setting": entry[1], "bytes": entry[2], "error": entry[3],
                       "others": others}}


def _choice_lines(tensors: list[dict[str, Any]]) -> list[str]:
    """The ``--codec auto`` section of :func:`render_text`: each tensor's codec, bytes and error
    (relative to its energy) beside the best option of every other codec at the same trade."""
    chosen = [t for t in tensors if "choice" in t]
    if not chosen:
        return []
    lines = ["", "codec choice (--codec auto): bytes and error relative to the tensor's energy; "
                 "other codecs at the same error-per-byte trade"]
    for t in chosen:
        c = t["choice"]
        others = "; ".join(f"{_safe(k)} {v[0]:,} B {v[1]:.3g}" for k, v in sorted(c["others"].items()))
        lines.append(f"  {_safe(t['name'])}: {_safe(c['codec'])} {_safe(c['setting'])}, {c['bytes']:,} B, "
                     f"error {c['error']:.3g}" + (f" (vs {others})" if others else ""))
    return lines


def _onnx_io(f: Any) -> dict[str, Any]:
    """The stored ONNX graph's inputs, outputs and the initializers whose data it keeps."""
    from .runtime.onnx_io import graph_io
    try:
        io = graph_io(f.graph()[1])
    except AqmError as e:  # the tensors are still worth describing
        return {"error": str(e), "inputs": [], "outputs": [], "initializers_in_graph": []}
    # initializers are named in aqformat's dtype terms, like the tensors beside them
    dtypes = {"float": "float32", "double": "float64"}
    return {"inputs": [asdict(v) for v in io.inputs], "outputs": [asdict(v) for v in io.outputs],
            "initializers_in_graph": [dict(asdict(v), type=dtypes.get(v.type, v.type)) for v in io.in_graph]}


_safe = printable  # text from the file, with control characters escaped


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _shape(shape: list[Any] | None) -> str:
    if shape is None:
        return "?"
    return "x".join("?" if d is None else _safe(d) for d in shape) or "scalar"


def render_text(r: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`describe`'s report, laid out like gguf-dump.

    Metadata is printed as JSON; every tensor with its stored bytes and file
    offset; for an ONNX graph, its inputs and outputs and the initializers it
    keeps ("in graph").
    """
    src = r["source"].get("framework", "?") if r["source"] else "?"
    lines = [
        f"file          {_safe(r['file'])}",
        f"format        .aqm {r['format_version']}   producer {_safe(r['producer'])}   source {_safe(src)}",
        f"tensors       {r['tensor_count']}   parameters {r['parameters']:,}",
        f"size          {format_size(r['file_bytes'])} ({r['file_bytes']:,} bytes)   "
        f"{r['bits_per_weight']:.3f} bits/weight   {r['compression_ratio_fp32']:.2f}x vs fp32",
        f"graph         {r['graph'] or 'none'}",
        f"integrity     {r['integrity']}" + (f": {_safe(r['integrity_error'])}" if "integrity_error" in r else ""),
    ]
    for title, value in (("source", r["source"]), ("metadata", r["metadata"])):
        if value:
            lines.append("")
            lines.append(title)
            text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
            lines.extend("  " + _safe(line) for line in text.splitlines())
    io = r.get("graph_io")
    if io:
        lines.append("")
        if "error" in io:
            lines.append(f"graph inputs and outputs unreadable: {_safe(io['error'])}")
        for label, values in (("inputs", io["inputs"]), ("outputs", io["outputs"])):
            lines.append(f"graph {label}")
            for v in values:
                lines.append(f"  {_safe(v['name'])}: {_safe(v['type'])} [{_shape(v['shape'])}]")
    rows = [(_safe(t["name"]), _shape(t["shape"]), t["dtype"], _safe(t["codec"]), f"{t['bits_per_weight']:.3f}",
             f"{t['stored_bytes']:,}", f"{t['offset']:,}" if t["offset"] is not None else "-",
             _safe(t["group"] or "-")) for t in r["tensors"]]
    rows += [(_safe(t["name"]), _shape(t["shape"]), _safe(t["type"]), "in graph", "-", f"{t['stored_bytes']:,}",
              "-", "-") for t in (io or {}).get("initializers_in_graph", [])]
    header = ("name", "shape", "dtype", "codec", "bits/w", "bytes", "offset", "group")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {4, 5, 6}
    lines.append("")
    for row in [header, *rows]:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.extend(_choice_lines(r["tensors"]))
    if r["codebook_groups"]:
        lines.append("")
        lines.append(f"codebook groups: {format_size(r['codebook_bytes'])}, {100 * r['codebook_share']:.1f}% of the file")
        for g in r["codebook_groups"]:
            lines.append(f"  {_safe(g['name'])}: M={g['M']} K={g['K']} d={g['d']} {g['dtype']} "
                         f"{format_size(g['bytes'])} at offset {g['offset']:,}, "
                         f"shared by {_plural(len(g['tensors']), 'tensor')}")
    return "\n".join(lines)
