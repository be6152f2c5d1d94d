"""The shepherd's connection to an orchestrator: URL parsing, gRPC channel, one stream.

A :class:`GrpcConnector` opens a fresh ``grpc.aio`` channel and one
``ClusterService.Stream`` call per connection attempt (so the runtime's own bounded backoff,
not gRPC's internal reconnect backoff of up to two minutes, decides when to try again) and
wraps it in a :class:`StreamLink`. A channel costs the shepherd a few milliseconds of CPU, so
while the orchestrator is down (the runtime then retries every few tens of milliseconds) each
attempt first checks with a plain TCP connect that something listens, and fails at once if
nothing does; the check is skipped when a proxy is configured. The runtime only sees the small
:class:`Link` protocol, so tests can drive it with an in-memory link.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc
import grpc.aio

from azolla.adapters.grpc.pb import orchestrator_pb2 as opb
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc as opb_grpc

__all__ = [
    "DEFAULT_ORCHESTRATOR_PORT",
    "DEFAULT_ORCHESTRATOR_URL",
    "ConnectionLost",
    "ConnectionOptions",
    "Connector",
    "GrpcConnector",
    "Link",
    "OrchestratorAddress",
    "StreamLink",
    "parse_orchestrator_url",
]

DEFAULT_ORCHESTRATOR_PORT = 52710
DEFAULT_ORCHESTRATOR_URL = f"http://127.0.0.1:{DEFAULT_ORCHESTRATOR_PORT}"

#: Largest message accepted from the orchestrator (a batch of tasks can be big).
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
#: Environment variables through which gRPC reaches the orchestrator via a proxy.
_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")
#: Longest wait for the TCP check before trying gRPC anyway.
_PROBE_TIMEOUT = 1.0


class ConnectionLost(Exception):
    """The stream to the orchestrator ended or could not be opened.

    Attributes:
        code: The gRPC status code name when known (e.g. ``"UNAVAILABLE"``), else ``""``.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class OrchestratorAddress:
    """Where an orchestrator listens.

    Attributes:
        target: ``host:port`` as gRPC expects it.
        secure: True for TLS (``https``).
    """

    target: str
    secure: bool


def parse_orchestrator_url(url: str) -> OrchestratorAddress:
    """Parse an orchestrator URL.

    Accepts ``http://host[:port]``, ``https://host[:port]`` and a bare ``host[:port]``
    (plaintext). The port defaults to 52710.

    Args:
        url: The URL.

    Returns:
        The address.

    Raises:
        ValueError: The URL is malformed or uses another scheme.
    """
    text = url.strip()
    if not text:
        raise ValueError("the orchestrator URL is empty")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"orchestrator URL must start with http:// or https://, not {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"orchestrator URL must be scheme://host:port, not {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"orchestrator URL has no host: {url!r}")
    try:
        port = parts.port or DEFAULT_ORCHESTRATOR_PORT
    except ValueError:
        raise ValueError(f"orchestrator URL has a bad port: {url!r}") from None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return OrchestratorAddress(target=f"{host}:{port}", secure=parts.scheme == "https")


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """How to reach the orchestrator.

    Attributes:
        url: Orchestrator URL (see :func:`parse_orchestrator_url`).
        root_certificates: PEM certificate authorities for ``https`` (None: system roots).
        token: Bearer token sent as ``authorization: Bearer <token>`` metadata, or None.
        certificate_chain: PEM client certificate for mutual TLS, or None.
        private_key: PEM private key of ``certificate_chain``.
        channel_options: Extra gRPC channel arguments.
    """

    url: str = DEFAULT_ORCHESTRATOR_URL
    root_certificates: bytes | None = None
    token: str | None = field(default=None, repr=False)
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    channel_options: Sequence[tuple[str, Any]] = ()


class Link(Protocol):
    """One open stream to an orchestrator, as the runtime uses it."""

    async def send(self, message: opb.ClientMsg) -> None:
        """Write one message.

        Raises:
            ConnectionLost: The stream is gone.
        """
        ...

    async def receive(self) -> opb.ServerMsg | None:
        """Read the next message; None when the orchestrator ended the stream cleanly.

        Raises:
            ConnectionLost: The stream failed.
        """
        ...

    async def finish(self) -> None:
        """Half-close: tell the orchestrator no more messages will come."""
        ...

    async def close(self) -> None:
        """Abort the stream and release its resources (idempotent)."""
        ...


class Connector(Protocol):
    """Opens links to the orchestrator."""

    @property
    def description(self) -> str:
        """Where it connects to, for logs."""
        ...

    async def open(self) -> Link:
        """Open a new stream.

        Raises:
            ConnectionLost: The orchestrator cannot be reached.
        """
        ...


class StreamLink:
    """A :class:`Link` over one ``ClusterService.Stream`` call on its own channel.

    Args:
        channel: The channel (closed with the link).
        call: The stream call.
    """

    def __init__(self, channel: grpc.aio.Channel, call: Any) -> None:
        self._channel = channel
        self._call = call
        self._write_lock = asyncio.Lock()
        self._closed = False

    async def send(self, message: opb.ClientMsg) -> None:
        """Write one message (writes are serialised)."""
        if self._closed:
            raise ConnectionLost("the stream is closed")
        async with self._write_lock:
            try:
                await self._call.write(message)
            except grpc.aio.AioRpcError as exc:
                raise _lost(exc) from None
            except (grpc.aio.UsageError, asyncio.InvalidStateError, RuntimeError) as exc:
                raise ConnectionLost(f"the stream is closed: {exc}") from None

    async def receive(self) -> opb.ServerMsg | None:
        """Read the next message; None at a clean end of the stream."""
        if self._closed:
            raise ConnectionLost("the stream is closed")
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _lost(exc) from None
        if message is grpc.aio.EOF:
            code = await self._call.code()
            if code is not None and code != grpc.StatusCode.OK:
                details = await self._call.details()
                raise ConnectionLost(f"{code.name}: {details}", code.name)
            return None
        assert isinstance(message, opb.ServerMsg)
        return message

    async def finish(self) -> None:
        """Half-close the stream."""
        if self._closed:
            return
        async with self._write_lock:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError,
                                     asyncio.InvalidStateError):
                await self._call.done_writing()

    async def close(self) -> None:
        """Cancel the call and close the channel."""
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        await self._channel.close(grace=None)


def _proxied(options: ConnectionOptions) -> bool:
    """True when gRPC may reach the orchestrator through a proxy (a TCP check would mislead)."""
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES):
        return True
    return any(key == "grpc.http_proxy" for key, _ in options.channel_options)


def _lost(exc: grpc.aio.AioRpcError) -> ConnectionLost:
    code = exc.code()
    name = code.name if code is not None else ""
    return ConnectionLost(f"{name}: {exc.details()}", name)


class GrpcConnector:
    """Opens :class:`StreamLink` s to an orchestrator.

    Args:
        options: Where and how to connect.
    """

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.address = parse_orchestrator_url(options.url)
        self.probe = not _proxied(options)

    @property
    def description(self) -> str:
        """``https://host:port`` or ``http://host:port``."""
        scheme = "https" if self.address.secure else "http"
        return f"{scheme}://{self.address.target}"

    def _channel(self) -> grpc.aio.Channel:
        channel_options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.enable_retries", 0),
            *self.options.channel_options,
        ]
        if self.address.secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.options.root_certificates,
                private_key=self.options.private_key,
                certificate_chain=self.options.certificate_chain)
            return grpc.aio.secure_channel(self.address.target, credentials,
                                           options=channel_options)
        return grpc.aio.insecure_channel(self.address.target, options=channel_options)

    async def _check_listening(self) -> None:
        """Fail fast when nothing accepts TCP connections at the address.

        Raises:
            ConnectionLost: ``UNAVAILABLE``: the connection was refused or the host is
                unreachable. A timeout is not a failure (gRPC gets its own try).
        """
        host, _, port = self.address.target.rpartition(":")
        host = host.strip("[]")
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT):
                _, writer = await asyncio.open_connection(host, int(port))
        except TimeoutError:
            return
        except OSError as exc:
            raise ConnectionLost(f"UNAVAILABLE: cannot connect to {self.address.target}: "
                                 f"{exc.strerror or exc}", "UNAVAILABLE") from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def open(self) -> Link:
        """Open a channel and start a stream on it.

        Raises:
            ConnectionLost: Nothing listens at the orchestrator's address.
        """
        if self.probe:
            await self._check_listening()
        metadata: list[tuple[str, str]] = []
        if self.options.token:
            metadata.append(("authorization", f"Bearer {self.options.token}"))
        channel = self._channel()
        try:
            stub = opb_grpc.ClusterServiceStub(channel)
            call = stub.Stream(metadata=tuple(metadata))
        except BaseException:
            await channel.close(grace=None)
            raise
        return StreamLink(channel, call)
