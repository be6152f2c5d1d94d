"""The one dependency rule: ``azolla.domain`` is pure.

No module under ``src/azolla/domain`` may import asyncio, asyncpg, grpc, ``azolla.app`` or
``azolla.adapters`` (also not lazily inside a function or under ``TYPE_CHECKING``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
DOMAIN = SRC / "azolla" / "domain"
FORBIDDEN = ("asyncio", "asyncpg", "grpc", "azolla.app", "azolla.adapters")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Return the absolute names of every module ``source`` (the module ``module``) imports.

    ``from x import y`` yields both ``x`` and ``x.y`` (``y`` may be a submodule); relative
    imports are resolved against ``module``.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(imports: set[str]) -> list[str]:
    """Return the imports that break the rule, sorted."""
    return sorted(
        name
        for name in imports
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    )


def test_domain_package_exists() -> None:
    assert (DOMAIN / "__init__.py").is_file()


@pytest.mark.parametrize(
    "path", sorted(DOMAIN.rglob("*.py")), ids=lambda p: str(p.relative_to(DOMAIN))
)
def test_domain_module_is_pure(path: Path) -> None:
    imports = imported_modules(
        path.read_text(), _module_name(path), is_package=path.name == "__init__.py"
    )
    assert violations(imports) == [], f"{path} breaks the domain dependency rule"


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import asyncio", ["asyncio"]),
        ("import asyncio.locks as l", ["asyncio.locks"]),
        ("from asyncpg import Record", ["asyncpg", "asyncpg.Record"]),
        ("import grpc.aio", ["grpc.aio"]),
        ("from azolla import app", ["azolla.app"]),
        (
            "from azolla.adapters.memory import x",
            ["azolla.adapters.memory", "azolla.adapters.memory.x"],
        ),
        ("from ..app import containers", ["azolla.app", "azolla.app.containers"]),
        ("from .. import adapters", ["azolla.adapters"]),
        ("def f():\n    import asyncpg\n", ["asyncpg"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import grpc\n", ["grpc"]),
        ("import asyncio_extra\nfrom azolla.application import x\nfrom . import ports", []),
    ],
)
def test_checker_catches_forbidden_imports(source: str, bad: list[str]) -> None:
    assert violations(imported_modules(source, "azolla.domain.task")) == bad
