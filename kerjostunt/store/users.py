"""Users and groups: who may register, and who trusts whom."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from kerjostunt.store.directory import mark_changed
from kerjostunt.store.models import Group, Membership, User
from kerjostunt.store.queries import (
    CALL_CHECK,
    HA1_MANY,
    HA1_MANY_COLUMNS,
    HA1_QUERIES,
    SHARE_GROUP,
    USER_GROUPS,
    USER_ROW,
    EngineBound,
    chunks,
    translated,
    user_record,
)
from kerjostunt.store.records import (
    Duplicate,
    ImportRowError,
    InvalidValue,
    UnknownUser,
    UserRecord,
    check_name,
    credential_columns,
    import_row,
)


class UsersAndGroups(EngineBound):
    """The ``Database`` operations on users, their credentials and groups."""

    @translated
    def add_user(
        self,
        user_id: str,
        realm: str,
        password: str | None = None,
        ha1_md5: str | None = None,
        ha1_sha256: str | None = None,
    ) -> None:
        check_name(user_id, "user ID")
        creds = credential_columns(user_id, realm, password, ha1_md5, ha1_sha256)
        with self._session() as s, s.begin():
            if s.get(User, user_id) is not None:
                raise Duplicate(f"user {user_id!r} already exists")
            s.add(User(user_id=user_id, realm=realm, stunt_state="unknown", **creds))
            try:
                s.flush()
            except IntegrityError as e:  # lost a race with another writer
                raise Duplicate(f"user {user_id!r} already exists") from e
            mark_changed(s)

    @translated
    def set_password(self, user_id: str, realm: str, password: str) -> None:
        creds = credential_columns(user_id, realm, password, None, None)
        with self._session() as s, s.begin():
            user = self._user(s, user_id)
            user.realm = realm
            user.ha1_md5 = creds["ha1_md5"]
            user.ha1_sha256 = creds["ha1_sha256"]
            mark_changed(s)

    @translated
    def delete_user(self, user_id: str) -> None:
        with self._session() as s, s.begin():
            self._user(s, user_id)
            s.execute(delete(Membership).where(Membership.user_id == user_id))
            s.execute(delete(User).where(User.user_id == user_id))
            mark_changed(s)

    @translated
    def get_user(self, user_id: str) -> UserRecord:
        # Core, not an ORM Session: the server asks this for every INVITE.
        with self.engine.connect() as c:
            user = c.execute(USER_ROW, {"user_id": user_id}).first()
            if user is None:
                raise UnknownUser(f"unknown user {user_id!r}")
            groups = c.execute(USER_GROUPS, {"user_id": user_id}).scalars().all()
            return user_record(user, groups)  # type: ignore[arg-type]

    @translated
    def list_users(self) -> list[UserRecord]:
        with self._session() as s:
            groups: dict[str, list[str]] = {}
            for group_name, user_id in s.execute(
                select(Membership.group_name, Membership.user_id).order_by(
                    Membership.group_name
                )
            ):
                groups.setdefault(user_id, []).append(group_name)
            users = s.scalars(select(User).order_by(User.user_id))
            return [user_record(u, groups.get(u.user_id, [])) for u in users]

    @translated
    def get_ha1(self, user_id: str, algorithm: str) -> str | None:
        query = HA1_QUERIES.get(algorithm.upper())
        if query is None:
            raise InvalidValue(f"unknown digest algorithm {algorithm!r}")
        with self.engine.connect() as c:
            return c.execute(query, {"user_id": user_id}).scalar()

    @translated
    def get_ha1_many(self, wanted: Sequence[tuple[str, str]]) -> list[str | None]:
        """``get_ha1`` for many ``(user_id, algorithm)`` pairs in one query per
        500 users; the answers in the same order (None: no such user or HA1).

        The server gathers the REGISTERs of a few milliseconds into one call
        (``AsyncStore.get_ha1``)."""
        columns = HA1_MANY_COLUMNS
        for _user_id, algorithm in wanted:
            if algorithm.upper() not in columns:
                raise InvalidValue(f"unknown digest algorithm {algorithm!r}")
        rows: dict[str, Any] = {}
        with self.engine.connect() as c:
            for chunk in chunks(list(dict.fromkeys(user_id for user_id, _ in wanted))):
                rows.update((row[0], row) for row in c.execute(HA1_MANY, {"user_ids": list(chunk)}))
        return [
            rows[user_id][columns[algorithm.upper()]] if user_id in rows else None
            for user_id, algorithm in wanted
        ]

    @translated
    def import_users(self, rows: Iterable[Mapping[str, str | None]], realm: str) -> int:
        """Create many users in one transaction: all of them or none.

        Rows are ``csv.DictReader`` rows (see docs/admin.rst for the format).
        Validation happens before anything is written, so a bad row costs no
        rollback; the inserts are executemany batches.
        """
        users: list[dict[str, Any]] = []
        memberships: list[dict[str, str]] = []
        wanted_groups: set[str] = set()
        row_of: dict[str, int] = {}
        for number, row in enumerate(rows, start=1):
            user, groups = import_row(number, row, realm)
            if user["user_id"] in row_of:
                raise ImportRowError(
                    number,
                    f"user_id {user['user_id']!r} repeats row {row_of[user['user_id']]}",
                )
            row_of[user["user_id"]] = number
            users.append(user)
            wanted_groups.update(groups)
            memberships.extend({"group_name": g, "user_id": user["user_id"]} for g in groups)
        if not users:
            return 0
        with self._session() as s, s.begin():
            ids = list(row_of)
            for chunk in chunks(ids):
                existing = s.scalars(select(User.user_id).where(User.user_id.in_(chunk))).all()
                if existing:
                    first = min(existing, key=row_of.__getitem__)
                    raise ImportRowError(row_of[first], f"user {first!r} already exists")
            names = sorted(wanted_groups)
            have: set[str] = set()
            for chunk in chunks(names):
                have.update(s.scalars(select(Group.name).where(Group.name.in_(chunk))))
            missing = [{"name": n} for n in names if n not in have]
            if missing:
                s.execute(insert(Group), missing)
            s.execute(insert(User), users)
            if memberships:
                s.execute(insert(Membership), memberships)
            mark_changed(s)
        return len(users)

    # -- groups --------------------------------------------------------

    @translated
    def add_group(self, name: str) -> None:
        check_name(name, "group name")
        with self._session() as s, s.begin():
            if s.get(Group, name) is not None:
                raise Duplicate(f"group {name!r} already exists")
            s.add(Group(name=name))
            try:
                s.flush()
            except IntegrityError as e:
                raise Duplicate(f"group {name!r} already exists") from e

    @translated
    def delete_group(self, name: str) -> None:
        with self._session() as s, s.begin():
            self._group(s, name)
            s.execute(delete(Membership).where(Membership.group_name == name))
            s.execute(delete(Group).where(Group.name == name))
            mark_changed(s)

    @translated
    def join_group(self, name: str, user_ids: Sequence[str]) -> None:
        """Add users to a group; users already in it are left alone."""
        with self._session() as s, s.begin():
            self._group(s, name)
            wanted = self._existing_users(s, user_ids)
            present = set(
                s.scalars(
                    select(Membership.user_id).where(
                        Membership.group_name == name, Membership.user_id.in_(wanted)
                    )
                )
            )
            new = [{"group_name": name, "user_id": u} for u in wanted if u not in present]
            if new:
                s.execute(insert(Membership), new)
                mark_changed(s)

    @translated
    def leave_group(self, name: str, user_ids: Sequence[str]) -> None:
        """Remove users from a group; users not in it are ignored."""
        with self._session() as s, s.begin():
            self._group(s, name)
            wanted = self._existing_users(s, user_ids)
            s.execute(
                delete(Membership).where(
                    Membership.group_name == name, Membership.user_id.in_(wanted)
                )
            )
            mark_changed(s)

    @translated
    def list_groups(self) -> dict[str, list[str]]:
        with self._session() as s:
            result: dict[str, list[str]] = {
                name: [] for name in s.scalars(select(Group.name).order_by(Group.name))
            }
            for group_name, user_id in s.execute(
                select(Membership.group_name, Membership.user_id).order_by(
                    Membership.group_name, Membership.user_id
                )
            ):
                result[group_name].append(user_id)
            return result

    @translated
    def groups_of(self, user_id: str) -> list[str]:
        """The user's groups; UnknownUser if there is no such user."""
        with self._session() as s:
            self._user(s, user_id)
            return self._groups_of(s, user_id)

    @translated
    def share_group(self, a: str, b: str) -> bool:
        """True when some group holds both users (the trust relation)."""
        with self.engine.connect() as c:  # Core: once per INVITE
            return bool(c.execute(SHARE_GROUP, {"a": a, "b": b}).scalar())

    @translated
    def call_check(self, caller: str, callee: str) -> str:
        """'unknown' (no such callee), 'no-group' (no group holds both) or 'ok'.

        One query for what an INVITE needs, instead of get_user + share_group.
        """
        with self.engine.connect() as c:
            known, shared = c.execute(CALL_CHECK, {"a": caller, "b": callee}).one()
        if not known:
            return "unknown"
        return "ok" if shared else "no-group"

    @translated
    def is_member(self, group: str, user_id: str) -> bool:
        with self._session() as s:
            self._group(s, group)
            return s.get(Membership, (group, user_id)) is not None

    @translated
    def group_members(self, group: str) -> list[UserRecord]:
        with self._session() as s:
            self._group(s, group)
            users = s.scalars(
                select(User)
                .join(Membership, Membership.user_id == User.user_id)
                .where(Membership.group_name == group)
                .order_by(User.user_id)
            ).all()
            groups: dict[str, list[str]] = {}
            ids = [u.user_id for u in users]
            for chunk in chunks(ids):
                for group_name, user_id in s.execute(
                    select(Membership.group_name, Membership.user_id)
                    .where(Membership.user_id.in_(chunk))
                    .order_by(Membership.group_name)
                ):
                    groups.setdefault(user_id, []).append(group_name)
            return [user_record(u, groups.get(u.user_id, [])) for u in users]
