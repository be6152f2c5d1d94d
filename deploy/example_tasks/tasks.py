"""Example task module for docker-compose.yml's shepherd (``AZOLLA_TASKS=tasks``)."""

from __future__ import annotations

from azolla import azolla_task


@azolla_task
async def greet_user(name: str, age: int) -> dict[str, str]:
    """Return a greeting (the README's example)."""
    return {"greeting": f"Hello {name}! You are {age} years old."}
