"""SQL text is never built from values: values travel as bound parameters (``$1``, ``$2``).

The scanner reads every module under ``src/`` with :mod:`ast` and looks at each call of an
asyncpg-style method (``execute``, ``executemany``, ``fetch``, ``fetchrow``, ``fetchval``,
``prepare``, ``cursor``, ``copy_*``). The first argument -- the SQL text, or the table name of
``copy_*_table`` -- must be *constant*:

* a string literal, or a module-level constant built only from literals and other constants
  (``_READ_ALL = f"SELECT {_COLUMNS} FROM ..."`` is fine);
* a local variable or ``self`` attribute whose every assignment is constant;
* a call of a function of the same module whose every ``return`` is constant;
* a parameter of a function of the same module whose every call site passes a constant;
* an f-string whose holes are constants or calls of an **identifier builder** listed in
  :data:`IDENTIFIER_BUILDERS` (e.g. ``quote_ident(name)``: a value quoted as one identifier).

Anything built with an f-string hole, ``%``, ``.format()``, ``.join()`` or ``+`` from a
non-constant fails the test, and so does an argument the scanner cannot prove constant, unless
it is listed in :data:`ALLOWED` with the reason it is safe. An entry of :data:`ALLOWED` that no
longer matches anything also fails (the list stays honest). The scanner is itself tested on
synthetic good and bad modules.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from azolla.adapters.postgres import partitions
from azolla.adapters.postgres.cluster import quote_ident

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
#: Generated protobuf/gRPC code: no SQL, and not written by hand.
SKIP_DIRS = ("src/azolla/adapters/grpc/pb/",)

SQL_METHODS = frozenset({"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare",
                         "cursor"})

#: Functions whose result may appear in SQL text: each turns any value into a single safe token.
IDENTIFIER_BUILDERS: dict[str, str] = {
    "quote_ident": "azolla.adapters.postgres.cluster.quote_ident wraps the name in double quotes "
                   "and doubles embedded ones: the value is one identifier, never SQL "
                   "(asserted by test_identifier_builders_quote)",
    "_quote_ident": "azolla.adapters.postgres.partitions._quote_ident: the same rule",
    "int": "int() yields digits (and a sign) only",
}

#: ``(path, function, argument source) -> reason``: arguments the scanner cannot prove constant
#: but that carry no user input.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("src/azolla/adapters/postgres/migrations.py", "apply_migrations", "migration.sql"):
        "the text of a migration file shipped inside the package (migrations/*.sql, "
        "checksummed); never built from a request",
    ("src/azolla/adapters/postgres/partitions.py", "drop_partitions_older_than", "detached"):
        "copy_from_table takes a table *name* that asyncpg quotes itself; the name is derived "
        "from a partition name read from pg_inherits, not from a request",
    ("src/azolla/adapters/postgres/event_store.py", "_commit", "packed_domains"):
        "the first bound parameter ($1) of the prepared batch insert (lane.insert.fetchrow), "
        "not SQL text",
    ("src/azolla/adapters/postgres/event_store.py", "_commit", "domains"):
        "the first bound parameter ($1) of the prepared batch insert "
        "(lane.insert_arrays.fetchrow), not SQL text",
    ("src/azolla/shepherd/runtime.py", "_execute", "request"):
        "TaskExecutor.execute(request) runs a task attempt; it is not a database call",
}


_CALL_HINT = re.compile(rf"\.(?:{'|'.join(sorted(SQL_METHODS))}|copy_\w+)\(")


def _is_sql_method(name: str) -> bool:
    return name in SQL_METHODS or name.startswith("copy_")


@dataclass(frozen=True)
class Finding:
    """A call whose SQL argument is not provably constant."""

    path: str
    line: int
    function: str
    argument: str
    reason: str

    def __str__(self) -> str:
        return (f"{self.path}:{self.line} in {self.function}(): {self.argument!r} -- "
                f"{self.reason}")


SAFE, DYNAMIC, OPAQUE, NOT_TEXT = "safe", "dynamic", "opaque", "not text"
_FuncDef = ast.FunctionDef | ast.AsyncFunctionDef
_NOT_TEXT_NODES = (ast.List, ast.ListComp, ast.Tuple, ast.Set, ast.SetComp, ast.Dict,
                   ast.DictComp, ast.GeneratorExp)


class ModuleScan:
    """Classifies the SQL arguments of one module."""

    def __init__(self, source: str, path: str) -> None:
        self.path = path
        self.tree = ast.parse(source)
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.constants: dict[str, list[ast.expr]] = {}
        for stmt in self.tree.body:
            for target, value in _assignments(stmt):
                if isinstance(target, ast.Name):
                    self.constants.setdefault(target.id, []).append(value)
        self.functions: dict[str, list[_FuncDef]] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions.setdefault(node.name, []).append(node)
        self._busy: set[object] = set()

    # -- scope helpers -----------------------------------------------------------------------

    def enclosing(self, node: ast.AST, kind: type | tuple[type, ...]) -> ast.AST | None:
        current = self.parents.get(node)
        while current is not None and not isinstance(current, kind):
            current = self.parents.get(current)
        return current

    def function_of(self, node: ast.AST) -> _FuncDef | None:
        found = self.enclosing(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        return found if isinstance(found, ast.FunctionDef | ast.AsyncFunctionDef) else None

    # -- classification ----------------------------------------------------------------------

    def classify(self, node: ast.expr, scope: _FuncDef | None) -> tuple[str, str]:
        """Return ``(verdict, why)`` for an expression used as (part of) SQL text."""
        key = (id(node), id(scope))
        if key in self._busy:
            return SAFE, "recursive reference"  # judged by the other paths
        self._busy.add(key)
        try:
            return self._classify(node, scope)
        finally:
            self._busy.discard(key)

    def _all(self, nodes: list[ast.expr], scope: _FuncDef | None,
             what: str) -> tuple[str, str]:
        for part in nodes:
            verdict, why = self.classify(part, scope)
            if verdict != SAFE:
                return DYNAMIC, f"{what}: {why}"
        return SAFE, what

    def _classify(self, node: ast.expr, scope: _FuncDef | None) -> tuple[str, str]:
        if isinstance(node, ast.Constant):
            return SAFE, "literal"
        if isinstance(node, _NOT_TEXT_NODES):
            return NOT_TEXT, "not a string"
        if isinstance(node, ast.JoinedStr):
            holes: list[ast.expr] = []
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    if self._is_builder_call(value.value):
                        continue
                    holes.append(value.value)
            return self._all(holes, scope, "f-string hole")
        if isinstance(node, ast.IfExp):
            return self._all([node.body, node.orelse], scope, "conditional")
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Mod):
                return self._all([node.left, node.right], scope, "%-formatting")
            if isinstance(node.op, ast.Add):
                return self._all([node.left, node.right], scope, "concatenation")
            return DYNAMIC, "arithmetic on text"
        if isinstance(node, ast.Call):
            return self._classify_call(node, scope)
        if isinstance(node, ast.Name):
            return self._classify_name(node, scope)
        if isinstance(node, ast.Attribute):
            return self._classify_attribute(node, scope)
        return OPAQUE, f"cannot tell what {ast.unparse(node)!r} holds"

    def _is_builder_call(self, node: ast.expr) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in IDENTIFIER_BUILDERS)

    def _classify_call(self, node: ast.Call, scope: _FuncDef | None) -> tuple[str, str]:
        func = node.func
        if self._is_builder_call(node):
            return SAFE, "identifier builder"
        if isinstance(func, ast.Attribute) and func.attr in ("format", "join", "format_map"):
            parts = [func.value, *(k.value for k in node.keywords)]
            for arg in node.args:  # the items of a literal list joined, or the value itself
                parts.extend(arg.elts if isinstance(arg, ast.List | ast.Tuple) else [arg])
            return self._all(parts, scope, f".{func.attr}()")
        if isinstance(func, ast.Name) and func.id in self.functions:
            returns = [r.value for f in self.functions[func.id] for r in ast.walk(f)
                       if isinstance(r, ast.Return) and r.value is not None
                       and self.function_of(r) is f]
            verdicts = [self.classify(r, self.function_of(r)) for r in returns]
            if returns and all(v == SAFE for v, _ in verdicts):
                return SAFE, f"{func.id}() returns constants"
            bad = next((why for v, why in verdicts if v != SAFE), "no return value")
            return DYNAMIC, f"{func.id}() builds text: {bad}"
        return OPAQUE, f"the result of {ast.unparse(func)}()"

    def _classify_name(self, node: ast.Name, scope: _FuncDef | None) -> tuple[str, str]:
        name = node.id
        if scope is not None:
            params = [a.arg for a in (*scope.args.posonlyargs, *scope.args.args,
                                      *scope.args.kwonlyargs)]
            if name in params:
                return self._classify_parameter(scope, name, params.index(name))
            local = [value for stmt in ast.walk(scope) if self.function_of(stmt) is scope
                     for target, value in _assignments(stmt)
                     if isinstance(target, ast.Name) and target.id == name]
            bound_otherwise = any(
                isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)
                for n in ast.walk(scope)) and not local
            if bound_otherwise:
                return OPAQUE, f"{name} is bound by a loop, with or except clause"
            if local:
                return self._all(local, scope, f"variable {name}")
        if name in self.constants:
            return self._all(self.constants[name], None, f"module constant {name}")
        return OPAQUE, f"{name} is not a constant of this module"

    def _classify_parameter(self, function: _FuncDef, name: str,
                            index: int) -> tuple[str, str]:
        is_method = index > 0 and function.args.args[:1] and \
            function.args.args[0].arg in ("self", "cls")
        position = index - 1 if is_method else index
        passed: list[tuple[ast.expr, _FuncDef | None]] = []
        for call in ast.walk(self.tree):
            if not isinstance(call, ast.Call):
                continue
            callee = call.func
            called = callee.id if isinstance(callee, ast.Name) else (
                callee.attr if isinstance(callee, ast.Attribute) else None)
            if called != function.name:
                continue
            keyword = next((k.value for k in call.keywords if k.arg == name), None)
            if keyword is not None:
                passed.append((keyword, self.function_of(call)))
            elif position < len(call.args) and not any(
                    isinstance(a, ast.Starred) for a in call.args[:position + 1]):
                passed.append((call.args[position], self.function_of(call)))
        if not passed:
            return OPAQUE, f"parameter {name} of {function.name}() (no caller in this module)"
        for value, where in passed:
            verdict, why = self.classify(value, where)
            if verdict != SAFE:
                return DYNAMIC, f"a caller of {function.name}() passes {name}: {why}"
        return SAFE, f"every caller of {function.name}() passes a constant"

    def _classify_attribute(self, node: ast.Attribute,
                            scope: _FuncDef | None) -> tuple[str, str]:
        if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
            return OPAQUE, f"cannot tell what {ast.unparse(node)!r} holds"
        cls = self.enclosing(node, ast.ClassDef)
        if cls is None:
            return OPAQUE, "self outside a class"
        values = [(value, self.function_of(stmt)) for stmt in ast.walk(cls)
                  for target, value in _assignments(stmt)
                  if isinstance(target, ast.Attribute) and target.attr == node.attr
                  and isinstance(target.value, ast.Name) and target.value.id == "self"]
        if not values:
            return OPAQUE, f"self.{node.attr} is never assigned in this class"
        for value, where in values:
            verdict, why = self.classify(value, where)
            if verdict != SAFE:
                return DYNAMIC, f"self.{node.attr}: {why}"
        return SAFE, f"self.{node.attr} holds constants"

    # -- the scan ----------------------------------------------------------------------------

    def findings(self) -> Iterator[Finding]:
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and _is_sql_method(node.func.attr) and node.args):
                continue
            first = node.args[0]
            if isinstance(first, ast.Starred):
                continue
            scope = self.function_of(node)
            verdict, why = self.classify(first, scope)
            if verdict in (SAFE, NOT_TEXT):
                continue
            yield Finding(self.path, node.lineno, scope.name if scope else "<module>",
                          ast.unparse(first), why)


def _assignments(stmt: ast.AST) -> Iterator[tuple[ast.expr, ast.expr]]:
    if isinstance(stmt, ast.Assign):
        for target in stmt.targets:
            yield target, stmt.value
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        yield stmt.target, stmt.value
    elif isinstance(stmt, ast.AugAssign):
        yield stmt.target, ast.BinOp(left=stmt.target, op=stmt.op, right=stmt.value)
    elif isinstance(stmt, ast.NamedExpr):
        yield stmt.target, stmt.value


def scan_source(source: str, path: str = "<test>") -> list[Finding]:
    """Return the findings of one module's source."""
    return list(ModuleScan(textwrap.dedent(source), path).findings())


@functools.cache
def scan_tree(root: Path = SRC) -> tuple[Finding, ...]:
    """Return the findings of every module under ``root`` (cached: the tree does not change)."""
    found: list[Finding] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        if rel.startswith(SKIP_DIRS) or not _CALL_HINT.search(source):
            continue  # no call of a SQL method name at all: nothing to classify
        found.extend(scan_source(source, rel))
    return tuple(found)


# -- the real tree ---------------------------------------------------------------------------


def test_sql_in_src_is_never_built_from_values() -> None:
    findings = scan_tree()
    unexplained = [f for f in findings if (f.path, f.function, f.argument) not in ALLOWED]
    assert not unexplained, (
        "SQL built from non-constant text (use $n parameters, or quote identifiers with "
        "quote_ident; list a true exception in ALLOWED with its reason):\n"
        + "\n".join(str(f) for f in unexplained))


def test_every_allowed_exception_still_exists() -> None:
    seen = {(f.path, f.function, f.argument) for f in scan_tree()}
    stale = [key for key in ALLOWED if key not in seen]
    assert not stale, f"ALLOWED entries that no longer match a call: {stale}"


def test_the_scanner_sees_the_real_sql_calls() -> None:
    """Guard against a scanner that silently finds nothing: it must visit the store's calls."""
    source = (SRC / "azolla/adapters/postgres/event_store.py").read_text(encoding="utf-8")
    scan = ModuleScan(source, "event_store.py")
    calls = [n for n in ast.walk(scan.tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and _is_sql_method(n.func.attr)]
    assert len(calls) >= 5
    prepare = next(c for c in calls if c.func.attr == "prepare")  # type: ignore[attr-defined]
    assert scan.classify(prepare.args[0], scan.function_of(prepare))[0] == SAFE


def test_identifier_builders_quote() -> None:
    for quote in (quote_ident, partitions._quote_ident):
        assert quote('a"; DROP TABLE azolla_events; --') == \
            '"a""; DROP TABLE azolla_events; --"'
        assert quote("plain") == '"plain"'


# -- the scanner itself ----------------------------------------------------------------------

BAD_EXAMPLES = {
    "f-string": """
        async def f(conn, name):
            await conn.execute(f"SELECT * FROM t WHERE name = '{name}'")
    """,
    "percent": """
        async def f(conn, name):
            await conn.fetch("SELECT * FROM t WHERE name = '%s'" % name)
    """,
    "format": """
        async def f(conn, name):
            await conn.fetchrow("SELECT * FROM t WHERE name = '{}'".format(name))
    """,
    "concatenation": """
        async def f(conn, name):
            await conn.fetchval("SELECT * FROM t WHERE name = '" + name + "'")
    """,
    "join": """
        async def f(conn, names):
            await conn.execute(" ".join(["DELETE FROM t WHERE", names]))
    """,
    "local variable": """
        async def f(conn, name):
            sql = "SELECT 1"
            if name:
                sql = f"SELECT * FROM t WHERE name = '{name}'"
            await conn.execute(sql)
    """,
    "augmented assignment": """
        async def f(conn, name):
            sql = "SELECT * FROM t WHERE "
            sql += name
            await conn.executemany(sql, [])
    """,
    "module constant built from a value": """
        import os
        QUERY = "SELECT * FROM t WHERE name = '" + os.environ["NAME"] + "'"
        async def f(conn):
            await conn.execute(QUERY)
    """,
    "parameter passed a built string": """
        async def _run(conn, sql):
            return await conn.fetch(sql)
        async def g(conn, name):
            return await _run(conn, f"SELECT '{name}'")
    """,
    "parameter without a caller": """
        async def run(conn, sql):
            return await conn.fetch(sql)
    """,
    "self attribute": """
        class Store:
            def __init__(self, table):
                self._sql = f"SELECT * FROM {table}"
            async def read(self, conn):
                return await conn.prepare(self._sql)
    """,
    "helper that builds text": """
        def build(name):
            return "SELECT * FROM t WHERE name = '" + name + "'"
        async def f(conn, name):
            await conn.execute(build(name))
    """,
    "copy from a built query": """
        async def f(conn, name):
            await conn.copy_from_query(f"SELECT * FROM t WHERE name = '{name}'", output="x")
    """,
    "unknown value": """
        async def f(conn, request):
            await conn.execute(request.sql)
    """,
}

GOOD_EXAMPLES = {
    "literal with parameters": """
        async def f(conn, name):
            await conn.execute("SELECT * FROM t WHERE name = $1", name)
    """,
    "module constants": """
        _COLUMNS = "a, b"
        _READ = f"SELECT {_COLUMNS} FROM t WHERE a = $1"
        async def f(conn, a):
            return await conn.fetch(_READ, a)
    """,
    "quoted identifier": """
        from azolla.adapters.postgres.cluster import quote_ident
        async def f(conn, name):
            sql = f"DROP DATABASE {quote_ident(name)}"
            await conn.execute(sql)
    """,
    "constant helper and attribute": """
        LOCK = 42
        def _sql(lock):
            extra = f"pg_advisory_xact_lock({LOCK})" if lock else "1"
            return f"SELECT {extra}"
        class Store:
            def __init__(self, lock):
                self._sql = _sql(lock)
            async def go(self, conn):
                return await conn.prepare(self._sql)
    """,
    "parameter whose callers pass constants": """
        _MAX = "SELECT max(x) FROM t"
        class Store:
            async def _read(self, sql, *args):
                return await self.conn.fetch(sql, *args)
            async def top(self):
                return await self._read(_MAX)
    """,
    "prepared statement arguments": """
        async def f(statement, rows):
            return await statement.fetchrow([r.a for r in rows], [r.b for r in rows])
    """,
    "integer formatting": """
        async def f(conn, seconds):
            await conn.execute(f"SET LOCAL lock_timeout = '{int(seconds * 1000)}ms'")
    """,
}


@pytest.mark.parametrize("name", sorted(BAD_EXAMPLES))
def test_scanner_flags_sql_built_from_values(name: str) -> None:
    findings = scan_source(BAD_EXAMPLES[name])
    assert findings, f"the scanner missed: {name}"


@pytest.mark.parametrize("name", sorted(GOOD_EXAMPLES))
def test_scanner_accepts_constant_sql(name: str) -> None:
    assert scan_source(GOOD_EXAMPLES[name]) == []


def test_a_finding_names_the_place_and_reason() -> None:
    [finding] = scan_source(BAD_EXAMPLES["f-string"], "pkg/mod.py")
    text = str(finding)
    assert text.startswith("pkg/mod.py:3 in f():")
    assert "name" in text
