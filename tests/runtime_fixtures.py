"""Build .aqm files from real ONNX models for the runtime tests and benchmark.

The runtime is tested for decode consistency, not compression fidelity: 2-D+
float initializers are quantized with a quick greedy residual VQ (codebooks
sampled from the weight vectors), the rest are stored raw. The reference is
ONNX Runtime running the original graph with every initializer replaced by
``aqformat.open(...).read(name)`` (inlined with onnx.numpy_helper, i.e.
independently of the runtime's own code paths).
"""
from __future__ import annotations

import io
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import aqformat
from aqformat.layout import to_matrix


def silero_path(name: str = "silero_vad_16k_op15.onnx") -> str:
    import silero_vad
    return os.path.join(os.path.dirname(silero_vad.__file__), "data", name)


def quantize(w: np.ndarray, codebooks: np.ndarray, axes=None, perm=None, scale=None) -> np.ndarray:
    """Greedy residual codes ``[n_vec, M]`` of ``w``'s matrix view against ``codebooks``."""
    M, K, d = codebooks.shape
    mat = to_matrix(w.astype(np.float32), axes, perm)
    if scale is not None:
        mat = mat / scale.astype(np.float32)[:, None]
    rows, cols = mat.shape
    pad = -cols % d
    vec = np.pad(mat, ((0, 0), (0, pad))).reshape(-1, d)
    codes = np.empty((vec.shape[0], M), dtype=np.uint16 if K > 256 else np.uint8)
    resid = vec.copy()
    cb = codebooks.astype(np.float32)
    for s in range(0, vec.shape[0], 1 << 15):
        r = resid[s:s + (1 << 15)]
        for m in range(M):
            dist = (r * r).sum(1)[:, None] - 2 * r @ cb[m].T + (cb[m] * cb[m]).sum(1)[None]
            c = dist.argmin(1)
            codes[s:s + len(r), m] = c
            r -= cb[m][c]
    return codes


def make_codebooks(weights: list[np.ndarray], M: int, K: int, d: int, seed: int = 0) -> np.ndarray:
    """Codebook m = K sampled weight vectors (first) or residual-sized noise (later)."""
    rng = np.random.default_rng(seed)
    vecs = np.concatenate([np.pad(w.reshape(w.shape[0], -1), ((0, 0), (0, -w[0].size % d))).reshape(-1, d)
                           for w in weights])
    first = vecs[rng.choice(len(vecs), K, replace=len(vecs) < K)]
    rest = rng.standard_normal((M - 1, K, d)) * vecs.std() * 0.3
    return np.concatenate([first[None], rest]).astype(np.float16)


def stub_graph(model: onnx.ModelProto, names: set[str]) -> bytes:
    """The contract's stored graph: initializers ``names`` replaced by data-less 'aqm' stubs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name in names:
            t = TensorProto(name=init.name, data_type=init.data_type, dims=list(init.dims),
                            data_location=TensorProto.EXTERNAL)
            e = t.external_data.add()
            e.key, e.value = "location", "aqm"
            init.CopyFrom(t)
    return m.SerializeToString()


def build_aqm(model: onnx.ModelProto, path: str, *, M: int = 2, K: int = 256, d: int = 8,
              min_aq: int = 256, layout_variety: bool = True, name: str = "test") -> dict[str, str]:
    """Write ``model`` as an .aqm at ``path``; return ``{initializer: codec}``.

    Float initializers with >= 2 dims and >= ``min_aq`` elements are AQ-coded
    (some with per-row scale, column permutation or transposing axes when
    ``layout_variety``); every other initializer is stored raw.
    """
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    aq = [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim >= 2 and a.size >= min_aq]
    codecs = {}
    rng = np.random.default_rng(1)
    with aqformat.Writer(path, source={"framework": "onnx", "name": name}) as w:
        if aq:
            cb = make_codebooks([inits[n] for n in aq], M, K, d)
            w.add_codebooks("cb", cb)
        for i, (n, a) in enumerate(inits.items()):
            if n in aq:
                axes = perm = scale = None
                if layout_variety and i % 3 == 1 and a.ndim >= 2:
                    axes = list(range(a.ndim))[::-1]
                shape_m = to_matrix(a, axes).shape
                if layout_variety and i % 2 == 0:
                    scale = np.abs(to_matrix(a, axes)).max(1) + 1e-3
                if layout_variety and i % 4 == 3:
                    perm = rng.permutation(shape_m[1])
                codes = quantize(a, cb, axes, perm, scale)
                w.add_aq(n, a.shape, codes, group="cb", scale=scale, perm=perm, axes=axes)
                codecs[n] = "aq"
            else:
                w.add_tensor(n, a)
                codecs[n] = "raw"
        w.set_graph(stub_graph(model, set(inits)))
    return codecs


def reference_model(model: onnx.ModelProto, aqm_path: str) -> bytes:
    """``model`` with every initializer replaced by aqformat's numpy decode of it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    with aqformat.open(aqm_path) as f:
        for init in m.graph.initializer:
            if init.name in f:
                init.CopyFrom(numpy_helper.from_array(np.asarray(f.read(init.name)), init.name))
    return m.SerializeToString()


def mlp_model(layers: int = 10, width: int = 128, inp: int = 32, out: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A real MLP graph (MatMul + Add + Relu per layer, Gemm head)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, dim = "x", inp
    for i in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((dim, width)) / np.sqrt(dim)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        x, dim = f"h{i}", width
    inits += [numpy_helper.from_array((rng.standard_normal((out, dim)) / np.sqrt(dim)).astype(np.float32), "head_w"),
              numpy_helper.from_array(np.zeros(out, np.float32), "head_b")]
    nodes.append(helper.make_node("Gemm", [x, "head_w", "head_b"], ["y"], transB=1))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inp])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out]),
                           helper.make_tensor_value_info(f"h{layers // 2}", TensorProto.FLOAT, ["N", width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def cnn_model() -> onnx.ModelProto:
    """A small CNN exported from PyTorch (Conv2d, BatchNorm folded by the exporter, Linear)."""
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), buf, dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def silero_feeds(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((batch, 512)).astype(np.float32) * 0.1,
            "state": np.zeros((2, batch, 128), np.float32), "sr": np.array(16000, np.int64)}


def build_torch_aqm(state_dict: dict, path: str, *, M: int = 2, K: int = 256, d: int = 8,
                    min_aq: int = 256, aq_dtypes: dict[str, str] | None = None) -> dict[str, str]:
    """Write a torch ``state_dict`` as an .aqm (same AQ/raw rule as :func:`build_aqm`).

    ``aq_dtypes`` maps a key to the decoded dtype stored for it (default float32).
    """
    arrays = {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
              for k, v in state_dict.items()}
    aq = [k for k, a in arrays.items() if a.dtype == np.float32 and a.ndim >= 2 and a.size >= min_aq]
    codecs = {}
    # tied tensors (one storage under several keys) get the same layout, hence equal decodes
    first_index: dict[int, int] = {}
    layout_index = [first_index.setdefault(v.data_ptr(), i) for i, v in enumerate(state_dict.values())]
    with aqformat.Writer(path, source={"framework": "pytorch", "name": "test"}) as w:
        if aq:
            cb = make_codebooks([arrays[k] for k in aq], M, K, d)
            w.add_codebooks("cb", cb)
        for i, (k, a) in zip(layout_index, arrays.items()):
            if k in aq:
                axes = list(range(a.ndim))[::-1] if i % 3 == 1 else None
                rows, cols = to_matrix(a, axes).shape
                scale = np.abs(to_matrix(a, axes)).max(1) + 1e-3 if i % 2 == 0 else None
                perm = np.random.default_rng(i).permutation(cols) if i % 4 == 3 else None
                w.add_aq(k, a.shape, quantize(a, cb, axes, perm, scale), group="cb",
                         dtype=(aq_dtypes or {}).get(k, "float32"), scale=scale, perm=perm, axes=axes)
                codecs[k] = "aq"
            else:
                w.add_tensor(k, a)
                codecs[k] = "raw"
    return codecs


def digits_cnn():
    """The digits CNN's architecture (bench/tasks.py), seeded: 3 conv layers and a 256-128-10 classifier."""
    import torch
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
