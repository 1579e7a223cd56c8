"""The same Writer calls give byte-identical files, in one process and across processes."""
import os
import subprocess
import sys

import numpy as np

import aqformat
from tests.craft import write_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITE = "import sys; from tests.craft import write_sample; write_sample(sys.argv[1])"


def test_same_calls_same_bytes_in_one_process(tmp_path):
    write_sample(tmp_path / "a.aqm")
    write_sample(tmp_path / "b.aqm")
    assert (tmp_path / "a.aqm").read_bytes() == (tmp_path / "b.aqm").read_bytes()


def test_same_calls_same_bytes_across_processes_and_hash_seeds(tmp_path):
    write_sample(tmp_path / "ref.aqm")
    ref = (tmp_path / "ref.aqm").read_bytes()
    for seed in ("0", "1", "4242", "random"):
        out = tmp_path / f"p{seed}.aqm"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", WRITE, str(out)], cwd=ROOT, env=env, check=True, timeout=120)
        assert out.read_bytes() == ref, f"PYTHONHASHSEED={seed} changed the file"


def test_metadata_and_names_keep_insertion_order(tmp_path):
    """Maps are written in the order given (not hash order), so equal calls give equal headers."""
    keys = [f"k{i}" for i in (5, 1, 9, 3)]
    for name in ("a", "b"):
        with aqformat.Writer(tmp_path / f"{name}.aqm", metadata={k: {"v": k} for k in keys}) as w:
            for k in reversed(keys):
                w.add_tensor(k, np.zeros(3, np.float32))
    assert (tmp_path / "a.aqm").read_bytes() == (tmp_path / "b.aqm").read_bytes()
    with aqformat.open(tmp_path / "a.aqm") as f:
        assert list(f.metadata) == keys and f.names() == keys[::-1]
