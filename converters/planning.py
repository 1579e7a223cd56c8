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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat.dtypes import FLOAT_DTYPES
from aqformat.errors import AqmInputError

from .options import DEFAULT_MIN_ELEMENTS, AQConfig, ConvertOptions
from .progress import Progress
from .sources import TensorSpec

__all__ = ["ModelTensors", "Plan", "select_tensors", "plan"]

_TRIAL_ROWS = 64  # rows coded per tensor and candidate to predict its error


@dataclass
class ModelTensors:
    """The model's tensors as planning and encoding see them.

    ``load`` reads one tensor as float32; ``axes`` are the matrix views whose
    rows are not dim 0; ``H`` and ``S`` the calibration statistics by weight
    name (:func:`aqformat.converters.calib.calibration_stats`); ``perms`` the
    column permutations found while sampling (``permute``).
    """

    specs: list[TensorSpec]
    load: Callable[[str], np.ndarray]
    axes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    H: dict[str, Any] = field(default_factory=dict)
    S: dict[str, Any] = field(default_factory=dict)
    perms: dict[str, np.ndarray | None] = field(default_factory=dict)
    _by_name: dict[str, TensorSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.specs}

    def spec(self, name: str) -> TensorSpec:
        """The spec of tensor ``name``."""
        return self._by_name[name]


@dataclass
class Plan:
    """Each coded tensor's AQ codebook group, the groups' settings and trained codebooks."""

    configs: dict[str, AQConfig]
    group_of: dict[str, str]
    books: dict[str, Any]


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


def _reserved(n_tensors: int) -> int:
    """Bytes of header, metadata and alignment padding reserved under a budget.

    Measured: 19.6 KB for MiniLM's 104 tensors, 1.6 KB for an 8-tensor model.
    """
    return 1024 + 224 * n_tensors


def plan(tensors: ModelTensors, compress: list[str], opts: ConvertOptions) -> Plan:
    """Choose every compressed tensor's codebook group and train the groups.

    Without a target size or ``allocate``, every tensor gets the
    ``bits_per_weight`` setting, in groups by ``grouping`` mode. Otherwise each
    group is offered candidates of ``bits - 1``, ``bits`` and ``bits + 1`` code
    bits and the allocator picks per tensor under the budget: the target size,
    or ``bits`` per compressed weight with every byte counted (codes, scales,
    codebooks).
    """
    from .aq_encode import aq_eligible
    from .grouping import group_tensors
    uniform = opts.encoder.config(opts.bits_per_weight)
    if opts.target_size is None and not opts.allocate:
        shapes = {n: tensors.spec(n).shape for n in compress}
        compress = [n for n in compress if aq_eligible(shapes[n], uniform, tensors.axes.get(n))]
        groups = group_tensors(compress, opts.grouping, shapes)
        configs = {g: uniform for g in groups}
        group_of = {n: g for g, ms in groups.items() for n in ms}
        books = _sample_and_train(configs, {n: [g] for n, g in group_of.items()}, tensors, opts)
        return Plan(configs, group_of, books)
    configs, members = _candidates(tensors, compress, opts, uniform)
    budget = _budget(tensors, members, opts)
    books = _sample_and_train(configs, members, tensors, opts)
    choice = _allocate(budget, configs, members, books, tensors, opts)
    group_of = {n: g for n, g in choice.items() if g != "raw"}
    used = set(group_of.values())
    return Plan({g: c for g, c in configs.items() if g in used}, group_of,
                {g: c for g, c in books.items() if g in used})


def _candidates(tensors: ModelTensors, compress: list[str], opts: ConvertOptions, uniform: AQConfig
                ) -> tuple[dict[str, AQConfig], dict[str, list[str]]]:
    """Candidate groups (``M - d/b .. M + d/b`` codebooks per grouping key) and each tensor's candidates."""
    from .aq_encode import aq_eligible
    from .grouping import group_tensors
    b, d = int(opts.encoder.bits_per_code), int(opts.encoder.d)
    shapes = {n: tensors.spec(n).shape for n in compress}
    configs: dict[str, AQConfig] = {}
    members: dict[str, list[str]] = {}
    for key, names in group_tensors(compress, opts.grouping, shapes).items():
        for M in range(max(1, uniform.M - d // b), uniform.M + d // b + 1):
            cfg = opts.encoder.config(M * b / d)
            gid = f"{key}:{M}x{b}d{d}"
            for n in names:
                if aq_eligible(shapes[n], cfg, tensors.axes.get(n)):
                    configs[gid] = cfg
                    members.setdefault(n, []).append(gid)
    return configs, members


def _budget(tensors: ModelTensors, members: dict[str, list[str]], opts: ConvertOptions) -> int:
    """Bytes the allocated tensors may take: the target size less everything else, or
    ``bits_per_weight`` over the allocated weights less the reserve."""
    specs, target, bits = tensors.specs, opts.target_size, opts.bits_per_weight
    if target is not None:
        fixed = sum(s.nbytes for s in specs if s.name not in members)
        budget = int((target - _reserved(len(specs))) / 1.002) - fixed
        if budget <= 0:
            raise AqmInputError(f"target size {target:,} bytes is below the smallest reachable "
                                f"(raw tensors alone take {fixed:,} bytes)")
        return budget
    allowed = int(bits * sum(tensors.spec(n).numel for n in members) / 8)
    budget = allowed - _reserved(len(specs))
    if budget <= 0:
        raise AqmInputError(f"--allocate at {bits} bits/weight gives {allowed:,} bytes, less than the "
                            f"{_reserved(len(specs)):,} reserved for the header: use more bits or no --allocate")
    return budget


def _sample_and_train(configs: dict[str, AQConfig], members: dict[str, list[str]], tensors: ModelTensors,
                      opts: ConvertOptions) -> dict[str, Any]:
    """Pass 1: read each tensor once, sample it into every group it may join, train the groups.

    With ``opts.permute``, each tensor's column permutation is searched first
    (:func:`aqformat.converters.permute.search_permutation`), recorded in
    ``tensors.perms`` and used from then on.
    """
    from .grouping import GroupTrainer
    enc, seed = opts.encoder, opts.seed
    trainers = {g: GroupTrainer(cfg, reservoir=int(enc.reservoir), seed=seed) for g, cfg in configs.items()}
    numel = sum(tensors.spec(n).numel for n in members)
    with Progress("sample", numel, len(members), opts.progress) as bar:
        for n, groups in members.items():
            W = tensors.load(n)
            if opts.permute:
                from .permute import search_permutation
                tensors.perms[n] = search_permutation(W, configs[groups[0]].d, tensors.axes.get(n), seed=seed,
                                                      iters=int(enc.perm_iters)).perm
            for g in groups:
                trainers[g].add(n, W, tensors.H.get(n), tensors.axes.get(n), tensors.perms.get(n))
            bar.update(tensors.spec(n).numel, n)
    books = {}
    with Progress("train", len(trainers), len(trainers), opts.progress, unit="group") as bar:
        for g, tr in trainers.items():
            books[g] = tr.train()
            bar.update(1, g)
    return books


def _allocate(budget: int, configs: dict[str, AQConfig], members: dict[str, list[str]], books: dict[str, Any],
              tensors: ModelTensors, opts: ConvertOptions) -> dict[str, str]:
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

    from .allocate import allocate
    gen = torch.Generator().manual_seed(opts.seed)
    errors: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    energy: dict[str, float] = {}
    with Progress("allocate", sum(tensors.spec(n).numel for n in members), len(members), opts.progress) as bar:
        for n, groups in members.items():
            errors[n], nbytes[n], energy[n] = _trial(n, groups, configs, books, tensors, gen)
            bar.update(tensors.spec(n).numel, n)
    weighted = [energy[n] for n in members if n in tensors.S]
    ref = float(np.median(weighted)) if weighted else 1.0
    sensitivity = {n: 1.0 if n in tensors.S else ref / max(energy[n], 1e-30) for n in members}
    return allocate(errors, nbytes, budget, {g: cfg.codebook_bytes() for g, cfg in configs.items()},
                    sensitivity)


def _trial(n: str, groups: list[str], configs: dict[str, AQConfig], books: dict[str, Any],
           tensors: ModelTensors, gen: Any) -> tuple[dict[str, float], dict[str, int], float]:
    """Predicted error and bytes of tensor ``n`` raw and in each candidate group, and its energy."""
    import torch

    from .allocate import aq_tensor_bytes
    from .aq_encode import as_matrix, decode_rows, encode_tensor, output_error
    W, H, s, axes, perm = (tensors.load(n), tensors.H.get(n), tensors.S.get(n), tensors.axes.get(n),
                           tensors.perms.get(n))
    Wm = as_matrix(n, W, axes, perm)
    energy = output_error(Wm, 0.0, H, s)
    sub = torch.randperm(Wm.shape[0], generator=gen)[:_TRIAL_ROWS]
    errors, nbytes = {"raw": 0.0}, {"raw": tensors.spec(n).nbytes}
    for g in groups:
        t = encode_tensor(n, W, books[g], configs[g], H, axes, perm, rows=sub)
        Wh = decode_rows(t, books[g], Wm.shape[1])
        errors[g] = output_error(Wm[sub], Wh, H, None if s is None else s[sub]) * Wm.shape[0] / len(sub)
        nbytes[g] = aq_tensor_bytes(tensors.spec(n).shape, configs[g], axes, perm is not None)
    return errors, nbytes, energy
