"""Length-prefixed frames on pipes between the shepherd and its worker processes.

A frame is a 4-byte little-endian length followed by that many payload bytes.

Request frame (shepherd -> worker): an orjson array
``[task_id, attempt, name, args_json, kwargs_json, domain, memory_limit]``, or a revocation
``S`` + the decimal index of an earlier request frame on the same pipe (0 for the first). In
pool mode the shepherd may write a worker's next request while it still runs one; a request
revoked before the worker reached it is answered with ``S`` instead of being run.

Result frame (worker -> shepherd): one kind byte, then

* ``O`` + the value's JSON text (success);
* ``E`` + an orjson array ``[type, message, data, retriable]`` (failure);
* ``R`` + the same array: failure after which the worker exits (e.g. ``MemoryLimitExceeded``);
* ``S`` alone: the request was revoked before it started, and was not run.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

__all__ = [
    "HEADER",
    "KIND_ERROR",
    "KIND_ERROR_RETIRE",
    "KIND_OK",
    "KIND_SKIPPED",
    "FrameDecoder",
    "FrameTooLarge",
    "pack",
    "read_frame",
    "revoke_frame",
    "write_all",
]

HEADER = struct.Struct("<I")
KIND_OK = ord("O")
KIND_ERROR = ord("E")
KIND_ERROR_RETIRE = ord("R")
KIND_SKIPPED = ord("S")


class FrameTooLarge(ValueError):
    """A frame announced more bytes than the receiver accepts."""


def pack(payload: bytes) -> bytes:
    """Return ``payload`` with its length prefix."""
    return HEADER.pack(len(payload)) + payload


def revoke_frame(index: int) -> bytes:
    """Return the request frame that revokes the ``index``-th request frame of a pipe."""
    return pack(b"S%d" % index)


class FrameDecoder:
    """Splits a byte stream into frames.

    Args:
        max_size: Largest payload accepted.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the frames completed by them (payloads only).

        Raises:
            FrameTooLarge: When a frame is larger than ``max_size``.
        """
        buf = self._buf
        if not buf and len(data) >= 4:
            # Fast path: the read holds exactly one whole frame.
            (size,) = HEADER.unpack_from(data)
            if len(data) == 4 + size and size <= self._max:
                return [data[4:]]
        buf += data
        frames: list[bytes] = []
        while len(buf) >= 4:
            (size,) = HEADER.unpack_from(buf)
            if size > self._max:
                raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self._max}")
            end = 4 + size
            if len(buf) < end:
                break
            frames.append(bytes(buf[4:end]))
            del buf[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf)


def read_frame(stream: BinaryIO, max_size: int) -> bytes | None:
    """Read one frame from a blocking binary stream; None at end of stream.

    Raises:
        FrameTooLarge: When the frame is larger than ``max_size``.
    """
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = HEADER.unpack(header)
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_size}")
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking file descriptor."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
