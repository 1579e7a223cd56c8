"""BatchNorm folding: a convolution (or Gemm) followed by inference-mode BatchNorm becomes one
layer whose weights already carry BatchNorm's per-channel scale, before anything is coded.

BatchNorm in inference mode is ``y = s * (x - mean) + beta`` per output channel, with
``s = gamma / sqrt(var + eps)``. Folding multiplies the layer's output-channel rows by ``s``,
so the codec spends its error where the model's output sees it (a channel that BatchNorm
scales by 10 no longer has its weight error multiplied by 10 after coding).

* ONNX graphs (:func:`fold_onnx`): the BatchNormalization node is removed, the Conv,
  ConvTranspose or Gemm
  takes its output name, its weight is scaled and its bias added or updated.
* PyTorch modules (:func:`fold_torch`): the module keeps its structure, so the file still loads
  into the same code: the convolution's weight and bias are scaled, and the BatchNorm is left
  with ``gamma = 1``, ``running_var = 1 - eps``, ``running_mean = s * mean`` and its ``beta``,
  which computes the same function. The pairs are found in a :mod:`torch.fx` trace of the module
  (a module that cannot be traced is left unfolded).

Only patterns whose result is provably the same function are folded; anything else is left as
it is: a layer output read by another node besides the BatchNorm, a weight or bias shared with
another layer (or a graph input, which a caller may override), BatchNorm in training mode or
without running statistics, non-float32 ONNX tensors, a Gemm bias that is not per channel,
a grouped ConvTranspose (its output channels are spread over the weight's first two axes),
and, for torch, Linear or Conv1d before ``BatchNorm1d`` unless a calibration input shows the
layer's output rank (BatchNorm1d's channel axis depends on it, and a trace does not know it).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from .sources import Source, TensorSpec, torch_source

__all__ = ["fold_onnx", "fold_torch", "fold_source", "fold_calibrated", "FOLDED_KEY"]

#: ``source`` metadata key listing the folded ``[weight, batchnorm]`` pairs.
FOLDED_KEY = "batchnorm_folded"


def fold_source(source: Source, probe: Callable[[Any], Any] | None = None) -> Source:
    """``source`` with every recognised layer + BatchNorm pair folded (itself when none is).

    A PyTorch source needs its module (an ``nn.Module``, or a state_dict with model code);
    ``probe(module)`` runs it on one input, which Linear/Conv1d -> BatchNorm1d pairs need
    (:func:`fold_torch`). The folded pairs are listed in ``source.info[FOLDED_KEY]``.
    """
    if source.framework == "onnx":
        return fold_onnx(source)
    return fold_torch(source, probe) if source.module is not None else source


def fold_calibrated(source: Source, calib: tuple[Any, Any, Any] | None) -> tuple[Source, Any]:
    """:func:`fold_source` with the first calibration input as the probe, and the resolved
    calibration ``(module, batches, run)`` given the folded module in place of the source's."""
    probe = (lambda m: calib[2](m, calib[1][0])) if calib is not None and len(calib[1]) else None
    folded = fold_source(source, probe)
    if calib is not None and folded is not source and calib[0] is source.module:
        calib = (folded.module, *calib[1:])
    return folded, calib


def _scale(gamma: np.ndarray | None, var: np.ndarray, eps: float) -> np.ndarray | None:
    """BatchNorm's per-channel scale in float64, None when it is not finite."""
    denom = var.astype(np.float64) + eps
    if np.any(~(denom > 0)):
        return None
    s = (1.0 if gamma is None else gamma.astype(np.float64)) / np.sqrt(denom)
    s = np.broadcast_to(s, var.shape)
    return s if np.all(np.isfinite(s)) else None


# ------------------------------------------------------------------ ONNX

def fold_onnx(source: Source) -> Source:
    """Fold ``Conv``/``Gemm`` -> ``BatchNormalization`` pairs of an ONNX source's main graph.

    The source's ``onnx_model`` is rewritten in place (folded weights carry their new data, the
    BatchNormalization nodes and their now unused initializers are removed); the returned source
    reads the folded tensors and lists a new bias among its tensors when it is large enough to
    live in the .aqm.
    """
    from . import onnx_graph
    graph = source.onnx_model.graph
    specs = {s.name: s for s in source.specs}
    inits = {t.name: t for t in graph.initializer}
    uses = _onnx_uses(source.onnx_model)
    producer = {o: n for n in graph.node for o in n.output}
    graph_inputs = {i.name for i in graph.input}

    def array(name: str) -> np.ndarray | None:
        """A float32 initializer's values (None: not a plain float32 initializer)."""
        t = inits.get(name)
        if t is None or name in graph_inputs or onnx_graph.dtype_name(t) != "float32":
            return None
        return np.asarray(source.load(name) if name in specs else onnx_graph.tensor_array(t, ""))

    folded: dict[str, np.ndarray] = {}
    pairs, drop = [], []
    for bn in list(graph.node):
        plan = _onnx_pair(bn, producer, uses, array)
        if plan is None:
            continue
        layer, (w_name, w), (b_name, b) = plan
        folded[w_name] = w
        inits[w_name].CopyFrom(_tensor(w_name, w))
        if b_name in inits:
            inits[b_name].CopyFrom(_tensor(b_name, b))
        else:
            graph.initializer.append(_tensor(b_name, b))
            if len(layer.input) == 2:
                layer.input.append(b_name)
            else:
                layer.input[2] = b_name
        folded[b_name] = b
        layer.output[0] = bn.output[0]
        pairs.append([w_name, bn.name or bn.output[0]])
        drop.append(bn)
    if not pairs:
        return source
    for bn in drop:
        graph.node.remove(bn)
    gone = set(onnx_graph.prune_unused(source.onnx_model))
    new_specs = []
    for s in source.specs:
        if s.name in gone:
            continue
        new_specs.append(s)
    known = {s.name for s in new_specs}
    for name, arr in folded.items():  # a new bias that is not inline in the graph lives in the .aqm
        if name not in known and arr.size >= onnx_graph.CONSTANT_MIN_ELEMENTS:
            new_specs.append(TensorSpec(name, tuple(arr.shape), "float32"))
    load = source.load
    return dataclasses.replace(source, specs=new_specs, load=lambda n: folded[n] if n in folded else load(n),
                               info={**source.info, FOLDED_KEY: pairs})


def _onnx_uses(model: Any) -> Counter:
    """How many times each value is read: node inputs in every graph, and main-graph outputs."""
    from aqformat.onnx_stubs import all_graphs
    uses: Counter = Counter(o.name for o in model.graph.output)
    for g in all_graphs(model.graph):
        uses.update(x for node in g.node for x in node.input if x)
        uses.update(o.name for o in g.output)
    return uses


def _attr(node: Any, name: str, default: Any) -> Any:
    """A node attribute's value (int, float or ints), ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return {1: a.f, 2: a.i, 7: list(a.ints)}.get(a.type, default)
    return default


def _set_float_attr(node: Any, name: str, value: float) -> None:
    import onnx
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])


def _tensor(name: str, arr: np.ndarray) -> Any:
    import onnx
    return onnx.numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name)


def _onnx_pair(bn: Any, producer: dict[str, Any], uses: Counter, array: Any) -> Any:
    """``(layer node, (weight name, folded weight), (bias name, folded bias))`` for a foldable
    BatchNormalization node, else None (and the graph is not touched)."""
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) != 5:
        return None
    if _attr(bn, "training_mode", 0) or not _attr(bn, "spatial", 1) or any(o for o in bn.output[1:]):
        return None
    layer = producer.get(bn.input[0])
    if layer is None or layer.domain not in ("", "ai.onnx") or layer.op_type not in ("Conv", "ConvTranspose", "Gemm"):
        return None
    if uses[bn.input[0]] != 1 or len(layer.output) != 1:  # the layer's output feeds the BatchNorm alone
        return None
    params = [array(_through_identity(n, producer)) for n in bn.input[1:]]
    if any(p is None for p in params) or len(layer.input) < 2:
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    w_name = layer.input[1]
    b_name = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
    w = array(w_name)
    b = array(b_name) if b_name else None
    if w is None or uses[w_name] != 1 or (b_name and (b is None or uses[b_name] != 1)):
        return None
    s = _scale(gamma, var, float(_attr(bn, "epsilon", 1e-5)))
    if s is None or not all(p.shape == s.shape == (s.size,) for p in (gamma, beta, mean, var)):
        return None
    c = s.size
    if layer.op_type in ("Conv", "ConvTranspose"):
        # Conv weights are [C_out, C_in/group, k...]; ConvTranspose's [C_in, C_out/group, k...]
        axis = 0 if layer.op_type == "Conv" else 1
        if w.ndim < 3 or w.shape[axis] != c or (axis == 1 and _attr(layer, "group", 1) != 1):
            return None
        bias = np.zeros(c) if b is None else b.astype(np.float64)
        if bias.shape != (c,):
            return None
    else:  # Gemm: Y = alpha * A @ op(B) + beta * C, channel j is op(B)[:, j]
        if _attr(layer, "transA", 0) not in (0, 1) or w.ndim != 2:
            return None
        axis = 0 if _attr(layer, "transB", 0) else 1
        if w.shape[axis] != c:
            return None
        bias = np.zeros(c) if b is None else b.astype(np.float64)
        if bias.size not in (1, c) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            return None  # a [M, N] bias is not per channel
        bias = np.broadcast_to(bias.reshape(-1), (c,)) * float(_attr(layer, "beta", 1.0))
        _set_float_attr(layer, "beta", 1.0)
    shape = [1] * w.ndim
    shape[axis] = c
    w_new = (w.astype(np.float64) * s.reshape(shape)).astype(np.float32)
    b_new = (s * (bias - mean) + beta).astype(np.float32)
    return layer, (w_name, w_new), (b_name or _new_name(f"{w_name}.folded_bias", uses), b_new)


def _through_identity(name: str, producer: dict[str, Any]) -> str:
    """The value an ``Identity`` node passes on as ``name`` (the TorchScript exporter reads one
    initializer through Identity where two parameters are equal), else ``name``."""
    node = producer.get(name)
    if node is not None and node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input:
        return node.input[0]
    return name


def _new_name(base: str, taken: Counter) -> str:
    """``base``, or ``base.N``, not yet a value name (and then marked taken)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}.{k}"
    taken[name] += 0
    return name


# ------------------------------------------------------------------ PyTorch

def fold_torch(source: Source, probe: Callable[[Any], Any] | None = None) -> Source:
    """Fold the Conv2d/Conv3d -> BatchNorm2d/BatchNorm3d pairs of a PyTorch source's module, and
    its Linear/Conv1d -> BatchNorm1d pairs where ``probe(module)`` (one forward pass) shows that the
    layer's output has BatchNorm1d's channels on axis 1 (Linear: 2-D; Conv1d: 3-D, batched).

    The module is copied when something folds (the caller's module is never changed); the
    returned source reads the copy's ``state_dict``, with the same names and shapes.
    """
    pairs = _torch_pairs(source.module, probe)
    if not pairs:
        return source
    import torch
    module = copy.deepcopy(source.module)
    with torch.no_grad():
        for w_name, b_name, bn_name in pairs:
            _fold_torch_pair(module, w_name, b_name, bn_name)
    folded = torch_source(module, name=source.name)
    return dataclasses.replace(folded, info={**source.info, FOLDED_KEY: [[w, bn] for w, _, bn in pairs]},
                               file_bytes=source.file_bytes, path=source.path)


def _fold_torch_pair(module: Any, w_name: str, b_name: str | None, bn_name: str) -> None:
    """Scale the layer's weight and bias by BatchNorm's ``s``; leave the BatchNorm computing
    ``x - s * mean + beta`` (``gamma = 1``, ``running_var = 1 - eps``)."""
    import torch
    bn = module.get_submodule(bn_name)
    w = module.get_parameter(w_name)
    s = torch.from_numpy(_scale(None if bn.weight is None else bn.weight.detach().cpu().numpy(),
                                bn.running_var.detach().cpu().numpy(), bn.eps).copy())
    shape = [1] * w.dim()
    shape[_channel_axis(module.get_submodule(w_name.rpartition(".")[0]))] = -1
    w.copy_((w.double() * s.reshape(shape).to(w.device)).to(w.dtype))
    if b_name is not None:
        b = module.get_parameter(b_name)
        b.copy_((b.double() * s.to(b.device)).to(b.dtype))
    bn.running_mean.copy_((bn.running_mean.double() * s.to(bn.running_mean.device)).to(bn.running_mean.dtype))
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1.0)


def _channel_axis(owner: Any) -> int:
    """The output-channel axis of the weight of module ``owner`` (None for a functional
    convolution): 1 for a ConvTranspose's ``[C_in, C_out/groups, k...]``, else 0."""
    import torch
    return 1 if isinstance(owner, torch.nn.modules.conv._ConvTransposeNd) else 0


def _torch_pairs(module: Any, probe: Callable[[Any], Any] | None) -> list[tuple[str, str | None, str]]:
    """``(weight name, bias name or None, batchnorm name)`` of the foldable pairs of ``module``,
    from a :mod:`torch.fx` trace (none when the module cannot be traced)."""
    import torch
    from torch import fx
    nn = torch.nn
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - tracing runs the user's forward on proxies: anything can fail
        return []
    names = {}  # id(tensor) -> its first name; tied tensors are one
    for n, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), n)
    uses: Counter = Counter()
    modules: Counter = Counter()
    for node in graph.nodes:
        if node.op == "get_attr":
            uses[_tensor_id(module, node.target)] += 1
        elif node.op == "call_module":
            modules[node.target] += 1
            sub = module.get_submodule(node.target)
            uses.update(id(t) for t in list(sub.parameters()) + list(sub.buffers()))
    bn_types = {nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Conv1d: nn.BatchNorm1d,
                nn.Linear: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d, nn.ConvTranspose3d: nn.BatchNorm3d}
    out, ranked = [], {}  # ranked: batchnorm -> its BatchNorm1d layer, whose output rank must be checked
    for node in graph.nodes:
        if node.op != "call_module" or type(module.get_submodule(node.target)) not in bn_types.values():
            continue
        bn = module.get_submodule(node.target)
        if bn.training or not bn.track_running_stats or bn.running_mean is None or modules[node.target] != 1 \
                or not 0.0 <= bn.eps < 1.0 or not node.args or node.kwargs:
            continue
        layer = node.args[0]
        if not isinstance(layer, fx.Node) or len(layer.users) != 1:
            continue
        found = _torch_layer(module, layer, bn_types, type(bn))
        if found is None:
            continue
        w, b = found
        bn_tensors = [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
        if any(uses[id(t)] != 1 for t in [w, *([b] if b is not None else []), *bn_tensors]):
            continue
        sub = module.get_submodule(layer.target) if layer.op == "call_module" else None
        axis = _channel_axis(sub)
        if axis and sub.groups != 1:
            continue  # a grouped ConvTranspose spreads its output channels over two axes
        if w.shape[axis] != bn.num_features or not w.is_floating_point() \
                or _scale(None, bn.running_var.detach().cpu().numpy(), bn.eps) is None:
            continue
        out.append((names[id(w)], names[id(b)] if b is not None else None, node.target))
        if type(bn) is nn.BatchNorm1d:
            ranked[node.target] = layer.target
    ok = _checked_ranks(module, set(ranked.values()), probe) if ranked else set()
    return [p for p in out if p[2] not in ranked or ranked[p[2]] in ok]


def _checked_ranks(module: Any, targets: set[str], probe: Callable[[Any], Any] | None) -> set[str]:
    """Those of the Linear/Conv1d modules ``targets`` whose every output in ``probe(module)`` had
    BatchNorm1d's channels on axis 1 (Linear: rank 2; Conv1d: rank 3). Nothing without a probe, or
    when a module trains (a forward would move its BatchNorm statistics) or the probe fails."""
    import torch
    if probe is None or any(m.training for m in module.modules()):
        return set()
    want = {torch.nn.Linear: 2, torch.nn.Conv1d: 3}
    seen: dict[str, set[int]] = {t: set() for t in targets}
    hooks = [module.get_submodule(t).register_forward_hook(
        lambda _m, _i, out, t=t: seen[t].add(out.dim() if isinstance(out, torch.Tensor) else -1)) for t in targets]
    try:
        with torch.no_grad():
            probe(module)
    except Exception:  # noqa: BLE001 - the calibration input is checked, with its own message, later
        return set()
    finally:
        for h in hooks:
            h.remove()
    return {t for t, ranks in seen.items() if ranks == {want[type(module.get_submodule(t))]}}


def _tensor_id(module: Any, target: str) -> int:
    """``id`` of the parameter or buffer at ``target`` (0 for other attributes)."""
    import torch
    owner, _, attr = target.rpartition(".")
    t = getattr(module.get_submodule(owner) if owner else module, attr, None)
    return id(t) if isinstance(t, torch.Tensor) else 0


def _torch_layer(module: Any, node: Any, bn_types: dict, bn_type: type) -> tuple[Any, Any] | None:
    """``(weight, bias)`` parameters of the convolution ``node`` computes, when it is a plain
    ``nn.ConvNd`` matching ``bn_type`` or ``torch.convNd`` of parameters, else None."""
    import torch
    from torch import fx
    if node.op == "call_module":
        conv = module.get_submodule(node.target)
        return (conv.weight, conv.bias) if bn_types.get(type(conv)) is bn_type else None
    nn, F = torch.nn, torch.nn.functional
    kinds = {torch.conv2d: nn.Conv2d, F.conv2d: nn.Conv2d, torch.conv3d: nn.Conv3d, F.conv3d: nn.Conv3d}
    if node.op != "call_function" or bn_types.get(kinds.get(node.target)) is not bn_type:
        return None
    args = list(node.args) + [None] * 3
    weight, bias = node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    params = []
    for arg in (weight, bias):
        if arg is None:
            params.append(None)
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            return None
        owner, _, attr = arg.target.rpartition(".")
        t = (module.get_submodule(owner) if owner else module)._parameters.get(attr)
        if t is None:
            return None
        params.append(t)
    if params[0] is None:
        return None
    return params[0], params[1]
