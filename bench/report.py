"""bench/results/*.json -> bench/results/RESULTS.md, PNG charts (one per model, decode throughput,
memory over time), README section.

Usage: python -m bench.report [--results bench/results] [--readme README.md]

Everything printed comes from the JSON files written by bench/run.py and
the other bench scripts; only the text between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` of the README is replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from bench.baselines import INT8

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MODEL_FILES = ("minilm", "silero_vad_16k_op15", "silero_vad", "digits", "efficientnet_lite0", "ddddocr")
# Metrics where smaller is better; all others are "higher is better".
LOWER_BETTER = {"max_abs_diff", "mean_abs_diff", "kl"}
NNCODEC_TARGET = 0.9  # ONNX models: .aqm at most this fraction of NNCodec's bits at equal fidelity
WHOLE_FILE_TARGET = 8.0  # EfficientNet-Lite0: whole .aqm file this many times smaller than the .onnx
WHOLE_FILE_TARGET_UNTUNED = 6.0  # ... and this many times without fine-tuning
# models whose fine-tuned .aqm must reach a whole-file ratio at an absolute primary metric
FINETUNED_TARGETS = {"EfficientNet-Lite0": (10.0, 0.95)}
FOUR_BIT = ("int4-g128", "kmeans4", "ort-matmul-4bits")
AQM_4BIT_MAX = 4.3   # an .aqm file "at <= 4 bits" may carry scales/codebooks up to this
AQM_3BIT_MAX = 3.3
TIE = 0.002          # "matches": within this of the reference metric


def save_json(path: str, data: Any, indent: int = 1) -> None:
    """Write one bench script's results to ``path``, making its folder first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)


def load(folder: str) -> tuple[dict[str, dict], dict[str, Any]]:
    """Model result files and the other JSON files (systems, container, ...)."""
    models, other = {}, {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            data = json.load(f)
        stem = name[:-5]
        (models if stem in MODEL_FILES else other)[stem] = data
    models = {k: models[k] for k in MODEL_FILES if k in models}
    return models, other


def ok_rows(data: dict) -> list[dict]:
    return [r for r in data.get("rows", []) if "error" not in r]


def better(a: float, b: float, metric: str) -> bool:
    """``a`` is at least as good as ``b`` (within :data:`TIE`)."""
    return a <= b + TIE if metric in LOWER_BETTER else a >= b - TIE


def _f(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        return f"{v:.{nd}f}"
    return str(v)


def _label(r: dict) -> str:
    return f"{r['method']} ({r['setting']})" if r.get("setting") else r["method"]


# ------------------------------------------------------------------ comparisons

def nncodec_bits_at(data: dict, value: float) -> tuple[float, str] | None:
    """NNCodec bits/weight needed to reach primary-metric ``value``, and how it was found.

    NNCodec's points, sorted by size, are made monotone (the best fidelity
    reached at that size or less), then interpolated linearly in bits.
    Returns ``(bits, "interpolated")``, ``(bits, "at most")`` when even its
    smallest file is as good, or None when no NNCodec file reaches ``value``.
    """
    m = data["primary"]
    sign = -1.0 if m in LOWER_BETTER else 1.0
    pts = sorted((r["bits_per_weight"], sign * r["metrics"][m]) for r in ok_rows(data)
                 if r["method"] == "nncodec")
    target, env, best = sign * value, [], float("-inf")
    for bits, fid in pts:
        best = max(best, fid)
        env.append((bits, best))
    for i, (bits, fid) in enumerate(env):
        if fid >= target:
            if i == 0:
                return bits, "at most"
            (b0, f0) = env[i - 1]
            return b0 + (target - f0) * (bits - b0) / (fid - f0), "interpolated"
    return None


def checks(data: dict) -> dict[str, Any]:
    """The three headline questions, answered from the rows of one model."""
    m = data["primary"]
    rows = ok_rows(data)
    aqm = [r for r in rows if r["method"].startswith("aqm")]
    out: dict[str, Any] = {}
    cand4 = [r for r in aqm if r["bits_per_weight"] <= AQM_4BIT_MAX]
    base4 = [r for r in rows if r["method"] in FOUR_BIT]
    if cand4 and base4:
        best = max(cand4, key=lambda r: r["metrics"][m] * (-1 if m in LOWER_BETTER else 1))
        out["aqm<=4 bits at least as good as every 4-bit baseline"] = {
            "answer": all(better(best["metrics"][m], r["metrics"][m], m) for r in base4), "aqm": f"{best['bits_per_weight']:.2f} b/w, {m}={best['metrics'][m]:.4f}",
            "baselines": {r["method"]: f"{r['bits_per_weight']:.2f} b/w, {m}={r['metrics'][m]:.4f}" for r in base4}}
    cand3 = [r for r in aqm if r["bits_per_weight"] <= AQM_3BIT_MAX]
    int4 = [r for r in rows if r["method"] == "int4-g128"]
    if cand3 and int4:
        best = max(cand3, key=lambda r: r["metrics"][m] * (-1 if m in LOWER_BETTER else 1))
        out["aqm<=3 bits matches int4-g128"] = {
            "answer": better(best["metrics"][m], int4[0]["metrics"][m], m),
            "aqm": f"{best['bits_per_weight']:.2f} b/w, {m}={best['metrics'][m]:.4f}",
            "int4-g128": f"{int4[0]['bits_per_weight']:.2f} b/w, {m}={int4[0]['metrics'][m]:.4f}"}
    ratios = []
    for r in aqm:
        found = nncodec_bits_at(data, r["metrics"][m])
        if found:
            ratios.append({"aqm": _label(r), "aqm_bits": r["bits_per_weight"], "nncodec_bits": found[0],
                           "how": found[1], "ratio": r["bits_per_weight"] / found[0], m: r["metrics"][m]})
        else:
            ratios.append({"aqm": _label(r), "aqm_bits": r["bits_per_weight"], "nncodec_bits": None,
                           "how": "no NNCodec file reaches it", "ratio": None, m: r["metrics"][m]})
    if any(x["method"] == "nncodec" for x in rows):
        out["aqm vs NNCodec at equal fidelity"] = {
            "answer": any(x["ratio"] is None or x["ratio"] < 1.0 for x in ratios),
            "points": ratios,
            "note": "aqm size / NNCodec size at the same primary metric; < 1 means .aqm is smaller"}
        if data.get("onnx_source"):
            out[f"aqm <= {NNCODEC_TARGET}x NNCodec at every rate"] = {
                "answer": all(x["ratio"] is None or x["ratio"] <= NNCODEC_TARGET for x in ratios),
                "worst": max((x["ratio"] for x in ratios if x["ratio"] is not None), default=None)}
    out.update(_onnx_checks(data, rows, aqm))
    return out


def _onnx_checks(data: dict, rows: list[dict], aqm: list[dict]) -> dict[str, Any]:
    """Targets of the ONNX models: EfficientNet's whole-file size at int8's top-1, MiniLM from ONNX
    within :data:`TIE` of the Hugging Face path at each rate."""
    m, out = data["primary"], {}
    int8 = [r for r in rows if r["method"] == INT8]
    if data.get("onnx_file_bytes") and int8:
        for target, rows_in in ((WHOLE_FILE_TARGET, aqm), (WHOLE_FILE_TARGET_UNTUNED,
                                                           [r for r in aqm if r["method"] != "aqm+finetune"])):
            ok = [r for r in rows_in if r.get("whole_file_ratio", 0) >= target
                  and better(r["metrics"][m], int8[0]["metrics"][m], m)]
            best = max(rows_in, key=lambda r: (better(r["metrics"][m], int8[0]["metrics"][m], m),
                                               r.get("whole_file_ratio", 0)), default=None)
            tuned = "" if target == WHOLE_FILE_TARGET else " without fine-tuning"
            out[f"whole file >= {target:g}x smaller{tuned} with {m} >= int8 per-channel's"] = {
                "answer": bool(ok), "int8_per_channel": f"{m}={int8[0]['metrics'][m]:.4f}",
                "best_aqm": None if best is None else
                f"{_label(best)}: {best.get('whole_file_ratio', 0):.2f}x whole file, {m}={best['metrics'][m]:.4f}"}
    out.update(_finetuned_check(data, aqm))
    hf = {r["setting"].split("-bit")[0]: r for r in aqm if "from ONNX" not in r.get("setting", "")}
    pairs = []
    for r in aqm:
        if "from ONNX" in r.get("setting", ""):
            bits, tuned = r["setting"].split("-bit")[0], "distillation" in r["setting"]
            ref = [h for h in aqm if "from ONNX" not in h.get("setting", "") and h["setting"].startswith(bits + "-bit")
                   and ("distillation" in h["setting"]) == tuned]
            if ref:
                pairs.append((_label(r), r["metrics"][m] - ref[0]["metrics"][m]))
    if pairs and hf:
        out[f"ONNX source within {TIE} {m} of the Hugging Face path"] = {
            "answer": all(d >= -TIE for _, d in pairs), "differences": {k: round(d, 4) for k, d in pairs}}
    return out


def _finetuned_check(data: dict, aqm: list[dict]) -> dict[str, Any]:
    """The fine-tuned file's target of :data:`FINETUNED_TARGETS`, where the model has one."""
    m = data["primary"]
    target = next((t for k, t in FINETUNED_TARGETS.items() if data.get("model", "").startswith(k)), None)
    tuned = [r for r in aqm if r["method"] == "aqm+finetune"]
    if target is None or not tuned:
        return {}
    ratio, value = target
    best = max(tuned, key=lambda r: (r.get("whole_file_ratio", 0) >= ratio, r["metrics"][m]))
    return {f"whole file >= {ratio:g}x smaller after fine-tuning with {m} >= {value:g}": {
        "answer": any(r.get("whole_file_ratio", 0) >= ratio and better(r["metrics"][m], value, m) for r in tuned),
        "best_aqm": f"{_label(best)}: {best.get('whole_file_ratio', 0):.2f}x whole file, {m}={best['metrics'][m]:.4f}"}}


# ------------------------------------------------------------------ Markdown

def model_table(data: dict) -> list[str]:
    names = list(data["metrics"])
    head = ["method", "setting", "bits/weight", "bytes", "x vs fp32", "weight SQNR dB", *names,
            "compress s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(data.get("rows", []), key=lambda r: (r.get("family") != "aqm", -r.get("bits_per_weight", 0)))
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | **did not run**: {r['error']} |" + " |" * (len(head) - 2))
            continue
        ratio = 32.0 / r["bits_per_weight"]
        lines.append("| " + " | ".join([
            f"**{r['method']}**" if r["method"].startswith("aqm") else r["method"], r.get("setting", ""),
            f"{r['bits_per_weight']:.3f}", f"{r['bytes_counted']:,}", f"{ratio:.1f}",
            _f(r.get("sqnr_db"), 2), *[_f(r["metrics"].get(k)) for k in names], _f(r.get("seconds"), 1)]) + " |")
    return lines


def check_lines(data: dict) -> list[str]:
    out = []
    for q, c in checks(data).items():
        yes = "yes" if c["answer"] else "**no**"
        detail = {k: v for k, v in c.items() if k != "answer"}
        if q.startswith("aqm vs NNCodec"):
            pts = "; ".join(
                f"{p['aqm']} {p['aqm_bits']:.2f} b/w vs NNCodec "
                + (f"{'<= ' if p['how'] == 'at most' else ''}{p['nncodec_bits']:.2f} b/w ({p['ratio']:.2f}x)"
                   if p["ratio"] is not None else "never as good (.aqm smaller and better)")
                for p in c["points"])
            out.append(f"- {q}: {yes} — .aqm vs NNCodec bits/weight at equal {data['primary']}: {pts}")
        else:
            out.append(f"- {q}: {yes} — {json.dumps(detail)}")
    return out


def machine_line(info: dict) -> str:
    threads = f" ({info['threads']} threads used)" if "threads" in info else ""
    return (f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores{threads}, {info.get('ram_gib', '?')} GiB RAM, "
            f"Python {info.get('python', '?')}, {info.get('date', '?')}, mode `{info.get('mode', '?')}`")


def systems_lines(models: dict[str, dict], other: dict[str, Any]) -> list[str]:
    out = ["## Systems", ""]
    c = other.get("container")
    if c:
        out += ["### AQ decode throughput vs memcpy of the fp32 output (one thread; kernel: numba)", "",
                "| code bits | d | M | memcpy GB/s | numpy / memcpy | kernel / memcpy | kernel, by threads |",
                "|---|---|---|---|---|---|---|"]
        for r in c.get("decode", []):
            curve = " ".join(f"{n}: {v['ratio_to_memcpy']:.2f}x" for n, v in r.get("threads", {}).items())
            kernel = f"{r['kernel_ratio_to_memcpy']:.2f}" if "kernel_ratio_to_memcpy" in r else "-"
            out.append(f"| {r['bits']} | {r['d']} | {r['M']} | {r['memcpy_GBps']:.2f} | "
                       f"{r.get('numpy_ratio_to_memcpy', r['ratio_to_memcpy']):.2f} | {kernel} | {curve or '-'} |")
        if c.get("kernel_compile"):
            k = c["kernel_compile"]
            out += ["", f"Decode kernel compile time in a fresh process: {k['cold_cache_s']:.2f} s with an empty "
                    f"cache, {k['warm_cache_s']:.2f} s loading the cached kernel."]
        out += ["", "| file MB | open() ms | RSS delta MB |", "|---|---|---|"]
        out += [f"| {r['file_mb']} | {r['open_s'] * 1e3:.2f} | {r['rss_delta_bytes'] / 1e6:.2f} |"
                for r in c.get("open", [])]
        out += ["", "![decode throughput](decode.png)", ""] if c.get("decode") else [""]
    cb = other.get("compressed")
    if cb and "targets" in cb:
        lat, t = cb["latency"], cb["targets"]
        out += [f"### Torch with weights kept compressed ({cb['model']}, `python -m bench.compressed_bench`)", "",
                "| | fp32 torch | decoded | compressed | compressed / fp32 |", "|---|---|---|---|---|"]
        for b, target in (("1", "1.3"), ("8", "1.5")):
            r = lat[f"batch{b}"]
            out.append(f"| latency ms, {b} sentence(s) | {r['fp32'] * 1e3:.2f} | {r['decoded'] * 1e3:.2f} | "
                       f"{r['compressed'] * 1e3:.2f} | {r['compressed'] / r['fp32']:.2f}x (target <= {target}x) |")
        above = t["rss_above_base"]
        out += [f"| peak RSS above the interpreter, MB | {above['fp32'] / 1e6:.1f} | {above['decoded'] / 1e6:.1f} | "
                f"{above['compressed'] / 1e6:.1f} | bound .aqm + activations + 30 MB = {t['rss_bound'] / 1e6:.1f}: "
                f"{'met' if t['rss_met'] else 'not met'} |", "",
                "![memory over time on torch](memory_torch.png)", ""]
    rb = other.get("runtime_bench")
    if rb:
        out += [f"### Runtime: .aqm InferenceSession vs fp32 ONNX Runtime ({rb.get('model', '')})", "",
                "| mode | load s | first output s | steady s | peak RSS MB | ratios (.aqm / fp32 ORT) |",
                "|---|---|---|---|---|---|"]
        for mode in ("resident", "streaming"):
            r = rb.get(mode)
            if not isinstance(r, dict) or "aqm" not in r:
                continue
            for v in ("aqm", "onnx"):
                x = r[v]
                ratios = ", ".join(f"{k} {val:.2f}" for k, val in r.get("ratios", {}).items()) if v == "aqm" else ""
                out.append(f"| {mode} {v} | {x['load_s']:.3f} | {x['first_output_s']:.3f} | {x['steady_s']:.3f} | "
                           f"{x['peak_rss'] / 1e6:.0f} | {ratios} |")
        out.append("")
        if "rss_trace" in rb.get("resident", {}).get("aqm", {}):
            out += ["![memory over time](memory.png)", ""]
    if other.get("device"):
        out += _device_lines(other["device"])
    out += ["### .aqm container overhead (header + alignment padding) per file", "",
            "| model | file | file bytes | overhead |", "|---|---|---|---|"]
    for key, data in models.items():
        for r in ok_rows(data):
            if "overhead_fraction" in r:
                out.append(f"| {key} | {r['file']} | {r['file_total_bytes']:,} | {100 * r['overhead_fraction']:.3f}% |")
    out += ["", "### Compression time vs faiss (same M, K, d; weight SQNR shows the quality reached)", "",
            "| model | method | setting | bits/weight | weight SQNR dB | seconds |", "|---|---|---|---|---|---|"]
    for key, data in models.items():
        for r in ok_rows(data):
            if r["method"] in ("aqm", "faiss-rq", "faiss-lsq"):
                out.append(f"| {key} | {r['method']} | {r['setting']} | {r['bits_per_weight']:.3f} | "
                           f"{_f(r.get('sqnr_db'), 2)} | {r['seconds']:.1f} |")
    sysd = other.get("systems", {}).get("scripts", {})
    if sysd:
        out += ["", "### Other bench scripts run by bench/run.py", "", "| script | status | seconds | output |",
                "|---|---|---|---|"]
        for s, rec in sysd.items():
            tail = rec.get("json_file") or ("<br>".join(rec.get("stdout_tail", [])[-4:]).replace("|", "/") or "-")
            out.append(f"| {s} | {rec['status']} | {_f(rec.get('seconds'), 1)} | {tail} |")
    return out + [""]


def _device_lines(dv: dict) -> list[str]:
    """bench/device_bench.py's results: AQ codes on a GPU against fp16 weights."""
    out = [f"### Codes on a GPU ({dv['name']}, torch {dv['torch']}, `python -m bench.device_bench`)", "",
           "Decode: every weight to fp32 by the Triton kernel, time against a pinned host-to-device copy of the "
           "fp16 weights. Products: ratio of time to cuBLAS fp16 with decoded weights (eager, one launch per "
           "weight; `graph`: the batch-1 products replayed as one CUDA graph).", "",
           "| weights | codes | decode GB/s (Triton / torch ops) | decode time / fp16 copy time | T=1 table "
           "| T=1 table, graph | T=1 fp16 graph us | T=8 table | T=8 decode+GEMM | T=64 decode+GEMM |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in dv["sets"].items():
        name, codes = key.split()
        m, gb = r["matvec"], 4 * r["weights"] / 1e9
        one, eight, big = m["1"], m["8"], m["64"]
        out.append(f"| {name} ({r['weights'] / 1e6:.1f}M) | {codes} | {gb / r['decode_triton_s']:.0f} / "
                   f"{gb / r['decode_torch_s']:.0f} | {r['decode_triton_s'] / r['h2d_fp16_s']:.3f} | "
                   f"{one['triton_lut_s'] / one['fp16_s']:.2f}x | "
                   f"{one['graph_triton_lut_s'] / one['graph_fp16_s']:.2f}x | {one['graph_fp16_s'] * 1e6:.0f} | "
                   f"{eight['triton_lut_s'] / eight['fp16_s']:.2f}x | "
                   f"{eight['triton_gemm_s'] / eight['fp16_s']:.2f}x | "
                   f"{big['triton_gemm_s'] / big['fp16_s']:.2f}x |")
    mm = dv.get("minilm")
    if mm:
        out += ["", f"MiniLM end to end on the GPU ({mm['sequence_tokens']} tokens a sequence, eager):", "",
                "| weights | 1 sequence ms | 8 sequences ms | min cosine to fp32-decoded |", "|---|---|---|---|"]
        for v in ("decoded_fp32", "decoded_fp16", "compressed"):
            r = mm[v]
            out.append(f"| {v.replace('_', ' ')} | {r['latency_1_s'] * 1e3:.2f} | {r['latency_8_s'] * 1e3:.2f} | "
                       f"{r['cosine_to_fp32']:.6f} |")
    return out + [""]


def results_md(models: dict[str, dict], other: dict[str, Any]) -> str:
    info = next((d["machine"] for d in models.values() if "machine" in d), {})
    out = ["# Benchmark results", "", f"Generated by `bench/report.py` from `bench/results/*.json` "
           f"(written by `bench/run.py`). Machine: {machine_line(info)}. Each model's section says when "
           "it was measured.", "",
           "Bits/weight count every byte of the file that holds the covered weights "
           "(.aqm: the whole file minus raw tensors that are not covered and the embedded graph, "
           "so header, padding, codebooks, codes, scales are all charged; baselines: their whole file; "
           "ONNX Runtime quantizers: the initializers derived from the covered weights). "
           "`x vs fp32` = 32 / bits per weight.", ""]
    for key, data in models.items():
        out += [f"## {data['model']}", ""]
        if "error" in data and not data.get("rows"):
            out += [f"Did not run: {data['error']}", ""]
            continue
        extra = {k: data[k] for k in ("task", "covered", "params", "eval_sentences", "calib_sentences",
                                      "frames", "speech_frames_ref", "audio", "audio_seconds", "test_images",
                                      "reference", "eval_crops", "calib_crops", "calibration_s",
                                      "calib_chunks", "text_images") if k in data}
        out += [", ".join(f"{k}: {_f(v, 1) if isinstance(v, float) else v}" for k, v in extra.items()), "",
                _run_line(data), "",
                "Metrics: " + "; ".join(f"`{k}` {v}" for k, v in data["metrics"].items()), ""]
        out += model_table(data) + [""]
        out += [f"![{key}]({key}.png)", ""]
        out += check_lines(data) + [f"- {n}" for n in data.get("notes", [])] + _timing_lines(data) + [""]
    out += systems_lines(models, other)
    return "\n".join(out)


def _run_line(data: dict) -> str:
    """When and how a model's rows were measured: the models of one report may come from different runs."""
    info = data.get("machine", {})
    return f"Measured {info.get('date', '?')}, mode `{info.get('mode', '?')}`."


def _timing_lines(data: dict) -> list[str]:
    """Calibration and fine-tuning time of the .aqm rows, and what a conversion could not use."""
    out = []
    if data.get("calibration_s") is not None:
        out.append(f"- calibration (X^T X through ONNX Runtime, every covered weight): "
                   f"{data['calibration_s']:.1f} s")
    for r in ok_rows(data):
        if r.get("finetune_s") is not None:
            out.append(f"- fine-tuning of {_label(r)}: {r['finetune_s']:.1f} s")
        if r.get("not_used"):
            out.append(f"- {_label(r)}, not used: {'; '.join(r['not_used'])}")
    return out


# ------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, folder: str, name: str) -> str:
    path = os.path.join(folder, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_decode(container: dict, folder: str) -> str | None:
    """Decode throughput per code layout beside memcpy of the same output (decode.png)."""
    rows = container.get("decode", [])
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"M={r['M']} K=2^{r['bits']} d={r['d']}\n{r['M'] * r['bits'] / r['d']:g} bits/weight" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.27 for i in x], [r.get("numpy_GBps", r["decode_GBps"]) for r in rows], 0.27, color="salmon",
           label="AQ decode (numpy)")
    ax.bar(list(x), [r.get("kernel_GBps", 0.0) for r in rows], 0.27, color="crimson", label="AQ decode (kernel)")
    ax.bar([i + 0.27 for i in x], [r["memcpy_GBps"] for r in rows], 0.27, color="grey", label="memcpy, same output")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GB/s of fp32 output")
    ax.set_ylim(0, 1.25 * max(r["memcpy_GBps"] for r in rows))
    ax.set_title("Decode throughput vs memcpy (one thread)")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "decode")


def plot_memory(runtime_bench: dict, folder: str) -> str | None:
    """RSS over time from the start of loading through six inferences (memory.png)."""
    series = [(f"{mode} {v}", runtime_bench[mode][v]) for mode, v in
              (("resident", "onnx"), ("resident", "aqm"), ("streaming", "aqm"), ("compressed", "aqm"))
              if "rss_trace" in runtime_bench.get(mode, {}).get(v, {})]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    styles = {"resident onnx": dict(color="grey"), "resident aqm": dict(color="crimson"),
              "streaming aqm": dict(color="crimson", ls="--"), "compressed aqm": dict(color="navy")}
    for label, r in series:
        t, rss = zip(*r["rss_trace"])
        name = {"resident onnx": "fp32 ONNX Runtime", "resident aqm": "resident .aqm", "streaming aqm": "streaming .aqm",
                "compressed aqm": ".aqm, resident='compressed'"}[label]
        ax.plot(t, [(b - r["base_rss"]) / 2**20 for b in rss], label=name, **styles[label])
    return _finish_memory_plot(fig, ax, folder, "memory", f"Memory over time: {runtime_bench.get('model', '')}",
                               "seconds from the start of loading (load, first inference, five more)")


def _finish_memory_plot(fig, ax, folder: str, name: str, title: str, xlabel: str) -> str:
    """Axes, legend and grid shared by the RSS-over-time plots; saves ``name``.png."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("RSS above the interpreter, MiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, folder, name)


def plot_torch_memory(compressed: dict, folder: str) -> str | None:
    """MiniLM on torch: RSS over time for fp32, resident decoded and resident compressed (memory_torch.png)."""
    load = compressed.get("load", {})
    if not load:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    styles = {"fp32": ("fp32 torch", dict(color="grey")),
              "decoded": ("load_torch, weights decoded", dict(color="crimson", ls="--")),
              "compressed": ("load_torch, resident='compressed'", dict(color="crimson"))}
    for v, (label, style) in styles.items():
        if v in load:
            t, rss = zip(*load[v]["rss_trace"])
            ax.plot(t, [(b - load[v]["base_rss"]) / 2**20 for b in rss], label=label, **style)
    ax.axhline(compressed["aqm_bytes"] / 2**20, color="black", lw=0.8, ls=":", label=".aqm file size")
    return _finish_memory_plot(fig, ax, folder, "memory_torch",
                               f"Memory over time on torch: {compressed.get('model', '')}",
                               "seconds from the start of loading (load, then 1- and 8-sentence runs)")


def plot(key: str, data: dict, folder: str) -> str | None:
    """Fidelity (primary and secondary metric) vs bits/weight for every method."""
    rows = [r for r in ok_rows(data) if r["bits_per_weight"] <= 17]
    if not rows:
        return None
    plt = _pyplot()
    mets = [data["primary"], data.get("secondary")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    markers = "os^vD<>ph*Xd8P"
    for ax, m in zip(axes, mets):
        if not m:
            ax.axis("off")
            continue
        for i, (meth, rs) in enumerate(sorted(by_method.items())):
            rs = sorted(rs, key=lambda r: r["bits_per_weight"])
            style = dict(lw=2.5, ms=9, color="crimson") if meth.startswith("aqm") else dict(lw=1, ms=6)
            ax.plot([r["bits_per_weight"] for r in rs], [r["metrics"][m] for r in rs],
                    marker=markers[i % len(markers)], label=meth, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per weight (counted from files on disk)")
        ax.set_ylabel(m + (" (lower is better)" if m in LOWER_BETTER else ""))
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{data['model']}: {data['primary']} vs size")
    axes[0].legend(fontsize=7, loc="best")
    return _save(fig, folder, key)


# ------------------------------------------------------------------ README

def _readme_image(folder: str, name: str, alt: str) -> list[str]:
    """The README's embed of ``folder/name.png`` when the plot was drawn."""
    path = os.path.join(folder, f"{name}.png")
    return [f"![{alt}]({os.path.relpath(path, ROOT)})", ""] if os.path.exists(path) else []


def _finetune_table(folder: str) -> list[str]:
    """The fine-tuning comparison of ``folder/FINETUNE.md`` (``bench/finetune_bench.py``), if run."""
    path = os.path.join(folder, "FINETUNE.md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        table = [line for line in f.read().splitlines() if line.startswith("|")]
    return [f"**Fine-tuning**: no fine-tuning vs distillation vs task loss, from "
            f"[{os.path.relpath(path, ROOT)}]({os.path.relpath(path, ROOT)}) "
            "(`python -m bench.finetune_bench`)", "", *table, ""]


def readme_section(models: dict[str, dict], folder: str) -> str:
    info = next((d["machine"] for d in models.values() if "machine" in d), {})
    out = ["", f"Measured by `make bench` on {machine_line(info)} (each model's date: RESULTS.md); full tables, "
           "systems figures and plots: "
           "[bench/results/RESULTS.md](bench/results/RESULTS.md). Bits/weight count every byte of the "
           "files on disk over the weights they cover.", ""]
    for key, data in models.items():
        rows = ok_rows(data)
        if not rows:
            continue
        m, s = data["primary"], data.get("secondary")
        out += [f"**{data['model']}** ({data.get('covered', '')}; {m}" + (f", {s}" if s else "") + ")", "",
                f"| method | bits/weight | {m} |" + (f" {s} |" if s else ""), "|---|---|---|" + ("---|" if s else "")]
        for r in sorted(rows, key=lambda r: (not r["method"].startswith("aqm"), r["bits_per_weight"])):
            if r["method"] in ("faiss-lsq", "fp16"):
                continue
            out.append(f"| {'**' + _label(r) + '**' if r['method'].startswith('aqm') else _label(r)} | "
                       f"{r['bits_per_weight']:.2f} | {_f(r['metrics'][m])} |" +
                       (f" {_f(r['metrics'].get(s))} |" if s else ""))
        out += [""] + _readme_image(folder, key, f"{data['model']}: fidelity vs bits/weight")
        out += check_lines(data) + [""]
    out += _finetune_table(folder)
    out += _readme_image(folder, "decode", "decode throughput vs memcpy")
    out += _readme_image(folder, "memory", "memory over time, .aqm vs fp32 ONNX Runtime")
    out += _readme_image(folder, "memory_torch", "memory over time on torch: fp32, decoded, compressed")
    return "\n".join(out)


def update_readme(path: str, section: str) -> bool:
    """Replace the text between the bench markers; False if the markers are missing."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        text = f.read()
    a, b = text.find(BEGIN), text.find(END)
    if a < 0 or b < a:
        return False
    new = text[:a + len(BEGIN)] + "\n" + section.strip("\n") + "\n" + text[b:]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = ap.parse_args(argv)
    models, other = load(args.results)
    if not models:
        print(f"no model results in {args.results}; run bench/run.py first", file=sys.stderr)
        return 1
    plots = [plot(key, data, args.results) for key, data in models.items()]
    plots += [plot_decode(other.get("container", {}), args.results),
              plot_memory(other.get("runtime_bench", {}), args.results),
              plot_torch_memory(other.get("compressed", {}), args.results)]
    md = os.path.join(args.results, "RESULTS.md")
    with open(md, "w") as f:
        f.write(results_md(models, other))
    print(f"wrote {os.path.relpath(md, ROOT)} and {sum(p is not None for p in plots)} plot(s)")
    if update_readme(args.readme, readme_section(models, args.results)):
        print(f"updated the benchmark section of {os.path.relpath(args.readme, ROOT)}")
    else:
        print(f"{args.readme}: no {BEGIN}/{END} markers; README left unchanged", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
