"""A file truncated or rewritten in place while open never kills the reader (no SIGBUS).

Each scenario runs in a child process, because SIGBUS would kill the test
runner: the child opens a file, starts using it, the file is replaced in
place (``truncate``, or ``cp new.aqm model.aqm``), and the child goes on:
reading tensors, using arrays returned before, running a lazily loaded torch
module's first forward, and a streaming ONNX Runtime session. Each step must
work or raise an AqmError; the child reports which.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import aqformat

CHILD = textwrap.dedent("""
    import os, shutil, sys, numpy as np, aqformat
    path, how, other = sys.argv[1], sys.argv[2], sys.argv[3]

    def damage():
        if how == "truncate":
            os.truncate(path, 100)
        else:  # what `cp other path` does: the same inode, truncated, then written
            shutil.copyfile(other, path)

    def step(name, fn):
        try:
            fn()
            print(name + ": ok")
        except aqformat.AqmError as e:
            print(name + ": AqmError", type(e).__name__, str(e).replace("\\n", " ")[:100])
        sys.stdout.flush()

    f = aqformat.open(path)
    early = f.read("big")  # a raw tensor: used to be a view of the mapping
    f.read("small")
    damage()
    step("array returned earlier", lambda: float(np.asarray(early, np.float64).sum()))
    step("read raw", lambda: f.read("big").sum())
    step("read aq", lambda: f.read("q").sum())
    step("verify", f.verify)
    step("graph", f.graph)
    print("alive")
""")

TORCH_CHILD = textwrap.dedent("""
    import os, shutil, sys, torch, aqformat
    from aqformat.runtime import load_torch
    path, how, other = sys.argv[1], sys.argv[2], sys.argv[3]
    m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    load_torch(path, model=m, lazy=True)
    os.truncate(path, 100) if how == "truncate" else shutil.copyfile(other, path)
    try:
        m(torch.ones(1, 512))
        print("forward ok")
    except aqformat.AqmError as e:
        print("forward AqmError", type(e).__name__)
    print("alive")
""")


def write(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with aqformat.Writer(path) as w:
        w.add_tensor("big", rng.standard_normal((1024, 1024)).astype(np.float32))  # 4 MiB: many pages
        w.add_tensor("small", np.arange(4, dtype=np.float32))
        w.add_codebooks("g", rng.standard_normal((2, 16, 8)).astype(np.float16))
        w.add_aq("q", (64, 64), rng.integers(0, 16, (64 * 8, 2)), group="g")
        w.set_graph(b"\x08\x01" * 1000)


@pytest.mark.parametrize("how", ["truncate", "cp"])
def test_reader_survives_a_file_changed_in_place(tmp_path, how):
    path, other = tmp_path / "model.aqm", tmp_path / "new.aqm"
    write(path, 0)
    write(other, 1)
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), how, str(other)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stdout}{r.stderr}"
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert r.stdout.rstrip().endswith("alive")
    assert lines["array returned earlier"] == "ok"  # owned memory, not a view of the file
    for step in ("read raw", "read aq", "verify", "graph"):
        assert lines[step].startswith("AqmError") and "changed" in lines[step], (step, lines[step])


@pytest.mark.parametrize("how", ["truncate", "cp"])
def test_lazy_torch_first_forward_survives(tmp_path, how):
    pytest.importorskip("torch")
    import torch
    path, other = tmp_path / "model.aqm", tmp_path / "new.aqm"
    m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    for p in (path, other):
        with aqformat.Writer(p) as w:
            for k, v in m.state_dict().items():
                w.add_tensor(k, v.numpy())
    r = subprocess.run([sys.executable, "-c", TORCH_CHILD, str(path), how, str(other)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("alive"), f"{r.returncode}: {r.stdout}{r.stderr}"
    assert "forward AqmError" in r.stdout


def test_update_by_rename_keeps_the_open_file_readable(tmp_path):
    path, other = tmp_path / "model.aqm", tmp_path / "new.aqm"
    write(path, 0)
    write(other, 1)
    with aqformat.open(path) as f:
        before = f.read("big").copy()
        os.replace(other, path)  # the documented way to update a served model
        np.testing.assert_array_equal(f.read("big"), before)
        f.verify()
    with aqformat.open(path) as f:
        assert not np.array_equal(f.read("big"), before)


def test_streaming_session_survives(tmp_path):
    pytest.importorskip("onnxruntime")
    from aqformat.runtime import InferenceSession
    from tests.runtime_fixtures import build_aqm, mlp_model
    path, other = tmp_path / "m.aqm", tmp_path / "o.aqm"
    build_aqm(mlp_model(), str(path))
    shutil.copyfile(path, other)
    code = textwrap.dedent(f"""
        import os, numpy as np, aqformat
        from aqformat.runtime import InferenceSession
        whole = InferenceSession({str(path)!r}).weight_bytes
        s = InferenceSession({str(path)!r}, memory_budget=whole)  # streams: stages hold half the budget
        x = {{"x": np.ones((2, 32), np.float32)}}
        s.run(None, x)
        os.truncate({str(path)!r}, 100)
        try:
            s.run(None, x)
            print("run ok")
        except aqformat.AqmError as e:
            print("run AqmError")
        print("alive")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("alive"), f"{r.returncode}: {r.stdout}{r.stderr}"
