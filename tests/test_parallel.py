"""Conversions in worker processes and on Ray: same bytes whatever the workers, errors naming the tensor."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from aqformat.converters import from_torch
from aqformat.converters.options import ConvertOptions
from aqformat.converters.parallel import Executor, LocalProcesses, make_executor, ordered
from aqformat.converters.pipeline import run
from aqformat.converters.sources import Source, TensorSpec
from aqformat.errors import AqmError, AqmInputError

ENCODER = {"beam": 2, "iters": 1, "reservoir": 4096}


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A small LLM-shaped state dict: heavy-tailed rows, a few outlier columns, raw norms."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(2):
        for name, shape in (("attn.q_proj", (64, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128))):
            w = rng.standard_t(4, size=shape).astype(np.float32) * 0.02
            w[:, rng.integers(0, shape[1], 2)] *= 8
            out[f"layers.{i}.{name}.weight"] = w
        out[f"layers.{i}.norm.weight"] = np.ones(64, np.float32)
    return out


def _convert(tmp_path, name: str, codec: str = "aq", **kw) -> bytes:
    """The conversion's bytes; on the CPU unless ``device`` says otherwise: byte-identity across workers
    is the CPU's promise (a GPU's float sums, and so its codes, may differ from run to run)."""
    kw.setdefault("device", "cpu")
    path = tmp_path / f"{name}.aqm"
    from_torch({k: torch.from_numpy(v) for k, v in _weights().items()}, str(path), bits=2, grouping="by-kind",
               codec=codec, progress=False, encoder=ENCODER, **kw)
    return path.read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    return _convert(tmp_path_factory.mktemp("ref"), "workers1", workers=1)


@pytest.mark.parametrize("workers", [2, 3])
def test_same_bytes_whatever_the_workers(tmp_path, reference, workers):
    assert hashlib.sha256(_convert(tmp_path, f"w{workers}", workers=workers)).digest() == \
        hashlib.sha256(reference).digest()


def test_the_default_codec_gives_the_same_bytes_whatever_the_workers(tmp_path):
    """--codec auto (the default) trains its AQ options and codes its lattice tensors in the workers too."""
    assert _convert(tmp_path, "auto1", codec="auto", workers=2) == _convert(tmp_path, "auto", codec="auto")


def test_in_process_matches_workers(tmp_path, reference):
    assert _convert(tmp_path, "here") == reference


@pytest.mark.parametrize("workers", [None, 2])
def test_large_tensors_coded_as_row_blocks_give_the_same_bytes(tmp_path, reference, monkeypatch, workers):
    """A tensor over twice ROW_BLOCK weights is coded as several tasks of rows, joined back."""
    from aqformat.converters import aq_encode
    split = []
    join = aq_encode.AQEncoder.join
    monkeypatch.setattr(aq_encode, "ROW_BLOCK", 512)
    monkeypatch.setattr(aq_encode.AQEncoder, "join", lambda self, n, r: split.append(len(r)) or join(self, n, r))
    assert _convert(tmp_path, "blocks", workers=workers) == reference
    assert split and max(split) > 1


def test_ordered_keeps_order_and_bounds_tasks_in_flight():
    class Counting(Executor):
        workers = 2
        live = peak = 0

        def submit(self, fn, *args):
            Counting.live += 1
            Counting.peak = max(Counting.peak, Counting.live)
            return fn(*args)

        def result(self, handle, label):
            Counting.live -= 1
            return handle

    tasks = [(str(i), (lambda v: v * 2) if i % 3 else None, (i,)) for i in range(20)]
    assert [r for _, r in ordered(Counting(), iter(tasks), limit=4)] == [i * 2 if i % 3 else i for i in range(20)]
    assert Counting.peak <= 5


class _PoisonedSecondRead:
    """A source whose tensor turns NaN after the sampling pass (the encoding task meets it)."""

    def __init__(self, weights: dict[str, np.ndarray], bad: str):
        self.weights, self.bad, self.reads = weights, bad, 0

    def load(self, name: str) -> np.ndarray:
        w = self.weights[name]
        if name == self.bad:
            self.reads += 1
            if self.reads > 1:
                w = w.copy()
                w[3, 5] = np.nan
        return w


@pytest.mark.parametrize("workers", [None, 2])
def test_worker_data_error_names_the_tensor(tmp_path, workers):
    weights = _weights()
    bad = "layers.1.mlp.up_proj.weight"
    poisoned = _PoisonedSecondRead(weights, bad)
    source = Source([TensorSpec(n, w.shape, "float32") for n, w in weights.items()], poisoned.load, "pytorch", "t")
    opts = ConvertOptions.build(bits=2, target_size=None, keep=(), encoder=ENCODER, progress=False, workers=workers)
    out = tmp_path / "bad.aqm"
    with pytest.raises(AqmInputError, match=f"{bad}.*NaN"):
        run(source, out, opts, {})
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_cuda_is_refused(tmp_path):
    with pytest.raises(AqmInputError, match="no CUDA device"):
        _convert(tmp_path, "cuda", device="cuda")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not exercised")
def test_device_cuda_converts(tmp_path, reference):
    """On the GPU every tensor gets the codec it gets on the CPU, at about its error (the float sums differ,
    so the bytes may)."""
    import aqformat
    _convert(tmp_path, "cuda", device="cuda")
    (tmp_path / "cpu.aqm").write_bytes(reference)
    with aqformat.open(tmp_path / "cuda.aqm") as f, aqformat.open(tmp_path / "cpu.aqm") as ref:
        codecs = {t.name: t.codec for t in f.tensors()}
        assert codecs == {t.name: t.codec for t in ref.tensors()}
        assert sum(c == "aq" for c in codecs.values()) == 4
        for name, w in _weights().items():
            gpu, cpu = (float(np.mean((g.read(name) - w) ** 2)) for g in (f, ref))
            assert gpu <= 1.25 * cpu + 1e-12, name


def test_bad_worker_counts_refused():
    with pytest.raises(AqmInputError, match="workers"):
        ConvertOptions(workers=0)
    with pytest.raises(AqmInputError, match="workers"):
        LocalProcesses(0)


def _crash(_):
    os._exit(3)


def test_dead_worker_is_one_line_error():
    with LocalProcesses(1) as ex:
        with pytest.raises(AqmError, match="tensor x: a worker process died"):
            list(ordered(ex, iter([("tensor x", _crash, (0,))]), ex.read_ahead))


def test_cli_workers(tmp_path):
    from safetensors.numpy import save_file
    save_file(_weights(), str(tmp_path / "m.safetensors"))
    r = subprocess.run([sys.executable, "-m", "aqformat.cli", "convert", str(tmp_path / "m.safetensors"), "-o",
                        str(tmp_path / "m.aqm"), "--bits", "2", "--beam", "2", "--iters", "1", "--workers", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "m.aqm").stat().st_size > 0


# ----------------------------------------------------------------- Ray

def test_unreachable_ray_address_fails_fast():  # before the local cluster starts (it would be used)
    pytest.importorskip("ray", reason="Ray is not installed (extra 'ray')")
    t = time.monotonic()
    with pytest.raises(AqmInputError, match="--ray 127.0.0.1:9: cannot reach"):
        make_executor(ray="127.0.0.1:9")
    assert time.monotonic() - t < 30
    with pytest.raises(AqmInputError, match="HOST:PORT"):
        make_executor(ray="no-port")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (extra 'ray'): Ray-path tests skipped")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_same_bytes(tmp_path, reference, ray_local):
    assert _convert(tmp_path, "ray", ray="auto") == reference


def test_ray_worker_killed_mid_task_is_retried(tmp_path, reference, ray_local):
    psutil = pytest.importorskip("psutil")
    killed: list[int] = []

    workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::" in " ".join(p.info["cmdline"] or [])]

    def kill_one_coding_worker():  # the first Ray worker seen running a task of the conversion
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for p in workers:
                try:
                    cmd = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if "ray::_code_and_measure" in cmd or "ray::train_codebooks" in cmd:
                    p.kill()
                    killed.append(p.pid)
                    return
            time.sleep(0.0005)

    killer = threading.Thread(target=kill_one_coding_worker, daemon=True)
    killer.start()
    data = _convert(tmp_path, "ray_killed", ray="auto")
    killer.join(5)
    assert killed, "no coding task was seen running"
    assert data == reference


def test_ray_data_error_names_the_tensor(tmp_path, ray_local):
    weights = _weights()
    bad = "layers.1.mlp.down_proj.weight"
    poisoned = _PoisonedSecondRead(weights, bad)
    source = Source([TensorSpec(n, w.shape, "float32") for n, w in weights.items()], poisoned.load, "pytorch", "t")
    opts = ConvertOptions.build(bits=2, target_size=None, keep=(), encoder=ENCODER, progress=False, ray="auto")
    with pytest.raises(AqmInputError, match=f"{bad}.*NaN"):
        run(source, tmp_path / "bad.aqm", opts, {})
    assert os.listdir(tmp_path) == []
