"""How much the small tensors the affine codec codes move the model's output, from calibration data.

For a tensor ``w`` coded with error ``E`` (decoded minus original), the output of calibration batch
``k`` moves by about ``J_k E`` (``J_k`` its Jacobian in ``w``). With a random projection
``r_k ~ N(0, I)`` of the output (as :func:`~aqformat.converters.calib.collect_output_sensitivity`
draws them), ``g_k = J_k^T r_k`` is the gradient of ``<r_k, f(x_k)>`` and ``E_r[(g_k . E)^2] =
||J_k E||^2``: so one backward pass per batch gives every small tensor's ``g_k`` at once, and
``sum_k (g_k . E)^2`` predicts the squared output error of *any* error ``E`` of that tensor, the
correlations between its weights' errors included (a coded bias's errors share one offset). Batches
beyond :data:`SLOTS` are summed into the slots (``k mod SLOTS``): the projections are independent,
so the estimate stays unbiased and memory is ``SLOTS`` float32 values per small weight (the
cost in time: one forward and backward pass per calibration batch).

:func:`small_sensitivity` measures it for a conversion's resolved calibration (a PyTorch module or
an ONNX graph run by torch); :meth:`SmallSensitivity.errors` gives the predicted output errors of a
tensor's candidate codings, which :func:`aqformat.converters.affine.plan_within` weighs per byte.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SmallSensitivity", "small_sensitivity", "collect_tensor_gradients", "SLOTS", "UNREACHED_WEIGHT"]

SLOTS = 64
"""Projected gradients kept per small tensor (batches beyond it are summed into them)."""
UNREACHED_WEIGHT = 1e-3
"""Weight of a tensor's relative weight error beside its output error (in units of the median
tensor's output error per unit of relative weight error): it only orders the choices the output
error does not tell apart, e.g. those of a tensor the calibration data never reaches."""


@dataclass
class SmallSensitivity:
    """Projected output gradients of the small tensors, and the output's energy over the same batches.

    ``grads`` maps a tensor name to float32 ``[slots, numel]``; ``energy`` is ``sum_k ||f(x_k)||^2``,
    so ``errors(...) / energy`` is a relative squared output error; ``scale`` converts a relative
    weight error into an output error for tensors without gradients: the median over the measured
    tensors of the output error of a relative error of 1 spread evenly over the tensor's weights.
    """

    grads: dict[str, np.ndarray]
    energy: float
    scale: float

    def errors(self, name: str, w: np.ndarray, decoded: Sequence[np.ndarray | None]) -> np.ndarray:
        """Predicted squared output error of each coding of tensor ``name`` (``w`` the original,
        ``decoded`` one array per candidate, None for a candidate that cannot code it: inf)."""
        w64 = np.asarray(w, dtype=np.float64).reshape(-1)
        energy = max(float(np.dot(w64, w64)), 1e-30)
        ok = [i for i, d in enumerate(decoded) if d is not None]
        out = np.full(len(decoded), np.inf)
        if not ok:
            return out
        E = np.stack([np.asarray(decoded[i], dtype=np.float64).reshape(-1) for i in ok]) - w64
        rel = np.sum(np.square(E), axis=1) / energy
        g = self.grads.get(name)
        if g is None or g.shape[1] != w64.size:  # not in the module: its relative error at the median's rate
            measured = self.scale * rel
        else:
            measured = np.sum(np.square(E @ g.T.astype(np.float64)), axis=1)
        out[ok] = measured + UNREACHED_WEIGHT * self.scale * rel
        return out


def collect_tensor_gradients(module: Any, run: Any, batches: Iterable[Any], names: Iterable[str],
                             slots: int = SLOTS, seed: int = 0) -> SmallSensitivity:
    """Projected output gradients of the tensors ``names`` of ``module`` (its ``state_dict`` keys:
    parameters or floating-point buffers; other names are left out), over calibration ``batches``.

    ``run(module, batch)`` returns the model output (compared as
    :func:`~aqformat.converters.calib.model_output` picks it). The module runs in eval mode; its
    tensors' ``requires_grad`` flags are restored afterwards.
    """
    import torch

    from .calib import model_output
    state = module.state_dict(keep_vars=True)
    wanted = [n for n in dict.fromkeys(names) if n in state and state[n].is_floating_point()]
    tensors = [state[n] for n in wanted]
    flags = [t.requires_grad for t in tensors]
    sums = [torch.zeros(slots, t.numel(), dtype=torch.float32) for t in tensors]
    gen = torch.Generator().manual_seed(seed)
    energy, was_training = 0.0, module.training
    module.eval()
    try:
        for t in tensors:
            t.requires_grad_(True)
        with torch.enable_grad():
            for k, batch in enumerate(batches):
                y = model_output(run(module, batch))
                r = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y)
                grads = torch.autograd.grad((y * r).sum(), tensors, allow_unused=True) if tensors else ()
                for s, g in zip(sums, grads):
                    if g is not None:
                        s[k % slots] += g.detach().reshape(-1).float()
                energy += float(y.detach().double().square().sum())
    finally:
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)
        module.train(was_training)
    grads = {n: s.numpy() for n, s in zip(wanted, sums)}
    # output error of a relative error of 1 spread evenly: sum_k ||g_k||^2 ||w||^2 / numel
    unit = [float(np.sum(np.square(grads[n], dtype=np.float64))) * float(t.detach().double().square().sum())
            / max(t.numel(), 1)
            for n, t in zip(wanted, tensors)]
    scale = float(np.median(unit)) if unit else 0.0
    return SmallSensitivity(grads, max(energy, 1e-30), scale if scale > 0 else 1.0)  # 1.0: nothing measured


def small_sensitivity(calib: Any, names: Sequence[str]) -> SmallSensitivity | None:
    """:func:`collect_tensor_gradients` of ``names`` for a conversion's resolved calibration: a
    PyTorch source's ``(module, batches, run)``, or an ONNX source's
    :class:`~aqformat.converters.onnx_calib.OnnxCalibration` (its graph run by torch). None without
    calibration or names, or when torch cannot run the graph (said in the calibration's notes).

    Raises :class:`~aqformat.errors.AqmInputError` when the calibration forward pass fails.
    """
    from aqformat.errors import AqmInputError
    if calib is None or not names:
        return None
    if hasattr(calib, "stats"):  # an ONNX source
        from .onnx_torch import unsupported_ops
        bad = unsupported_ops(calib.model)
        if bad:
            calib.notes.append(f"small tensors coded by weight error (the torch interpreter lacks {', '.join(bad)})")
            return None
        module, batches, run = calib.torch_module(), calib.data.batches, calib.run
    else:
        module, batches, run = calib
    try:
        return collect_tensor_gradients(module, run, batches, names)
    except (RuntimeError, TypeError, ValueError) as e:
        raise AqmInputError(f"calibration forward pass failed: {(str(e).splitlines() or [''])[0]}") from None
