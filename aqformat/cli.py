"""Command line: ``aqm info|verify|convert|export|run|bench`` and ``aqm-info``.

Subcommands that need torch or onnxruntime live in their packages and import
them only when run. Every user error ends as one line on stderr and a
non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import AqmError
from .inspect import describe, render_text


def _cmd_info(args: argparse.Namespace) -> int:
    report = describe(args.file, check=not args.no_verify)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0 if report["integrity"] != "corrupted" else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from .reader import open as open_aqm
    with open_aqm(args.file) as f:
        f.verify()
        n = len(f)
    print(f"{args.file}: OK ({n} tensors decoded, every checksum matches)")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe an .aqm file")
    _info_args(p)


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=".aqm file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    p.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    """The ``aqm`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="aqm", description="Compressed neural-network model files (.aqm)")
    parser.add_argument("--version", action="version", version=f"aqformat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    p = sub.add_parser("verify", help="check every checksum and decode every tensor")
    p.add_argument("file")
    p.set_defaults(func=_cmd_verify)
    for register in _extensions():
        register(sub)
    return parser


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
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the shell's status for a process ended by SIGPIPE
    except AqmError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqm``."""
    return run(build_parser(), argv)


def info_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqm-info`` (same as ``aqm info``)."""
    parser = argparse.ArgumentParser(prog="aqm-info", description="Describe an .aqm file")
    _info_args(parser)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
