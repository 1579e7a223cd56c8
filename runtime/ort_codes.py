"""ONNX Runtime with the weights kept as AQ codes, each decoded just before the nodes reading it run.

The graph is cut into segments, each run by an ONNX Runtime session built
once (per input signature) and kept. The AQ-coded weights a segment reads are
not in its session: they are inputs, decoded by the compiled decoder into a
reusable buffer just before the segment runs (at most the segment budget's
bytes at once), so ONNX Runtime's own kernels (MLAS GEMM) multiply them. A
weight stored transposed (``axes = [1, 0]``, usual for ``MatMul``) is fed as
its matrix view through a ``Transpose`` node, which ONNX Runtime fuses into
the product. An embedding table read by ``Gather`` (``axis = 0``) is not
decoded at all: a host step decodes only the looked-up rows. Weights that
are not AQ-coded (biases, norms) are decoded once and lent to ONNX Runtime
in place, as the resident session does.

So no fp32 copy of the coded weights exists beyond one segment's, and
nothing is written to disk.

Measured alternatives (MiniLM, ``bench/runtime_bench.py``):

- an ONNX Runtime custom operator through onnxruntime-extensions' Python
  operators: they hand every output back to ONNX Runtime as a Python list of
  floats (about 70 ns per value: 12.6 ms for one ``[120, 1536]`` activation,
  53 ms for one decoded ``384 x 1536`` weight), more than the whole fp32
  model's run; a compiled operator needs ONNX Runtime's C headers and a
  compiler on every platform;
- computing ``MatMul``/``Gemm`` from the codes outside ONNX Runtime
  (:data:`HOST_PRODUCTS`: lookup table or decoded tiles times numpy's BLAS):
  numpy's BLAS runs these shapes at about half MLAS's speed, and every such
  node cuts the graph, so it is slower except for a few input rows.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dtypes import ONNX_TYPES, dtype_name
from ..errors import AqmInputError, StageTooLarge
from .aq_weight import AQWeight
from .onnx_graph import Stub, parse_model, require_onnx, used_names

# decoded weights one segment may hold at once, unless the session is given a memory_budget
SEGMENT_BYTES = 4 << 20
# compute MatMul/Gemm from the codes outside ONNX Runtime (see the module docstring: slower)
HOST_PRODUCTS = False
FLOAT = 1                  # onnx TensorProto.FLOAT
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's own operators (FusedMatMul)
_ROWS_SUFFIX = "/aq_rows"  # segment input holding a transposed weight's matrix view
_scratch = threading.local()


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
    if op in ("MatMul", "Gemm") and not HOST_PRODUCTS:
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
class Segment:
    """Consecutive nodes run by one ONNX Runtime session."""

    nodes: list[Any]
    inputs: list[str]                # values from feeds or earlier steps
    outputs: list[str]               # values later steps or the caller need
    decoded: list[str] = field(default_factory=list)  # AQ weights decoded before each run, fed as inputs
    weights: list[str] = field(default_factory=list)  # other stubs, decoded once and lent to ONNX Runtime
    sessions: dict[tuple, Any] = field(default_factory=dict)  # input signature -> session


@dataclass
class CodesPlan:
    """The graph as a sequence of segments and host steps."""

    steps: list[Segment | HostStep]
    graph_inputs: list[Any]
    graph_outputs: list[Any]
    drop: list[list[str]]             # values no step after step i reads (graph outputs excepted)
    template: Any                     # the ModelProto without its nodes
    aq: dict[str, AQWeight]           # every AQ weight, by stub name
    limit: int                        # bytes of decoded weights a segment holds at most

    @property
    def segments(self) -> list[Segment]:
        return [s for s in self.steps if isinstance(s, Segment)]


def transposed(aq: AQWeight) -> bool:
    """Whether ``aq`` is fed as its matrix view through a Transpose node (a 2-D ``axes = [1, 0]`` weight)."""
    return aq.axes == [1, 0] and aq.perm is None and len(aq.shape) == 2


def plan_codes(model_bytes: bytes, stubs: Mapping[str, Stub], aq_weights: Mapping[str, AQWeight],
               decode: Callable[[str], np.ndarray], limit: int | None) -> CodesPlan:
    """Cut the graph into segments and host steps (see the module docstring).

    Segments are maximal under ``limit`` bytes of decoded AQ weights (default:
    :data:`SEGMENT_BYTES`, or more if one node needs more): each takes every
    node whose inputs are available once the steps before it ran. ``decode(name)``
    gives a stub's value (a Gemm's ``C`` held by a host step).

    Raises
    ------
    StageTooLarge
        ``limit`` is given and one node reads more AQ weight bytes than it.
    """
    onnx = require_onnx("running with the weights kept as codes")
    model = parse_model(model_bytes, "running with the weights kept as codes")
    g = model.graph
    inline = {t.name: t for t in g.initializer if t.name not in stubs}

    def constant(name: str) -> np.ndarray | None:
        if name in stubs:
            return decode(name)
        return onnx.numpy_helper.to_array(inline[name]) if name in inline else None

    pending = list(g.node)
    hosts = {id(n): host_step(n, aq_weights, constant) for n in pending}
    size = {n: stubs[n].nbytes for n in aq_weights}
    reads = {id(n): used_names(n) & size.keys() for n in pending if hosts[id(n)] is None}
    need = {i: sum(size[w] for w in ws) for i, ws in reads.items()}
    worst = max(pending, key=lambda n: need.get(id(n), 0), default=None)
    if worst is not None and limit is not None and need.get(id(worst), 0) > limit:
        raise StageTooLarge(worst.name or worst.op_type, worst.op_type, need[id(worst)], "one node")
    limit = max(SEGMENT_BYTES if limit is None else limit, need.get(id(worst), 0) if worst is not None else 0)

    available = {i.name for i in g.input} | inline.keys() | set(stubs) | {""}
    steps: list[Segment | HostStep] = []
    while pending:
        seg, rest, held = [], [], set()
        for node in pending:
            ws = reads.get(id(node))
            if ws is not None and used_names(node) <= available and \
                    sum(size[w] for w in held | ws) <= limit:
                seg.append(node)
                held |= ws
                available |= set(node.output)
            else:
                rest.append(node)
        ready = [n for n in rest if hosts[id(n)] is not None and used_names(n) <= available]
        if not seg and not ready:
            missing = sorted(used_names(rest[0]) - available)
            raise AqmInputError(f"stored ONNX graph: node {rest[0].name or rest[0].op_type!r} reads "
                                f"{missing}, which nothing computes")
        if seg:
            steps.append(Segment(seg, [], [], sorted(held)))
        for n in ready:
            steps.append(hosts[id(n)])
            available |= set(n.output)
        done = {id(n) for n in seg + ready}
        pending = [n for n in rest if id(n) not in done]

    _sink(steps, reads, {o.name for o in g.output})
    drop = _wire(steps, stubs.keys(), aq_weights.keys(), inline.keys(), {o.name for o in g.output})
    del model.graph.node[:]
    return CodesPlan(steps, list(g.input), list(g.output), drop, model, dict(aq_weights), limit)


def _sink(steps: list[Segment | HostStep], reads: Mapping[int, set[str]], graph_out: set[str]) -> None:
    """Move each node that reads no AQ weight into the segment of its first consumer.

    The greedy cut puts a node in the first segment that can run it, so the
    shape arithmetic of the whole graph (``Shape``, ``Gather``, ``Concat``...)
    lands in one early segment, and its hundreds of small results cross every
    later cut as outputs and inputs. Placed next to its consumers, it stays
    inside the subgraph ONNX Runtime optimises as one.
    """
    consumers = _readers(steps)
    last_segment = [max((j for j in range(i + 1) if isinstance(steps[j], Segment)), default=-1)
                    for i in range(len(steps))]  # the latest segment at or before each step
    for i in reversed(range(len(steps))):
        s = steps[i]
        if not isinstance(s, Segment):
            continue
        stay = []
        for node in reversed(s.nodes):  # consumers first, so a chain of such nodes moves together
            uses = [j for o in node.output if o for j in consumers.get(o, [])]
            target = i
            if uses and not reads.get(id(node)) and not any(o in graph_out for o in node.output):
                first = min(uses)
                target = first if isinstance(steps[first], Segment) else last_segment[first - 1]
            if target > i:
                # in front of the target's nodes: they, and nodes moved there already, may read it
                steps[target].nodes.insert(0, node)
                for name in used_names(node):
                    consumers[name].remove(i)
                    consumers[name].append(target)
            else:
                stay.append(node)
        s.nodes[:] = stay[::-1]
    steps[:] = [s for s in steps if not isinstance(s, Segment) or s.nodes]


def _readers(steps: list[Segment | HostStep]) -> dict[str, list[int]]:
    """The indices of the steps reading each value, once per reading node."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(steps):
        for node in s.nodes if isinstance(s, Segment) else [s.node]:
            for name in used_names(node):
                out.setdefault(name, []).append(i)
    return out


def _wire(steps: list[Segment | HostStep], stubs: Any, coded: Any, inline: Any, graph_out: set[str]) -> list[list[str]]:
    """Fill each segment's inputs, outputs and lent weights; return the values each step is the last to read."""
    last_use = {name: max(steps_reading) for name, steps_reading in _readers(steps).items()}
    for i, s in enumerate(steps):
        if not isinstance(s, Segment):
            continue
        produced: set[str] = set()
        needed: set[str] = set()
        for node in s.nodes:
            needed |= used_names(node) - produced
            produced |= {o for o in node.output if o}
        s.weights = sorted((needed - produced) & (stubs - coded))
        s.inputs = sorted(needed - produced - stubs - inline)
        s.outputs = sorted(n for n in produced if n in graph_out or last_use.get(n, -1) > i)
    drop: list[list[str]] = [[] for _ in steps]
    for name, i in last_use.items():
        if name not in graph_out:
            drop[i].append(name)
    return drop


def segment_model(plan: CodesPlan, seg: Segment, index: int, feeds: Mapping[str, np.ndarray]) -> bytes:
    """Serialized ModelProto of ``seg`` for inputs of the dtypes and ranks in ``feeds``.

    Its decoded weights are float32 inputs of fixed shape. A transposed one
    is an input of its matrix view's shape: a ``MatMul`` reading it becomes
    ONNX Runtime's ``FusedMatMul`` with ``transB`` (no transposed copy), any
    other node reads it through a Transpose node.
    """
    onnx = require_onnx("running with the weights kept as codes")
    h = onnx.helper
    t = plan.template
    inputs = [h.make_tensor_value_info(n, ONNX_TYPES[dtype_name(feeds[n].dtype)], [None] * feeds[n].ndim)
              for n in seg.inputs]
    flipped = {n for n in seg.decoded if transposed(plan.aq[n])}
    nodes, fused = [], False
    for node in seg.nodes:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in flipped \
                and node.input[0] not in flipped:
            node = h.make_node("FusedMatMul", [node.input[0], node.input[1] + _ROWS_SUFFIX], list(node.output),
                               name=node.name, domain=MS_DOMAIN, transB=1)
            fused = True
        nodes.append(node)
    read = {n for node in nodes for n in used_names(node)}
    for n in seg.decoded:
        aq = plan.aq[n]
        if n in flipped:
            inputs.append(h.make_tensor_value_info(n + _ROWS_SUFFIX, FLOAT, [aq.rows, aq.cols]))
            if n in read:
                nodes.insert(0, h.make_node("Transpose", [n + _ROWS_SUFFIX], [n], perm=[1, 0]))
        else:
            inputs.append(h.make_tensor_value_info(n, FLOAT, list(aq.shape)))
    outputs = [h.make_value_info(n, onnx.TypeProto()) for n in seg.outputs]
    inits = [init for init in t.graph.initializer if init.name in read and init.name not in plan.aq]
    graph = h.make_graph(nodes, f"{t.graph.name}_segment{index}", inputs, outputs, inits)
    m = onnx.ModelProto()
    m.CopyFrom(t)
    m.graph.CopyFrom(graph)
    if fused and not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(h.make_opsetid(MS_DOMAIN, 1))
    return m.SerializeToString()


def decoded_feeds(plan: CodesPlan, seg: Segment) -> dict[str, np.ndarray]:
    """The AQ weights of ``seg`` decoded into this thread's buffer (valid until the next call), by input name."""
    total = sum(math.prod(plan.aq[n].shape) for n in seg.decoded)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < total:
        buf = _scratch.buf = np.empty(max(total, 1), np.float32)
    feeds, pos = {}, 0
    for n in seg.decoded:
        aq = plan.aq[n]
        size = math.prod(aq.shape)
        out = buf[pos:pos + size]
        pos += size
        if transposed(aq) or (aq.axes is None and aq.perm is None):
            aq.matrix_rows(0, aq.rows, out.reshape(aq.rows, aq.cols))
            feeds[n + _ROWS_SUFFIX if transposed(aq) else n] = out.reshape(
                (aq.rows, aq.cols) if transposed(aq) else aq.shape)
        else:  # another layout: decoded whole, then copied into the buffer
            feeds[n] = out.reshape(aq.shape)
            feeds[n][...] = aq.decode()
    return feeds


def run_plan(plan: CodesPlan, names: list[str], feeds: Mapping[str, np.ndarray],
             session: Callable[[Segment, int, Mapping[str, np.ndarray]], Any], run_options: Any,
             errors: tuple[type[BaseException], ...], one_line: Callable[[Exception], str]) -> list[np.ndarray]:
    """Outputs ``names`` of the graph for ``feeds``; ``session(seg, i, env)`` gives segment ``i``'s session."""
    env: dict[str, np.ndarray] = dict(feeds)
    for i, step in enumerate(plan.steps):
        if isinstance(step, Segment):
            sess = session(step, i, env)
            inputs = {n: env[n] for n in step.inputs}
            inputs.update(decoded_feeds(plan, step))
            try:
                out = sess.run(step.outputs, inputs, run_options)
            except errors as e:
                raise AqmInputError(f"ONNX Runtime (segment {i}): {one_line(e)}") from None
            del inputs
            env.update(zip(step.outputs, out))
        else:
            env[step.node.output[0]] = step.run(env)
        for n in plan.drop[i]:
            if n not in names:
                env.pop(n, None)
    return [env[n] for n in names]


def signature(seg: Segment, env: Mapping[str, np.ndarray]) -> tuple:
    """What a segment's session depends on besides the graph: its inputs' dtypes and ranks."""
    return tuple((n, env[n].dtype.str, env[n].ndim) for n in seg.inputs)
