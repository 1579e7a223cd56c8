"""Bit allocation: choose per-tensor AQ settings under a byte budget.

Each candidate setting is one codebook group (one ``(M, K, d)``, codebooks
shared by every tensor assigned to it), e.g. a 3-, 4- and 5-bit group, plus
keeping a tensor raw. The conversion pipeline predicts each choice's error
(see ``planning._allocate``); :func:`allocate` then picks one option per
tensor: a Lagrangian relaxation gives a starting point, then greedy
upgrades (best error decrease per byte) spend the remaining budget. All
bytes count: bit-packed codes, fp16 scales and each used group's fp16
codebooks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from aqformat.codecs.aq import stored_bytes
from aqformat.errors import AqmInputError

from .options import AQConfig

__all__ = ["aq_tensor_bytes", "allocate"]


def aq_tensor_bytes(shape: Sequence[int], cfg: AQConfig, axes: Sequence[int] | None = None,
                    perm: bool = False) -> int:
    """Bytes of one AQ-coded tensor in the file: bit-packed codes (padding included), fp16 scales
    and the column permutation if it has one (:func:`aqformat.codecs.aq.stored_bytes`)."""
    return stored_bytes(shape, axes, M=cfg.M, bits=cfg.b, d=cfg.d, perm=perm)


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
        raise AqmInputError(f"a budget of {budget:,} bytes is impossible: the smallest "
                            f"achievable is {smallest:,} bytes")

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
