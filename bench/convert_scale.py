"""Conversion at scale: a synthetic LLM-shaped sharded checkpoint converted with 1 and N workers.

Writes a Hugging Face folder (``config.json``, bfloat16 safetensors shards of
at most ``--shard-mb`` and ``model.safetensors.index.json``) shaped like a
LLaMA-style decoder: ``--layers`` blocks of q/k/v/o projections ``[h, h]``
and gate/up/down projections ``[i, h]``/``[h, i]`` (``i = 2.6875 h``, rounded
to 256), norms, and untied ``[vocab, h]`` embedding and output tables. The
defaults (``h = 2048``, 18 layers, vocab 32000) make 1.04 B parameters.

Weights have the statistics that make real checkpoints hard to quantize:
Student-t (4 degrees of freedom) entries, log-normal row scales (heavy-tailed
rows) and a few outlier input columns 10-30x larger, generated vectorised a
tensor at a time and streamed to disk.

The folder is converted by ``aqm convert --workers N`` for each ``--workers``
value in a fresh process, sampling the resident memory of that process and of
each of its workers (psutil) every 0.2 s. Reported: wall time, weights/s in
all and per worker, peak RSS per process, the speed-up over the first worker
count and, from the per-worker throughput, the hours 7 B and 70 B parameters
would take on 8, 64 and 512 workers, splitting the measured time into a
serial part (reading, reservoir sampling, writing) and a parallel part by
Amdahl's law from the 1- and 2-worker times. Every file must
have the same bytes. The folder and files are deleted afterwards.

Run: ``python -m bench.convert_scale [--layers 18 --hidden 2048] [--workers 1 2]``
(about ``2 GB`` of disk per billion parameters; ``--layers 2 --hidden 1024``
is a small run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

_T_DF = 4.0  # Student-t degrees of freedom of the entries


def llm_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LLaMA-style decoder, in checkpoint order."""
    inter = int(round(2.6875 * hidden / 256)) * 256
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden)),
                (f"{p}.mlp.down_proj.weight", (hidden, inter)),
                (f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def llm_weight(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """bfloat16 bits (uint16) of one tensor: heavy-tailed rows and outlier columns; norms near 1."""
    if len(shape) == 1:
        w = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
    else:
        rows, cols = shape
        w = rng.standard_t(_T_DF, size=shape).astype(np.float32)
        w *= (0.02 / np.sqrt(_T_DF / (_T_DF - 2)) * rng.lognormal(0.0, 0.5, rows)).astype(np.float32)[:, None]
        outliers = rng.choice(cols, max(1, cols // 512), replace=False)
        w[:, outliers] *= rng.uniform(10.0, 30.0, outliers.size).astype(np.float32)
    bits = w.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_checkpoint(folder: str, shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int, seed: int) -> int:
    """Write the sharded bfloat16 checkpoint; returns the number of shards."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    for s, members in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in members:
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(folder, fname), "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            for _, shape in members:
                fh.write(llm_weight(shape, rng).tobytes())
    total = sum(2 * int(np.prod(shape)) for _, shape in shapes)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return len(shards)


class RssSampler:
    """Peak resident memory of a process and of each of its descendants, sampled every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        import psutil
        self._root = psutil.Process(pid)
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        import psutil
        while not self._stop.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(period)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def convert(folder: str, out: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """``aqm convert --workers N`` in a fresh process: wall seconds, peak RSS of the main process
    and the largest of its workers (MB), and the file's digest."""
    cmd = [sys.executable, "-m", "aqformat.cli", "convert", folder, "-o", out, "--force", "--no-progress",
           "--codec", "aq",
           "--bits", str(args.bits), "--beam", str(args.beam), "--iters", str(args.iters),
           "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = RssSampler(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - t
    peaks = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"aqm convert --workers {workers} failed:\n{stderr[-3000:]}")
    main_rss = peaks.pop(proc.pid, 0)
    with open(out, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"wall_s": wall, "main_rss_mb": main_rss / 1e6, "worker_rss_mb": max(peaks.values(), default=0) / 1e6,
            "sha256": digest, "summary": stdout.strip().splitlines()[0] if stdout.strip() else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048, help="model width h (default 2048)")
    ap.add_argument("--layers", type=int, default=18, help="decoder blocks (default 18: 1.04 B parameters)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    ap.add_argument("--shard-mb", type=float, default=500.0, help="largest shard (MB, default 500)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    ap.add_argument("--bits", type=float, default=2.0, help="code bits per weight (default 2)")
    ap.add_argument("--beam", type=int, default=4, help="beam width (default 4)")
    ap.add_argument("--iters", type=int, default=2, help="codebook training iterations (default 2)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    shapes = llm_shapes(args.hidden, args.layers, args.vocab)
    params = sum(int(np.prod(s)) for _, s in shapes)
    free = shutil.disk_usage(args.dir or tempfile.gettempdir()).free
    if free < 3 * 2 * params:
        raise SystemExit(f"needs about {6 * params / 1e9:.1f} GB of free disk, {free / 1e9:.1f} GB free")
    load = os.getloadavg()[0]
    print(f"model: {params / 1e9:.3f} B parameters (h={args.hidden}, {args.layers} layers, vocab {args.vocab}), "
          f"bfloat16; encoder --bits {args.bits} --beam {args.beam} --iters {args.iters}; "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        folder = os.path.join(d, "model")
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump({"model_type": "llama", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                       "vocab_size": args.vocab, "_name_or_path": "synthetic-llm"}, fh)
        t = time.monotonic()
        n_shards = write_checkpoint(folder, shapes, int(args.shard_mb * 1e6), seed=0)
        print(f"wrote {n_shards} shards + index ({2 * params / 1e9:.2f} GB) in {time.monotonic() - t:.0f} s")
        for n in args.workers:
            r = results[n] = convert(folder, os.path.join(d, f"w{n}.aqm"), n, args)
            r["weights_per_s"] = params / r["wall_s"]
            print(f"--workers {n}: {r['wall_s']:.0f} s, {r['weights_per_s'] / 1e3:.0f} k weights/s "
                  f"({r['weights_per_s'] / n / 1e3:.0f} k per worker), peak RSS main {r['main_rss_mb']:.0f} MB, "
                  f"largest worker {r['worker_rss_mb']:.0f} MB; load average {os.getloadavg()[0]:.1f}")
    _report(results, args.workers, params)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"parameters": params, "args": vars(args), "results": results}, fh, indent=1)


def _report(results: dict[int, dict[str, float]], counts: list[int], params: int) -> None:
    base = counts[0]
    for n in counts[1:]:
        print(f"speed-up {base} -> {n} workers: {results[base]['wall_s'] / results[n]['wall_s']:.2f}x")
    digests = {r["sha256"] for r in results.values()}
    print("same bytes for every worker count" if len(digests) == 1 else f"FILES DIFFER: {digests}")
    _extrapolate(results, counts, params)
    if len(digests) != 1:
        raise SystemExit(1)


def _extrapolate(results: dict[int, dict[str, float]], counts: list[int], params: int) -> None:
    """Hours for 7 B and 70 B parameters on 8, 64 and 512 workers, by Amdahl's law."""
    base = counts[0]
    one = results[base]["wall_s"] * base  # worker-seconds at the first count
    serial = 0.0
    if len(counts) > 1 and base == 1:  # Amdahl: T(n) = serial + parallel / n, from the first two counts
        n = counts[1]
        if results[n]["wall_s"] >= results[1]["wall_s"]:
            # Amdahl's law has no parallel part to scale then: the workers did not get their cores
            print(f"no extrapolation: {n} workers were not faster than 1 (load average "
                  f"{os.getloadavg()[0]:.1f}); rerun on an idle machine")
            return
        serial = max(0.0, (n * results[n]["wall_s"] - results[1]["wall_s"]) / (n - 1))
        print(f"serial part (reading, sampling, writing): {serial:.0f} s of {results[1]['wall_s']:.0f} s")
    parallel = one - serial
    for size in (7e9, 70e9):
        k = size / params
        cells = ", ".join(f"{w} workers {(serial + parallel / w) * k / 3600:.1f} h" for w in (8, 64, 512))
        print(f"extrapolated {size / 1e9:.0f} B ({params / parallel / 1e3:.0f} k weights/s per worker in the "
              f"parallel part, {serial * k / 3600:.1f} h serial): {cells}")


if __name__ == "__main__":
    main()
