"""docs/library.md stays true: its example runs as written, its other snippets parse."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(120)]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "library.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def example() -> str:
    text = PAGE.read_text()
    marker = text.index("<!-- library-example -->")
    found = BLOCK.search(text, marker)
    assert found is not None, "no python block after the library-example marker"
    return found.group(1)


def test_the_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "custom_orchestrator.py"
    script.write_text(example())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZOLLA_")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert 'hook: greet succeeded: "Hello Ada!"' in lines
    assert "client: Hello Ada!" in lines
    assert any("TaskSubmitted.v1" in line for line in lines)
    assert any("TaskSucceeded.v1" in line for line in lines)


def test_every_snippet_parses() -> None:
    blocks = BLOCK.findall(PAGE.read_text())
    assert len(blocks) >= 2
    for block in blocks:
        ast.parse(block)
