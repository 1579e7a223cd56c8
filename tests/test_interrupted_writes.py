"""Interrupted writes leave no temporary file behind for long.

SIGTERM and SIGHUP remove the writer's temporary file and still end the
process with that signal; after a SIGKILL (which cannot be caught) the next
writer of the same output removes the stale temporary file, but never one
that a live process is still writing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import aqformat
from aqformat import tempfiles

WRITER = textwrap.dedent("""
    import signal, sys, time, numpy as np, aqformat
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal: under nohup the child would inherit SIG_IGN
    with aqformat.Writer(sys.argv[1]) as w:
        w.add_tensor("t", np.ones((256, 1024), np.float32))
        print("writing", flush=True)
        time.sleep(60)
""")


def temp_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def start_writer(target) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"writing\n"
    return child


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_remove_the_temporary_file(tmp_path, sig):
    child = start_writer(tmp_path / "model.aqm")
    assert len(temp_files(tmp_path)) == 1
    child.send_signal(sig)
    assert child.wait(timeout=60) == -sig  # the process still ends by the signal
    assert os.listdir(tmp_path) == []


def test_the_next_writer_sweeps_what_sigkill_left(tmp_path):
    target = tmp_path / "model.aqm"
    child = start_writer(target)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    (stale,) = temp_files(tmp_path)
    assert stale.startswith(f".model.aqm.{child.pid}.") and os.path.getsize(tmp_path / stale) >= 1 << 20
    live = start_writer(target)  # a writer that is still running keeps its file
    try:
        other = tmp_path / f".other.aqm.{child.pid}.abcdefgh.tmp"  # another output's stale file: not ours
        other.write_bytes(b"x")
        with aqformat.Writer(target) as w:
            w.add_tensor("t", np.zeros(3, np.float32))
        left = temp_files(tmp_path)
        assert stale not in left and other.name in left
        assert [n for n in left if n.startswith(f".model.aqm.{live.pid}.")]
    finally:
        live.kill()
        live.wait(timeout=60)
    aqformat.open(target).verify()


def test_handlers_are_installed_only_while_writing_and_never_replace_the_programs_own(tmp_path):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with aqformat.Writer(tmp_path / "a.aqm") as w:
        assert signal.getsignal(signal.SIGTERM) is tempfiles.on_signal
        w.add_tensor("t", np.zeros(3, np.float32))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum, frame):
        pass
    previous = signal.signal(signal.SIGHUP, own)
    try:
        with aqformat.Writer(tmp_path / "b.aqm") as w:
            assert signal.getsignal(signal.SIGHUP) is own
        assert signal.getsignal(signal.SIGHUP) is own
    finally:
        signal.signal(signal.SIGHUP, previous)
