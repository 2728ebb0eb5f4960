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
    "kerjostunt.server.operators",
    "kerjostunt.client.cli.peers",
    "kerjostunt.client.cli.echo",
    "kerjostunt.client.cli.join",
    "kerjostunt.client.cli.netcheck",
]

#: a peer's commands, by name: ``kerjostunt join`` imports only its own module.  The admin
#: commands pull in SQLAlchemy and Alembic (0.4 s of CPU), and a dozen peers started at
#: once on a small machine wait for each other's imports (the NAT lab's group).
PEER_COMMANDS: dict[str, str] = {
    "peers": "kerjostunt.client.cli.peers",
    "echo-server": "kerjostunt.client.cli.echo",
    "echo-client": "kerjostunt.client.cli.echo",
    "join": "kerjostunt.client.cli.join",
}

PROG = "kerjostunt"


def fail(message: str) -> int:
    """Print a one-line error on stderr; return exit code 1."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or only ``command``'s when it is a peer's command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="kerjostunt admin and client commands"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    modules = [PEER_COMMANDS[command]] if command in PEER_COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list[0] if args_list else None)
    try:
        args = parser.parse_args(args_list)
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
