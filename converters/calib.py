"""Calibration statistics: ``H = X^T X / n`` over the inputs of each weight.

``H`` is taken over the columns of the weight's matrix view
(:func:`aqformat.layout.to_matrix`): the ``in`` features of a Linear
``[out, in]`` weight, the ``in*kh*kw`` im2col patches of a Conv2d
``[out, in, kh, kw]`` weight. The AQ encoder minimises
``tr((W - W_hat) H (W - W_hat)^T)``, the mean squared layer output error.

How much a layer's output error moves the *model's* output differs by layer
and by output channel; :func:`collect_output_sensitivity` measures that
weight (the Gauss-Newton diagonal over each layer's output channels), which
bit allocation multiplies into each row's predicted error.

:func:`calibration_batches` turns the ``calib`` argument of a conversion
(``.npy``/``.npz``/``.txt`` files or batches) into ``(module, batches, run)``,
and :func:`calibration_stats` collects both statistics for the tensors a
conversion codes.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aqformat.errors import AqmInputError, AqmUnsupportedError

from .sources import Source

__all__ = ["collect_hessians", "collect_output_sensitivity", "model_output", "calibration_batches",
           "calibration_stats"]


def model_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is compared on: ``last_hidden_state``, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("last_hidden_state", "logits"):
        if hasattr(out, key) and isinstance(getattr(out, key), torch.Tensor):
            return getattr(out, key)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise AqmInputError(f"cannot compare model outputs of type {type(out).__name__}; pass loss_fn=")


def _conv_patches(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col of a conv input: ``[n_patches * groups, in/groups * kh * kw]``."""
    if mod.padding_mode != "zeros":
        raise AqmUnsupportedError(f"calibration of {mod.padding_mode}-padded convolutions is not supported")
    pad = mod.padding if not isinstance(mod.padding, str) else _same_pad(mod)
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)
    g = mod.groups
    n, k, L = cols.shape
    # Group g's weight rows only see its own input channels: stack groups as samples.
    return cols.reshape(n, g, k // g, L).permute(0, 1, 3, 2).reshape(-1, k // g)


def _same_pad(mod: nn.Conv2d) -> tuple[int, int]:
    if mod.padding == "valid":
        return (0, 0)
    if any(s != 1 for s in mod.stride):
        raise AqmUnsupportedError("calibration of padding='same' convolutions needs stride 1")
    return tuple(d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation))


def _layers(model: nn.Module, include: Callable[[str, nn.Module], bool] | None
            ) -> dict[str, nn.Module]:
    """The Linear / Conv2d modules that calibration statistics are collected for."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and (include is None or include(name, mod))}


def collect_hessians(model: nn.Module, run: Callable[[nn.Module, object], object],
                     batches: Iterable[object],
                     include: Callable[[str, nn.Module], bool] | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Accumulate ``H = X^T X / n_samples`` for every Linear / Conv2d weight.

    Parameters
    ----------
    model : nn.Module
        The model (run in eval mode, no gradients).
    run : callable
        ``run(model, batch)`` performs one forward pass.
    batches : iterable
        Calibration batches. Padding tokens should not be fed (they would
        bias ``H``): give unpadded batches, e.g. one sentence at a time.
    include : callable, optional
        ``include(module_name, module)`` selects the modules (default: all).

    Returns
    -------
    dict mapping ``"<module>.weight"`` to float32 ``H`` of shape ``[cols, cols]``.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str, mod: nn.Module):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach()
            if isinstance(mod, nn.Conv2d):
                x = _conv_patches(mod, x)
            else:
                x = x.reshape(-1, x.shape[-1])
            x = x.double()
            key = name + ".weight"
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]
        return hook

    hooks = [mod.register_forward_hook(hook_for(name, mod)) for name, mod in _layers(model, include).items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: (v / counts[k]).float() for k, v in sums.items()}


def collect_output_sensitivity(model: nn.Module, run: Callable[[nn.Module, object], object],
                               batches: Iterable[object],
                               include: Callable[[str, nn.Module], bool] | None = None,
                               seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-output-channel sensitivity of the model's output to every Linear / Conv2d output.

    For each batch, ``L = <r, f(x)>`` with ``r ~ N(0, I)`` (``f`` the tensor
    :func:`model_output` picks) is back-propagated to each layer output
    ``y``; since ``E_r[(dL/dy)^2]`` is the diagonal of ``J^T J``, channel
    ``i`` gets ``s_i = sum over positions of (dL/dy_i)^2``, averaged over
    batches. An error ``E`` in the weight then moves the model output by
    about ``sum_i s_i (E H E^T)_ii`` (``H`` from :func:`collect_hessians`).

    Parameters
    ----------
    model, run, batches, include
        As in :func:`collect_hessians`; ``run`` must return the model output.
    seed : int
        Seed of the random projections.

    Returns
    -------
    dict mapping ``"<module>.weight"`` to float32 ``s`` of shape ``[out_channels]``
    (a model with a ``calibration_taps()`` method, such as
    :class:`~aqformat.converters.onnx_torch.OnnxModule`, maps weight names to
    ``(module, channel axis)`` of their layer outputs itself). Weights that do
    not reach the output get zeros.
    """
    outs: dict[str, list[torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(_mod, _inputs, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                outs.setdefault(name, []).append(out)
                if name not in sums:  # a layer that runs but does not reach the output: zeros
                    sums[name] = torch.zeros(out.shape[taps[name][1]], dtype=torch.float64)
        return hook

    # weight name -> (module whose output is the layer output, its output-channel axis); a model
    # that is not made of Linear/Conv2d modules (an ONNX graph run by torch) names its own
    taps = model.calibration_taps() if hasattr(model, "calibration_taps") else {
        f"{n}.weight": (m, 1 if isinstance(m, nn.Conv2d) else -1) for n, m in _layers(model, include).items()}
    hooks = [mod.register_forward_hook(hook_for(name)) for name, (mod, _) in taps.items()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    gen = torch.Generator().manual_seed(seed)
    sums = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, (m, _) in taps.items()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}
    n_batches = 0
    model.eval()
    try:
        for p in params:  # the graph must exist; only layer outputs get gradients
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                outs.clear()
                y = model_output(run(model, batch))
                r = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y)
                keys = [n for n in outs for _ in outs[n]]
                tensors = [t for n in outs for t in outs[n]]
                grads = torch.autograd.grad((y * r).sum(), tensors, allow_unused=True) if tensors else ()
                for n, g in zip(keys, grads):
                    if g is not None:
                        ch = taps[n][1] % g.dim()
                        sums[n] += g.detach().double().pow(2).movedim(ch, -1).reshape(-1, g.shape[ch]).sum(0)
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return {n: (s / max(n_batches, 1)).float() for n, s in sums.items()}


def calibration_batches(calib: Any, source: Source) -> tuple[Any, Any, Any]:
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
        raise AqmInputError("calibration needs the model's code: pass an nn.Module, a Hugging Face "
                            "folder, or --model module:Callable (model_code=) for a state_dict")
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


def calibration_stats(calib: tuple[Any, Any, Any] | None, names: Sequence[str],
                      sensitivity: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``H`` per weight in ``names`` and, if ``sensitivity``, each weight's output-channel
    sensitivity (:func:`~aqformat.converters.calib.collect_output_sensitivity`), from
    resolved ``(module, batches, run)`` calibration."""
    if calib is None:
        return {}, {}
    if hasattr(calib, "stats"):  # an ONNX source: statistics through ONNX Runtime
        return calib.stats(names, sensitivity)
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
