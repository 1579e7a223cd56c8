"""Codebook groups: which tensors share codebooks, and the streaming trainer of a group."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from aqformat.errors import AqmInputError, TooSmallForAQ

from .aq_encode import _block_metrics, _prepare
from .aq_search import default_device, train_aq
from .options import AQConfig

__all__ = ["GroupTrainer", "train_codebooks", "layer_kind", "group_key", "group_tensors"]


class GroupTrainer:
    """Streaming trainer of one codebook group shared by many tensors.

    Tensors are added one at a time; a uniform reservoir sample of their
    normalised vectors (with each vector's metric) is kept, so memory is
    bounded by ``reservoir`` vectors whatever the model size.

    Parameters
    ----------
    cfg : AQConfig
        Group settings.
    reservoir : int
        Maximum number of training vectors kept.
    seed : int
        Seed of the reservoir sampling and of the k-means initialisation.
    """

    def __init__(self, cfg: AQConfig, reservoir: int = 1 << 16, seed: int = 0) -> None:
        self.cfg = cfg
        self.reservoir = reservoir
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self._x = torch.empty(0, cfg.d)
        self._G = torch.empty(0, cfg.d, cfg.d)
        self._key = torch.empty(0)
        self._weighted = False  # some tensor brought calibration statistics
        self.n_seen = 0

    def add(self, name: str, w, H=None, axes: Sequence[int] | None = None,
            perm: np.ndarray | None = None) -> None:
        """Sample the vectors of one tensor (raises :class:`TooSmallForAQ`)."""
        d = self.cfg.d
        _, _, Wn, Hp = _prepare(name, w, self.cfg, H, axes, perm)
        rows, J = Wn.shape[0], Wn.shape[1] // d
        if Hp is None:
            G = torch.eye(d).expand(J, d, d)
        else:
            G, _ = _block_metrics(Hp, d, self.cfg.feedback is True)
            # Normalise the metric per tensor so every tensor weighs alike in training.
            G = (G / (G.diagonal(dim1=1, dim2=2).sum(1).mean() / d)).float()
            self._weighted = True
        x = Wn.reshape(rows * J, d)
        key = torch.rand(rows * J, generator=self._gen)
        keep = key.topk(min(self.reservoir, rows * J), largest=False).indices
        self._x = torch.cat([self._x, x[keep]])
        self._G = torch.cat([self._G, G[keep % J]])
        self._key = torch.cat([self._key, key[keep]])
        if self._x.shape[0] > self.reservoir:
            sel = self._key.topk(self.reservoir, largest=False).indices
            self._x, self._G, self._key = self._x[sel], self._G[sel], self._key[sel]
        self.n_seen += rows * J

    @property
    def n_kept(self) -> int:
        """Vectors currently in the reservoir."""
        return int(self._x.shape[0])

    def sample(self, share: Callable[[Any], Any] = lambda obj: obj) -> tuple[Any, ...]:
        """The arguments of :func:`train_codebooks` but the device: the settings, the sampled
        vectors and their metrics (None when every metric is the identity), and the seed;
        the vectors and metrics passed through ``share``."""
        G = share(self._G) if self._weighted else None  # all-identity metrics: the fast plain-MSE path
        return self.cfg, share(self._x), G, self.seed

    def train(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Train the group's codebooks ``C[M, K, d]`` (float32 holding fp16 values)."""
        return train_codebooks(*self.sample(), device)


def train_codebooks(cfg: AQConfig, x: torch.Tensor, G: torch.Tensor | None, seed: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Codebooks ``C[M, K, d]`` (float32 holding fp16 values) trained on a group's sample
    (:meth:`GroupTrainer.sample`): one task of a conversion."""
    if x.shape[0] < cfg.K:
        raise TooSmallForAQ(f"group has {x.shape[0]} vectors < K={cfg.K}")
    dev = torch.device(device) if device is not None else default_device()
    C, _ = train_aq(x.to(dev), cfg, None if G is None else G.to(dev), seed=seed)
    return C.cpu()


_ATTN = re.compile(r"attn|attention|query|key|value|[qkvo]_proj|qkv|out_proj")

_MLP = re.compile(r"mlp|ffn|feed_?forward|fc\d|intermediate|output\.dense|gate_proj|up_proj|"
                  r"down_proj|h_to_4h|4h_to_h|w[123]\b")


def layer_kind(name: str, shape: Sequence[int] | None = None) -> str:
    """``"attention"``, ``"mlp"``, ``"conv"`` or ``"other"`` from the tensor name (and rank)."""
    low = name.lower()
    if _ATTN.search(low):
        return "attention"
    if (shape is not None and len(shape) >= 3) or "conv" in low:
        return "conv"
    if _MLP.search(low):
        return "mlp"
    return "other"


def group_key(name: str, mode: str = "shared", shape: Sequence[int] | None = None) -> str:
    """Codebook group of a tensor: ``mode`` is ``shared``, ``per-layer`` or ``by-kind``."""
    if mode == "shared":
        return "shared"
    if mode == "per-layer":
        return name
    if mode == "by-kind":
        return layer_kind(name, shape)
    raise AqmInputError(f"unknown grouping {mode!r} (shared, per-layer, by-kind)")


def group_tensors(names: Iterable[str], mode: str = "shared",
                  shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[str]]:
    """Map group key -> tensor names (in input order)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(group_key(n, mode, None if shapes is None else shapes.get(n)), []).append(n)
    return groups
