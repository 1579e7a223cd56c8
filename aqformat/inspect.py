"""What ``aqm-info`` reports: sizes, bits per weight, codecs and sharing of a file."""
from __future__ import annotations

import os
from typing import Any

from .errors import AqmIntegrityError
from .reader import open as open_aqm


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
            "graph": f.graph_format,
            "integrity": integrity,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "codec": t.codec,
                         "bits_per_weight": round(t.bits_per_weight, 4), "group": t.group}
                        for t in tensors],
            "codebook_groups": [{"name": g.name, "M": g.M, "K": g.K, "d": g.d, "dtype": g.dtype,
                                 "bytes": group_bytes[g.name],
                                 "tensors": [t.name for t in tensors if t.group == g.name]}
                                for g in groups],
        }
        if integrity == "corrupted":
            report["integrity_error"] = integrity_error
    return report


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _safe(v: Any) -> str:
    """Text from the file with control characters escaped, so it cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(v))


def render_text(r: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`describe`'s report."""
    src = r["source"].get("framework", "?") if r["source"] else "?"
    lines = [
        f"file          {r['file']}",
        f"format        .aqm {r['format_version']}   producer {_safe(r['producer'])}   source {_safe(src)}",
        f"tensors       {r['tensor_count']}   parameters {r['parameters']:,}",
        f"size          {_size(r['file_bytes'])} ({r['file_bytes']:,} bytes)   "
        f"{r['bits_per_weight']:.3f} bits/weight   {r['compression_ratio_fp32']:.2f}x vs fp32",
        f"graph         {r['graph'] or 'none'}",
        f"integrity     {r['integrity']}" + (f": {r['integrity_error']}" if "integrity_error" in r else ""),
    ]
    if r["metadata"]:
        for k, v in r["metadata"].items():
            lines.append(f"metadata      {_safe(k)} = {_safe(v)}")
    names = [_safe(t["name"]) for t in r["tensors"]]
    width = max([len(n) for n in names] + [4])
    lines.append("")
    lines.append(f"{'name':<{width}}  {'shape':<18} {'dtype':<8} {'codec':<8} {'bits/w':>7}  group")
    for name, t in zip(names, r["tensors"]):
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(f"{name:<{width}}  {shape:<18} {t['dtype']:<8} {_safe(t['codec']):<8} "
                     f"{t['bits_per_weight']:>7.3f}  {_safe(t['group'] or '-')}")
    if r["codebook_groups"]:
        lines.append("")
        lines.append("codebook groups")
        for g in r["codebook_groups"]:
            lines.append(f"  {_safe(g['name'])}: M={g['M']} K={g['K']} d={g['d']} {g['dtype']} "
                         f"{_size(g['bytes'])}, shared by {len(g['tensors'])} tensors")
    return "\n".join(lines)
