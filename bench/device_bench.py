"""Compressed weights on a torch device (a GPU): decode speed, products from codes, and MiniLM end to end.

Weights with random codes and Gaussian codebooks, in two shape sets and two
code configurations (``2x8``: 2 codebooks of 256 codewords over 8-vectors,
2 bits/weight; ``4x8``: 4 of them, the 4-bit setting MiniLM uses):

- ``minilm``: MiniLM's 36 encoder matrices (6 layers of 384x384 x4, 1536x384, 384x1536);
- ``llama``: one Llama-7B block (4096x4096 x4, 11008x4096 x2, 4096x11008), 202M weights.

For each, on ``--device`` (medians of ``--iters`` synchronised runs after a warm-up):

- **decode**: every weight decoded, in GB/s of float32 produced, by the Triton
  kernel and by the torch operations, against a host-to-device copy of the
  same weights in float16 from pinned memory (what loading decoded fp16
  weights costs);
- **matvec**: ``T`` input rows times every weight from codes (the Triton
  lookup-table kernel, Triton decode + GEMM, torch decode + GEMM) against
  the products with the decoded weights in float16 and float32 (cuBLAS).
  At ``T = 1`` the same products are also replayed as one CUDA graph, which
  takes the launch and Python costs out.

With ``--minilm-aqm FILE --minilm-config config.json`` it also runs
all-MiniLM-L6-v2 (the model built from its config, the weights from the
.aqm) with the weights decoded to fp32, to fp16, and compressed-resident
(``load_torch(..., resident="compressed")``): latency for one sequence and
8, and the cosine of the outputs to the
decoded model's.

On the CPU it runs as a smoke test of the same code (the CPU's products use
the compiled kernels instead; see bench/compressed_bench.py). Run::

    .venv/bin/python -m bench.device_bench --device cuda [--minilm-aqm F --minilm-config DIR] \
        [--out bench/results/device.json]

On the H200 this ran with a MiniLM file from ``bench.compressed_bench.convert``
and the package's config.json: the device has no copy of the model's package.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from aqformat.runtime import aq_weight_torch, triton_kernels
from aqformat.runtime.aq_weight import AQWeight
from aqformat.runtime.aq_weight_torch import DeviceAQWeight
from bench.report import save_json

SHAPE_SETS = {"minilm": [(384, 384)] * 4 * 6 + [(1536, 384), (384, 1536)] * 6,
              "llama": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]}
CONFIGS = {"2x8": (2, 256, 8), "4x8": (4, 256, 8)}
BATCHES = (1, 2, 4, 8, 16, 64)
LUT_BLOCKS = [(r, c) for r in (4, 8, 16, 32) for c in (32, 64)]  # (rows, chunks) per program, timed at T = 1


def weights(shapes: list[tuple[int, int]], M: int, K: int, d: int, device: torch.device,
            seed: int = 0) -> list[DeviceAQWeight]:
    """AQ weights of ``shapes`` with random codes, one shared Gaussian codebook group, on ``device``."""
    rng = np.random.default_rng(seed)
    cb = (rng.standard_normal((M, K, d)) * 0.02).astype(np.float32)
    out = []
    for rows, cols in shapes:
        codes = rng.integers(0, K, (rows * cols // d, M), dtype=np.uint8)
        out.append(DeviceAQWeight.from_weight(AQWeight(codes, cb, None, None, None, rows, cols, (rows, cols)),
                                              device))
    return out


def timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median seconds of ``fn`` (after one warm-up run), synchronising the device around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def graph_timed(fn: Callable[[], object], device: torch.device, iters: int) -> float | str:
    """Median seconds of one replay of ``fn`` captured as a CUDA graph (or why it could not be captured)."""
    if device.type != "cuda":
        return "not a CUDA device"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up outside the capture: Triton compiles, cuBLAS picks its kernels
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # a path that cannot be captured is reported, not fatal
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return timed(graph.replay, device, iters)


@contextlib.contextmanager
def _setting(module: object, **values: int) -> Iterator[None]:
    """Module constants (the Triton path's threshold and block sizes) set for one measurement."""
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def measure_set(shapes: list[tuple[int, int]], config: str, device: torch.device, iters: int) -> dict:
    """Decode and products of one shape set in one code configuration (see the module docstring)."""
    ws = weights(shapes, *CONFIGS[config], device)
    plain = [dataclasses.replace(w, triton=False) for w in ws]
    triton = ws[0].triton
    values = sum(r * c for r, c in shapes)
    host = torch.empty(values, dtype=torch.float16, pin_memory=device.type == "cuda")
    res: dict = {"weights": values, "code_bytes": sum(w.codes.numel() for w in ws), "triton": triton,
                 "h2d_fp16_s": timed(lambda: host.to(device, non_blocking=True), device, iters),
                 "decode_torch_s": timed(lambda: [w.decode() for w in plain], device, iters)}
    if triton:
        res["decode_triton_s"] = timed(lambda: [w.decode() for w in ws], device, iters)
        assert all(torch.equal(a.decode(), b.decode()) for a, b in zip(ws[:3], plain[:3]))
    best = res.get("decode_triton_s", res["decode_torch_s"])
    res["decode_GB_per_s"] = 4 * values / best / 1e9
    res["h2d_fp16_GB_per_s"] = 2 * values / res["h2d_fp16_s"] / 1e9
    dense16 = [w.decode().half() for w in ws]
    dense32 = [w.decode() for w in ws]
    res["matvec"] = {}
    for T in BATCHES:
        xs = {c: torch.randn(T, c, device=device) for c in {c for _, c in shapes}}
        xs16 = {c: x.half() for c, x in xs.items()}
        fp16 = lambda: [torch.nn.functional.linear(xs16[d.shape[1]], d) for d in dense16]  # noqa: E731
        row = {"fp16_s": timed(fp16, device, iters),
               "fp32_s": timed(lambda: [torch.nn.functional.linear(xs[d.shape[1]], d) for d in dense32], device, iters),
               "torch_s": timed(lambda: [w.times_rows(xs[w.host.cols]) for w in plain], device, iters)}
        if triton:
            lut = lambda: [w.times_rows(xs[w.host.cols]) for w in ws]  # noqa: E731
            with _setting(aq_weight_torch, TRITON_LUT_MAX_GATHERS=T * CONFIGS[config][0]):
                row["triton_lut_s"] = timed(lut, device, iters)
                want, got = dense32[0] @ xs[shapes[0][1]].T, ws[0].times_rows(xs[shapes[0][1]]).T
                row["triton_lut_max_rel_err"] = float((got - want).abs().max() / want.abs().max())
                if T == 1:
                    row["graph_triton_lut_s"] = graph_timed(lut, device, iters)
                    for r, c in LUT_BLOCKS:
                        with _setting(triton_kernels, LUT_BLOCK_ROWS=r, LUT_BLOCK_CHUNKS=c):
                            row[f"graph_triton_lut_{r}x{c}_s"] = graph_timed(lut, device, iters)
            with _setting(aq_weight_torch, TRITON_LUT_MAX_GATHERS=0):
                row["triton_gemm_s"] = timed(lut, device, iters)
        if T == 1:
            row["graph_fp16_s"] = graph_timed(fp16, device, iters)
        res["matvec"][T] = row
    del dense16, dense32
    return res


def measure_minilm(aqm: str, config: str, device: torch.device, iters: int) -> dict:
    """all-MiniLM-L6-v2 from ``aqm`` on ``device``: decoded to fp32, decoded to fp16, compressed-resident
    (cosines are to the fp32-decoded outputs)."""
    from transformers import AutoConfig

    from aqformat.runtime import load_torch
    from bench.compressed_bench import skeleton
    cfg = AutoConfig.from_pretrained(config)
    gen = torch.Generator().manual_seed(0)
    inputs = {n: {"input_ids": torch.randint(1000, cfg.vocab_size, (n, 32), generator=gen).to(device)} for n in (1, 8)}
    out: dict = {"aqm": aqm, "sequence_tokens": 32}
    ref = None
    for variant in ("decoded_fp32", "decoded_fp16", "compressed"):
        model = skeleton(cfg)
        load_torch(aqm, model, lazy=False, strict=False, device=device,
                   resident="compressed" if variant == "compressed" else "decoded")
        model = model.to(device)  # the rebuilt buffers, which no file holds
        model = (model.half() if variant == "decoded_fp16" else model).eval()
        row: dict = {}
        with torch.no_grad():
            for n, inp in inputs.items():
                row[f"latency_{n}_s"] = timed(lambda: model(**inp), device, iters)
            y = model(**inputs[8]).last_hidden_state.float().mean(1)
        if ref is None:
            ref = y
        row["cosine_to_fp32"] = float(torch.nn.functional.cosine_similarity(y, ref).min())
        out[variant] = row
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sets", default="minilm,llama", help="shape sets, of " + ",".join(SHAPE_SETS))
    ap.add_argument("--minilm-aqm", help="an all-MiniLM-L6-v2 .aqm to run end to end")
    ap.add_argument("--minilm-config", help="the folder of its config.json (the model is built from it)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    res: dict = {"device": str(device), "iters": args.iters,
                 "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "sets": {}}
    for name in args.sets.split(","):
        for config in CONFIGS:
            t = time.perf_counter()
            res["sets"][f"{name} {config}"] = measure_set(SHAPE_SETS[name], config, device, args.iters)
            print(f"{name} {config}: {time.perf_counter() - t:.1f} s", flush=True)
            if args.out:  # kept as it goes: a later stage that fails loses nothing measured
                save_json(args.out, res)
    if args.minilm_aqm:
        res["minilm"] = measure_minilm(args.minilm_aqm, args.minilm_config, device, args.iters)
    print(json.dumps(res, indent=1))
    if args.out:
        save_json(args.out, res)


if __name__ == "__main__":
    main()
