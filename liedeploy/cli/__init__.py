"""The ``liedeploy`` command: argparse, one module per subcommand, the work in the library."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from .._version import __version__

__all__ = ["main", "build_parser"]

SUBCOMMANDS = ("merge", "export", "inspect", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liedeploy",
        description="Lie-group adapters: inspect, merge, export and demo.",
        epilog="Run 'liedeploy COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"liedeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}_cmd", __name__).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 refused input, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("liedeploy: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure is one line unless LIEDEPLOY_DEBUG=1
        if os.environ.get("LIEDEPLOY_DEBUG") == "1":
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, FileNotFoundError) and exc.filename:
            msg = f"{exc.filename}: no such file"
        elif not isinstance(exc, (ValueError, OSError, ImportError, RuntimeError)):
            msg = f"{type(exc).__name__}: {msg} (set LIEDEPLOY_DEBUG=1 for the traceback)"
        print(f"liedeploy {args.command}: error: {msg}", file=sys.stderr)
        return 1


def _entry() -> None:  # console script
    sys.exit(main())
