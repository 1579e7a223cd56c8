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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aqformat.codecs.aq import stored_bytes
from aqformat.errors import AqmInputError

from .options import AQConfig

__all__ = ["aq_tensor_bytes", "allocate", "bisect_multiplier", "upgrade"]

K, V, T = TypeVar("K"), TypeVar("V"), TypeVar("T")


def aq_tensor_bytes(shape: Sequence[int], cfg: AQConfig, axes: Sequence[int] | None = None,
                    perm: bool = False) -> int:
    """Bytes of one AQ-coded tensor in the file: bit-packed codes (padding included), fp16 scales
    and the column permutation if it has one (:func:`aqformat.codecs.aq.stored_bytes`)."""
    return stored_bytes(shape, axes, M=cfg.M, bits=cfg.b, d=cfg.d, perm=perm)


def allocate(errors: Mapping[str, Mapping[str, float]], nbytes: Mapping[str, Mapping[str, int]],
             budget: int, group_bytes: Mapping[str, int] | None = None,
             sensitivity: Mapping[str, float] | None = None, floor: int = 0,
             fallback: Mapping[str, str] | None = None) -> dict[str, str]:
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
    floor : int
        Fewest bytes wanted (a size target lands just under its budget): when the
        error-driven choice spends less, pairs of changes that spend more are made,
        else ``fallback`` (a fuller choice) is improved without spending less.
    fallback : dict tensor -> option, optional
        See ``floor``.

    Returns
    -------
    dict tensor -> option. Raises :class:`AqmInputError` naming the smallest
    achievable size when the budget cannot be met.
    """
    if not errors:
        return {}
    p = _Problem(errors, nbytes, dict(group_bytes or {}),
                 {t: (sensitivity or {}).get(t, 1.0) for t in errors})
    smallest = min((p.total({t: p.opts[t][0] for t in p.names}),
                    *(p.total({t: o for t in p.names}) for o in set.intersection(*map(set, p.opts.values())))),
                   default=0)
    if budget < smallest:
        raise AqmInputError(f"a budget of {budget:,} bytes is impossible: the smallest "
                            f"achievable is {smallest:,} bytes")
    choice = _upgrade(p, _relax(p, budget), budget)
    if p.total(choice) < floor:
        _fill_in_pairs(p, choice, budget, floor)
    if p.total(choice) < floor and fallback is not None and p.total(choice) < p.total(fallback) <= budget:
        choice = dict(fallback)
        _improve_within(p, choice, min(floor, p.total(fallback)), budget)
    return choice


@dataclass
class _Problem:
    """One allocation: options per tensor (smallest first), their errors and bytes."""

    errors: Mapping[str, Mapping[str, float]]
    nbytes: Mapping[str, Mapping[str, int]]
    group_bytes: dict[str, int]
    sens: dict[str, float]

    def __post_init__(self) -> None:
        self.names = list(self.errors)
        self.opts = {t: sorted(self.errors[t], key=lambda o: self.nbytes[t][o]) for t in self.names}

    def total(self, choice: Mapping[str, str]) -> int:
        """Bytes of a choice, each used group's fixed cost counted once."""
        used = set(choice.values())
        return sum(self.nbytes[t][o] for t, o in choice.items()) + sum(self.group_bytes.get(o, 0) for o in used)

    def cost(self, t: str, o: str) -> float:
        return self.sens[t] * self.errors[t][o]

    def lagrangian(self, lam: float) -> dict[str, str]:
        return {t: min(self.opts[t], key=lambda o: self.cost(t, o) + lam * self.nbytes[t][o]) for t in self.names}


def _relax(p: _Problem, budget: int) -> dict[str, str]:
    """The Lagrangian relaxation's best choice within ``budget`` (bisection on the multiplier)."""
    lam, choice = bisect_multiplier(lambda lam: (p.total(c := p.lagrangian(lam)) <= budget, c), 1.0, tol=1.0001)
    # group overheads can defeat the relaxation: then start from the smallest options
    return choice if lam is not None else {t: p.opts[t][0] for t in p.names}


def _upgrade(p: _Problem, choice: dict[str, str], budget: int) -> dict[str, str]:
    """Greedy upgrades: best error decrease per extra byte that still fits."""
    spent = p.total(choice)

    def extra(t: str, o: str) -> int:
        return p.total(dict(choice, **{t: o})) - spent

    def take(t: str, o: str, added: int) -> None:
        nonlocal spent
        choice[t] = o
        spent += added
    upgrade(p.names, lambda t: (o for o in p.opts[t] if o != choice[t]),
            lambda t, o: p.cost(t, choice[t]) - p.cost(t, o), extra, budget - spent, take)
    return choice


def bisect_multiplier(fits: Callable[[float], tuple[bool, T]], lam0: float, tol: float = 1.02,
                      span: float = 4.0 ** 40) -> tuple[float | None, T]:
    """The smallest Lagrange multiplier (within a factor ``tol``) whose choice fits, and that choice.

    ``fits(lam)`` makes the choice at ``lam`` and says whether it fits. The
    bracket grows from ``lam0`` by factors of 4 (up to ``span`` either way),
    then ``log lam`` is bisected. When no multiplier up to ``lam0 * span``
    gives a choice that fits, the multiplier is None and the choice is the
    one at ``lam0 * span`` (the smallest there is).
    """
    lo = hi = lam0
    ok, choice = fits(lam0)
    while not ok and hi < lam0 * span:
        lo, hi = hi, hi * 4.0
        ok, choice = fits(hi)
    if not ok:
        return None, choice
    while lo == hi and lo > lam0 / span:
        ok_lo, c_lo = fits(lo / 4.0)
        if not ok_lo:
            lo /= 4.0
            break
        lo, hi, choice = lo / 4.0, lo / 4.0, c_lo
    while hi / lo >= tol:
        mid = math.sqrt(lo * hi)
        ok, c = fits(mid)
        lo, hi, choice = (lo, mid, c) if ok else (mid, hi, choice)
    return hi, choice


def upgrade(names: Iterable[K], moves: Callable[[K], Iterable[V]], gain: Callable[[K, V], float],
            extra: Callable[[K, V], int], room: int, take: Callable[[K, V, int], None]) -> None:
    """Make, one at a time, the move of most gain per extra byte that still fits in ``room`` bytes.

    ``moves(t)`` are the options ``t`` may change to, ``gain(t, o)`` the
    error the change saves and ``extra(t, o)`` the bytes it adds (both
    against the current choice); ``take(t, o, extra)`` makes it. A move
    that saves error without adding bytes counts as adding one.
    """
    while True:
        best: tuple[float, K, V, int] | None = None
        for t in names:
            for o in moves(t):
                g = gain(t, o)
                if g <= 0:
                    continue
                x = extra(t, o)
                if x <= room and (best is None or g / max(x, 1) > best[0]):
                    best = g / max(x, 1), t, o, x
        if best is None:
            return
        _, t, o, x = best
        take(t, o, x)
        room -= x


def _fill_in_pairs(p: _Problem, choice: dict[str, str], budget: int, floor: int, rounds: int = 16) -> None:
    """Spend more of ``budget`` (up to ``floor``) by changing two tensors at once (moving into a
    group whose codebooks are not yet paid for often needs another tensor to give bytes back):
    each round takes the change that adds the most bytes per unit of error it adds."""
    moves = [(t, o) for t in p.opts for o in p.opts[t]]
    for _ in range(rounds):
        spent = p.total(choice)
        if spent >= floor:
            return
        best, best_score = None, -math.inf
        for i, (t1, o1) in enumerate(moves):
            if o1 == choice[t1]:
                continue
            for t2, o2 in moves[i:]:
                if t2 == t1 and o2 != o1 or o2 == choice[t2]:
                    continue
                trial = dict(choice, **{t1: o1, t2: o2})
                added = p.total(trial) - spent
                if added <= 0 or spent + added > budget:
                    continue
                worse = p.cost(t1, o1) - p.cost(t1, choice[t1]) + (p.cost(t2, o2) - p.cost(t2, choice[t2]) if t2 != t1 else 0)
                score = added / max(worse, 1e-30) if worse > 0 else math.inf
                if score > best_score or (score == best_score and best is not None and added > best[2]):
                    best, best_score = (t1, o1, added, t2, o2), score
        if best is None:
            return
        choice[best[0]], choice[best[3]] = best[1], best[4]


def _improve_within(p: _Problem, choice: dict[str, str], floor: int, budget: int) -> None:
    """Lower the error of ``choice`` by single changes that keep its bytes in ``floor..budget``."""
    while True:
        best, best_gain = None, 0.0
        for t in p.opts:
            for o in p.opts[t]:
                if o == choice[t]:
                    continue
                gain = p.cost(t, choice[t]) - p.cost(t, o)
                if gain > best_gain and floor <= p.total(dict(choice, **{t: o})) <= budget:
                    best, best_gain = (t, o), gain
        if best is None:
            return
        choice[best[0]] = best[1]
