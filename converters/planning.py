"""Planning a conversion: which tensors are coded, in which codebook group, at which setting.

Which tensors are compressed (:func:`select_tensors`): floating-point tensors
with at least 2 dimensions and at least ``min_elements`` (default 4096)
elements, not matching a ``keep`` pattern. This includes embedding tables.
The other floating-point tensors (biases, norms, depthwise kernels, small
linears), and those whose AQ codebooks would take more bytes than their codes,
go to the affine scalar codec (:func:`plan_small`): each is coded at 1 to 8
bits or kept raw by measured error per byte, within the bytes of every such
tensor at a nominal rate (``bits + 2``, 4 to 8, for small tensors; ``bits``
for the others); the error is the relative weight error, or with calibration
the predicted error in the model's output, which may also keep a tensor at 16
bits (:mod:`aqformat.converters.sensitivity`). Kept (``keep``), integer, scalar and BatchNorm-statistics
tensors are stored raw in their original dtype, so they round-trip bit-exactly
(a running variance divides the activations: a small absolute error in it is a
large relative one).

With a size target or ``allocate``, the budget is checked against what the
model can reach before anything is trained (:func:`size_budget`), every tensor
joins one candidate group per code width worth trying, and an *allocate* pass
predicts each tensor's output error per candidate from a few rows and picks
one per tensor under the budget.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat.codecs import aq as aq_codec
from aqformat.dtypes import FLOAT_DTYPES
from aqformat.errors import AqmInputError

from . import size_target
from .options import DEFAULT_MIN_ELEMENTS, AQConfig, ConvertOptions
from .affine import AffinePlan
from .half import RECORD_BYTES as HALF_RECORD_BYTES, encode_half, kept_format
from .progress import Progress
from .size_target import MAX_CODE_BITS, Budget, Reach
from .sources import TensorSpec

__all__ = ["ModelTensors", "Plan", "select_tensors", "plan", "plan_small", "nominal_rate"]

_TRIAL_ROWS = 64  # rows coded per tensor and candidate to predict its error


@dataclass
class ModelTensors:
    """The model's tensors as planning and encoding see them.

    ``load`` reads one tensor as float32; ``axes`` are the matrix views whose
    rows are not dim 0; ``H`` and ``S`` the calibration statistics by weight
    name (:func:`aqformat.converters.calib.calibration_stats`); ``perms`` the
    column permutations found while sampling (``permute``); ``budget`` the size
    budget checked before calibration (:func:`size_budget`); ``small`` the
    tensors the affine codec codes (:func:`plan_small`).
    """

    specs: list[TensorSpec]
    load: Callable[[str], np.ndarray]
    axes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    H: dict[str, Any] = field(default_factory=dict)
    S: dict[str, Any] = field(default_factory=dict)
    perms: dict[str, np.ndarray | None] = field(default_factory=dict)
    budget: Budget | None = None
    small: AffinePlan = field(default_factory=AffinePlan)
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


def plan_small(specs: Sequence[TensorSpec], compress: list[str], opts: ConvertOptions, axes: Mapping[str, Any],
               load: Callable[[str], np.ndarray], graph_model: Any = None,
               calib: Any = None) -> tuple[AffinePlan, list[str]]:
    """The tensors coded by the affine codec, and the ``compress`` names left to the main encoder.

    Candidates: float tensors of at least one dimension not in ``compress``, not
    kept and not BatchNorm statistics; with the AQ codec, also the tensors of
    ``compress`` that AQ cannot take or whose group's codebooks would outweigh
    their codes (:func:`aqformat.converters.affine.codebook_dominated`) at the
    nominal rate (:func:`nominal_rate`). The plan's ``nbytes`` also holds the coded bytes of
    the tensors ``--keep`` holds at 16 bits, which a size budget counts. With ``calib``
    (the conversion's resolved calibration), widths are chosen by predicted output error
    (:func:`aqformat.converters.affine.plan_within`); without it, by relative weight
    error (:func:`aqformat.converters.affine.plan_affine`).
    """
    from .affine import codebook_dominated, plan_within, small_bits
    from .sensitivity import small_sensitivity
    bits = nominal_rate(specs, opts, graph_model)
    by_name = {s.name: s for s in specs}
    moved: list[str] = []
    if opts.codec == aq_codec.NAME and compress:
        from .aq_encode import aq_eligible
        from .grouping import group_tensors
        cfg = opts.encoder.config(min(bits, MAX_CODE_BITS))
        shapes = {n: by_name[n].shape for n in compress}
        eligible = [n for n in compress if aq_eligible(shapes[n], cfg, axes.get(n))]
        moved = [n for n in compress if n not in set(eligible)] + codebook_dominated(
            group_tensors(eligible, opts.grouping, shapes), cfg, {n: by_name[n].numel for n in eligible})
    keep, stats, big = list(opts.keep), _bn_statistics(specs, graph_model), set(compress)
    small = [s.name for s in specs if s.name not in big and s.dtype in FLOAT_DTYPES and s.shape and s.numel
             and s.name not in stats and not any(fnmatch.fnmatchcase(s.name, p) for p in keep)]
    rate = {**{n: small_bits(bits) for n in small}, **{n: min(bits, 8.0) for n in moved}}
    candidates = {n: (by_name[n].shape, axes.get(n), r, by_name[n].nbytes) for n, r in rate.items()}
    plan_ = plan_within(candidates, load, small_sensitivity(calib, list(candidates)))
    for s in specs:  # a size budget counts the tensors --keep holds at 16 bits at their coded bytes
        fmt = kept_format(s.name, opts.keep_half)
        if fmt is not None and s.dtype in ("float32", "float64") and s.name not in plan_.nbytes:
            coded = encode_half(load(s.name), fmt)
            if coded is not None:
                plan_.nbytes[s.name] = coded.stored_bytes() + HALF_RECORD_BYTES
    gone = set(moved)
    return plan_, [n for n in compress if n not in gone]


def nominal_rate(specs: Sequence[TensorSpec], opts: ConvertOptions, graph_model: Any = None) -> float:
    """Bits per weight the conversion aims at: ``bits_per_weight``, or with a target size the
    bytes it leaves for the floating-point tensors (graph and a header estimate taken off) per weight."""
    if opts.target_size is None:
        return float(opts.bits_per_weight)
    floats = [s for s in specs if s.dtype in FLOAT_DTYPES]
    other = sum(s.nbytes for s in specs if s.dtype not in FLOAT_DTYPES)
    if graph_model is not None:
        from .onnx_graph import stored_graph_bytes
        other += stored_graph_bytes(graph_model, {s.name for s in specs})
    other += size_target.header_bytes([s.name for s in specs], alignment=size_target.section_alignment(
        sum(s.nbytes for s in specs)))[1]
    weights = max(sum(s.numel for s in floats), 1)
    return float(min(max(8.0 * (opts.target_size - other) / weights, 1.0), 8.0))


def _bn_statistics(specs: Sequence[TensorSpec], graph_model: Any) -> set[str]:
    """Names of BatchNorm running means and variances (torch buffers, ONNX BatchNormalization inputs)."""
    out = {s.name for s in specs if s.name.rsplit(".", 1)[-1] in ("running_mean", "running_var")}
    if graph_model is not None:
        for node in graph_model.graph.node:
            if node.op_type == "BatchNormalization":
                out.update(node.input[3:5])
    return out


def size_budget(specs: list[TensorSpec], compress: list[str], opts: ConvertOptions, axes: dict[str, Any],
                graph_model: Any = None, source_info: dict[str, Any] | None = None,
                small: AffinePlan | None = None) -> Budget | None:
    """The budget of ``--target-size`` or ``--allocate`` (None without either), from the shapes
    alone, before anything is trained or calibrated; ``small`` the tensors planned for the affine
    codec (:func:`plan_small`): a size target counts their bytes, ``--allocate`` their bytes and weights.

    Raises :class:`AqmInputError` at once when it is out of reach, with the range that is
    reachable (:mod:`aqformat.converters.size_target`).
    """
    if opts.target_size is None and not opts.allocate:
        return None
    import msgpack

    from .aq_encode import aq_eligible
    from .grouping import group_tensors
    uniform = opts.encoder.config(opts.bits_per_weight)
    shapes = {s.name: s.shape for s in specs}
    eligible = [n for n in compress if aq_eligible(shapes[n], uniform, axes.get(n))]
    small = small or AffinePlan()
    raw = {s.name: small.nbytes.get(s.name, s.nbytes) for s in specs}
    known = len(msgpack.packb(source_info or {}, use_bin_type=True, default=str))

    def reach(grouping: str, other_bytes: int = 0) -> Reach:
        return size_target.reach(shapes, axes, group_tensors(eligible, grouping, shapes), raw, b=uniform.b,
                                 d=uniform.d, other_bytes=other_bytes, permute=opts.permute, header_known=known,
                                 small=len(small.coded))
    if opts.target_size is not None:
        from .onnx_graph import stored_graph_bytes
        r = reach(opts.grouping, stored_graph_bytes(graph_model, set(raw)) if graph_model is not None else 0)
        return size_target.target_budget(opts.target_size, opts.target_text or opts.target_size, r)
    r = reach(opts.grouping)
    shared = reach("shared") if opts.grouping != "shared" else None
    side = (sum(s.numel for s in specs if s.name in small.coded), sum(small.nbytes[n] for n in small.coded))
    return size_target.allocate_budget(opts.bits_per_weight, r, opts.grouping, uniform.M, shared, side)


def plan(tensors: ModelTensors, compress: list[str], opts: ConvertOptions, executor: Any = None) -> Plan:
    """Choose every compressed tensor's codebook group and train the groups.

    Without a target size or ``allocate``, every tensor gets the
    ``bits_per_weight`` setting, in groups by ``grouping`` mode; a rate between two
    code widths (e.g. 2.5 bits with 8-bit codes over 8-vectors) is reached by mixing
    them per tensor (:func:`_mixed_budget`), never rounded. Otherwise each
    group is offered one candidate per code width of the budget
    (``tensors.budget``, else :func:`size_budget`) and the allocator picks per
    tensor under it: the target size, or ``bits`` per compressed weight with
    every byte counted (codes, scales, codebooks). Groups are trained one task
    each on ``executor`` (:mod:`aqformat.converters.parallel`; default: here).
    """
    from .aq_encode import aq_eligible
    from .grouping import group_tensors
    uniform = opts.encoder.config(opts.bits_per_weight)
    mixed = opts.target_size is None and not opts.allocate and not opts.encoder.exact(opts.bits_per_weight)
    if opts.target_size is None and not opts.allocate and not mixed:
        shapes = {n: tensors.spec(n).shape for n in compress}
        compress = [n for n in compress if aq_eligible(shapes[n], uniform, tensors.axes.get(n))]
        groups = group_tensors(compress, opts.grouping, shapes)
        configs = {g: uniform for g in groups}
        group_of = {n: g for g, ms in groups.items() for n in ms}
        books = _sample_and_train(configs, {n: [g] for n, g in group_of.items()}, tensors, opts, executor)
        return Plan(configs, group_of, books)
    budget = (_mixed_budget(tensors, compress, opts) if mixed
              else tensors.budget or size_budget(tensors.specs, compress, opts, tensors.axes))
    configs, members = _candidates(tensors, compress, opts, budget.widths)
    books = _sample_and_train(configs, members, tensors, opts, executor)
    choice = _allocate(budget, configs, members, books, tensors, opts)
    group_of = {n: g for n, g in choice.items() if g != "raw"}
    used = set(group_of.values())
    return Plan({g: c for g, c in configs.items() if g in used}, group_of,
                {g: c for g, c in books.items() if g in used})


def _mixed_budget(tensors: ModelTensors, compress: list[str], opts: ConvertOptions) -> Budget:
    """The budget of a rate between two code widths ``M`` and ``M + 1``: each tensor's bytes at
    ``M`` plus the rate's fraction of what ``M + 1`` adds, and both widths' codebooks per group."""
    from .allocate import aq_tensor_bytes
    from .aq_encode import aq_eligible
    from .grouping import group_tensors
    enc = opts.encoder
    exact = opts.bits_per_weight * enc.vector_dim / enc.code_width
    lo, hi = enc.config(math.floor(exact) * enc.code_width / enc.vector_dim), \
        enc.config(math.ceil(exact) * enc.code_width / enc.vector_dim)
    frac = exact - lo.M
    shapes = {n: tensors.spec(n).shape for n in compress}
    names = [n for n in compress if aq_eligible(shapes[n], hi, tensors.axes.get(n))]
    codes = sum((1 - frac) * aq_tensor_bytes(shapes[n], lo, tensors.axes.get(n))
                + frac * aq_tensor_bytes(shapes[n], hi, tensors.axes.get(n)) for n in names)
    books = len(group_tensors(names, opts.grouping, shapes)) * (lo.codebook_bytes() + hi.codebook_bytes())
    return Budget(int(codes + books), [lo.M, hi.M])


def _candidates(tensors: ModelTensors, compress: list[str], opts: ConvertOptions, widths: list[int]
                ) -> tuple[dict[str, AQConfig], dict[str, list[str]]]:
    """Candidate groups (``widths``: codebooks per vector, per grouping key) and each tensor's candidates."""
    from .aq_encode import aq_eligible
    from .grouping import group_tensors
    b, d = opts.encoder.code_width, opts.encoder.vector_dim
    shapes = {n: tensors.spec(n).shape for n in compress}
    configs: dict[str, AQConfig] = {}
    members: dict[str, list[str]] = {}
    for key, names in group_tensors(compress, opts.grouping, shapes).items():
        for M in widths:
            cfg = opts.encoder.config(M * b / d)
            gid = f"{key}:{M}x{b}d{d}"
            for n in names:
                if aq_eligible(shapes[n], cfg, tensors.axes.get(n)):
                    configs[gid] = cfg
                    members.setdefault(n, []).append(gid)
    return configs, members


def _sample_and_train(configs: dict[str, AQConfig], members: dict[str, list[str]], tensors: ModelTensors,
                      opts: ConvertOptions, executor: Any = None) -> dict[str, Any]:
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
    from .grouping import train_codebooks
    from .parallel import Executor, ordered
    executor = executor or Executor()
    books = {}
    tasks = ((g, train_codebooks, (*tr.sample(executor.share), opts.device)) for g, tr in trainers.items())
    with Progress("train", len(trainers), len(trainers), opts.progress, unit="group") as bar:
        for g, C in ordered(executor, tasks, executor.read_ahead):
            books[g] = C
            bar.update(1, g)
    return books


def _allocate(budget: Budget, configs: dict[str, AQConfig], members: dict[str, list[str]], books: dict[str, Any],
              tensors: ModelTensors, opts: ConvertOptions) -> dict[str, str]:
    """Pass 2: predict each tensor's error under every candidate group from a random subset
    of its rows, then let :func:`aqformat.converters.allocate.allocate` pick one group (or
    ``"raw"``) per tensor within ``budget`` (codes, scales and codebooks counted; a size
    target also has a floor, so that the file lands just under it).

    A row's predicted error is its output error ``(E H E^T)_ii`` weighted by the output
    sensitivity ``s_i`` of ``S`` (the predicted change of the model's output). Tensors
    without ``S`` (no calibration, or not a Linear/Conv2d) are weighted relative to their
    own energy ``tr(W H W^T)``, scaled by the median sensitivity-weighted energy of the
    others so both kinds compare (measured on MiniLM: absolute errors starve sensitive
    layers). Without calibration no tensor has ``S`` and every weight's squared error counts
    alike: equal distortion per weight, the reverse water-filling of ``--codec auto``, in place
    of each tensor's relative error (issue 21 reports that rule at 0.00 accuracy on a mobile OCR
    model; on ddddocr's common.onnx at 4 bits both rules read 58-59 of 60 strings as the original)."""
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
    ref = float(np.median(weighted)) if weighted else None  # None: no calibration, every weight alike
    sensitivity = {n: 1.0 if ref is None or n in tensors.S else ref / max(energy[n], 1e-30) for n in members}
    books_bytes = {g: cfg.codebook_bytes() for g, cfg in configs.items()}
    fallback = None
    if budget.floor:  # the choice that fills the budget best, by bytes alone
        fallback = size_target.fullest(nbytes, {g: cfg.code_bits for g, cfg in configs.items()},
                                       budget.bytes, books_bytes)
    return allocate(errors, nbytes, budget.bytes, books_bytes, sensitivity, floor=budget.floor, fallback=fallback)


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
