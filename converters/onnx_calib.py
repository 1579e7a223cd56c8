"""Calibration statistics of an ONNX model through ONNX Runtime (no torch).

For every weight of a MatMul, Gemm or Conv (grouped and depthwise included;
weights from Constant nodes are initializers by then, see
:func:`~aqformat.converters.onnx_graph.lift_constants`), ``H = X^T X / n``
over the columns of the weight's matrix view, as
:func:`aqformat.converters.calib.collect_hessians` computes it for torch
modules: the ``in`` features of a MatMul/Gemm, the ``in/groups * k...``
patches of a Conv (each group's patches are samples of its own rows).

The activations feeding those weights are made extra outputs of one ONNX
Runtime session, which runs batch after batch; each batch's contribution is
added to a float64 sum and dropped, so memory is the statistics (about the
largest layer's ``cols^2``) plus one batch's activations, whatever the number
of samples.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqformat.errors import AqmInputError

__all__ = ["WeightUse", "weight_uses", "collect_onnx_hessians", "conv_patches"]

_CHUNK_ROWS = 1 << 16  # rows of X per X^T X product: bounds the float32 temporaries


@dataclass(frozen=True)
class WeightUse:
    """A node that multiplies activation ``x`` by weight ``weight`` (``op`` and its attributes)."""

    weight: str
    x: str
    op: str
    attrs: tuple[tuple[str, Any], ...] = ()


def weight_uses(model: Any, names: Iterable[str] | None = None) -> list[WeightUse]:
    """The main-graph uses of initializers as MatMul / Gemm / Conv weights whose ``H`` is defined.

    A MatMul weight is its second input, a 2-D ``[in, out]`` matrix; a Gemm's
    is input B (``transB`` either way, ``transA`` applied to the activation);
    a Conv's is input W, ``[out, in/groups, k...]``. Other uses (a weight as
    MatMul's first input, batched weights) have no ``H`` and are coded by
    weight error.
    """
    from onnx import helper
    inits = {t.name: len(t.dims) for t in model.graph.initializer}
    wanted = set(inits) if names is None else set(names) & set(inits)
    uses = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in wanted or x in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul" and inits[w] == 2:
            uses.append(WeightUse(w, x, "MatMul"))
        elif node.op_type == "Gemm" and inits[w] == 2:
            uses.append(WeightUse(w, x, "Gemm", (("transA", int(attrs.get("transA", 0))),)))
        elif node.op_type == "Conv" and inits[w] >= 3:
            keep = ("auto_pad", "dilations", "group", "pads", "strides")
            uses.append(WeightUse(w, x, "Conv", tuple((k, _plain(attrs[k])) for k in keep if k in attrs)))
    return uses


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else v


def conv_patches(x: np.ndarray, kernel: Sequence[int], attrs: dict[str, Any]) -> np.ndarray:
    """im2col of an ONNX Conv input ``x [n, C, *spatial]``: ``[n * groups * positions, C/groups * prod(kernel)]``.

    Columns follow the weight's ``[in/groups, k...]`` order, so ``X^T X`` is over
    the columns of the weight's matrix view.
    """
    nd = len(kernel)
    n, C = x.shape[:2]
    g = int(attrs.get("group", 1))
    strides = attrs.get("strides") or (1,) * nd
    dil = attrs.get("dilations") or (1,) * nd
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for size, s, sp in zip(x.shape[2:], strides, span):
            total = max((math.ceil(size / s) - 1) * s + sp - size, 0)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pads_b = pads_e = [0] * nd
    else:
        pads = attrs.get("pads") or (0,) * (2 * nd)
        pads_b, pads_e = list(pads[:nd]), list(pads[nd:])
    xp = np.pad(x, [(0, 0), (0, 0), *zip(pads_b, pads_e)])
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    # win: [n, C, out_1.., span_1..]: stride the positions, dilate the kernel taps
    win = win[(slice(None), slice(None), *(slice(None, None, s) for s in strides),
               *(slice(None, None, d) for d in dil))]
    pos = win.shape[2:2 + nd]
    win = win.reshape(n, g, C // g, *pos, *kernel)
    order = (0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    return win.transpose(order).reshape(-1, (C // g) * math.prod(kernel))


def _columns(use: WeightUse, x: np.ndarray, wshape: Sequence[int]) -> np.ndarray:
    """The rows ``X`` whose ``X^T X`` is the weight's statistic."""
    attrs = dict(use.attrs)
    if use.op == "Conv":
        return conv_patches(x, wshape[2:], attrs)
    if use.op == "Gemm" and attrs.get("transA"):
        x = x.T
    return x.reshape(-1, x.shape[-1])


def _gram(X: np.ndarray) -> np.ndarray:
    """``X^T X`` in float64, float32 products over bounded row chunks."""
    out = np.zeros((X.shape[1], X.shape[1]), np.float64)
    for i in range(0, X.shape[0], _CHUNK_ROWS):
        c = np.ascontiguousarray(X[i:i + _CHUNK_ROWS], np.float32)
        out += c.T @ c
    return out


def _session(model: Any, outputs: Sequence[str], fill: Any, threads: int | None):
    """An ORT session over a copy of ``model`` with ``outputs`` added; external data filled by ``fill``."""
    import onnx
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            arr = fill(t.name)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = np.ascontiguousarray(arr).tobytes()
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise AqmInputError(f"ONNX Runtime cannot run the model for calibration: {_first_line(e)}") from None


def _nothing_to_calibrate(model: Any, names: Sequence[str]) -> str:
    """Why no weight in ``names`` has an ``H``: the one-line error, naming the subgraph ops holding
    them where that is the cause (ONNX Runtime exposes main-graph values only)."""
    from aqformat.onnx_stubs import all_graphs, subgraphs
    wanted, ops = set(names), set()
    for node in model.graph.node:
        if any(wanted & set(n.input) for sub in subgraphs(node) for g in all_graphs(sub) for n in g.node):
            ops.add(node.op_type)
    where = (f"; the tensors to compress are used inside {'/'.join(sorted(ops))} subgraphs, which calibration "
             "cannot reach: convert without --calib" if ops else "")
    return f"calibration found no main-graph MatMul/Gemm/Conv weight among the tensors to compress{where}"


def collect_onnx_hessians(model: Any, batches: Iterable[dict[str, np.ndarray]], names: Iterable[str],
                          fill: Any = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """``H = X^T X / n`` of every weight in ``names`` used by a MatMul, Gemm or Conv.

    Parameters
    ----------
    model : onnx.ModelProto
        The model with its weights (initializers whose data is external are
        read with ``fill``).
    batches : iterable of dict
        Feeds (``input name -> array``), e.g. :attr:`CalibSet.batches`.
    names : iterable of str
        The weights wanted (e.g. those chosen for compression).
    fill : callable, optional
        ``fill(name) -> array`` for initializers with external data.
    threads : int, optional
        ONNX Runtime intra-op threads.

    Returns
    -------
    dict mapping weight name to float32 ``H`` of shape ``[cols, cols]``.
    Weights used several times sum the statistics of every use.
    """
    uses = weight_uses(model, names)
    if not uses:
        return {}
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    acts = sorted({u.x for u in uses if u.x not in graph_inputs})
    sess = _session(model, acts, fill or (lambda n: (_ for _ in ()).throw(
        AqmInputError(f"initializer {n!r} has external data and no reader"))), threads)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i, feed in enumerate(batches):
        try:
            values = dict(zip(acts, sess.run(acts, feed))) if acts else {}
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise AqmInputError(f"calibration batch {i} does not run through the model: {_first_line(e)}") from None
        values.update({k: v for k, v in feed.items() if k in graph_inputs})
        for u in uses:
            X = _columns(u, np.asarray(values[u.x]), shapes[u.weight])
            sums[u.weight] = sums.get(u.weight, 0) + _gram(X)
            counts[u.weight] = counts.get(u.weight, 0) + X.shape[0]
        del values
    return {k: (v / max(counts[k], 1)).astype(np.float32) for k, v in sums.items()}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class OnnxCalibration:
    """Calibration of an ONNX source, resolved once for the whole conversion.

    ``H`` comes from ONNX Runtime (:func:`collect_onnx_hessians`, no torch);
    the output sensitivity of ``--allocate`` and fine-tuning run the graph in
    torch (:class:`~aqformat.converters.onnx_torch.OnnxModule`), through the
    same :func:`~aqformat.converters.calib.collect_output_sensitivity` and
    :func:`~aqformat.converters.finetune` as PyTorch sources.

    Parameters
    ----------
    model : onnx.ModelProto
        The source graph with its weights (copied: conversion later strips them).
    load : callable
        ``load(name) -> array`` of an initializer (for external data).
    data : CalibSet
        The calibration feeds (:func:`~aqformat.converters.calib_inputs.load_calibration`).
    """

    def __init__(self, model: Any, load: Any, data: Any):
        import onnx
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.load = load
        self.data = data
        self.notes: list[str] = []  # what could not be used, and why (for the summary)

    def stats(self, names: Sequence[str], sensitivity: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(H, S)`` for the weights in ``names``; ``S`` only when ``sensitivity``."""
        H = collect_onnx_hessians(self.model, self.data.batches, names, fill=self.load)
        if not H:
            raise AqmInputError(_nothing_to_calibrate(self.model, names))
        if not sensitivity:
            return H, {}
        from .onnx_torch import unsupported_ops
        bad = unsupported_ops(self.model)
        if bad:
            self.notes.append(f"output sensitivity (the torch interpreter lacks {', '.join(bad)}): "
                              "bits allocated by layer output error alone")
            return H, {}
        from .calib import collect_output_sensitivity
        module = self.torch_module(taps=names)
        try:
            S = collect_output_sensitivity(module, self.run, self.data.batches)
        except (RuntimeError, TypeError, ValueError) as e:
            raise AqmInputError(f"calibration forward pass failed: {_first_line(e)}") from None
        return H, S

    def torch_module(self, taps: Iterable[str] = ()) -> Any:
        """The graph as a torch module holding the original weights."""
        from .onnx_torch import OnnxModule
        return OnnxModule(self.model, self.load, taps).eval()

    @staticmethod
    def run(module: Any, feed: dict[str, Any]) -> Any:
        """One forward pass on a feed of numpy arrays (or tensors)."""
        import torch
        return module(**{k: torch.as_tensor(v) for k, v in feed.items()})

    def finetune_inputs(self) -> tuple[Any, list[dict[str, Any]], Any]:
        """``(teacher module, training batches, run)`` for :func:`~aqformat.converters.finetune`."""
        return self.torch_module(), self.data.train, self.run
