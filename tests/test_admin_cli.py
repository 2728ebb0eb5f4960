"""The ``kerjostunt`` admin commands, run in-process and as a real process."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys

from twisted.trial import unittest

from kerjostunt import cli
from kerjostunt.store import Database


def md5_ha1(user: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()


class AdminCommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite")
        self.url = f"sqlite:///{self.path}"
        self.ok("group", "list", "--create")  # a database to work on (mode 0600)

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main([*argv, "--db", self.url] if "--db" not in argv else list(argv))
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str, stdin: str = "") -> str:
        code, out, err = self.run_cli(*argv, stdin=stdin)
        self.assertEqual((code, err), (0, ""), argv)
        return out

    def error(self, *argv: str, stdin: str = "", code: int = 1) -> str:
        got, out, err = self.run_cli(*argv, stdin=stdin)
        self.assertEqual(got, code, (argv, out, err))
        self.assertNotIn("Traceback", err)
        if code == 1:
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertTrue(err.startswith("kerjostunt: error: "), err)
        return err

    def database(self) -> Database:
        db = Database(self.url)
        self.addCleanup(db.close)
        return db

    def add(self, user: str, password: str = "pw") -> None:
        self.ok("user", "add", user, "--password-stdin", stdin=password + "\n")

    # -- users -------------------------------------------------------------

    def test_add_user_from_stdin_on_a_fresh_file(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite")
        self.url = f"sqlite:///{self.path}"
        self.assertFalse(os.path.exists(self.path))
        out = self.ok("user", "add", "alice", "--password-stdin", "--create", stdin="s3cret\nignored\n")
        self.assertIn("alice", out)
        self.assertEqual(
            self.database().get_ha1("alice", "MD5"), md5_ha1("alice", "kerjo.local", "s3cret")
        )

    def test_add_user_from_file_with_domain(self) -> None:
        pwfile = self.mktemp()
        with open(pwfile, "w") as f:
            f.write("filepw\r\n")
        self.ok("user", "add", "bob", "--password-file", pwfile, "--domain", "example.org")
        db = self.database()
        self.assertEqual(db.get_user("bob").realm, "example.org")
        self.assertEqual(db.get_ha1("bob", "MD5"), md5_ha1("bob", "example.org", "filepw"))

    def test_add_errors(self) -> None:
        self.add("alice")
        self.assertIn("already exists", self.error("user", "add", "alice", "--password-stdin",
                                                   stdin="x\n"))
        self.assertIn("invalid user ID", self.error("user", "add", "bad/id", "--password-stdin",
                                                    stdin="x\n"))
        for bad in ("bob\n", "bob\r", "b\x1bob"):  # issue 13: no trailing newline, no control characters
            self.assertIn("invalid user ID", self.error("user", "add", bad, "--password-stdin", stdin="x\n"))
        self.assertIn("empty password", self.error("user", "add", "bob", "--password-stdin"))
        self.assertIn("password file", self.error("user", "add", "bob", "--password-file",
                                                  self.mktemp()))
        self.assertEqual([u.user_id for u in self.database().list_users()], ["alice"])

    def test_usage_errors_exit_2(self) -> None:
        self.error("user", "add", "alice", code=2)  # no password option
        self.error("user", "add", "alice", "--password-stdin", "--password-file", "f", code=2)
        self.error("user", code=2)
        self.error("frobnicate", code=2)
        code, _, _ = self.run_cli("--db", self.url)  # no command at all
        self.assertEqual(code, 2)

    def test_passwd(self) -> None:
        self.add("alice", "old")
        self.ok("user", "passwd", "alice", "--password-stdin", stdin="new\n")
        self.assertEqual(
            self.database().get_ha1("alice", "MD5"), md5_ha1("alice", "kerjo.local", "new")
        )
        self.assertIn("unknown user", self.error("user", "passwd", "bob", "--password-stdin",
                                                 stdin="x\n"))

    def test_del(self) -> None:
        self.add("alice")
        self.ok("user", "del", "alice")
        self.assertEqual(self.database().list_users(), [])
        self.assertIn("unknown user 'alice'", self.error("user", "del", "alice"))

    def test_list(self) -> None:
        self.assertEqual(self.ok("user", "list"), "")
        self.add("bob")
        self.add("alice")
        db = self.database()
        db.add_group("g1")
        db.add_group("g2")
        db.join_group("g1", ["alice"])
        db.join_group("g2", ["alice"])
        db.set_stunt_state("bob", "stunt")
        lines = [line.split() for line in self.ok("user", "list").splitlines()]
        self.assertEqual(lines, [["alice", "unknown", "g1,g2"], ["bob", "stunt", "-"]])

    def test_show(self) -> None:
        self.add("alice")
        self.add("bob")
        db = self.database()
        db.record_seen("alice", "203.0.113.9", 41000, 0.0)
        db.record_nat("alice", {"mapping": "endpoint-dependent", "allocation": "sequential",
                                "delta": 2, "public_ip": "203.0.113.9"}, 60.0)
        db.record_attempt("call-1", "alice", "bob", "sequential", "stunt",
                          "203.0.113.9:41002", "203.0.113.9:41004", 230.0, 120.0)
        out = self.ok("user", "show", "alice")
        for text in [
            "alice", "kerjo.local", "use STUNT:   stunt", "203.0.113.9:41000",
            "1970-01-01 00:01:00 UTC", "mapping=endpoint-dependent", "allocation=sequential",
            "delta=2", "public_ip=203.0.113.9", "alice -> bob", "technique=sequential",
            "230 ms", "predicted=203.0.113.9:41002", "actual=203.0.113.9:41004", "call-1",
        ]:
            self.assertIn(text, out)
        self.assertIn("unknown user", self.error("user", "show", "nobody"))

    # -- import ------------------------------------------------------------

    def write_csv(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", newline="") as f:
            f.write(text)
        return path

    def test_import(self) -> None:
        ha1 = md5_ha1("carol", "kerjo.local", "c")
        path = self.write_csv(
            "user_id,password,ha1_md5,groups\r\n"
            "alice,a,,team all\r\n"
            "bob,b,,all\r\n"
            f"carol,,{ha1},\r\n"
        )
        self.assertIn("imported 3 users", self.ok("user", "import", path))
        db = self.database()
        self.assertEqual(db.list_groups(), {"all": ["alice", "bob"], "team": ["alice"]})
        self.assertEqual(db.get_ha1("carol", "MD5"), ha1)
        self.assertEqual(db.get_ha1("bob", "MD5"), md5_ha1("bob", "kerjo.local", "b"))

    def test_import_from_stdin(self) -> None:
        self.ok("user", "import", "-", stdin="user_id,password\nalice,a\n")
        self.assertEqual([u.user_id for u in self.database().list_users()], ["alice"])

    def test_import_bad_row_imports_nothing(self) -> None:
        rows = "".join(f"u{i},pw{i},g\n" for i in range(1, 1001))
        path = self.write_csv("user_id,password,groups\n" + rows + "bad id,x,g\n")
        err = self.error("user", "import", path)
        self.assertIn("row 1001", err)
        self.assertIn("user_id", err)
        self.assertIn("nothing imported", err)
        self.assertEqual(self.database().list_users(), [])
        self.assertEqual(self.database().list_groups(), {})

    def test_import_file_errors(self) -> None:
        self.assertIn("cannot read", self.error("user", "import", self.mktemp()))
        self.assertIn("user_id column",
                      self.error("user", "import", self.write_csv("name,password\na,b\n")))
        self.assertIn("row 1: more fields",
                      self.error("user", "import", self.write_csv("user_id,password\na,b,c\n")))

    # -- groups ------------------------------------------------------------

    def test_groups(self) -> None:
        self.add("alice")
        self.add("bob")
        self.ok("group", "add", "friends")
        self.ok("group", "add", "empty")
        self.ok("group", "join", "friends", "alice", "bob")
        self.assertEqual(self.ok("group", "list"), "empty: -\nfriends: alice bob\n")
        self.ok("group", "leave", "friends", "bob")
        self.assertEqual(self.ok("group", "list"), "empty: -\nfriends: alice\n")
        self.ok("group", "del", "empty")
        self.assertEqual(self.database().list_groups(), {"friends": ["alice"]})

    def test_group_errors(self) -> None:
        self.add("alice")
        self.ok("group", "add", "g")
        self.assertIn("already exists", self.error("group", "add", "g"))
        self.assertIn("invalid group name", self.error("group", "add", "no good"))
        self.assertIn("invalid group name", self.error("group", "add", "g2\n"))  # issue 13
        self.assertIn("unknown group 'h'", self.error("group", "join", "h", "alice"))
        self.assertIn("unknown user 'zed'", self.error("group", "join", "g", "alice", "zed"))
        self.assertIn("unknown group", self.error("group", "leave", "h", "alice"))
        self.assertIn("unknown group", self.error("group", "del", "h"))
        self.error("group", "join", "g", code=2)  # no user IDs
        self.assertEqual(self.database().list_groups(), {"g": []})

    def test_unusable_database(self) -> None:
        err = self.error("user", "list", "--create", "--db", "sqlite:////nonexistent-dir/x.sqlite")
        self.assertIn("cannot create database file /nonexistent-dir/x.sqlite", err)

    def test_a_missing_database_is_not_created_without_create(self) -> None:
        moved = self.path + ".moved"
        os.rename(self.path, moved)
        for argv in (("user", "list"), ("user", "add", "bob", "--password-stdin"), ("group", "add", "g")):
            err = self.error(*argv, stdin="pw\n")
            self.assertEqual(err, f"kerjostunt: error: no database at {self.path} (give --create to make a new one)\n")
        self.assertFalse(os.path.exists(self.path))
        # A relative --db names the absolute path it looked for.
        relative = os.path.relpath(self.path)
        err = self.error("user", "list", "--db", f"sqlite:///{relative}")
        self.assertIn(f"no database at {self.path} ", err)

    def test_database_files_are_private(self) -> None:
        self.add("alice")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                self.assertEqual(stat.S_IMODE(os.stat(self.path + suffix).st_mode), 0o600, suffix)
        os.chmod(self.path, 0o644)
        code, out, err = self.run_cli("user", "list")
        self.assertEqual((code, out.split()), (0, ["alice", "unknown", "-"]))
        self.assertEqual(err, f"kerjostunt: warning: {self.path} was mode 0644, now 0600: it holds password hashes\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_a_new_database_is_private_whatever_the_umask(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite")
        self.url = f"sqlite:///{self.path}"
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        self.add_created("alice")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        wal = self.path + "-wal"
        if os.path.exists(wal):
            self.assertEqual(stat.S_IMODE(os.stat(wal).st_mode), 0o600)

    def add_created(self, user: str) -> None:
        self.ok("user", "add", user, "--password-stdin", "--create", stdin="pw\n")


class ConsoleScriptTests(unittest.TestCase):
    """The commands as a separate process, the way an admin runs them."""

    def run_process(self, command: list[str], *argv: str, stdin: str = ""):
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return subprocess.run(
            [*command, *argv], input=stdin, capture_output=True, text=True, env=env,
            timeout=60,
        )

    def check(self, command: list[str]) -> None:
        db = "sqlite:///" + os.path.abspath(self.mktemp() + ".sqlite")
        r = self.run_process(command, "user", "list", "--db", db)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr, f"kerjostunt: error: no database at {db[len('sqlite:///'):]} "
                                   "(give --create to make a new one)\n")
        r = self.run_process(command, "user", "add", "alice", "--password-stdin", "--create", "--db", db,
                             stdin="pw\n")
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        r = self.run_process(command, "user", "add", "alice", "--password-stdin", "--db", db,
                             stdin="pw\n")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr, "kerjostunt: error: user 'alice' already exists\n")
        r = self.run_process(command, "user", "list", "--db", db)
        self.assertEqual((r.returncode, r.stdout.split()), (0, ["alice", "unknown", "-"]))
        r = self.run_process(command, "user", "nope", "--db", db)
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage:", r.stderr)

    def test_module(self) -> None:
        self.check([sys.executable, "-m", "kerjostunt.cli"])

    def test_console_script(self) -> None:
        script = shutil.which("kerjostunt", path=os.path.dirname(sys.executable))
        script = script or shutil.which("kerjostunt")
        if script is None:
            raise unittest.SkipTest("the kerjostunt console script is not installed")
        self.check([script])
