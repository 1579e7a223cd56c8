"""The writer's temporary files: named after their process, removed on SIGTERM/SIGHUP, swept when stale.

A file is written as ``.NAME.PID.XXXXXXXX.tmp`` beside its target and renamed
onto it when complete. If the process is killed before that:

* SIGTERM and SIGHUP (while their handling is the default, i.e. the program
  did not install its own) remove every temporary file still open, then the
  signal takes its default course (the process ends with that signal);
* SIGKILL cannot be caught, so the next writer of the same target removes the
  temporary files of that name whose process no longer exists.

Temporary files of a live process (on this machine) are never touched.
"""
from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from typing import Any

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_live: set[str] = set()
_lock = threading.Lock()
_installed: dict[int, Any] = {}  # signal -> our handler, while it is installed


def create(path: str) -> tuple[int, str]:
    """Open a new temporary file for target ``path`` (mode 0600); return its descriptor and name.

    Stale temporary files of the same target are removed first.
    """
    directory, base = os.path.split(os.path.abspath(path))
    sweep(directory, base)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=".tmp", dir=directory)
    with _lock:
        _live.add(tmp)
        _install()
    return fd, tmp


def release(tmp: str) -> None:
    """Forget ``tmp`` (renamed into place or deleted); the last one restores the default signal handling."""
    with _lock:
        _live.discard(tmp)
        if not _live:
            _uninstall()


def sweep(directory: str, base: str) -> list[str]:
    """Remove ``.BASE.PID.*.tmp`` files in ``directory`` whose process PID is gone; return their names."""
    pattern = re.compile(rf"\.{re.escape(base)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:  # removed meanwhile, or not ours to remove
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a number we cannot ask about: leave it
    return True


def on_signal(signum: int, frame: Any) -> None:
    """The SIGTERM/SIGHUP handler while a Writer holds temporary files: remove them, then die of the signal."""
    for tmp in list(_live):
        try:
            os.unlink(tmp)
        except OSError:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # end the way the signal would have ended the process


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the sweep covers the rest
    for sig in _SIGNALS:
        if sig not in _installed and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, on_signal)
            _installed[sig] = on_signal


def _uninstall() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in list(_installed):
        if signal.getsignal(sig) is on_signal:
            signal.signal(sig, signal.SIG_DFL)
        del _installed[sig]
