"""Bounded capture of a worker's output (stdout and stderr, merged)."""

from __future__ import annotations

__all__ = ["OutputTail"]


class OutputTail:
    """Keeps the last bytes and lines written by a worker.

    Args:
        max_bytes: Most bytes kept.
        max_lines: Most lines returned by :meth:`text`.
    """

    __slots__ = ("_buf", "max_bytes", "max_lines", "total")

    def __init__(self, max_bytes: int = 8192, max_lines: int = 50) -> None:
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self._buf = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        """Append output."""
        self.total += len(data)
        self._buf += data
        if len(self._buf) > 2 * self.max_bytes:
            del self._buf[: -self.max_bytes]

    def snapshot(self) -> OutputTail:
        """Return an independent copy of the captured tail."""
        copy = OutputTail(self.max_bytes, self.max_lines)
        copy._buf = bytearray(self._buf[-self.max_bytes :])
        copy.total = self.total
        return copy

    def clear(self) -> None:
        """Forget everything captured so far."""
        self._buf.clear()
        self.total = 0

    def text(self) -> str:
        """Return the tail: at most ``max_lines`` lines within the last ``max_bytes`` bytes."""
        return self._tail()[0]

    def _tail(self) -> tuple[str, bool]:
        data = bytes(self._buf[-self.max_bytes :])
        truncated = self.total > len(data)
        text = data.decode("utf-8", errors="replace")
        lines = text.splitlines()
        if len(lines) > self.max_lines:
            lines = lines[-self.max_lines :]
            truncated = True
        return "\n".join(lines), truncated

    @property
    def truncated(self) -> bool:
        """True when more output was written than :meth:`text` returns."""
        return self._tail()[1]
