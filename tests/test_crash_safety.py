"""Crash safety of the Writer: SIGKILL, full disks and Ctrl-C never leave half a file.

The Writer streams into a temporary file next to the target and renames it
into place after an fsync, so the target name only ever holds the old file or
the complete new one. (A SIGKILLed process cannot remove its temporary file;
that is the one thing left behind, under a hidden ``.name.*.tmp`` name.)
"""
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import aqformat
from aqformat import AqmError, Writer
from tests.craft import FullDisk

CONVERT = textwrap.dedent("""
    import sys, numpy as np, aqformat
    rng = np.random.default_rng(0)
    with aqformat.Writer(sys.argv[1], source={"framework": "numpy", "name": "crash"}) as w:
        w.add_codebooks("g", rng.standard_normal((2, 256, 8)).astype(np.float16))
        for i in range(int(sys.argv[2])):
            w.add_tensor(f"t{i}", rng.standard_normal((64, 256)).astype(np.float32), compress=True)
            w.add_aq(f"q{i}", (64, 256), rng.integers(0, 256, (64 * 32, 2)), group="g", scale=np.ones(64))
            if i == 0:
                print("writing", flush=True)
""")


def temp_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def old_file(path) -> bytes:
    with Writer(path, source={"framework": "numpy", "name": "old"}) as w:
        w.add_tensor("old", np.arange(10, dtype=np.float32))
    return path.read_bytes()


def test_sigkill_at_random_moments_leaves_old_or_new_file(tmp_path):
    target = tmp_path / "model.aqm"
    fresh = tmp_path / "fresh.aqm"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CONVERT, str(fresh), "40"], check=True, timeout=120)
    duration = time.perf_counter() - t0
    new = fresh.read_bytes()
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    for trial in range(10):
        old = old_file(target)
        child = subprocess.Popen([sys.executable, "-c", CONVERT, str(target), "40"], stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.1) * duration)  # a few kills land after the rename
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        data = target.read_bytes()
        assert data in (old, new), f"trial {trial}: target is neither the old nor the new file"
        outcomes["old" if data == old else "new"] += 1
        with aqformat.open(target) as f:
            f.verify()
        for name in temp_files(tmp_path):  # what SIGKILL leaves behind is never the target
            os.unlink(tmp_path / name)
    assert outcomes["old"] >= 1, outcomes


def test_sigkill_mid_write_without_previous_file_leaves_no_target(tmp_path):
    target = tmp_path / "model.aqm"
    child = subprocess.Popen([sys.executable, "-c", CONVERT, str(target), "400"], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"writing\n"
    time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert not target.exists()
    assert len(temp_files(tmp_path)) == 1  # the temporary file, under its hidden name


@pytest.mark.parametrize("budget", [0, 100, 5000, 70_000])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, budget):
    target = tmp_path / "model.aqm"
    old = old_file(target)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), budget))
    with pytest.raises(AqmError, match="disk full while writing .*model.aqm") as e:
        with Writer(target) as w:
            for i in range(20):
                w.add_tensor(f"t{i}", np.ones(1000, np.float32))
    assert "\n" not in str(e.value)
    assert target.read_bytes() == old and temp_files(tmp_path) == []


def test_disk_full_at_fsync(tmp_path, monkeypatch):
    target = tmp_path / "model.aqm"
    old = old_file(target)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(AqmError, match="cannot write .*: No space left on device"):
        with Writer(target) as w:
            w.add_tensor("t", np.ones(10, np.float32))
    assert target.read_bytes() == old and temp_files(tmp_path) == []


def test_real_file_size_limit_in_a_subprocess(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE -> EFBIG): one line, exit code, no files."""
    target = tmp_path / "model.aqm"
    code = textwrap.dedent(f"""
        import resource, signal, sys, numpy as np
        from aqformat import Writer, AqmError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            with Writer({str(target)!r}) as w:
                w.add_tensor("t", np.ones(1_000_000, np.float32))
        except AqmError as e:
            print(e, file=sys.stderr)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "File too large" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not target.exists() and temp_files(tmp_path) == []


def test_keyboard_interrupt_inside_with(tmp_path):
    target = tmp_path / "model.aqm"
    old = old_file(target)
    with pytest.raises(KeyboardInterrupt):
        with Writer(target) as w:
            w.add_tensor("t", np.ones(1000, np.float32))
            raise KeyboardInterrupt
    assert target.read_bytes() == old and temp_files(tmp_path) == []


def test_keyboard_interrupt_during_close(tmp_path, monkeypatch):
    """Ctrl-C while close() fsyncs: the temporary file used to be left behind."""
    target = tmp_path / "model.aqm"
    old = old_file(target)

    def fsync(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        with Writer(target) as w:
            w.add_tensor("t", np.ones(1000, np.float32))
    assert target.read_bytes() == old and temp_files(tmp_path) == []


def test_error_inside_with_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.aqm"
    old = old_file(target)
    with pytest.raises(aqformat.AqmInputError):
        with Writer(target) as w:
            w.add_tensor("t", np.ones(4, np.float32))
            w.add_tensor("t", np.ones(4, np.float32))
    assert target.read_bytes() == old and temp_files(tmp_path) == []


@pytest.mark.slow
def test_sigkill_during_real_aqm_convert(tmp_path):
    """A real conversion (torch checkpoint -> aqm convert) killed at several moments."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.save({f"layer{i}.weight": torch.randn(64, 64) for i in range(3)}, tmp_path / "net.pt")
    cmd = [sys.executable, "-m", "aqformat.cli", "convert", str(tmp_path / "net.pt"), "--beam", "1",
           "--iters", "1", "--no-progress", "-o"]
    t0 = time.perf_counter()
    subprocess.run(cmd + [str(tmp_path / "fresh.aqm")], check=True, capture_output=True, timeout=300)
    duration = time.perf_counter() - t0
    new = (tmp_path / "fresh.aqm").read_bytes()
    target = tmp_path / "model.aqm"
    for fraction in (0.3, 0.8):
        old = old_file(target)
        child = subprocess.Popen(cmd + [str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * duration)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert target.read_bytes() in (old, new)
        aqformat.open(target).verify()
