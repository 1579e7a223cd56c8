"""ONNX Runtime inference straight from an .aqm file.

Every weight stub of the stored graph is pointed at an in-memory external
file of its own, and decoded by aqformat's numpy decoders into one contiguous
array handed over as that file's contents with
``SessionOptions.add_external_initializers_from_files_in_memory``. ONNX Runtime
reads these arrays in place, so no temporary ONNX file is written, weights are
never serialised again, and ORT makes no second copy of them (only its
repacked layouts for kernels such as MatMul).

With a ``memory_budget`` smaller than the model needs, the graph is run as a
sequence of stages (see :mod:`.onnx_graph`), each stage's weights decoded just
before it runs and released after.

With ``resident="compressed"`` the AQ-coded weights stay as codes: the nodes
reading them compute from the codes, the rest of the graph runs in ONNX
Runtime sessions between them (see :mod:`.ort_codes`).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import open as open_aqm
from ..errors import AqmFormatError, AqmInputError, StageTooLarge
from ..units import format_size
from .cache import WeightCache
from ..dtypes import ONNX_TYPES, ORT_TYPE_NAMES, dtype_name
from ..onnx_stubs import AQM_LOCATION, stub_array
from .aq_weight import AQWeight
from .ort_codes import FLOAT, CodesPlan, Segment, plan_codes, run_plan, segment_model, signature
from .onnx_graph import (PROBE_SIZE, StagePlan, Stub, inline_weights, locate_stubs, parse_model, scan_model,
                         plan_stages, probe_model, stage_model)

# SessionOptions settings carried over to the sessions built here (the caller's object is never mutated)
_OPTION_FIELDS = ("enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse", "enable_profiling",
                  "execution_mode", "execution_order", "graph_optimization_level",
                  "inter_op_num_threads", "intra_op_num_threads", "log_severity_level",
                  "log_verbosity_level", "logid", "profile_file_prefix", "use_deterministic_compute",
                  "use_per_session_threads")
# While a session is built, the decoded arrays and ONNX Runtime's own copy of them coexist
# (repacked weights, or a plain copy where ORT cannot read the arrays in place),
# so a stage may hold half the budget.
COPIES_PER_WEIGHT = 2
# Session config entry that makes ORT read in-memory external files in place instead of copying them
_BORROW_BUFFERS = "session.use_external_initializer_file_buffers_directly"


@dataclass(frozen=True)
class IOInfo:
    """Name, type and shape of a graph input or output, as ``onnxruntime.NodeArg`` gives them."""

    name: str
    type: str
    shape: list[int | str | None]


def _ort_type(dtype: np.dtype) -> str:
    """The type of numpy ``dtype`` as ONNX Runtime's NodeArg.type spells it."""
    name = dtype_name(dtype)
    return f"tensor({ORT_TYPE_NAMES[ONNX_TYPES[name]]})" if name is not None else f"numpy {dtype}"


def decode_for_ort(f, stub: Stub) -> np.ndarray:
    """Decode the .aqm tensor of ``stub`` to a contiguous array of the graph's dtype.

    bfloat16 is returned as its uint16 bit patterns (rounded to nearest even).
    """
    return stub_array(f.read(stub.name), stub.data_type)


def _ort():
    import onnxruntime
    return onnxruntime


@functools.lru_cache(maxsize=None)
def _ort_errors() -> tuple[type[BaseException], ...]:
    """Exceptions ONNX Runtime raises (its pybind errors derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(st, n) for n in names if hasattr(st, n)) + (RuntimeError, ValueError, TypeError)


def _with_weights(so, files: list[str], arrays: list[np.ndarray]):
    """``so`` set up to read the in-memory external file ``files[i]`` from ``arrays[i]``, in place."""
    so.add_session_config_entry(_BORROW_BUFFERS, "1")
    so.add_external_initializers_from_files_in_memory(files, arrays, [a.nbytes for a in arrays])
    return so


@functools.lru_cache(maxsize=None)
def shared_cpu_arena() -> None:
    """Register one CPU memory arena with ONNX Runtime's environment, for the sessions that ask for it.

    The segments of a ``resident="compressed"`` session run one after the
    other: sharing one arena, they hold the largest segment's working memory
    rather than the sum (each session's own arena keeps its peak, and without
    an arena the C allocator keeps the freed blocks instead). The arena grows
    by what is asked, not by powers of two.
    """
    ort = _ort()
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))


@functools.lru_cache(maxsize=None)
def ort_borrows_weights() -> bool:
    """Whether ONNX Runtime reads the decoded weight arrays in place rather than copying them.

    Probed once per process on a small model set up the way sessions are: if
    overwriting the array after the session is built changes its output, ORT
    reads the array itself, which must then live (unchanged) as long as the
    session; otherwise ORT holds its own copy and the array can be freed.
    """
    w = np.ones(PROBE_SIZE, np.float32)
    sess = _probe_session(w, None, ["CPUExecutionProvider"])
    w[:] = 2.0
    return bool(np.all(sess.run(None, {"x": np.zeros(PROBE_SIZE, np.float32)})[0] == 2.0))


def _probe_session(w: np.ndarray, so: Any, providers: Any, provider_options: Any = None, **kwargs: Any):
    """A session of the small probe model, its weight read from ``w``, built as sessions are here."""
    ort = _ort()
    so = _with_weights(_clone_options(so), [AQM_LOCATION], [w])
    return ort.InferenceSession(locate_stubs(probe_model(), {"W": AQM_LOCATION}), so, providers,
                                provider_options, **kwargs)


def _clone_options(so):
    ort = _ort()
    new = ort.SessionOptions()
    if so is not None:
        for name in _OPTION_FIELDS:
            setattr(new, name, getattr(so, name))
    return new


def _one_line(e: Exception, limit: int = 300) -> str:
    """ONNX Runtime's message on one line, cut short: pybind errors repeat the whole call, arrays included."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


class InferenceSession:
    """An ONNX Runtime session over the graph and weights stored in an .aqm file.

    A drop-in for ``onnxruntime.InferenceSession``: the same positional order
    and keywords, the same methods, with the .aqm file (path or bytes) in place
    of the .onnx model. aqformat's own settings are keyword-only.

    Parameters
    ----------
    path_or_bytes : str, os.PathLike or bytes
        .aqm file holding an ONNX graph (``graph()`` format ``"onnx"``), or its bytes.
    sess_options : onnxruntime.SessionOptions, optional
        Settings copied into the sessions built here (the object itself is not
        modified; session config entries and custom-op libraries are not copied).
    providers : list, optional
        Execution providers, names or ``(name, options)`` pairs, as for
        ``onnxruntime.InferenceSession``.
    provider_options : list of dict, optional
        Options of each provider in ``providers``.
    memory_budget : int, optional
        Bytes of decoded weights allowed in memory at once, counting ONNX
        Runtime's own copy (its repacked weights), so a stage may hold
        ``memory_budget / 2`` bytes of weights. If the whole model does not
        fit, the graph runs in stages whose weights are decoded before and
        released after each stage ("streaming mode").
    resident : {"decoded", "compressed"}
        ``"compressed"`` keeps AQ-coded weights as codes in memory and decodes
        each just before the part of the graph reading it runs, at most
        ``memory_budget`` bytes of them at once (default 4 MiB, or one node's
        weights if more); embedding tables (``Gather``) decode only the rows
        looked up (:mod:`aqformat.runtime.ort_codes`). Needs the ``onnx``
        package. Methods that need one whole ORT session (``io_binding``,
        profiling) are unavailable in this mode.
    **kwargs
        Passed on to ``onnxruntime.InferenceSession`` (e.g. ``disabled_optimizers``).

    Raises
    ------
    AqmInputError
        The file has no ONNX graph, an argument has the wrong type, or
        ``memory_budget`` is below what the largest indivisible part of the
        graph needs (the message gives the size).
    AqmFormatError
        The graph's weight stubs do not match the file's tensors.
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, sess_options: Any = None,
                 providers: Sequence[Any] | None = None, provider_options: Sequence[dict] | None = None,
                 *, memory_budget: int | None = None, resident: str = "decoded", **kwargs: Any):
        if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
            raise AqmInputError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        if resident not in ("decoded", "compressed"):
            raise AqmInputError(f"resident must be 'decoded' or 'compressed', got {resident!r}")
        if sess_options is not None and not hasattr(sess_options, "intra_op_num_threads"):
            raise AqmInputError(f"sess_options must be an onnxruntime.SessionOptions, got "
                                f"{type(sess_options).__name__} (providers come third, as in onnxruntime, "
                                f"or as providers=...)")
        self._sess = None
        self._file = _open_model(path_or_bytes)
        graph = self._file.graph()
        if graph is None or graph[0] != "onnx":
            raise AqmInputError(f"{self._file.path} stores no ONNX graph"
                                + (f" (it stores {graph[0]!r})" if graph else "")
                                + "; use aqformat.runtime.load_torch for PyTorch weights")
        self._model_bytes = graph[1]
        scan = scan_model(self._model_bytes)  # one pass over the graph serves both uses
        self._stubs = {s.name: s for s in scan.stubs}
        self._check_stubs()
        # one in-memory file per stub, so a session can be given any subset of the weights
        self._files = {name: f"{AQM_LOCATION}.{i}" for i, name in enumerate(self._stubs)}
        self._graph = locate_stubs(self._model_bytes, self._files, scan)
        self._providers = providers
        self._provider_options = provider_options
        self._sess_options = sess_options
        self._ort_kwargs = kwargs
        self.memory_budget = memory_budget
        self.resident = resident
        total = self.weight_bytes
        self.streaming = resident == "decoded" and memory_budget is not None and \
            COPIES_PER_WEIGHT * total > memory_budget
        self.cache = WeightCache(memory_budget // COPIES_PER_WEIGHT if self.streaming else None)
        self._plan: StagePlan | None = None
        self._codes: CodesPlan | None = None
        self._weights: list[np.ndarray] = []
        if resident == "compressed":
            self._codes = self._make_codes_plan()
            self._inputs = [_io_info(v) for v in self._codes.graph_inputs]
            self._outputs = [_io_info(v) for v in self._codes.graph_outputs]
        elif self.streaming:
            self._plan = self._make_plan(memory_budget)
            self._inputs = [_io_info(v) for v in self._plan.graph_inputs]
            self._outputs = [_io_info(v) for v in self._plan.graph_outputs]
        else:
            self._start_resident()
            self._inputs = [_node_arg_info(a) for a in self._sess.get_inputs()]
            self._outputs = [_node_arg_info(a) for a in self._sess.get_outputs()]

    # -- construction ----------------------------------------------------------------
    def _check_stubs(self) -> None:
        f = self._file
        for s in self._stubs.values():
            if s.name not in f:
                raise AqmFormatError(f"graph initializer {s.name!r} is stored in the .aqm file, but no tensor has that name")
            info = f.info(s.name)
            if ONNX_TYPES.get(info.dtype) != s.data_type or tuple(info.shape) != s.dims:
                raise AqmFormatError(
                    f"graph initializer {s.name!r} is {ORT_TYPE_NAMES.get(s.data_type, s.data_type)}{list(s.dims)} "
                    f"but the .aqm tensor is {info.dtype}{list(info.shape)}")

    def _make_plan(self, budget: int) -> StagePlan:
        limit = budget // COPIES_PER_WEIGHT
        try:
            return plan_stages(self._graph, {n: s.nbytes for n, s in self._stubs.items()}, limit)
        except StageTooLarge as e:
            need = COPIES_PER_WEIGHT * e.need
            raise AqmInputError(f"memory_budget={budget} bytes ({format_size(budget)}) is too small: {e}; "
                                f"streaming needs memory_budget >= {need} bytes ({format_size(need)})") from None

    def _make_codes_plan(self) -> CodesPlan:
        """Codes of every float32 AQ stub, and the graph cut around the nodes computing from them."""
        from ..codecs.aq import NAME as AQ
        codebooks: dict[str, np.ndarray] = {}
        aq = {n: AQWeight.from_file(self._file, n, codebooks) for n, s in self._stubs.items()
              if s.data_type == FLOAT and self._file.info(n).codec == AQ}
        try:
            return plan_codes(self._graph, self._stubs, aq, self._decode, self.memory_budget)
        except StageTooLarge as e:
            raise AqmInputError(f"memory_budget={self.memory_budget} bytes ({format_size(self.memory_budget)}) "
                                f"is too small: {e}; resident='compressed' needs memory_budget >= {e.need} bytes "
                                f"({format_size(e.need)})") from None

    def _segment_session(self, seg: Segment, index: int, env: Mapping[str, np.ndarray]):
        """The session of segment ``index`` for the dtypes and ranks of ``env``'s values (built once)."""
        sig = signature(seg, env)
        sess = seg.sessions.get(sig)
        if sess is None:
            # one arena per segment would each keep their own peak: allocate per run instead
            sess, arrays = self._session(segment_model(self._codes, seg, index, env), seg.weights, arena=False)
            seg.sessions[sig] = sess
            if ort_borrows_weights():
                self._weights += [a for a in arrays if not any(a is b for b in self._weights)]
        return sess

    @property
    def code_bytes(self) -> int:
        """Bytes of the codes, scales and permutations held (``resident="compressed"``; else 0)."""
        if self._codes is None:
            return 0
        return sum(a.nbytes for a in self._codes.aq.values())

    def _start_resident(self) -> None:
        """Build the one session holding every weight (again, after :meth:`set_providers`)."""
        self._sess, arrays = self._session(self._graph, list(self._stubs))
        self.cache.clear()
        # ORT reads the arrays in place for as long as the session lives; a copying ORT lets them go
        self._weights = arrays if ort_borrows_weights() else []

    def _decode(self, name: str) -> np.ndarray:
        return self.cache.get(name, lambda: decode_for_ort(self._file, self._stubs[name]))

    def _session(self, model: bytes, names: list[str], arena: bool = True):
        """Build an ORT session from ``model`` with the stubs ``names`` decoded; return it and the arrays.

        ``arena=False`` turns ONNX Runtime's CPU memory arena off (it would keep its peak for good).
        """
        ort = _ort()
        arrays = [self._decode(n) for n in names]
        so = _with_weights(_clone_options(self._sess_options), [self._files[n] for n in names], arrays)
        if not arena:
            shared_cpu_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
            # each segment's session has its own thread pool; a pool left spinning after its segment
            # ran takes a core from the next one (MiniLM, 14 segments, loaded 2-core machine: 5.8x
            # fp32's latency spinning, 1.85x not)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            sess = ort.InferenceSession(model, so, self._providers, self._provider_options, **self._ort_kwargs)
        except _ort_errors() as e:
            raise AqmFormatError(f"ONNX Runtime rejected the stored graph: {_one_line(e)}") from None
        return sess, arrays

    def _open(self) -> None:
        if self._file is None:
            raise AqmInputError("this InferenceSession is closed")

    def _resident(self, method: str):
        """The wrapped ORT session, or a clear error where streaming mode has none."""
        self._open()
        if self._codes is not None:
            raise AqmInputError(f"{method}() needs the whole model in one ONNX Runtime session; this one "
                                f"computes from codes between {self.num_stages} sessions "
                                f"(resident='compressed'): use run(), or resident='decoded'")
        if self._sess is None:
            raise AqmInputError(f"{method}() needs the whole model in one ONNX Runtime session; this one "
                                f"streams in {self.num_stages} stages (memory_budget={self.memory_budget}): "
                                f"use run(), or a larger memory_budget")
        return self._sess

    # -- onnxruntime.InferenceSession API ---------------------------------------------
    def get_inputs(self) -> list[IOInfo]:
        """Graph inputs (``name``, ``type``, ``shape``), like ``onnxruntime.NodeArg`` in both modes."""
        self._open()
        return list(self._inputs)

    def get_outputs(self) -> list[IOInfo]:
        """Graph outputs (``name``, ``type``, ``shape``)."""
        self._open()
        return list(self._outputs)

    def get_overridable_initializers(self) -> list[IOInfo]:
        """Initializers a feed may override (resident mode)."""
        return [_node_arg_info(a) for a in self._resident("get_overridable_initializers").get_overridable_initializers()]

    @property
    def num_stages(self) -> int:
        """Sessions one run goes through: 1 when resident, more when streaming or computing from codes."""
        if self._codes is not None:
            return len(self._codes.segments)
        return len(self._plan.stages) if self._plan is not None else 1

    @property
    def weight_bytes(self) -> int:
        """Bytes of all the model's decoded weights."""
        return sum(s.nbytes for s in self._stubs.values())

    @property
    def stage_weight_bytes(self) -> list[int]:
        """Decoded weight bytes each stage holds while it runs (``[weight_bytes]`` when resident; with
        ``resident="compressed"``, the AQ weights each segment decodes before it runs)."""
        if self._codes is not None:
            return [sum(self._stubs[n].nbytes for n in seg.decoded) for seg in self._codes.segments]
        return [s.weight_bytes for s in self._plan.stages] if self._plan is not None else [self.weight_bytes]

    @property
    def codes_plan(self) -> CodesPlan | None:
        """How ``resident="compressed"`` runs the graph (its ``steps``: ONNX Runtime segments and host
        steps, in order), or None in the other modes."""
        return self._codes

    @property
    def pinned_weight_bytes(self) -> int:
        """Bytes of decoded weights kept alive because ONNX Runtime reads them in place (resident mode)."""
        return sum(a.nbytes for a in self._weights)

    def get_providers(self) -> list[str]:
        """Execution providers in use."""
        self._open()
        if self._sess is not None:
            return self._sess.get_providers()
        return self._probe_session().get_providers()

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        """Each execution provider's settings, as ONNX Runtime resolved them."""
        self._open()
        if self._sess is not None:
            return self._sess.get_provider_options()
        return self._probe_session().get_provider_options()

    def _probe_session(self):
        """A tiny session with this session's providers and options: what every stage gets."""
        return _probe_session(np.ones(PROBE_SIZE, np.float32), self._sess_options, self._providers,
                              self._provider_options, **self._ort_kwargs)

    def set_providers(self, providers: Sequence[Any] | None = None,
                      provider_options: Sequence[dict] | None = None) -> None:
        """Use other execution providers from now on (resident mode rebuilds its session)."""
        self._open()
        self._providers, self._provider_options = providers, provider_options
        for seg in self._codes.segments if self._codes is not None else []:
            seg.sessions.clear()
        if self._sess is not None:
            self._sess = None
            self._weights = []
            self._start_resident()

    def get_session_options(self):
        """The ``onnxruntime.SessionOptions`` in effect (a copy of the ones given)."""
        self._open()
        if self._sess is not None:
            return self._sess.get_session_options()
        return _clone_options(self._sess_options)

    def get_modelmeta(self):
        """The model's metadata: ``producer_name``, ``graph_name``, ``custom_metadata_map``..."""
        self._open()
        if self._sess is not None:
            return self._sess.get_modelmeta()
        return model_metadata(self._model_bytes)

    def end_profiling(self) -> str:
        """Stop profiling (``SessionOptions.enable_profiling``) and return the trace file's name."""
        return self._resident("end_profiling").end_profiling()

    def get_profiling_start_time_ns(self) -> int:
        """When profiling started, in ``time.monotonic_ns()`` terms."""
        return self._resident("get_profiling_start_time_ns").get_profiling_start_time_ns()

    def io_binding(self):
        """An ``onnxruntime.IOBinding`` for :meth:`run_with_iobinding`."""
        return self._resident("io_binding").io_binding()

    def run_with_iobinding(self, iobinding: Any, run_options: Any = None) -> None:
        """Run with inputs and outputs bound by :meth:`io_binding`."""
        sess = self._resident("run_with_iobinding")
        try:
            sess.run_with_iobinding(iobinding, run_options)
        except _ort_errors() as e:
            raise AqmInputError(f"ONNX Runtime: {_one_line(e)}") from None

    def run_with_ort_values(self, output_names: Sequence[str] | None, input_dict_ort_values: Mapping[str, Any],
                            run_options: Any = None) -> list[Any]:
        """:meth:`run` on ``onnxruntime.OrtValue`` inputs, returning ``OrtValue`` outputs."""
        self._open()
        if self._sess is not None:
            try:
                return self._sess.run_with_ort_values(output_names, input_dict_ort_values, run_options)
            except _ort_errors() as e:
                raise AqmInputError(f"ONNX Runtime: {_one_line(e)}") from None
        if not isinstance(input_dict_ort_values, Mapping):
            raise AqmInputError("input_dict_ort_values must be a dict of input name -> OrtValue")
        feeds = {n: v.numpy() for n, v in input_dict_ort_values.items()}
        out = self.run(output_names or None, feeds, run_options)
        return [_ort().OrtValue.ortvalue_from_numpy(a) for a in out]

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: Any = None) -> list[np.ndarray]:
        """Compute ``output_names`` (None: all outputs) from ``input_feed``.

        Raises
        ------
        AqmInputError
            Unknown or missing input names, wrong dtypes or ranks, or dimensions
            that contradict the graph's fixed sizes; unknown output names; a closed session.
        """
        self._open()
        _check_run_args(output_names, input_feed)
        if self._sess is not None:
            # ORT validates feeds itself; on failure, name the problem the way streaming mode does
            try:
                return self._sess.run(output_names, input_feed, run_options)
            except _ort_errors() as e:
                self._check_feeds(input_feed)
                self._check_outputs(output_names)
                raise AqmInputError(f"ONNX Runtime: {_one_line(e)}") from None
        feeds = self._check_feeds(input_feed)
        names = self._check_outputs(output_names)
        if self._codes is not None:
            return run_plan(self._codes, names, feeds, self._segment_session, run_options, _ort_errors(), _one_line)
        return self._run_stages(names, feeds, run_options)

    def decoded_model(self) -> bytes:
        """The stored graph with every weight decoded and inlined: an ordinary ONNX model.

        Holds every decoded weight in memory at once (it is what a plain
        ``.onnx`` file of this model would hold).
        """
        self._open()
        arrays = {name: decode_for_ort(self._file, stub) for name, stub in self._stubs.items()}
        return inline_weights(self._model_bytes, arrays)
    def _check_outputs(self, output_names: Sequence[str] | None) -> list[str]:
        known = [o.name for o in self._outputs]
        names = list(known if output_names is None else output_names)
        bad = [n for n in names if n not in known]
        if bad:
            raise AqmInputError(f"invalid output name(s) {bad}; the outputs are {known}")
        return names

    def _check_feeds(self, input_feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(input_feed, Mapping):
            raise AqmInputError("input_feed must be a dict of input name -> array")
        expected = {i.name: i for i in self._inputs}
        unknown = [n for n in input_feed if n not in expected]
        if unknown:
            raise AqmInputError(f"invalid input name(s) {unknown}; the inputs are {list(expected)}")
        missing = [n for n in expected if n not in input_feed]
        if missing:
            raise AqmInputError(f"required input(s) {missing} are missing from the input feed {list(input_feed)}")
        feeds = {}
        for name, value in input_feed.items():
            arr = np.asarray(value)
            spec = expected[name]
            got = _ort_type(arr.dtype)
            if got != spec.type:
                raise AqmInputError(f"input {name!r}: unexpected data type {got}, expected {spec.type}")
            if spec.shape is not None:
                if arr.ndim != len(spec.shape):
                    raise AqmInputError(f"input {name!r}: rank {arr.ndim} (shape {list(arr.shape)}), "
                                        f"expected rank {len(spec.shape)} {spec.shape}")
                wrong = [i for i, (g, e) in enumerate(zip(arr.shape, spec.shape)) if isinstance(e, int) and g != e]
                if wrong:
                    raise AqmInputError(f"input {name!r}: got shape {list(arr.shape)}, expected {spec.shape} "
                                        f"(dimension {wrong[0]} differs)")
            feeds[name] = arr
        return feeds

    def _run_stages(self, names: list[str], feeds: dict[str, np.ndarray], run_options: Any) -> list[np.ndarray]:
        plan = self._plan
        env: dict[str, np.ndarray] = dict(feeds)
        keep = set(names)
        for i, stage in enumerate(plan.stages):
            self.cache.pin(stage.weights)
            try:
                sess, arrays = self._session(stage_model(plan, i, env), stage.weights)
                try:
                    out = sess.run(stage.outputs, {n: env[n] for n in stage.inputs}, run_options)
                except _ort_errors() as e:
                    raise AqmInputError(f"ONNX Runtime (stage {i}): {_one_line(e)}") from None
                del sess, arrays
            finally:
                self.cache.unpin(stage.weights)
            env.update(zip(stage.outputs, out))
            for n in [n for n in env if n not in keep and plan.last_use.get(n, -1) <= i]:
                del env[n]
        return [env[n] for n in names]

    def close(self) -> None:
        """Release the session, the decoded weights and the file mapping."""
        self._sess = None
        self._codes = None
        self._weights = []
        self.cache.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._file is None:
            return "<aqformat InferenceSession, closed>"
        mode = f"streaming in {len(self._plan.stages)} stages" if self._plan else \
            f"computing from codes between {self.num_stages} sessions" if self._codes else "resident"
        return f"<aqformat InferenceSession {self._file.path!r}, {mode}>"


@dataclass(frozen=True)
class ModelMetadata:
    """The fields of ``onnxruntime.ModelMetadata``, read from the stored graph (streaming mode)."""

    producer_name: str
    graph_name: str
    domain: str
    description: str
    graph_description: str
    version: int
    custom_metadata_map: dict[str, str]


def model_metadata(model_bytes: bytes) -> ModelMetadata:
    """:class:`ModelMetadata` of a serialised ONNX model, as ONNX Runtime reports it."""
    m = parse_model(model_bytes, "reading a streamed model's metadata")
    return ModelMetadata(m.producer_name, m.graph.name, m.domain, m.doc_string, m.graph.doc_string,
                         m.model_version, {p.key: p.value for p in m.metadata_props})


def _check_run_args(output_names: Any, input_feed: Any) -> None:
    """Refuse argument types that ONNX Runtime would meet with AttributeError or TypeError."""
    if not isinstance(input_feed, Mapping):
        raise AqmInputError(f"input_feed must be a dict of input name -> array, got {type(input_feed).__name__}")
    if output_names is not None and (isinstance(output_names, (str, bytes)) or not isinstance(output_names, Sequence)
                                     or not all(isinstance(n, str) for n in output_names)):
        raise AqmInputError(f"output_names must be None or a list of output names, got {type(output_names).__name__}")


def _open_model(path_or_bytes: Any):
    """The .aqm file from a path, or from its bytes (held in an anonymous in-memory file)."""
    if isinstance(path_or_bytes, (str, os.PathLike)):
        return open_aqm(path_or_bytes)
    if not isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        raise AqmInputError(f"InferenceSession needs an .aqm path or its bytes, got {type(path_or_bytes).__name__}")
    # the reader maps a file: an anonymous one holds the bytes, gone once the mapping is closed
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("aqm", getattr(os, "MFD_CLOEXEC", 0))
        try:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(path_or_bytes)
            f = open_aqm(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:
        import tempfile
        with tempfile.NamedTemporaryFile(suffix=".aqm", delete=False) as tmp:
            tmp.write(path_or_bytes)
        try:
            f = open_aqm(tmp.name)
        finally:
            os.unlink(tmp.name)
    f.path = "<bytes>"
    return f


def _node_arg_info(arg) -> IOInfo:
    return IOInfo(arg.name, arg.type, list(arg.shape) if arg.shape is not None else None)


def _io_info(value_info) -> IOInfo:
    t = value_info.type.tensor_type
    shape: list[int | str | None] | None = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return IOInfo(value_info.name, f"tensor({ORT_TYPE_NAMES.get(t.elem_type, t.elem_type)})", shape)
