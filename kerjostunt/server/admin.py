"""Admin commands: ``kerjostunt user ...`` and ``kerjostunt group ...``.

Each command opens the database, runs the migrations, does one thing and
closes it. A SQLite file that is not there is an error unless ``--create``
is given (a database moved away must not be replaced by an empty one); a
new file is made mode 0600, an existing one readable by others is made so
with a warning. Store errors become one-line messages and exit code 1; see
docs/admin.rst.
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from kerjostunt.cli import PROG, fail
from kerjostunt.store.database import (
    AttemptRecord,
    Database,
    ImportRowError,
    StoreError,
    UserRecord,
    check_name,
)
from kerjostunt.store.realm import realm_problem

DEFAULT_DB = "sqlite:///kerjostunt.sqlite"
DEFAULT_DOMAIN = "kerjo.local"
SHOW_ATTEMPTS = 5

Command = Callable[[argparse.Namespace, Database], int]


class _InputError(Exception):
    """A password or CSV file that cannot be read: exit code 1."""


def register(subparsers: Any) -> None:
    _register_user(subparsers)
    _register_group(subparsers)


# -- plumbing ------------------------------------------------------------


def _db_options(parser: argparse.ArgumentParser, domain: bool = True) -> None:
    parser.add_argument(
        "--db", default=DEFAULT_DB, metavar="URL",
        help=f"SQLAlchemy database URL (default {DEFAULT_DB})",
    )
    parser.add_argument(
        "--create", action="store_true",
        help="make a new SQLite database if there is none at --db (otherwise that is an error)",
    )
    if domain:
        parser.add_argument(
            "--domain", default=None,
            help="SIP domain, the digest realm: the database's own (stored by the first server start or "
            f"command on it, {DEFAULT_DOMAIN} if none named one); given, it must be that one",
        )


def _realm(args: argparse.Namespace, db: Database) -> str:
    """The database's realm (store/realm.py); ``--domain``, when given, must be it."""
    return db.claim_realm(getattr(args, "domain", None), DEFAULT_DOMAIN)


def _password_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from the first line of standard input",
    )
    source.add_argument(
        "--password-file", metavar="FILE",
        help="read the password from the first line of FILE",
    )


def _with_database(command: Command) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            database = Database(args.db)
        except StoreError as e:
            return fail(str(e))
        try:
            if not database.exists() and not args.create:
                return fail(f"no database at {database.path} (give --create to make a new one)")
            for warning in database.secure_files():  # before SQLite makes -wal and -shm like it
                print(f"{PROG}: warning: {warning}", file=sys.stderr)
            database.upgrade()
            if getattr(args, "domain", None) is not None:
                _realm(args, database)  # a --domain that is not the database's realm is refused
            return command(args, database)
        except (StoreError, _InputError) as e:
            return fail(str(e))
        finally:
            database.close()

    return run


def _read_password(args: argparse.Namespace) -> str:
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                line = f.readline()
        except (OSError, UnicodeDecodeError) as e:
            raise _InputError(f"cannot read password file: {e}") from e
    else:
        line = sys.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise _InputError("empty password")
    return password


def _out(line: str = "") -> None:
    print(line, file=sys.stdout)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


# -- user ----------------------------------------------------------------


def _register_user(subparsers: Any) -> None:
    user = subparsers.add_parser("user", help="manage users")
    commands = user.add_subparsers(dest="user_command", metavar="SUBCOMMAND")
    commands.required = True

    p = commands.add_parser("add", help="create a user")
    p.add_argument("user_id")
    _password_options(p)
    _db_options(p, domain=True)
    p.set_defaults(func=_with_database(user_add))

    p = commands.add_parser("passwd", help="change a user's password")
    p.add_argument("user_id")
    _password_options(p)
    _db_options(p, domain=True)
    p.set_defaults(func=_with_database(user_passwd))

    p = commands.add_parser("del", help="delete a user")
    p.add_argument("user_id")
    _db_options(p)
    p.set_defaults(func=_with_database(user_del))

    p = commands.add_parser("list", help="list users: id, state, groups")
    _db_options(p)
    p.set_defaults(func=_with_database(user_list))

    p = commands.add_parser("show", help="everything known about a user")
    p.add_argument("user_id")
    _db_options(p)
    p.set_defaults(func=_with_database(user_show))

    p = commands.add_parser("import", help="create users from a CSV file (all or nothing)")
    p.add_argument("file", metavar="FILE", help="CSV file with a header row, or - for stdin")
    _db_options(p, domain=True)
    p.set_defaults(func=_with_database(user_import))


def user_add(args: argparse.Namespace, db: Database) -> int:
    check_name(args.user_id, "user ID")  # before asking for a password
    db.add_user(args.user_id, _realm(args, db), password=_read_password(args))
    _out(f"added user {args.user_id}")
    return 0


def user_passwd(args: argparse.Namespace, db: Database) -> int:
    password = _read_password(args)
    db.set_password(args.user_id, _realm(args, db), password)
    _out(f"changed password of {args.user_id}")
    return 0


def user_del(args: argparse.Namespace, db: Database) -> int:
    db.delete_user(args.user_id)
    _out(f"deleted user {args.user_id}")
    return 0


def user_list(args: argparse.Namespace, db: Database) -> int:
    for user in db.list_users():
        _out(f"{user.user_id}\t{user.stunt_state}\t{','.join(user.groups) or '-'}")
    return 0


def user_show(args: argparse.Namespace, db: Database) -> int:
    user = db.get_user(args.user_id)
    for line in describe_user(
        user,
        db.get_ha1(user.user_id, "MD5") is not None,
        db.get_ha1(user.user_id, "SHA-256") is not None,
        db.recent_attempts(user.user_id, SHOW_ATTEMPTS),
        db.realm(),
    ):
        _out(line)
    return 0


def describe_user(
    user: UserRecord, has_md5: bool, has_sha256: bool, attempts: list[AttemptRecord], realm: str | None = None
) -> list[str]:
    """``user show``'s lines; ``realm`` is the database's, named when the user's differs."""
    endpoint = (
        f"{user.public_ip}:{user.public_port}" if user.public_ip is not None else "unknown"
    )
    digests = [name for name, has in (("MD5", has_md5), ("SHA-256", has_sha256)) if has]
    lines = [
        f"user:        {user.user_id}",
        f"realm:       {user.realm}" + _realm_note(user, realm),
        f"digest:      {', '.join(digests) or 'none'}",
        f"use STUNT:   {user.stunt_state}",
        f"groups:      {', '.join(user.groups) or '-'}",
        f"public:      {endpoint}",
        f"last seen:   {_when(user.last_seen)}",
        f"nat:         {_describe_nat(user.nat)}",
        "attempts:" if attempts else "attempts:    none",
    ]
    for a in attempts:
        parts = [_when(a.when), f"{a.caller} -> {a.callee}", a.outcome]
        if a.technique:
            parts.append(f"technique={a.technique}")
        if a.duration_ms is not None:
            parts.append(f"{a.duration_ms:.0f} ms")
        if a.predicted:
            parts.append(f"predicted={a.predicted}")
        if a.actual:
            parts.append(f"actual={a.actual}")
        parts.append(f"call={a.call_id}")
        lines.append("  " + "  ".join(parts))
    return lines


def _realm_note(user: UserRecord, realm: str | None) -> str:
    problem = realm_problem(user, realm)
    return f" (logins fail: {problem})" if problem else ""


def _describe_nat(nat: dict[str, Any] | None) -> str:
    if not nat:
        return "unknown"
    first = ("mapping", "allocation", "delta", "public_ip")
    keys = [k for k in first if k in nat] + sorted(k for k in nat if k not in first)
    return " ".join(f"{k}={nat[k]}" for k in keys)


def user_import(args: argparse.Namespace, db: Database) -> int:
    try:
        if args.file == "-":
            count = _import(db, sys.stdin, _realm(args, db))
        else:
            with open(args.file, newline="", encoding="utf-8-sig") as f:
                count = _import(db, f, _realm(args, db))
    except (OSError, UnicodeDecodeError) as e:
        raise _InputError(f"cannot read {args.file}: {e}") from e
    except csv.Error as e:
        raise _InputError(f"{args.file}: bad CSV: {e}") from e
    _out(f"imported {count} users")
    return 0


def _import(db: Database, f: TextIO, realm: str) -> int:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if not header or "user_id" not in header:
        raise _InputError("the CSV header must name a user_id column")
    try:
        return db.import_users(reader, realm)
    except ImportRowError as e:
        # Row numbers count data rows, the header excluded.
        raise _InputError(f"{_file_label(f)}row {e.row}: {e.detail}; nothing imported") from e


def _file_label(f: TextIO) -> str:
    name = getattr(f, "name", None)
    return f"{name}: " if isinstance(name, str) and name != "<stdin>" else ""


# -- group ---------------------------------------------------------------


def _register_group(subparsers: Any) -> None:
    group = subparsers.add_parser("group", help="manage groups (who trusts whom)")
    commands = group.add_subparsers(dest="group_command", metavar="SUBCOMMAND")
    commands.required = True

    p = commands.add_parser("add", help="create a group")
    p.add_argument("group")
    _db_options(p)
    p.set_defaults(func=_with_database(group_add))

    p = commands.add_parser("del", help="delete a group (its users stay)")
    p.add_argument("group")
    _db_options(p)
    p.set_defaults(func=_with_database(group_del))

    p = commands.add_parser("join", help="add users to a group")
    p.add_argument("group")
    p.add_argument("user_ids", nargs="+", metavar="USER_ID")
    _db_options(p)
    p.set_defaults(func=_with_database(group_join))

    p = commands.add_parser("leave", help="remove users from a group")
    p.add_argument("group")
    p.add_argument("user_ids", nargs="+", metavar="USER_ID")
    _db_options(p)
    p.set_defaults(func=_with_database(group_leave))

    p = commands.add_parser("list", help="list groups and their members")
    _db_options(p)
    p.set_defaults(func=_with_database(group_list))


def group_add(args: argparse.Namespace, db: Database) -> int:
    db.add_group(args.group)
    _out(f"added group {args.group}")
    return 0


def group_del(args: argparse.Namespace, db: Database) -> int:
    db.delete_group(args.group)
    _out(f"deleted group {args.group}")
    return 0


def group_join(args: argparse.Namespace, db: Database) -> int:
    db.join_group(args.group, args.user_ids)
    _out(f"{args.group}: joined {' '.join(args.user_ids)}")
    return 0


def group_leave(args: argparse.Namespace, db: Database) -> int:
    db.leave_group(args.group, args.user_ids)
    _out(f"{args.group}: left {' '.join(args.user_ids)}")
    return 0


def group_list(args: argparse.Namespace, db: Database) -> int:
    for name, members in db.list_groups().items():
        _out(f"{name}: {' '.join(members) or '-'}")
    return 0
