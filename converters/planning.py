"""Planning a conversion: which tensors are coded, in which codebook group, at which setting.

Which tensors are compressed (:func:`select_tensors`): floating-point tensors
with at least 2 dimensions and at least ``min_elements`` (default 4096)
elements, not matching a ``keep`` pattern. This includes embedding tables.
Everything else (biases, norms, small or integer tensors) is stored raw in its
original dtype, so it round-trips bit-exactly.

With a size target or ``allocate``, every tensor joins one candidate group per
bit width, and an *allocate* pass predicts each tensor's output error per
candidate from a few rows and picks one per tensor under the budget.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from aqformat.dtypes import FLOAT_DTYPES
from aqformat.errors import AqmInputError

from .options import AQConfig
from .progress import Progress
from .sources import TensorSpec

__all__ = ["DEFAULT_MIN_ELEMENTS", "select_tensors"]

DEFAULT_MIN_ELEMENTS = 4096

_GROUPINGS = ("shared", "per-layer", "by-kind")


def select_tensors(specs: Sequence[TensorSpec], *, keep: Iterable[str] = (),
                   min_elements: int = DEFAULT_MIN_ELEMENTS) -> list[str]:
    """Names of the tensors to compress (see the module docstring for the rule).

    Parameters
    ----------
    specs : sequence of TensorSpec
        The model's tensors.
    keep : iterable of str
        fnmatch patterns of tensor names to keep raw.
    min_elements : int
        Smallest tensor compressed.
    """
    keep = list(keep)
    return [s.name for s in specs
            if s.dtype in FLOAT_DTYPES and len(s.shape) >= 2 and s.numel >= min_elements
            and not any(fnmatch.fnmatchcase(s.name, p) for p in keep)]


_ENCODER_KEYS = ("b", "d", "beam", "iters", "feedback", "damp", "reservoir", "perm_iters")

_PIPELINE_KEYS = ("reservoir", "perm_iters")  # used by the pipeline, not by AQConfig


def _config_for_bits(bits: float, encoder: dict[str, Any]):
    """The AQ configuration of about ``bits`` code bits per weight: ``M = bits * d / b``.

    ``encoder`` may set ``b`` (bits per code, default 8), ``d`` (vector length,
    default 8) and the search effort ``beam``/``iters``/``feedback``/``damp``
    (defaults of :class:`aqformat.converters.options.AQConfig`).
    """
    if isinstance(bits, (bool, str)) or not isinstance(bits, (int, float, np.number)) or not 0 < bits <= 64:
        raise AqmInputError(f"bits must be a number of bits per weight in (0, 64], got {bits!r}")
    unknown = set(encoder) - set(_ENCODER_KEYS)
    if unknown:
        raise AqmInputError(f"unknown encoder option(s) {sorted(unknown)} (known: {', '.join(_ENCODER_KEYS)})")
    opts = {k: v for k, v in encoder.items() if k not in _PIPELINE_KEYS}
    b, d = int(opts.pop("b", 8)), int(opts.pop("d", 8))
    M = int(round(bits * d / b))
    if not 1 <= M <= 64:
        raise AqmInputError(f"bits={bits} gives {M} codebooks of {b} bits over {d}-vectors (1..64 allowed)")
    return AQConfig(M=M, b=b, d=d, **opts)


def _reserved(n_tensors: int) -> int:
    """Bytes of header, metadata and alignment padding reserved under a budget.

    Measured: 19.6 KB for MiniLM's 104 tensors, 1.6 KB for an 8-tensor model.
    """
    return 1024 + 224 * n_tensors


def _sample_and_train(configs: dict[str, Any], members: dict[str, list[str]], weights: Any,
                      H: dict[str, Any], axes: dict[str, Any], perms: dict[str, Any] | None,
                      encoder: dict[str, Any], seed: int, numel: dict[str, int], progress: bool
                      ) -> dict[str, Any]:
    """Pass 1: read each tensor once, sample it into every group it may join, train the groups.

    With ``perms`` (a dict to fill), each tensor's column permutation is searched
    first (:func:`aqformat.converters.permute.search_permutation`) and used from then on.
    """
    from .grouping import GroupTrainer
    reservoir = int(encoder.get("reservoir", 1 << 16))
    trainers = {g: GroupTrainer(cfg, reservoir=reservoir, seed=seed) for g, cfg in configs.items()}
    with Progress("sample", sum(numel[n] for n in members), len(members), progress) as bar:
        for n, groups in members.items():
            W = weights(n)
            if perms is not None:
                from .permute import search_permutation
                perms[n] = search_permutation(W, configs[groups[0]].d, axes.get(n), seed=seed,
                                              iters=int(encoder.get("perm_iters", 2000))).perm
            for g in groups:
                trainers[g].add(n, W, H.get(n), axes.get(n), (perms or {}).get(n))
            bar.update(numel[n], n)
    books = {}
    with Progress("train", len(trainers), len(trainers), progress, unit="group") as bar:
        for g, tr in trainers.items():
            books[g] = tr.train()
            bar.update(1, g)
    return books


def _allocate(budget: int, configs: dict[str, Any], members: dict[str, list[str]], books: dict[str, Any],
              weights: Any, specs: dict[str, TensorSpec], H: dict[str, Any], S: dict[str, Any],
              axes: dict[str, Any], perms: dict[str, Any], seed: int, progress: bool,
              trial_rows: int = 64) -> dict[str, str]:
    """Pass 2: predict each tensor's error under every candidate group from a random subset
    of its rows, then let :func:`aqformat.converters.allocate.allocate` pick one group (or
    ``"raw"``) per tensor within ``budget`` bytes (codes, scales and codebooks counted).

    A row's predicted error is its output error ``(E H E^T)_ii`` weighted by the output
    sensitivity ``s_i`` of ``S`` (the predicted change of the model's output). Tensors
    without ``S`` (no calibration, or not a Linear/Conv2d) are weighted relative to their
    own energy ``tr(W H W^T)``, scaled by the median sensitivity-weighted energy of the
    others so both kinds compare (measured on MiniLM: absolute errors starve sensitive
    layers)."""
    import torch

    from .allocate import allocate, aq_tensor_bytes
    from .aq_encode import as_matrix, decode_rows, encode_tensor, output_error
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    energy: dict[str, float] = {}
    with Progress("allocate", sum(specs[n].numel for n in members), len(members), progress) as bar:
        for n, groups in members.items():
            W = weights(n)
            Wm = as_matrix(n, W, axes.get(n), perms.get(n))
            s = S.get(n)
            energy[n] = output_error(Wm, 0.0, H.get(n), s)
            sub = torch.randperm(Wm.shape[0], generator=gen)[:trial_rows]
            errors[n], nbytes[n] = {"raw": 0.0}, {"raw": specs[n].nbytes}
            for g in groups:
                t = encode_tensor(n, W, books[g], configs[g], H.get(n), axes.get(n), perms.get(n),
                                  rows=sub)
                Wh = decode_rows(t, books[g], Wm.shape[1])
                errors[n][g] = output_error(Wm[sub], Wh, H.get(n), None if s is None else s[sub]) \
                    * Wm.shape[0] / len(sub)
                nbytes[n][g] = aq_tensor_bytes(specs[n].shape, configs[g], axes.get(n), perms.get(n) is not None)
            bar.update(specs[n].numel, n)
    weighted = [energy[n] for n in members if n in S]
    ref = float(np.median(weighted)) if weighted else 1.0
    sensitivity = {n: 1.0 if n in S else ref / max(energy[n], 1e-30) for n in members}
    return allocate(errors, nbytes, budget, {g: cfg.codebook_bytes() for g, cfg in configs.items()},
                    sensitivity)


def _plan(specs: list[TensorSpec], compress: list[str], *, bits: float, target: int | None,
          allocate: bool, codebooks: str, encoder: dict[str, Any], axes: dict[str, Any],
          H: dict[str, Any], S: dict[str, Any], perms: dict[str, Any] | None, weights: Any, seed: int, progress: bool
          ) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Choose every compressed tensor's codebook group and train the groups.

    Without ``target`` or ``allocate``, every tensor gets the ``bits`` setting,
    in groups by ``codebooks`` mode. Otherwise each ``codebooks`` group is
    offered candidates of ``bits - 1``, ``bits`` and ``bits + 1`` code bits and the
    allocator picks per tensor under the budget: ``target`` bytes, or ``bits``
    per compressed weight with every byte counted (codes, scales, codebooks).

    Returns ``(configs by group, group of each coded tensor, codebooks by group)``.
    """
    from .aq_encode import aq_eligible
    from .grouping import group_tensors
    by_name = {s.name: s for s in specs}
    shapes = {s.name: s.shape for s in specs}
    numel = {s.name: s.numel for s in specs}
    uniform = _config_for_bits(bits, encoder)
    if target is None and not allocate:
        compress = [n for n in compress if aq_eligible(shapes[n], uniform, axes.get(n))]
        groups = group_tensors(compress, codebooks, shapes)
        configs = {g: uniform for g in groups}
        group_of = {n: g for g, ms in groups.items() for n in ms}
        books = _sample_and_train(configs, {n: [g] for n, g in group_of.items()}, weights, H, axes,
                                  perms, encoder, seed, numel, progress)
        return configs, group_of, books
    b, d = int(encoder.get("b", 8)), int(encoder.get("d", 8))
    configs, members = {}, {}
    for key, names in group_tensors(compress, codebooks, shapes).items():
        for M in range(max(1, uniform.M - d // b), uniform.M + d // b + 1):
            cfg = _config_for_bits(M * b / d, encoder)
            gid = f"{key}:{M}x{b}d{d}"
            for n in names:
                if aq_eligible(shapes[n], cfg, axes.get(n)):
                    configs[gid] = cfg
                    members.setdefault(n, []).append(gid)
    if target is not None:
        fixed = sum(s.nbytes for s in specs if s.name not in members)
        budget = int((target - _reserved(len(specs))) / 1.002) - fixed
        if budget <= 0:
            raise AqmInputError(f"target size {target:,} bytes is below the smallest reachable "
                                f"(raw tensors alone take {fixed:,} bytes)")
    else:
        allowed = int(bits * sum(numel[n] for n in members) / 8)
        budget = allowed - _reserved(len(specs))
        if budget <= 0:
            raise AqmInputError(f"--allocate at {bits} bits/weight gives {allowed:,} bytes, less than the "
                                f"{_reserved(len(specs)):,} reserved for the header: use more bits or no --allocate")
    books = _sample_and_train(configs, members, weights, H, axes, perms, encoder, seed, numel,
                              progress)
    choice = _allocate(budget, configs, members, books, weights, by_name, H, S, axes, perms or {},
                       seed, progress)
    group_of = {n: g for n, g in choice.items() if g != "raw"}
    used = set(group_of.values())
    return ({g: c for g, c in configs.items() if g in used}, group_of,
            {g: c for g, c in books.items() if g in used})
