"""The house rules of docs/development.rst, checked on the source itself.

The arrows between packages are what keep each feature in an obvious room:
the wire is shared and pure, the client never grows a dependency on the
server, and SQL stays in the store where the thread pool guards it. The size
limits keep every module and function readable in one sitting.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "kerjostunt"

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
MAX_INIT_PARAMETERS = 10

#: server modules that build or administer the database itself rather than use the async API
SERVER_STORE_OWNERS = {"kerjostunt.server.service", "kerjostunt.server.admin", "kerjostunt.server.operators"}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(path: Path, module: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names, relative ones resolved."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


class ArrowTests(SynchronousTestCase):
    def violations(self, rule: Callable[[str, str], bool]) -> list[str]:
        return [f"{module} imports {name}" for module, path in modules() for name in sorted(imports(path, module))
                if rule(module, name)]

    def test_wire_imports_neither_side_nor_twisted(self) -> None:
        """The wire is the standard library and itself: pure, and shared by both sides."""
        def rule(module: str, name: str) -> bool:
            if not under(module, "kerjostunt.wire"):
                return False
            return not (under(name, "kerjostunt.wire") or top(name) in sys.stdlib_module_names)
        self.assertEqual(self.violations(rule), [])

    def test_client_never_imports_server_or_store(self) -> None:
        def rule(module: str, name: str) -> bool:
            return under(module, "kerjostunt.client") and (
                under(name, "kerjostunt.server") or under(name, "kerjostunt.store") or top(name) == "sqlalchemy")
        self.assertEqual(self.violations(rule), [])

    def test_only_the_store_imports_sqlalchemy(self) -> None:
        def rule(module: str, name: str) -> bool:
            return top(name) in ("sqlalchemy", "alembic") and not under(module, "kerjostunt.store")
        self.assertEqual(self.violations(rule), [])

    def test_server_reaches_the_database_through_the_async_api(self) -> None:
        def rule(module: str, name: str) -> bool:
            return (under(module, "kerjostunt.server") and module not in SERVER_STORE_OWNERS
                    and (under(name, "kerjostunt.store.database") or under(name, "kerjostunt.store.models")))
        self.assertEqual(self.violations(rule), [])

    def test_shared_helpers_import_neither_side(self) -> None:
        def rule(module: str, name: str) -> bool:
            return module in ("kerjostunt.tls", "kerjostunt.tcp") and (
                under(name, "kerjostunt.server") or under(name, "kerjostunt.client"))
        self.assertEqual(self.violations(rule), [])

    def test_the_walk_sees_imports(self) -> None:
        """The checks above would pass vacuously if the walk found nothing."""
        found = dict(modules())
        names = imports(found["kerjostunt.server.service"], "kerjostunt.server.service")
        self.assertIn("kerjostunt.wire.kerjo", names)
        self.assertTrue(any(under(n, "kerjostunt.store") for n in names))


class SizeTests(SynchronousTestCase):
    def test_modules(self) -> None:
        long = [f"{m}: {n} lines" for m, p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
        self.assertEqual(long, [])

    def test_functions_and_initialisers(self) -> None:
        problems = []
        for module, path in modules():
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{module}.{node.name}: {length} lines")
                if node.name == "__init__":
                    args = node.args
                    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) - 1  # less self
                    if count > MAX_INIT_PARAMETERS:
                        problems.append(f"{module}.__init__ at line {node.lineno}: {count} parameters")
        self.assertEqual(problems, [])


class DocsTests(SynchronousTestCase):
    """README.rst and docs/ name modules that exist (a moved module must take its docs along)."""

    PATH = re.compile(r"(?<![\w/.-])(?:kerjostunt/)?((?:client|server|wire|store)/[\w/]*\w(?:\.\w+)?/?)")
    DOTTED = re.compile(r"(?<![\w.])kerjostunt(?:\.[a-z_]\w*)+")

    def documents(self) -> Iterator[Path]:
        root = PACKAGE.parent
        yield root / "README.rst"
        yield from sorted((root / "docs").glob("*.rst"))
        yield root / "bench" / "README.rst"

    def test_paths_exist(self) -> None:
        missing = []
        for doc in self.documents():
            for match in self.PATH.finditer(doc.read_text()):
                target = PACKAGE / match.group(1)
                if not target.exists() and not target.with_suffix(".py").exists():
                    missing.append(f"{doc.name}: {match.group(0)}")
        self.assertEqual(missing, [])

    def test_dotted_names_exist(self) -> None:
        missing = []
        for doc in self.documents():
            for match in self.DOTTED.finditer(doc.read_text()):
                if not self.resolves(match.group(0).split(".")):
                    missing.append(f"{doc.name}: {match.group(0)}")
        self.assertEqual(missing, [])

    def resolves(self, parts: list[str]) -> bool:
        """The longest module prefix exists, and what follows it is named in that module."""
        if parts[-1] in ("sqlite", "pem", "log", "conf"):  # file names such as kerjostunt.sqlite
            return True
        for cut in range(len(parts), 0, -1):
            base = PACKAGE.parent.joinpath(*parts[:cut])
            module = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
            if module.exists():
                rest = parts[cut:]
                return not rest or re.search(rf"\b{re.escape(rest[0])}\b", module.read_text()) is not None
        return False
