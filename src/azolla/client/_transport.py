"""Endpoint parsing, the gRPC channel, call options and status translation."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import grpc.aio

from azolla.adapters.grpc.pb import orchestrator_pb2_grpc
from azolla.errors import (
    AzollaConnectionError,
    AzollaError,
    ClientClosedError,
    ValidationError,
    error_from_status,
)

__all__ = ["DEFAULT_PORT", "Endpoint", "Transport", "parse_endpoint", "translate_rpc_error"]

#: The orchestrator's default port.
DEFAULT_PORT = 52710

ChannelOption = tuple[str, str | int]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the orchestrator listens and whether to use TLS.

    Attributes:
        target: The gRPC target, e.g. ``"localhost:52710"`` or ``"unix:/run/azolla.sock"``.
        tls: True for ``https://`` endpoints.
        url: The endpoint as the user gave it (for messages).
    """

    target: str
    tls: bool
    url: str


def parse_endpoint(url: str) -> Endpoint:
    """Parse ``http://host:port``, ``https://host:port``, ``host:port`` or ``unix:/path``.

    ``http://`` and bare ``host:port`` mean plaintext; ``https://`` means TLS. A missing port
    is 52710 (the orchestrator's default) for plaintext and 443 for TLS.

    Raises:
        ValidationError: The URL has another scheme, a path, or no host.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValidationError(f"orchestrator endpoint must be a non-empty string, not {url!r}")
    text = url.strip()
    if text.startswith(("unix:", "unix-abstract:")):
        return Endpoint(target=text, tls=False, url=text)
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValidationError(
            f"unsupported endpoint scheme {parts.scheme!r} in {url!r}: use http://host:port "
            "(plaintext) or https://host:port (TLS)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValidationError(f"endpoint {url!r} must be scheme://host:port, without a path")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"endpoint {url!r} has an invalid port") from exc
    host = parts.hostname
    if not host:
        raise ValidationError(f"endpoint {url!r} has no host")
    tls = parts.scheme == "https"
    if port is None:
        port = 443 if tls else DEFAULT_PORT
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return Endpoint(target=f"{host}:{port}", tls=tls, url=url)


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read the {what} file {str(path)!r}: {exc}") from exc


def translate_rpc_error(
    exc: grpc.RpcError, operation: str, *, endpoint: str = "", task_id: str | None = None
) -> AzollaError:
    """Turn a ``grpc.RpcError`` into an :class:`AzollaError` with a readable message."""
    code_obj: object = None
    details: object = None
    if isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        code_obj, details = exc.code(), exc.details()
    code = code_obj.name if isinstance(code_obj, grpc.StatusCode) else "UNKNOWN"
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    if not isinstance(details, str):
        details = None
    error = error_from_status(code, details, operation, task_id=task_id)
    if endpoint and isinstance(error, AzollaConnectionError):
        error.message = f"{error.message} [orchestrator {endpoint}]"
        error.args = (error.message,)
    return error


class Transport:
    """Owns the channel and the stub; created lazily on the running event loop.

    Args:
        endpoint: Where to connect.
        token: Bearer token sent as ``authorization`` metadata on every call, or None.
        ca_file: PEM file of root certificates for TLS (default: the system's).
        cert_file: PEM client certificate chain for mutual TLS, or None.
        key_file: PEM private key for ``cert_file``, or None.
        tls_server_name: Override the name checked in the server's certificate.
        timeout: Deadline in seconds for each unary call.
        channel_options: Extra ``grpc`` channel options.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        token: str | None,
        ca_file: str | Path | None,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        tls_server_name: str | None,
        timeout: float,
        channel_options: Sequence[ChannelOption],
    ) -> None:
        if not endpoint.tls and any(v is not None for v in (ca_file, cert_file, key_file)):
            raise ValidationError(
                f"TLS files were given but the endpoint {endpoint.url!r} is plaintext; "
                "use an https:// endpoint"
            )
        if (cert_file is None) != (key_file is None):
            raise ValidationError("give both cert_file and key_file for mutual TLS, or neither")
        if token is not None and (not isinstance(token, str) or not token or "\n" in token):
            raise ValidationError("token must be a non-empty single-line string")
        self.endpoint = endpoint
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._ca = _read(ca_file, "CA certificate")
        self._cert = _read(cert_file, "client certificate")
        self._key = _read(key_file, "client key")
        options: list[ChannelOption] = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        options.extend(channel_options)
        self._options = options
        self._channel: grpc.aio.Channel | None = None
        self._stub: orchestrator_pb2_grpc.ClientServiceAsyncStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.calls: Counter[str] = Counter()

    def stub(self) -> orchestrator_pb2_grpc.ClientServiceAsyncStub:
        """Return the stub, creating the channel on the running loop on first use.

        Raises:
            ClientClosedError: The client was closed.
            AzollaError: The client is used from another event loop than the one it started on.
        """
        if self.closed:
            raise ClientClosedError("the client is closed")
        loop = asyncio.get_running_loop()
        if self._stub is not None:
            if loop is not self._loop:
                raise AzollaError(
                    "this Client is bound to the event loop it was first used on; create one "
                    "Client per event loop"
                )
            return self._stub
        if self.endpoint.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._ca, private_key=self._key, certificate_chain=self._cert
            )
            channel = grpc.aio.secure_channel(self.endpoint.target, creds, options=self._options)
        else:
            channel = grpc.aio.insecure_channel(self.endpoint.target, options=self._options)
        self._channel = channel
        self._loop = loop
        self._stub = orchestrator_pb2_grpc.ClientServiceStub(channel)
        return self._stub

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel is connected.

        Raises:
            AzollaConnectionError: Not connected within ``timeout`` seconds.
        """
        self.stub()
        assert self._channel is not None
        try:
            async with asyncio.timeout(timeout):
                await self._channel.channel_ready()
        except TimeoutError:
            raise AzollaConnectionError(
                f"cannot connect to the orchestrator at {self.endpoint.url} within {timeout:g} s",
                code="UNAVAILABLE",
            ) from None

    async def close(self, grace: float | None = None) -> None:
        """Close the channel (cancelling any calls still running after ``grace`` seconds)."""
        self.closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace)
