"""Bit allocation: choose per-tensor AQ settings under a byte budget.

Each candidate setting is one codebook group (one ``(M, K, d)``, codebooks
shared by every tensor assigned to it), e.g. a 2-, 3-, 4-, 5- and 6-bit
group, plus keeping a tensor fp16. The predicted cost of a choice is the
sensitivity-weighted output error ``tr((W - W_hat) H (W - W_hat)^T)``
measured by coding a random subset of rows against the candidate's
codebooks. A Lagrangian relaxation picks a starting point, then greedy
upgrades (best error decrease per byte) spend the remaining budget. All
bytes count: bit-packed codes, fp16 scales and each used group's fp16
codebooks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from aqformat.errors import AqmInputError

from .aq import (AQConfig, AQTensor, GroupTrainer, aq_eligible, as_matrix, decode_tensor,
                 decode_vectors, encode_tensor, output_error)

__all__ = ["FP16", "aq_tensor_bytes", "default_candidates", "allocate", "Plan",
           "allocate_and_quantize"]

FP16 = "fp16"


def aq_tensor_bytes(shape: Sequence[int], cfg: AQConfig, axes: Sequence[int] | None = None) -> int:
    """Bytes of one AQ-coded tensor: bit-packed codes (padding included) + fp16 scales."""
    n = int(np.prod(shape))
    rows = shape[axes[0]] if axes is not None else shape[0]
    n_vec = rows * math.ceil((n // rows) / cfg.d)
    return math.ceil(n_vec * cfg.M * cfg.b / 8) + 2 * rows


def default_candidates(d: int = 8, b: int = 8, Ms: Sequence[int] = (2, 3, 4, 5, 6),
                       **kw) -> dict[str, AQConfig]:
    """Candidate groups ``aq{M}x{b}d{d}`` at ``M*b/d`` code bits per weight."""
    return {f"aq{M}x{b}d{d}": AQConfig(M=M, b=b, d=d, **kw) for M in Ms}


def allocate(errors: Mapping[str, Mapping[str, float]], nbytes: Mapping[str, Mapping[str, int]],
             budget: int, group_bytes: Mapping[str, int] | None = None,
             sensitivity: Mapping[str, float] | None = None) -> dict[str, str]:
    """Choose one option per tensor minimising total weighted error within ``budget`` bytes.

    Parameters
    ----------
    errors, nbytes : dict tensor -> dict option -> value
        Predicted error and bytes of every option of every tensor.
    budget : int
        Total bytes allowed, group overheads included.
    group_bytes : dict option -> bytes, optional
        Fixed cost paid once if any tensor uses the option (shared codebooks).
    sensitivity : dict tensor -> weight, optional
        Multiplies the tensor's errors (default 1).

    Returns
    -------
    dict tensor -> option. Raises :class:`AqmInputError` naming the smallest
    achievable size when the budget cannot be met.
    """
    if not errors:
        return {}
    group_bytes = dict(group_bytes or {})
    sens = {t: (sensitivity or {}).get(t, 1.0) for t in errors}
    names = list(errors)
    opts = {t: sorted(errors[t], key=lambda o: nbytes[t][o]) for t in names}

    def total(choice: Mapping[str, str]) -> int:
        used = set(choice.values())
        return sum(nbytes[t][o] for t, o in choice.items()) + sum(group_bytes.get(o, 0) for o in used)

    def cost(t: str, o: str) -> float:
        return sens[t] * errors[t][o]

    smallest = min((total({t: opts[t][0] for t in names}),
                    *(total({t: o for t in names}) for o in set.intersection(*map(set, opts.values())))),
                   default=0)
    if budget < smallest:
        raise AqmInputError(f"size target of {budget} bytes is impossible: the smallest "
                            f"achievable is {smallest} bytes")

    def lagrangian(lam: float) -> dict[str, str]:
        return {t: min(opts[t], key=lambda o: cost(t, o) + lam * nbytes[t][o]) for t in names}

    lo, hi = 0.0, 1.0
    while total(lagrangian(hi)) > budget and hi < 1e30:
        hi *= 10.0
    choice = lagrangian(hi)
    if total(choice) > budget:  # group overheads defeat the relaxation: start from the smallest
        choice = {t: opts[t][0] for t in names}
    else:
        for _ in range(60):
            mid = math.sqrt(max(lo, 1e-300) * hi) if lo > 0 else hi / 1e6
            c = lagrangian(mid)
            if total(c) <= budget:
                hi, choice = mid, c
            else:
                lo = mid
            if hi / max(lo, 1e-300) < 1.0001:
                break
    # Greedy upgrades: best error decrease per extra byte that still fits.
    while True:
        spent = total(choice)
        best, best_gain = None, 0.0
        for t in names:
            for o in opts[t]:
                if o == choice[t]:
                    continue
                trial = dict(choice, **{t: o})
                extra = total(trial) - spent
                gain = cost(t, choice[t]) - cost(t, o)
                if gain > 0 and spent + extra <= budget:
                    ratio = gain / max(extra, 1e-9)
                    if ratio > best_gain:
                        best, best_gain = (t, o), ratio
        if best is None:
            return choice
        choice[best[0]] = best[1]


@dataclass
class Plan:
    """Result of :func:`allocate_and_quantize`."""

    configs: dict[str, AQConfig]
    codebooks: dict[str, torch.Tensor]
    coded: dict[str, AQTensor]
    group_of: dict[str, str]
    raw: list[str]
    nbytes: int
    n_weights: int
    predicted: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(1, self.n_weights)

    def decoded(self) -> dict[str, np.ndarray]:
        """Reconstructed tensors of the coded weights."""
        return {n: decode_tensor(t, self.codebooks[self.group_of[n]]) for n, t in self.coded.items()}


def allocate_and_quantize(weights: Mapping[str, object], hessians: Mapping[str, object],
                          target_bits: float | None = None, budget_bytes: int | None = None,
                          candidates: Mapping[str, AQConfig] | None = None,
                          axes: Mapping[str, Sequence[int] | None] | None = None,
                          sensitivity: Mapping[str, float] | None = None,
                          trial_rows: int = 64, reservoir: int = 1 << 16, retrain: bool = True,
                          seed: int = 0, device: torch.device | str | None = None) -> Plan:
    """Train candidate groups, predict per-tensor errors, allocate, then code.

    Parameters
    ----------
    weights, hessians : dict name -> tensor / ``H``
    target_bits : float, optional
        Average bits per weight over ``weights``, every byte counted.
    budget_bytes : int, optional
        Alternative to ``target_bits``.
    candidates : dict option -> AQConfig, optional
        Default :func:`default_candidates`; fp16 is always an option.
    trial_rows : int
        Rows coded per tensor and candidate to predict its error.
    sensitivity : dict name -> weight, optional
        Multiplies each tensor's predicted error; default ``1 / tr(W H W^T)``
        (relative output error).
    retrain : bool
        Retrain each used group's codebooks on its assigned tensors only.

    Tensors too small for every candidate stay raw fp16 (counted in the bytes).
    """
    candidates = dict(candidates or default_candidates())
    axes = dict(axes or {})
    shapes = {n: tuple(np.shape(w)) for n, w in weights.items()}
    n_weights = sum(int(np.prod(s)) for s in shapes.values())
    if budget_bytes is None:
        if target_bits is None:
            raise AqmInputError("give target_bits or budget_bytes")
        budget_bytes = int(target_bits * n_weights / 8)
    gen = torch.Generator().manual_seed(seed)

    def trainer(key: str, names) -> torch.Tensor:
        tr = GroupTrainer(candidates[key], reservoir, seed)
        for n in names:
            tr.add(n, weights[n], hessians.get(n), axes.get(n))
        return tr.train(device)

    errors: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    for n, s in shapes.items():
        errors[n] = {FP16: 0.0}
        nbytes[n] = {FP16: 2 * int(np.prod(s))}
    books = {}
    for key, cfg in candidates.items():
        elig = [n for n in weights if aq_eligible(shapes[n], cfg, axes.get(n))]
        if not elig:
            continue
        books[key] = trainer(key, elig)
        for n in elig:
            W = as_matrix(n, weights[n], axes.get(n))
            sub = torch.randperm(W.shape[0], generator=gen)[:trial_rows]
            t = encode_tensor(n, weights[n], books[key], cfg, hessians.get(n), axes.get(n),
                              rows=sub, device=device)
            Wh = _decode_rows(t, books[key], W.shape[1])
            errors[n][key] = output_error(W[sub], Wh, hessians.get(n)) * W.shape[0] / len(sub)
            nbytes[n][key] = aq_tensor_bytes(shapes[n], cfg, axes.get(n))
    if sensitivity is None:
        # Absolute output errors are not comparable across layers (measured on
        # MiniLM: they starve sensitive layers); weigh them relative to each
        # layer's output energy tr(W H W^T) instead.
        sensitivity = {n: 1.0 / max(output_error(as_matrix(n, weights[n], axes.get(n)), 0.0,
                                                  hessians.get(n)), 1e-30) for n in weights}
    gbytes = {k: candidates[k].codebook_bytes() for k in books}
    choice = allocate(errors, nbytes, budget_bytes, gbytes, sensitivity)
    used = sorted(set(choice.values()) - {FP16})
    codebooks = {k: trainer(k, [n for n in weights if choice[n] == k]) if retrain else books[k]
                 for k in used}
    coded = {n: encode_tensor(n, weights[n], codebooks[k], candidates[k], hessians.get(n),
                              axes.get(n), device=device)
             for n, k in choice.items() if k != FP16}
    total = sum(t.nbytes() for t in coded.values()) + sum(gbytes[k] for k in used) + \
        sum(nbytes[n][FP16] for n, k in choice.items() if k == FP16)
    return Plan(configs={k: candidates[k] for k in used}, codebooks=codebooks, coded=coded,
                group_of={n: k for n, k in choice.items() if k != FP16},
                raw=[n for n, k in choice.items() if k == FP16], nbytes=total,
                n_weights=n_weights, predicted=errors)


def _decode_rows(t: AQTensor, C: torch.Tensor, cols: int) -> torch.Tensor:
    """Decode the matrix view of a row-subset AQTensor (no reshape to the logical shape)."""
    v = decode_vectors(C.float(), torch.from_numpy(t.codes.astype(np.int64)))
    return v.reshape(t.scale.shape[0], -1)[:, :cols] * torch.from_numpy(t.scale.astype(np.float32))[:, None]
