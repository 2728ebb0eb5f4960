"""Operator commands: ``kerjostunt attempts`` and ``kerjostunt operator add|del|list``.

``attempts`` answers "why did alice's call to bob fail?" from the attempts
table: per attempt who called whom and when, each side's techniques in the
order its race started them with each one's result, the ports the server
predicted against the endpoint that connected, both NATs, and the time.
``operator`` marks the accounts that may read the web service's /status
page. Blocking, like the other admin commands (``server/admin.py``, whose
plumbing these share); docs/admin.rst.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from kerjostunt.server.admin import _db_options, _out, _when, _with_database
from kerjostunt.store.database import AttemptRecord, Database, check_name

__all__ = ["register", "format_attempt"]


def register(subparsers: Any) -> None:
    attempts = subparsers.add_parser(
        "attempts", help="list call attempts with each technique's result",
        description="The latest call attempts (of USER, with --peer), oldest first: who called whom, when, "
        "each side's techniques in order with their results, predicted vs actual endpoint, time.")
    attempts.add_argument("user", nargs="?", metavar="USER", help="only attempts USER took part in")
    attempts.add_argument("--peer", metavar="ID", help="only attempts with this peer")
    attempts.add_argument("--last", type=int, default=20, metavar="N", help="how many (default 20)")
    attempts.add_argument("--json", action="store_true", help="one JSON object per attempt, a line each")
    _db_options(attempts)
    attempts.set_defaults(func=_with_database(_attempts))

    operator = subparsers.add_parser("operator", help="who may read the /status page")
    commands = operator.add_subparsers(dest="operator_command", metavar="SUBCOMMAND")
    commands.required = True
    for name, help_text in (("add", "make users operators"), ("del", "make users plain users again")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("user_ids", nargs="+", metavar="ID")
        _db_options(p)
        p.set_defaults(func=_with_database(_set_operator), on=name == "add")
    p = commands.add_parser("list", help="list the operators")
    _db_options(p)
    p.set_defaults(func=_with_database(_list_operators))


def _attempts(args: argparse.Namespace, db: Database) -> int:
    for name in (args.user, args.peer):
        if name is not None:
            check_name(name, "user ID")
    records = db.attempts(args.user, args.peer, args.last)
    for record in records:
        _out(json.dumps(asdict(record), sort_keys=True) if args.json else format_attempt(record))
    if not records and not args.json:
        _out("no attempts")
    return 0


def _tried(side: dict[str, Any]) -> str:
    entries = side.get("tried") or []
    return ", ".join(f"{t} {r}" for t, r in entries) or "nothing reported"


def _window(side: dict[str, Any]) -> str:
    ports = side.get("predicted") or []
    if not ports:
        return "-"
    return f"{side.get('ip') or '?'}:{','.join(str(p) for p in ports)}"


def format_attempt(a: AttemptRecord) -> str:
    """Three lines: the call, then each side (caller first)."""
    ms = "-" if a.duration_ms is None else f"{a.duration_ms:.0f} ms"
    head = (f"{_when(a.when)}  {a.caller} -> {a.callee}  {a.outcome} via {a.technique or 'none'}  {ms}  "
            f"predicted {a.predicted or '-'}  actual {a.actual or '-'}  call {a.call_id}")
    detail = a.detail or {}
    lines = [head]
    if "refused" in detail:
        lines.append(f"  refused: {detail['refused']}")
    for side, user in (("caller", a.caller), ("callee", a.callee)):
        info = detail.get(side)
        if not isinstance(info, dict):
            continue
        elapsed = info.get("elapsed_ms")
        took = "" if elapsed is None else f" after {elapsed} ms"
        lines.append(f"  {side} {user}: NAT {info.get('nat', 'unknown')}, predicted {_window(info)}; "
                     f"{info.get('outcome', '?')}{took}; tried {_tried(info)}")
    if not detail:
        lines.append("  (no per-technique detail: recorded before it was kept)")
    return "\n".join(lines)


def _set_operator(args: argparse.Namespace, db: Database) -> int:
    for user_id in args.user_ids:
        db.set_operator(user_id, args.on)
        _out(f"{user_id} {'is an operator' if args.on else 'is no longer an operator'}")
    return 0


def _list_operators(args: argparse.Namespace, db: Database) -> int:
    for user_id in db.operator_ids():
        _out(user_id)
    return 0
