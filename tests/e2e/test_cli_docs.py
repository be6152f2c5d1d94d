"""docs/cli.md is generated from the commands: it must match them."""

from __future__ import annotations

from pathlib import Path

from azolla.app.cli_docs import render

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_cli_reference_is_up_to_date() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py")


def test_cli_reference_covers_every_command() -> None:
    text = render()
    for command in ("submit", "status", "watch", "cancel", "retry", "tasks list",
                    "events tail", "shepherds list", "dead-letters list",
                    "dead-letters requeue", "migrate", "retention run", "dev"):
        assert f"## `azolla {command}`" in text
    assert "| 3 |" in text  # the exit codes
