"""ONNX Runtime with the weights kept as AQ codes: the graph cut around the nodes that read them.

A node that reads an AQ-coded weight as a matrix — ``MatMul`` (weight as its
second input), ``Gemm`` (weight as ``B``) or ``Gather`` (an embedding table,
``axis = 0``) — runs outside ONNX Runtime, computing from the codes with the
products of :mod:`.aq_weight` (lookup table for a few input rows; otherwise
tiles of at most ``TILE_BYTES`` decoded by the compiled decoder just before
BLAS multiplies them; only the looked-up rows of a table). Every other node
runs in ONNX Runtime sessions, one per maximal run of nodes between two such
steps, built once per input signature and kept. Weights those sessions read
(biases, norms, and AQ tensors some other operator reads) are decoded once,
as the resident session does, and lent to ONNX Runtime in place.

So no fp32 copy of a coded weight exists beyond one tile at a time, and
nothing is written to disk.

Why not an ONNX Runtime custom operator: onnxruntime-extensions' Python
operators hand every output back to ONNX Runtime as a Python list of floats
(about 70 ns per value: 12.6 ms for one ``[120, 1536]`` MiniLM activation,
53 ms to hand over one decoded ``384 x 1536`` weight), so both an operator
computing from codes and an operator decoding a weight for ONNX Runtime's
MatMul cost more than the whole fp32 model's run; a compiled operator needs
ONNX Runtime's C headers and a compiler on every platform. Cutting the graph
costs instead one ``run`` call per segment (tens of microseconds each).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dtypes import ONNX_TYPES, dtype_name
from ..errors import AqmInputError
from .aq_weight import AQWeight
from .onnx_graph import Stub, parse_model, require_onnx, used_names


@dataclass
class HostStep:
    """A node computed from codes: ``MatMul``, ``Gemm`` or ``Gather``."""

    node: Any                        # the NodeProto
    aq: AQWeight
    rows_out: bool                   # the matrix view's rows are output features (else input features)
    k: int = 0                       # input features (MatMul, Gemm)
    trans_a: bool = False            # Gemm: use A transposed
    alpha: float = 1.0
    c: np.ndarray | None = None      # Gemm: beta * C when C is a weight
    beta: float = 1.0                # Gemm: of a computed C (input 2)

    def run(self, env: Mapping[str, np.ndarray]) -> np.ndarray:
        node, aq = self.node, self.aq
        if node.op_type == "Gather":
            ids = np.asarray(env[node.input[1]])
            if ids.dtype.kind not in "iu":
                raise AqmInputError(f"Gather {node.name!r}: indices must be integers, got {ids.dtype}")
            ids = np.where(ids < 0, ids + aq.rows, ids)
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= aq.rows):
                raise AqmInputError(f"Gather {node.name!r}: an index is out of range for {aq.rows} rows")
            return aq.lookup(ids)
        x = env[node.input[0]]
        if x.dtype != np.float32:
            raise AqmInputError(f"{node.op_type} {node.name!r}: input {node.input[0]!r} is {x.dtype}, expected float32")
        if self.trans_a:
            x = x.T
        if x.ndim < 1 or x.shape[-1] != self.k or (node.op_type == "Gemm" and x.ndim != 2):
            raise AqmInputError(f"{node.op_type} {node.name!r}: input {node.input[0]!r} has shape "
                                f"{list(x.shape)}, its last dimension must be {self.k}")
        x2 = x.reshape(-1, self.k)
        y = aq.times_rows(x2) if self.rows_out else aq.times_cols(x2)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        if self.alpha != 1.0:
            y *= np.float32(self.alpha)
        if self.c is not None:
            y += self.c
        elif node.op_type == "Gemm" and len(node.input) == 3 and node.input[2]:
            y += np.float32(self.beta) * env[node.input[2]]
        return y


@dataclass
class Segment:
    """Consecutive nodes run by one ONNX Runtime session."""

    nodes: list[Any]
    inputs: list[str]                # values from feeds, earlier steps or host-held weights
    outputs: list[str]               # values later steps or the caller need
    weights: list[str] = field(default_factory=list)  # stubs decoded for ONNX Runtime
    sessions: dict[tuple, Any] = field(default_factory=dict)  # input signature -> session


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == 1 else a.i if a.type == 2 else default
    return default


def host_step(node: Any, aq_weights: Mapping[str, AQWeight], constant: Callable[[str], np.ndarray | None]
              ) -> HostStep | None:
    """The step computing ``node`` from codes, or None when ONNX Runtime must run it.

    ``constant(name)`` is the value of initializer ``name`` (None for a value
    computed by the graph): a Gemm's ``C`` may be one.
    """
    ins = list(node.input)
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or len(ins) < 2:
        return None
    w = aq_weights.get(ins[0] if op == "Gather" else ins[1])
    if w is None or len(w.shape) != 2 or w.axes not in (None, [1, 0]):
        return None
    if op == "MatMul" and len(ins) == 2 and constant(ins[0]) is None:
        return HostStep(node, w, rows_out=w.axes == [1, 0], k=w.shape[0])
    if op == "Gemm" and len(ins) <= 3 and constant(ins[0]) is None:
        trans_b = bool(_attr(node, "transB", 0))
        beta = float(_attr(node, "beta", 1.0))
        c = constant(ins[2]) if len(ins) == 3 and ins[2] else None
        if c is not None:
            c = np.float32(beta) * c.astype(np.float32)
        # B is [K, N] (or [N, K] with transB): its matrix rows are outputs when they are N
        return HostStep(node, w, rows_out=(w.axes is None) == trans_b, k=w.shape[1 if trans_b else 0],
                        trans_a=bool(_attr(node, "transA", 0)), alpha=float(_attr(node, "alpha", 1.0)), c=c,
                        beta=beta)
    if op == "Gather" and constant(ins[1]) is None and _attr(node, "axis", 0) == 0 and w.axes is None:
        return HostStep(node, w, rows_out=True)
    return None


@dataclass
class CodesPlan:
    """The graph as a sequence of segments and host steps."""

    steps: list[Segment | HostStep]
    graph_inputs: list[Any]
    graph_outputs: list[Any]
    last_use: dict[str, int]          # value name -> index of the last step reading it
    template: Any                     # the ModelProto without its nodes

    @property
    def segments(self) -> list[Segment]:
        return [s for s in self.steps if isinstance(s, Segment)]


def plan_codes(model_bytes: bytes, stubs: Mapping[str, Stub], aq_weights: Mapping[str, AQWeight],
               decode: Callable[[str], np.ndarray]) -> CodesPlan:
    """Cut the graph into ONNX Runtime segments and host steps (see the module docstring).

    Segments are maximal: each takes every node whose inputs are available
    once the host steps before it ran, so that the graph is cut only where a
    value computed from codes is needed. ``decode(name)`` gives a stub's
    value (a Gemm's ``C`` held by its host step).
    """
    onnx = require_onnx("running with the weights kept as codes")
    model = parse_model(model_bytes, "running with the weights kept as codes")
    g = model.graph
    inline = {t.name: t for t in g.initializer if t.name not in stubs}

    def constant(name: str) -> np.ndarray | None:
        if name in stubs:
            return decode(name)
        return onnx.numpy_helper.to_array(inline[name]) if name in inline else None

    available = {i.name for i in g.input} | inline.keys() | set(stubs) | {""}
    pending = list(g.node)
    hosts = {id(n): host_step(n, aq_weights, constant) for n in pending}
    steps: list[Segment | HostStep] = []
    while pending:
        seg, rest = [], []
        for node in pending:
            if hosts[id(node)] is None and used_names(node) <= available:
                seg.append(node)
                available |= set(node.output)
            else:
                rest.append(node)
        ready = [n for n in rest if hosts[id(n)] is not None and used_names(n) <= available]
        if not seg and not ready:
            missing = sorted(used_names(rest[0]) - available)
            raise AqmInputError(f"stored ONNX graph: node {rest[0].name or rest[0].op_type!r} reads "
                                f"{missing}, which nothing computes")
        if seg:
            steps.append(Segment(seg, [], []))
        for n in ready:
            steps.append(hosts[id(n)])
            available |= set(n.output)
        done = {id(n) for n in seg + ready}
        pending = [n for n in rest if id(n) not in done]

    graph_out = {o.name for o in g.output}
    last_use: dict[str, int] = {}
    for i, s in enumerate(steps):
        for node in s.nodes if isinstance(s, Segment) else [s.node]:
            for name in used_names(node):
                last_use[name] = i
    for i, s in enumerate(steps):
        if not isinstance(s, Segment):
            continue
        produced: set[str] = set()
        needed: set[str] = set()
        for node in s.nodes:
            needed |= used_names(node) - produced
            produced |= {o for o in node.output if o}
        s.weights = sorted((needed - produced) & stubs.keys())
        s.inputs = sorted(needed - produced - stubs.keys() - inline.keys())
        s.outputs = sorted(n for n in produced if n in graph_out or last_use.get(n, -1) > i)
    del model.graph.node[:]
    return CodesPlan(steps, list(g.input), list(g.output), last_use, model)


def segment_model(plan: CodesPlan, seg: Segment, index: int, feeds: Mapping[str, np.ndarray]) -> bytes:
    """Serialized ModelProto of ``seg`` for inputs of the dtypes and ranks in ``feeds``."""
    onnx = require_onnx("running with the weights kept as codes")
    t = plan.template
    inputs = [onnx.helper.make_tensor_value_info(n, ONNX_TYPES[dtype_name(feeds[n].dtype)], [None] * feeds[n].ndim)
              for n in seg.inputs]
    outputs = [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in seg.outputs]
    needed = {n for node in seg.nodes for n in used_names(node)}
    inits = [init for init in t.graph.initializer if init.name in needed]
    graph = onnx.helper.make_graph(seg.nodes, f"{t.graph.name}_segment{index}", inputs, outputs, inits)
    m = onnx.ModelProto()
    m.CopyFrom(t)
    m.graph.CopyFrom(graph)
    return m.SerializeToString()


def run_plan(plan: CodesPlan, names: list[str], feeds: Mapping[str, np.ndarray],
             session: Callable[[Segment, int, Mapping[str, np.ndarray]], Any], run_options: Any,
             errors: tuple[type[BaseException], ...], one_line: Callable[[Exception], str]) -> list[np.ndarray]:
    """Outputs ``names`` of the graph for ``feeds``; ``session(seg, i, env)`` gives segment ``i``'s session."""
    env: dict[str, np.ndarray] = dict(feeds)
    keep = set(names)
    for i, step in enumerate(plan.steps):
        if isinstance(step, Segment):
            sess = session(step, i, env)
            try:
                out = sess.run(step.outputs, {n: env[n] for n in step.inputs}, run_options)
            except errors as e:
                raise AqmInputError(f"ONNX Runtime (segment {i}): {one_line(e)}") from None
            env.update(zip(step.outputs, out))
        else:
            env[step.node.output[0]] = step.run(env)
        for n in [n for n in env if n not in keep and plan.last_use.get(n, -1) <= i]:
            del env[n]
    return [env[n] for n in names]


def signature(seg: Segment, env: Mapping[str, np.ndarray]) -> tuple:
    return tuple((n, env[n].dtype.str, env[n].ndim) for n in seg.inputs)

