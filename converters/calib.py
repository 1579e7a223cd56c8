"""Calibration statistics: ``H = X^T X / n`` over the inputs of each weight.

``H`` is taken over the columns of the weight's matrix view
(:func:`aqformat.layout.to_matrix`): the ``in`` features of a Linear
``[out, in]`` weight, the ``in*kh*kw`` im2col patches of a Conv2d
``[out, in, kh, kw]`` weight. The AQ encoder minimises
``tr((W - W_hat) H (W - W_hat)^T)``, the mean squared layer output error.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["collect_hessians"]


def _conv_patches(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col of a conv input: ``[n_patches * groups, in/groups * kh * kw]``."""
    if mod.padding_mode != "zeros":
        raise NotImplementedError("only zero-padded convolutions are supported")
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
        raise NotImplementedError("padding='same' needs stride 1")
    return tuple(d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation))


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
    hooks = []

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

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and (include is None or include(name, mod)):
            hooks.append(mod.register_forward_hook(hook_for(name, mod)))
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
