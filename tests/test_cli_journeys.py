"""A new user's first hour, scripted: the ``aqm`` commands run the way a person runs them.

A PyTorch CNN (its state_dict file), its ONNX export and silero-vad go through
convert, info, verify, run, bench and export; every step checks the exit code,
the files left behind and what is printed. Conversions use a small encoder
effort (--iters/--beam) so the default suite stays fast; silero-vad's full
conversion is marked slow.
"""
from __future__ import annotations

import json
import re
import os
import stat
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import aqformat
from aqformat.cli import main as aqm_main
from aqformat.converters.cli import DEFAULT_BEAM, DEFAULT_ITERS
from tests.runtime_fixtures import digits_cnn, silero_path

FAST = ["--iters", "2", "--beam", "2"]


class Aqm:
    """Runs ``aqm ...`` in this process and returns ``(exit code, stdout, stderr)``."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = aqm_main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return rc, out, err


def shell(*args: str) -> subprocess.CompletedProcess:
    """``aqm`` as a separate process, as typed in a terminal."""
    return subprocess.run([sys.executable, "-m", "aqformat.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("journey")
    model = digits_cnn()
    torch.save(model.state_dict(), d / "cnn.pt")
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    np.save(d / "x.npy", x)
    torch.onnx.export(model, (torch.from_numpy(x),), str(d / "cnn.onnx"), dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return d


def test_torch_cnn_journey(work, capsys):
    aqm = Aqm(capsys)
    out_path = work / "cnn.aqm"
    rc, out, err = aqm("convert", work / "cnn.pt", "-o", out_path, *FAST)
    assert rc == 0 and out_path.is_file() and err == ""
    assert out.startswith(f"{out_path}: ") and "tensors coded" in out and "bits/weight" in out
    assert stat.S_IMODE(os.stat(out_path).st_mode) == 0o666 & ~_umask()

    # an existing output is kept unless --force
    before = out_path.read_bytes()
    rc, out, err = aqm("convert", work / "cnn.pt", "-o", out_path, *FAST)
    assert rc == 2 and err.strip() == f"aqm: error: {out_path} exists; pass --force to replace it"
    assert out_path.read_bytes() == before
    rc, out, err = aqm("convert", work / "cnn.pt", "-o", out_path, "--force", "--keep", "decoder.*", *FAST)
    assert rc == 0 and out.rstrip().endswith("replaced the existing file")
    assert err.strip() == "aqm: warning: --keep 'decoder.*' matches no tensor (tensor names: aqm-info, " \
                          "or the model's state_dict keys / ONNX initializer names)"
    rc, out, err = aqm("convert", work / "cnn.pt", "-o", work / "cnn.onnx.out", "-q", *FAST)
    assert rc == 0 and out == "" and err == ""  # -q: errors only
    rc, out, err = aqm("convert", work / "cnn.pt", "-o", work / "wrong.onnx", "-v", *FAST)
    assert rc == 0 and "aqm: warning: -o " in err and "`aqm export` writes ONNX" in err
    assert "threads: " in out and "weight SQNR" in out and "\n9.weight " in out  # per-tensor detail
    rc, out, err = aqm("convert", work / "cnn.pt", "-o", work / "lattice.aqm", "-v", "--codec", "lattice", *FAST)
    assert rc == 0 and re.search(r"\n9\.weight +lattice ", out)  # each tensor's codec as written

    # aqm-info: every tensor with its stored bytes and offset; metadata as JSON
    rc, out, err = aqm("info", out_path)
    assert rc == 0 and "integrity     ok" in out
    header = next(line for line in out.splitlines() if line.startswith("name"))
    assert header.split() == ["name", "shape", "dtype", "codec", "bits/w", "bytes", "offset", "group"]
    assert '"conversion": {' in out and "'conversion'" not in out
    assert "codec choice (--codec auto)" in out  # the default: each tensor's codec and why
    rc, out, _ = aqm("info", out_path, "--json")
    report = json.loads(out)
    spans = sorted((t["offset"], t["stored_bytes"], t["name"]) for t in report["tensors"])
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two tensors overlap
    assert spans[-1][0] + spans[-1][1] <= report["file_bytes"]

    # verify, then a flipped byte inside one tensor is reported by name
    rc, out, _ = aqm("verify", out_path)
    assert rc == 0 and "OK" in out
    offset, _, name = spans[len(spans) // 2]
    bad = work / "bad.aqm"
    data = bytearray(out_path.read_bytes())
    data[offset] ^= 0xFF
    bad.write_bytes(bytes(data))
    rc, _, err = aqm("verify", bad)
    assert rc == 2 and f"tensor {name!r}: section" in err and "checksum mismatch" in err

    # a PyTorch file has no graph to run: the message says what to do instead
    rc, _, err = aqm("run", out_path, "--random-input")
    assert rc == 2 and "stores no ONNX graph" in err and "load_torch" in err


def test_onnx_cnn_journey(work, capsys):
    aqm = Aqm(capsys)
    src, out_path = work / "cnn.onnx", work / "cnn_onnx.aqm"
    rc, out, err = aqm("convert", src, "-o", out_path, *FAST)
    assert rc == 0 and err == ""  # no third-party warnings (e.g. torch's "not writable")
    rc, out, _ = aqm("info", out_path)
    assert "graph inputs\n  image: tensor(float) [batchx1x8x8]" in out
    assert "graph outputs\n  logits: tensor(float) [batchx10]" in out
    small = [line for line in out.splitlines() if " in graph " in line]
    assert small and all(line.split()[0] not in {t.name for t in aqformat.open(out_path).tensors()}
                         for line in small)  # e.g. the 10-element last bias, kept in the graph

    # run: shapes, values, saved outputs, dynamic dimensions, streaming under a budget in kB
    rc, out, err = aqm("run", out_path, "--input", work / "x.npy", "--print", "--output", work / "y.npz")
    assert rc == 0 and "logits: shape [2, 10] float32" in out and "[[" in out
    y = np.load(work / "y.npz")["logits"]
    ref = ort.InferenceSession(str(src)).run(None, {"image": np.load(work / "x.npy")})[0]
    assert y.shape == (2, 10) and np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.9
    rc, out, _ = aqm("run", out_path, "--random-input", "--dim", "batch=5", "--memory-budget", "300kB",
                     "--threads", "1")
    assert rc == 0 and "logits: shape [5, 10]" in out and "streaming" in out and "1 thread" in out
    rc, out, _ = aqm("run", out_path, "--random-input", "--dim", "image:0=3")
    assert rc == 0 and "logits: shape [3, 10]" in out
    rc, _, err = aqm("run", out_path, "--random-input", "--dim", "nope=3")
    assert rc == 2 and "the named ones are ['batch']" in err
    rc, _, err = aqm("run", out_path, "--random-input", "--memory-budget", "lots")
    assert rc == 2 and "cannot parse size 'lots'" in err and "KiB = 1024" in err

    # bench against plain ONNX Runtime, then export a plain .onnx with the umask's permissions
    rc, out, _ = aqm("bench", out_path, "--random-input", "--repeats", "1", "--iters", "2", "--threads", "1")
    assert rc == 0 and "steady latency" in out and "1 thread" in out
    exported = work / "plain.onnx"
    rc, out, _ = aqm("export", out_path, "-o", exported)
    assert rc == 0 and exported.is_file() and "ONNX model" in out
    assert stat.S_IMODE(os.stat(exported).st_mode) == 0o666 & ~_umask()
    rc, _, err = aqm("export", out_path, "-o", exported)
    assert rc == 2 and "pass --force" in err
    z = ort.InferenceSession(str(exported)).run(None, {"image": np.load(work / "x.npy")})[0]
    np.testing.assert_allclose(z, y, rtol=1e-5, atol=1e-5)


def _help_entries(text: str) -> dict[str, str]:
    """``{argument: its help}`` from an argparse help page."""
    entries, current = {}, None
    for line in text.split("options:", 1)[0].split("positional arguments:", 1)[-1].splitlines()[1:] \
            + text.split("options:", 1)[1].splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("    "):
            name, _, rest = line.strip().partition("  ")
            current = name.split(",")[0].split()[0]
            entries[current] = rest.strip()
        elif line.startswith("    ") and current is not None:
            entries[current] += " " + line.strip()
    return entries


def test_help_and_usage(capsys):
    # every argument of every subcommand says what it does
    pages = {}
    for name in ("info", "verify", "convert", "export", "run", "bench"):
        with pytest.raises(SystemExit) as e:
            aqm_main([name, "-h"])
        assert e.value.code == 0, name
        pages[name] = capsys.readouterr().out
        entries = _help_entries(pages[name])
        assert "-q" in entries and "-v" in entries
        for arg, text in entries.items():
            assert text, f"aqm {name} {arg} has no help"
    convert = pages["convert"]
    for flag, default in (("--beam", DEFAULT_BEAM), ("--iters", DEFAULT_ITERS), ("--seed", 0),
                          ("--finetune-lr", "1e-3")):
        text = " ".join(convert.split(flag, 2)[-1].split())
        assert f"default {default}" in text[:400], flag
    from aqformat.converters.options import AQConfig
    assert (AQConfig.beam, AQConfig.iters) == (DEFAULT_BEAM, DEFAULT_ITERS)
    # an unknown flag shows the subcommand's usage, not the top-level one
    proc = shell("verify", "x.aqm", "--frobnicate")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: aqm verify")
    assert "unrecognized arguments: --frobnicate" in proc.stderr
    assert "--no-verify" in pages["info"] and "default" in pages["info"]
    import aqformat.converters as conv
    assert {"convert", "from_onnx", "from_torch", "from_torch_via_onnx", "finetune"} <= set(dir(conv))


def test_info_on_a_closed_pipe_is_quiet(work, capsys):
    path = work / "pipe.aqm"
    Aqm(capsys)("convert", work / "cnn.pt", "-o", path, "--keep", "*")
    proc = subprocess.run(f"{sys.executable} -m aqformat.cli info {path} | head -2", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.count("\n") == 2 and proc.stderr == ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_silero_journey(tmp_path, capsys):
    """silero-vad: its inputs are [None, None] (unnamed dynamic dimensions) and sr a scalar."""
    aqm = Aqm(capsys)
    src, out_path = silero_path("silero_vad.onnx"), tmp_path / "vad.aqm"
    rc, out, err = aqm("convert", src, "-o", out_path)
    assert rc == 0 and err == "" and "tensors coded" in out
    rc, out, _ = aqm("info", out_path)
    assert "  input: tensor(float) [?x?]" in out and "  sr: tensor(int64) [scalar]" in out
    assert aqm("verify", out_path)[0] == 0
    np.save(tmp_path / "sr.npy", np.array(16000, np.int64))
    # random inputs with unsized dynamic dimensions: the error names them and the fix
    rc, _, err = aqm("run", out_path, "--random-input", "--input", f"sr={tmp_path / 'sr.npy'}")
    assert rc == 2 and "input:1" in err and "--dim" in err and err.count("\n") == 1
    args = ["--random-input", "--dim", "input:1=512", "--input", f"sr={tmp_path / 'sr.npy'}"]
    rc, out, _ = aqm("run", out_path, *args, "--output", tmp_path / "o.npz")
    assert rc == 0 and "output: shape [1, 1] float32" in out
    assert set(np.load(tmp_path / "o.npz").files) == {"output", "stateN"}
    rc, out, _ = aqm("bench", out_path, *args, "--repeats", "1", "--iters", "3")
    assert rc == 0 and "steady latency" in out
    rc, _, _ = aqm("export", out_path, "-o", tmp_path / "vad.onnx")
    assert rc == 0 and (tmp_path / "vad.onnx").is_file()
