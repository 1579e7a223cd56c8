"""An ONNX graph run by torch, for output sensitivity and fine-tuning of ONNX sources.

:class:`OnnxModule` executes the graph node by node with torch operations.
Its parameters and buffers are the graph's initializers under their ONNX
names (dotted names become nested modules), so its ``state_dict`` keys are
the tensor names of the .aqm file converted from the same graph: the
existing distillation (:func:`aqformat.converters.finetune`) trains it
unchanged, and the trained values go back into the .aqm beside the original
ONNX graph.

Why not onnx2torch: it imports torchvision at import time (for its NMS and
RoIAlign converters), and torchvision's published wheels are built against
the CUDA torch, not the CPU build pinned here, so the import fails; it also
renames parameters after its modules (``Conv_0.weight``), which would need a
map back to the graph's names. The interpreter here covers the operators of
common vision and transformer exports (listed in :data:`SUPPORTED_OPS`); a
graph with others gets one error naming them, and conversion without
fine-tuning does not need this module at all.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import onnx
from onnx import helper, numpy_helper
from torch.nn import functional as F

from aqformat.errors import AqmInputError

from .onnx_calib import weight_uses

__all__ = ["OnnxModule", "SUPPORTED_OPS", "unsupported_ops"]

_PARAM_MIN_ELEMENTS = 64  # float initializers this large are trainable parameters (as in the .aqm)


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _dtype(onnx_type: int):
    return {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
            7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
            16: torch.bfloat16}[onnx_type]


def _same_pads(x, kernel, strides, dil, mode: str) -> list[int]:
    """Begin pads then end pads of SAME_UPPER / SAME_LOWER auto padding."""
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dil):
        span = (k - 1) * d + 1
        total = max((math.ceil(size / s) - 1) * s + span - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def _pad_input(x, pads: list[int], value: float = 0.0):
    """Apply ONNX ``[b1, b2, .., e1, e2, ..]`` pads over the trailing spatial dims."""
    nd = len(pads) // 2
    torch_pads = []
    for i in reversed(range(nd)):
        torch_pads += [pads[i], pads[nd + i]]
    return F.pad(x, torch_pads, value=value) if any(torch_pads) else x


def _conv(x, w, b=None, **attrs):
    """ONNX Conv (the kernel shape is the weight's)."""
    nd = w.dim() - 2
    group, auto_pad, pads = attrs.get("group", 1), attrs.get("auto_pad", "NOTSET"), attrs.get("pads")
    strides, dilations = list(attrs.get("strides") or [1] * nd), list(attrs.get("dilations") or [1] * nd)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x, w.shape[2:], strides, dilations, auto_pad)
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    pads = list(pads or [0] * (2 * nd))
    sym = pads[:nd] == pads[nd:]
    if not sym:
        x = _pad_input(x, pads)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, stride=strides, padding=pads[:nd] if sym else 0, dilation=dilations, groups=group)


def _pool(kind: str):
    def run(x, *, kernel_shape, strides=None, pads=None, auto_pad="NOTSET", ceil_mode=0,
            count_include_pad=0, dilations=None, storage_order=0):
        nd = len(kernel_shape)
        strides = list(strides or [1] * nd)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(x, kernel_shape, strides, [1] * nd, auto_pad)
        pads = list(pads or [0] * (2 * nd))
        value = -math.inf if kind == "max" else 0.0
        if pads[:nd] != pads[nd:] or kind == "avg" and not count_include_pad and any(pads):
            if kind == "avg" and any(pads) and not count_include_pad:
                raise AqmInputError("AveragePool with asymmetric padding excluded from the count is not supported")
            x, pads = _pad_input(x, pads, value), [0] * (2 * nd)
        fn = getattr(F, f"{kind}_pool{nd}d")
        kw = {"dilation": list(dilations or [1] * nd)} if kind == "max" else {"count_include_pad": bool(count_include_pad)}
        return fn(x, list(kernel_shape), strides, pads[:nd], ceil_mode=bool(ceil_mode), **kw)
    return run


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = (a.T if transA else a) @ (b.T if transB else b)
    y = y * alpha if alpha != 1.0 else y
    return y if c is None else y + (c * beta if beta != 1.0 else c)


def _gather(data, idx, *, axis=0):
    axis = _axis(axis, data.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))


def _slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        if st > 0:
            x = x[(slice(None),) * a + (slice(s, e, st),)]
        else:  # Python's slice rules for negative steps are ONNX's; torch cannot index so
            idx = torch.arange(*slice(s, e, st).indices(x.shape[a]), dtype=torch.int64)
            x = torch.index_select(x, a, idx)
    return x


def _reshape(x, shape, *, allowzero=0):
    dims = _ints(shape)
    dims = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _unsqueeze(x, axes=None, **attrs):
    axes = _ints(axes) if axes is not None else list(attrs["axes"])
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(x, axes=None, **attrs):
    axes = _ints(axes) if axes is not None else attrs.get("axes")
    if axes is None:
        return x.squeeze()
    for a in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _reduce(kind: str):
    def run(x, axes=None, *, keepdims=1, noop_with_empty_axes=0, **attrs):
        axes = _ints(axes) if axes is not None else attrs.get("axes")
        if not axes:
            if noop_with_empty_axes:
                return x
            axes = list(range(x.dim()))
        dims = [_axis(a, x.dim()) for a in axes]
        if kind == "mean":
            return x.mean(dims, keepdim=bool(keepdims))
        if kind == "sum":
            return x.sum(dims, keepdim=bool(keepdims))
        out = x
        for d in sorted(dims, reverse=True):
            out = (out.amax if kind == "max" else out.amin)(d, keepdim=bool(keepdims))
        return out
    return run


def _split(x, split=None, *, axis=0, num_outputs=None, _n=1, **attrs):
    sizes = _ints(split) if split is not None else attrs.get("split")
    if sizes is None:
        n = num_outputs or _n
        total = x.shape[_axis(axis, x.dim())]
        size = -(-total // n)
        sizes = [min(size, total - i * size) for i in range(n)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _constant(*, value=None, value_float=None, value_floats=None, value_int=None, value_ints=None):
    if value is not None:
        return torch.from_numpy(np.array(value))
    for v, dt in ((value_float, torch.float32), (value_floats, torch.float32),
                  (value_int, torch.int64), (value_ints, torch.int64)):
        if v is not None:
            return torch.tensor(v, dtype=dt)
    raise AqmInputError("Constant node without a supported value attribute")


def _constant_of_shape(shape, *, value=None):
    v = torch.from_numpy(np.array(value)).reshape(()) if value is not None else torch.tensor(0.0)
    return torch.full(_ints(shape), v.item(), dtype=v.dtype)


def _clip(x, lo=None, hi=None, **attrs):
    lo = lo if lo is not None else attrs.get("min")
    hi = hi if hi is not None else attrs.get("max")
    return torch.clamp(x, lo, hi)


def _layer_norm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    axis = _axis(axis, x.dim())
    return F.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


def _batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


def _pad(x, pads, value=None, axes=None, *, mode="constant"):
    if mode != "constant":
        raise AqmInputError(f"Pad mode {mode!r} is not supported")
    p = _ints(pads)
    v = float(value.reshape(()).item()) if value is not None and value.numel() else 0.0
    nd = len(p) // 2
    if axes is not None:
        full = [0] * (2 * x.dim())
        for i, a in enumerate(_ints(axes)):
            a = _axis(a, x.dim())
            full[a], full[x.dim() + a] = p[i], p[nd + i]
        p, nd = full, x.dim()
    torch_pads = []
    for i in reversed(range(nd)):
        torch_pads += [p[i], p[nd + i]]
    return F.pad(x, torch_pads, value=v)


def _expand(x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _range(start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _flatten(x, *, axis=1):
    axis = _axis(axis, x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _softmax(kind: str):
    def run(x, *, axis=-1):
        return (F.softmax if kind == "softmax" else F.log_softmax)(x, dim=axis)
    return run


def _transpose(x, *, perm=None):
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _cast(x, *, to, saturate=1):
    return x.to(_dtype(to))


def _tile(x, repeats):
    return x.repeat(*_ints(repeats))


def _shape(x, *, start=0, end=None):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def _binary(name: str) -> Callable:
    def run(a, b):
        return getattr(torch, name)(a, b)
    return run


def _unary(name: str) -> Callable:
    def run(x):
        return getattr(torch, name)(x)
    return run


def _variadic(name: str) -> Callable:
    def run(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = getattr(torch, name)(out, x)
        return out
    return run


_OPS: dict[str, Callable] = {
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"),
    "Div": lambda a, b: a // b if not a.is_floating_point() else a / b,
    "Pow": _binary("pow"), "MatMul": _binary("matmul"),
    "Equal": _binary("eq"), "Greater": _binary("gt"), "GreaterOrEqual": _binary("ge"),
    "Less": _binary("lt"), "LessOrEqual": _binary("le"),
    "And": _binary("logical_and"), "Or": _binary("logical_or"), "Xor": _binary("logical_xor"),
    "Not": _unary("logical_not"), "IsNaN": _unary("isnan"),
    "Max": _variadic("maximum"), "Min": _variadic("minimum"), "Sum": _variadic("add"),
    "Where": lambda c, a, b: torch.where(c, a, b),
    "Relu": _unary("relu"), "Sigmoid": _unary("sigmoid"), "Tanh": _unary("tanh"),
    "Exp": _unary("exp"), "Log": _unary("log"), "Sqrt": _unary("sqrt"), "Neg": _unary("neg"),
    "Abs": _unary("abs"), "Erf": _unary("erf"), "Reciprocal": _unary("reciprocal"),
    "Sin": _unary("sin"), "Cos": _unary("cos"), "Floor": _unary("floor"), "Ceil": _unary("ceil"),
    "Identity": lambda x: x, "Dropout": lambda x, *rest, **kw: x,
    "Clip": _clip, "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: torch.clamp(alpha * x + beta, 0, 1),
    "HardSwish": lambda x: F.hardswish(x), "Gelu": _gelu,
    "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "Conv": _conv, "Gemm": _gemm, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Shape": _shape,
    "Size": lambda x: torch.tensor(x.numel(), dtype=torch.int64),
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": lambda *xs, axis: torch.cat(xs, axis),
    "Split": _split, "Slice": _slice, "Gather": _gather, "Expand": _expand, "Tile": _tile,
    "Range": _range, "Cast": _cast, "Pad": _pad,
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
}

#: ONNX operators (default domain) :class:`OnnxModule` runs.
SUPPORTED_OPS = frozenset(_OPS)


def unsupported_ops(model: Any) -> list[str]:
    """Operator types of the main graph that :class:`OnnxModule` cannot run (sorted)."""
    return sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                   for n in model.graph.node
                   if n.domain not in ("", "ai.onnx") or n.op_type not in _OPS})


class _Tap(torch.nn.Module):
    """Identity on a weight node's output, so hooks see the layer output."""

    def forward(self, x):
        return x


class OnnxModule(torch.nn.Module):
    """A torch module running an ONNX graph (see the module docstring).

    Parameters
    ----------
    model : onnx.ModelProto
        The graph with its weights.
    load : callable, optional
        ``load(name) -> array`` for initializers whose data is external.
    taps : iterable of str
        Weight names whose MatMul / Gemm / Conv outputs get an identity module
        (for :func:`aqformat.converters.calib.collect_output_sensitivity`).

    ``forward`` takes the graph inputs by position or by name and returns the
    graph outputs (one tensor, or a tuple); :meth:`calibration_taps` maps each
    tapped weight to ``(module, channel axis)`` of its layer output.

    Raises
    ------
    AqmInputError
        The graph uses operators not in :data:`SUPPORTED_OPS` (all named), or
        has subgraphs.
    """

    def __init__(self, model: Any, load: Callable[[str], np.ndarray] | None = None,
                 taps: Iterable[str] = ()):
        super().__init__()
        bad = unsupported_ops(model)
        if bad:
            raise AqmInputError(f"the ONNX graph has operators the torch interpreter does not run: "
                                f"{', '.join(bad)} (convert without --finetune/--allocate)")
        if any(a.type in (5, 10) for n in model.graph.node for a in n.attribute):
            raise AqmInputError("the ONNX graph has subgraphs (If/Loop/Scan), which the torch "
                                "interpreter does not run")
        self._init_names = []
        for t in model.graph.initializer:
            if t.data_location == 1:
                if load is None:
                    raise AqmInputError(f"initializer {t.name!r} has external data and no reader")
                arr = np.array(load(t.name))
            else:
                arr = numpy_helper.to_array(t)
            value = torch.from_numpy(np.array(arr))
            trainable = value.is_floating_point() and value.numel() >= _PARAM_MIN_ELEMENTS
            self._register(t.name, value, trainable)
            self._init_names.append(t.name)
        self._inputs = [i.name for i in model.graph.input if i.name not in set(self._init_names)]
        self._outputs = [o.name for o in model.graph.output]
        self._nodes = []
        for node in model.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            attrs = {k: numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else v
                     for k, v in attrs.items()}
            if node.op_type == "Split" and "num_outputs" not in attrs:
                attrs["_n"] = len(node.output)
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        wanted = set(taps)
        self._taps = torch.nn.ModuleDict()
        self._tap_of: dict[str, tuple[str, str, int]] = {}  # node output -> (key, weight, axis)
        outputs = {(n.input[0], n.input[1]): n.output[0] for n in model.graph.node if len(n.input) > 1}
        for use in weight_uses(model, wanted):
            out = outputs[(use.x, use.weight)]
            if use.weight in {w for _, w, _ in self._tap_of.values()}:
                continue  # a weight used twice: its first use measures it
            key = str(len(self._taps))
            self._taps[key] = _Tap()
            self._tap_of[out] = (key, use.weight, 1 if use.op == "Conv" else -1)

    def _register(self, name: str, value, trainable: bool) -> None:
        *path, leaf = name.split(".")
        if not leaf or any(not p for p in path):
            raise AqmInputError(f"initializer name {name!r} cannot be a module path")
        mod = self
        for p in path:
            child = mod._modules.get(p)
            if child is None:
                if hasattr(mod, p):
                    raise AqmInputError(f"initializer names {name!r} and {p!r} collide")
                child = torch.nn.Module()
                mod.add_module(p, child)
            mod = child
        if leaf in mod._modules or hasattr(mod, leaf):
            raise AqmInputError(f"initializer {name!r} collides with another name of the module")
        if trainable:
            mod.register_parameter(leaf, torch.nn.Parameter(value.float()))
        else:
            mod.register_buffer(leaf, value)

    def _tensor(self, name: str):
        *path, leaf = name.split(".")
        mod = self
        for p in path:
            mod = getattr(mod, p)
        return getattr(mod, leaf)

    def calibration_taps(self) -> dict[str, tuple[Any, int]]:
        """Weight name -> ``(identity module on its layer output, output-channel axis)``."""
        return {w: (self._taps[k], axis) for k, w, axis in self._tap_of.values()}

    def forward(self, *args, **kwargs):
        if len(args) > len(self._inputs) or set(kwargs) - set(self._inputs):
            raise TypeError(f"the model takes inputs {self._inputs}")
        values = dict(zip(self._inputs, args))
        values.update(kwargs)
        missing = [n for n in self._inputs if n not in values]
        if missing:
            raise TypeError(f"missing model inputs {missing}")
        values = {k: torch.as_tensor(v) for k, v in values.items()}
        for n in self._init_names:
            values[n] = self._tensor(n)
        for op, ins, outs, attrs in self._nodes:
            args_ = [values[i] if i else None for i in ins]
            while args_ and args_[-1] is None:
                args_.pop()
            y = _OPS[op](*args_, **attrs)
            ys = y if isinstance(y, tuple) else (y,)
            for name, v in zip(outs, ys):
                if name in self._tap_of:
                    v = self._taps[self._tap_of[name][0]](v)
                values[name] = v
        res = tuple(values[o] for o in self._outputs)
        return res[0] if len(res) == 1 else res

