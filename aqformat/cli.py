"""Command line: ``aqm info|verify|convert|export|run|bench`` and ``aqm-info``.

Subcommands that need torch or onnxruntime live in their packages and import
them only when run. Every user error ends as one line on stderr and a
non-zero exit code, never a traceback. Output is quiet by default: aqformat's
own warnings are shown as ``aqm: warning: ...`` lines, other libraries'
warnings only with ``-v``; ``-q`` shows errors alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .errors import AqmError, AqmWarning
from .inspect import describe, render_text
from .terminal import printable
from .units import parse_size


def _cmd_info(args: argparse.Namespace) -> int:
    report = describe(args.file, check=not args.no_verify)
    print(json.dumps(_finite(report), indent=2, allow_nan=False) if args.json else render_text(report))
    return 0 if report["integrity"] != "corrupted" else 1


def _finite(v: Any) -> Any:
    """``v`` with NaN and infinities (metadata may hold them) as the strings JSON readers know."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _cmd_verify(args: argparse.Namespace) -> int:
    from .reader import open as open_aqm
    budget = parse_size(args.decode_budget) if args.decode_budget is not None else None
    with open_aqm(args.file, decode_budget=budget) as f:
        f.verify()
        n = len(f)
    if args.verbosity >= 0:
        print(f"{args.file}: OK ({n} tensors decoded, every checksum matches)")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe an .aqm file", description=_INFO_DESCRIPTION)
    _info_args(p)


_INFO_DESCRIPTION = ("Describe an .aqm file: format, size, bits per weight, source and metadata (JSON), "
                     "the embedded graph's inputs and outputs, and every tensor with its codec, stored "
                     "bytes and file offset.")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the .aqm file to describe")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: a text table)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checksum verification (default: every section's checksum is checked)")
    p.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    """The ``aqm`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="aqm", description="Compressed neural-network model files (.aqm)")
    parser.add_argument("--version", action="version", version=f"aqformat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(sub)
    p = sub.add_parser("verify", help="check every checksum and decode every tensor",
                       description="Check every section's checksum, decode every tensor and the graph; "
                                   "a fault names the tensor (or codebook group) it is in.")
    p.add_argument("file", help="the .aqm file to verify")
    p.add_argument("--decode-budget", metavar="SIZE",
                   help="most memory decoding one tensor may take, e.g. 256MiB (default 1GiB); "
                        "tensors are decoded one at a time")
    p.set_defaults(func=_cmd_verify)
    for register in _extensions():
        register(sub)
    for p in sub.choices.values():
        _add_verbosity(p)
    return parser


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    """``-q``/``-v`` on a subcommand, and its parser remembered so that its own usage is shown on errors."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                   help="print errors only")
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                   help="print details (per-tensor results) and other libraries' warnings")
    p.set_defaults(verbosity=0, parser=p)


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands of the converters and runtime packages (their heavy imports are deferred)."""
    found = []
    for module in ("aqformat.converters.cli", "aqformat.runtime.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        found.append(mod.register)
    return found


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen command, turning errors into one-line messages."""
    args, extra = parser.parse_known_args(argv)
    command_parser = getattr(args, "parser", parser)
    if extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    prog = parser.prog
    verbosity = getattr(args, "verbosity", 0)
    try:
        with warnings.catch_warnings():
            _show_warnings(prog, verbosity)
            status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the shell's status for a process ended by SIGPIPE
    except AqmError as e:
        print(f"{prog}: error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


def _show_warnings(prog: str, verbosity: int) -> None:
    """aqformat's warnings as ``prog: warning: ...`` lines (none with -q); others only with -v."""
    warnings.filterwarnings("default" if verbosity >= 1 else "ignore")
    warnings.filterwarnings("ignore" if verbosity < 0 else "always", category=AqmWarning)

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        where = "" if issubclass(category, AqmWarning) else f" ({category.__name__}, {filename}:{lineno})"
        print(f"{prog}: warning: {message}{where}", file=sys.stderr)
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqm``."""
    return run(build_parser(), argv)


def info_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqm-info`` (same as ``aqm info``)."""
    parser = argparse.ArgumentParser(prog="aqm-info", description=_INFO_DESCRIPTION)
    _info_args(parser)
    _add_verbosity(parser)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
