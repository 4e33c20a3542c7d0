"""The ``liedeploy`` command: argparse, one module per subcommand, the work in the library.

Subcommand modules import nothing heavy at module level: ``--version``, ``--help`` and
``inspect`` start without torch. Each subcommand may define ``check(args)``, run before any
model is built, that raises :class:`UsageError` for flags that cannot go together (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from liedeploy._version import __version__
from liedeploy.errors import ConfigError, LieError

__all__ = ["main", "entry", "build_parser", "UsageError", "SUBCOMMANDS"]

SUBCOMMANDS = ("merge", "export", "inspect", "demo", "serve", "prune", "convert")


class UsageError(ConfigError):
    """Flags that cannot be used together, or a malformed flag value: exit 2, before any work."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liedeploy",
        description="Lie-group adapters: inspect, merge, export, serve and demo.",
        epilog="Run 'liedeploy COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"liedeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}_cmd", __name__).add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file"
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if not isinstance(exc, (LieError, OSError, ImportError)):
        msg = f"{type(exc).__name__}: {msg} (set LIEDEPLOY_DEBUG=1 for the traceback)"
    return msg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 refused input, 2 bad usage)."""
    from liedeploy.io.atomic import Terminated, terminate_on_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    try:
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
    except UsageError as exc:
        sub.choices[args.command].error(str(exc))  # exit 2 with the command's usage line
    debug = os.environ.get("LIEDEPLOY_DEBUG") == "1"
    try:
        with terminate_on_signals():
            return int(args.run(args) or 0)
    except UsageError as exc:
        sub.choices[args.command].error(str(exc))
    except KeyboardInterrupt:
        print(f"liedeploy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"liedeploy {args.command}: stopped by signal {exc.signum}; nothing was left half-written", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - every failure is one line unless LIEDEPLOY_DEBUG=1
        if debug:
            raise
        print(f"liedeploy {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def entry() -> None:  # console script
    sys.exit(main())
