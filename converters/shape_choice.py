"""The AQ codebook shape of a conversion (code width ``b``, vector length ``d``) chosen by rate and distortion.

Larger codebooks over longer vectors code better at a given code rate, but
cost ``2 * M * 2**b * d`` bytes per group. On a large model that is nothing;
on a small one the default shape's codebooks can outweigh its codes (two
16 KiB groups for a 55 k-parameter CNN at 4 bits). So when the user asks for
it (``bits_per_code="auto"``, ``--bits-per-code auto``), and the default
shape's codebooks would take more than :data:`OVERHEAD` of the codes' bytes,
every shape of
:data:`SHAPES` that reaches the code rate with a whole number ``M`` of
codebooks is trained on a sample of the model's normalised weight vectors,
and the one with the lowest error *at equal bytes* wins: each shape's
measured error is charged ``4 ** (extra bits per weight)`` for the bits its
codebooks add (``D ~ 2**(-2R)``, 6 dB per bit), the slope of its own rate
curve.

One shape serves the whole conversion (every codebook group), at the rate
``--bits`` gives; ``--allocate`` and ``--target-size`` keep the default shape
and spread their budget over its code widths, codebooks counted. Below the
threshold the default is kept without measuring: with codebooks under 1% of
the bytes, the longer vectors' lower error is what decides. Groups whose
default codebooks outweigh their codes are not measured: the affine codec
codes them (as it does whatever the shape; on a 64-128-10 MLP at 4 bits it
gave 22.1 dB where the best small shape gave 21.1 dB in a larger file).

It is not the default: weight error at equal bytes ranks shapes well on the
digits CNN (files 0.67-0.72x the 8-bit default's, agreement within 0.011),
but on silero-vad (16 kHz, 12 espeak-ng utterances) the shapes it chose
(6- and 8-bit codes over 4-vectors) made files 0.85-0.88x the default's whose mean
speech-probability error was 0.20 / 0.18 at 3 / 4 bits, against the
default's 0.017 / 0.009 (``python -m bench.shape_choice_bench --model silero``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from aqformat.errors import TooSmallForAQ

from .options import AQConfig, ConvertOptions

__all__ = ["SHAPES", "OVERHEAD", "choose_shape", "shape_errors"]

SHAPES = tuple((b, d) for b in (8, 6, 4) for d in (8, 4, 2, 1))
"""Candidate ``(bits_per_code, d)``; each ``d`` divides 8, so one sample of 8-vectors serves all
(``d = 1``: a scalar quantizer with learned levels)."""
OVERHEAD = 0.01
"""Codebook bytes, as a share of the code bytes, above which the shape is measured."""
MAX_M = 8  # more codebooks per vector multiply the search time for no gain at these sizes
SAMPLE = 1 << 14  # 8-vectors trained on: all of a small model's
EFFORT = 4  # the largest beam and codebook iterations of the trials: the ranking, not the codes, is sought


def choose_shape(opts: ConvertOptions, shapes: dict[str, tuple[int, ...]], load: Callable[[str], np.ndarray],
                 axes: dict[str, Any]) -> ConvertOptions:
    """``opts`` with the encoder's ``bits_per_code`` and ``d`` set for AQ-coding the tensors of
    ``shapes`` (name -> shape) at ``opts.bits_per_weight``: unchanged unless ``bits_per_code`` is
    ``"auto"``, then the best measured shape (module doc). The groups whose default codebooks outweigh their codes are left
    out: the affine codec takes those (:func:`aqformat.converters.affine.codebook_dominated`).
    A rate the default shape reaches only by mixing two code widths is reached exactly when a
    measured shape wins."""
    from .affine import codebook_dominated
    from .grouping import group_tensors
    enc, bits = opts.encoder, float(opts.bits_per_weight)
    if not enc.choose_shape or opts.target_size is not None or opts.allocate:
        return opts  # a budget is spread over code widths of one shape, codebooks counted
    default = enc.config(bits)
    numel = {k: int(np.prod(v)) for k, v in shapes.items()}
    groups = group_tensors(list(shapes), opts.grouping, shapes)
    gone = set(codebook_dominated(groups, default, numel))
    groups = {g: ms for g, ms in groups.items() if not gone.intersection(ms)}
    names = [k for ms in groups.values() for k in ms]
    n = sum(numel[k] for k in names)
    if not names or len(groups) * default.codebook_bytes() <= OVERHEAD * n * bits / 8:
        return opts
    errors = shape_errors(_sample(names, load, axes, opts.seed), bits, enc, opts.seed, opts.progress)
    if not errors:
        return opts
    best = min(errors, key=lambda s: errors[s] * 4.0 ** (8 * len(groups) * s.codebook_bytes() / n))
    return dataclasses.replace(opts, encoder=dataclasses.replace(enc, bits_per_code=best.b, d=best.d))


def shape_errors(x: np.ndarray, bits: float, enc: Any, seed: int, progress: bool = False) -> dict[AQConfig, float]:
    """Mean squared error per weight of the 8-vectors ``x`` (rows) coded by each shape of
    :data:`SHAPES` at ``bits`` code bits per weight (the shapes it reaches with 1 to
    :data:`MAX_M` codebooks and has enough vectors for)."""
    import torch

    from .aq_search import decode_vectors, train_aq
    from .progress import Progress
    trial = dataclasses.replace(enc, beam=min(enc.beam, EFFORT), iters=min(enc.iters, EFFORT))
    candidates = [dataclasses.replace(trial, bits_per_code=b, d=d) for b, d in SHAPES]
    shapes = [e.config(bits) for e in candidates if e.exact(bits) and bits * e.d / e.bits_per_code <= MAX_M]
    out: dict[AQConfig, float] = {}
    with Progress("shape", len(shapes), len(shapes), progress, unit="shape") as bar:
        for cfg in shapes:
            v = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, cfg.d)))
            try:
                C, codes = train_aq(v, cfg, None, seed=seed)
                out[cfg] = float((v - decode_vectors(C, codes)).pow(2).mean())
            except TooSmallForAQ:
                pass
            bar.update(1, f"{cfg.K}x{cfg.d}")
    return out


def _sample(names: Sequence[str], load: Callable[[str], np.ndarray], axes: dict[str, Any],
            seed: int) -> np.ndarray:
    """Up to :data:`SAMPLE` of the tensors' 8-vectors, rows scaled to unit RMS as AQ codes them."""
    from .aq_encode import as_matrix, row_scales
    parts = []
    for k in names:
        W = as_matrix(k, load(k), axes.get(k))
        Wn = (W / row_scales(W)[:, None]).numpy()
        pad = -Wn.shape[1] % 8
        parts.append(np.pad(Wn, ((0, 0), (0, pad))).reshape(-1, 8))
    x = np.concatenate(parts)
    if len(x) > SAMPLE:
        x = x[np.random.default_rng(seed).choice(len(x), SAMPLE, replace=False)]
    return x.astype(np.float32)

