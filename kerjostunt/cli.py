"""The ``kerjostunt`` console script.

Subcommands come from the modules listed in ``COMMAND_MODULES``. To add
commands, write a module with::

    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("peers", help="...")
        parser.add_argument(...)
        parser.set_defaults(func=run_peers)   # run_peers(args) -> int exit code

and append its dotted name here. ``func`` returns the exit code: 0 ok,
1 for an expected failure (it prints a one-line message on stderr with
``fail``), 2 is argparse's usage error. Expected failures never print a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kerjostunt import __version__

COMMAND_MODULES: list[str] = [
    "kerjostunt.server.admin",
    "kerjostunt.client.cli.peers",
    "kerjostunt.client.cli.echo",
    "kerjostunt.client.cli.join",
]

PROG = "kerjostunt"


def fail(message: str) -> int:
    """Print a one-line error on stderr; return exit code 1."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="kerjostunt admin and client commands"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    func = getattr(args, "func", None)
    if func is None:  # a registered parser forgot set_defaults(func=...)
        parser.print_usage(sys.stderr)
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return fail("interrupted")
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
