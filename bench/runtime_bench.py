"""Runtime benchmark on MiniLM (all-MiniLM-L6-v2): .aqm InferenceSession vs fp32 ONNX Runtime.

MiniLM is exported to ONNX (legacy TorchScript exporter), turned into an .aqm
with the test fixture builder (2-D weights AQ-coded with 2x256 codebooks of
dimension 8, i.e. 2 bits/weight; the rest raw), and both are measured by
:func:`aqformat.runtime.benchmark.compare` — every load in a fresh process,
steady-state latency alternating both sessions in one process — resident and
streaming under a memory budget. Run::

    .venv/bin/python -m bench.runtime_bench [--out bench/results/runtime_bench.json]

Targets (ratios to fp32 ORT): first output <= 1.5x, steady latency <= 1.05x,
peak RSS <= 1.2x; streaming peak RSS above the interpreter's <= .aqm size +
budget + activations/overhead (the resident fp32 ORT run's RSS above its
weights bounds the latter); ``resident="compressed"`` (weights kept as codes):
peak RSS above the interpreter's <= 0.35x fp32 ORT's, steady latency <= 1.5x.
``--aqm`` uses a given .aqm of the same export (e.g. ``aqm convert`` at 4
bits) instead of the quick 2-bit one.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from tests.minilm import export_minilm_onnx, load_minilm, sentences
from tests.runtime_fixtures import build_aqm
from bench.report import save_json

HERE = os.path.dirname(os.path.abspath(__file__))


def export_minilm(path: str) -> dict[str, np.ndarray]:
    """Write MiniLM as fp32 ONNX to ``path``; return real tokenized feeds (8 sentences)."""
    model, tok = load_minilm()
    export_minilm_onnx(model, tok, path)
    enc = tok(sentences("eval", 8), padding=True, return_tensors="np")
    return {n: enc[n] for n in ("input_ids", "attention_mask", "token_type_ids")}


def python_op_cost(iters: int = 10) -> dict[str, float] | None:
    """Milliseconds for ONNX Runtime to call an onnxruntime-extensions Python operator (median of ``iters``).

    The alternative to ``resident="compressed"``'s segments: a custom operator
    computing MatMul from codes (its output is an activation, ``[120, 1536]``
    for 8 sentences) or decoding a weight for ONNX Runtime's MatMul (its output
    is the weight, ``[384, 1536]``). The operator here only returns an array of
    that shape, so the figure is the bridge's own cost. None without the package.
    """
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        return None
    import onnxruntime
    from onnx import TensorProto, helper

    shapes = {"activation_120x1536": (120, 1536), "weight_384x1536": (384, 1536)}

    @onnx_op(op_type="AqmBridgeProbe", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
             attrs={"rows": PyCustomOpDef.dt_int64, "cols": PyCustomOpDef.dt_int64})
    def probe(x, rows, cols):
        return np.ones((rows, cols), np.float32)

    out = {}
    for label, (rows, cols) in shapes.items():
        node = helper.make_node("AqmBridgeProbe", ["x"], ["y"], domain="ai.onnx.contrib", rows=rows, cols=cols)
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("ai.onnx.contrib", 1)])
        so = onnxruntime.SessionOptions()
        so.register_custom_ops_library(get_library_path())
        sess = onnxruntime.InferenceSession(model.SerializeToString(), so, ["CPUExecutionProvider"])
        x = np.zeros(1, np.float32)
        times = []
        for _ in range(iters + 1):
            t = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        out[label] = 1e3 * float(np.median(times[1:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "runtime_bench.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--aqm", help="an .aqm of MiniLM's ONNX export (default: build one now)")
    args = ap.parse_args()

    import onnx
    from aqformat.runtime import InferenceSession
    from aqformat.runtime.benchmark import compare

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, aqm_path = os.path.join(tmp, "minilm.onnx"), args.aqm or os.path.join(tmp, "minilm.aqm")
        feeds = export_minilm(onnx_path)
        if not args.aqm:
            t0 = time.perf_counter()
            build_aqm(onnx.load(onnx_path), aqm_path, name="all-MiniLM-L6-v2", layout_variety=False)
            print(f"built .aqm in {time.perf_counter() - t0:.1f} s: {os.path.getsize(aqm_path) / 2**20:.1f} MiB "
                  f"(onnx {os.path.getsize(onnx_path) / 2**20:.1f} MiB)")

        resident = InferenceSession(aqm_path)
        weights = resident.weight_bytes
        full = resident.run(None, feeds)
        del resident
        # smallest budget the plan accepts is 2x the embedding table's Gather; use a little more
        budget = int(2.2 * 30522 * 384 * 4)
        streaming = InferenceSession(aqm_path, memory_budget=budget)
        identical = all(np.array_equal(a, b) for a, b in zip(streaming.run(None, feeds), full))
        stages = streaming.num_stages
        del streaming

        results = {"model": "all-MiniLM-L6-v2", "feeds": {k: list(v.shape) for k, v in feeds.items()},
                   "decoded_weight_bytes": weights,
                   "resident": compare(aqm_path, onnx_path, feeds, repeats=args.repeats, iters=args.iters),
                   "streaming": compare(aqm_path, onnx_path, feeds, repeats=args.repeats, iters=args.iters,
                                        memory_budget=budget),
                   "compressed": compare(aqm_path, onnx_path, feeds, repeats=args.repeats, iters=args.iters,
                                         resident="compressed")}
    s = results["streaming"]
    s.update(budget=budget, stages=stages, identical_to_resident=identical)
    o = results["resident"]["onnx"]
    s["rss_above_base"] = s["aqm"]["peak_rss"] - s["aqm"]["base_rss"]
    # activations + ORT overhead: what fp32 ORT needs above its interpreter and its weights
    s["activation_overhead"] = o["peak_rss"] - o["base_rss"] - weights
    s["rss_bound"] = s["aqm_file_bytes"] + budget + s["activation_overhead"]

    results["python_op_ms"] = python_op_cost()
    c = results["compressed"]
    c["rss_above_base_ratio"] = (c["aqm"]["peak_rss"] - c["aqm"]["base_rss"]) / \
        (c["onnx"]["peak_rss"] - c["onnx"]["base_rss"])
    for mode in ("resident", "streaming", "compressed"):
        r = results[mode]
        print(f"\n{mode}:  {'aqm':>10} {'fp32 ORT':>10} {'ratio':>7}")
        for label, key, mult in (("load ms", "load_s", 1e3), ("first output ms", "first_output_s", 1e3),
                                 ("steady ms", "steady_s", 1e3), ("peak RSS MiB", "peak_rss", 2 ** -20),
                                 ("RSS after MiB", "rss_after_first_output", 2 ** -20)):
            print(f"  {label:16}{r['aqm'][key] * mult:10.1f} {r['onnx'][key] * mult:10.1f} {r['ratios'][key]:7.3f}")
    print(f"\nstreaming: {stages} stages, budget {budget / 2**20:.1f} MiB, identical outputs: {identical}; "
          f"RSS above interpreter {s['rss_above_base'] / 2**20:.1f} MiB <= bound {s['rss_bound'] / 2**20:.1f} MiB "
          f"(.aqm + budget + activations/overhead): {s['rss_above_base'] <= s['rss_bound']}")
    print(f"compressed: peak RSS above the interpreter {c['rss_above_base_ratio']:.3f}x fp32 ORT's (target 0.35), "
          f"steady latency {c['ratios']['steady_s']:.2f}x (target 1.5)")
    if results["python_op_ms"]:
        print("onnxruntime-extensions Python operator, ms per call returning: "
              + ", ".join(f"{k} {v:.1f}" for k, v in results["python_op_ms"].items())
              + f" (fp32 ORT's whole run: {c['onnx']['steady_s'] * 1e3:.1f})")
    save_json(args.out, results, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
