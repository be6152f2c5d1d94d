"""GrpcConnector: the TCP check that makes attempts against a down orchestrator cheap."""

from __future__ import annotations

import asyncio
import socket

import pytest

from azolla.shepherd.connection import ConnectionLost, ConnectionOptions, GrpcConnector

pytestmark = pytest.mark.timeout(30)


class _Opened(Exception):
    """Raised instead of opening a real channel."""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def _connector(port: int, monkeypatch: pytest.MonkeyPatch, **options: object) -> GrpcConnector:
    connector = GrpcConnector(ConnectionOptions(url=f"http://127.0.0.1:{port}",
                                                **options))  # type: ignore[arg-type]

    def no_channel() -> None:
        raise _Opened

    monkeypatch.setattr(connector, "_channel", no_channel)
    return connector


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("grpc_proxy", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def test_nothing_listening_fails_fast_without_a_channel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    connector = _connector(_closed_port(), monkeypatch)
    with pytest.raises(ConnectionLost) as lost:
        await connector.open()
    assert lost.value.code == "UNAVAILABLE"


async def test_a_listening_port_gets_a_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(_Opened):
            await _connector(port, monkeypatch).open()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("variable", ["grpc_proxy", "HTTPS_PROXY", "http_proxy"])
async def test_with_a_proxy_grpc_always_gets_its_try(monkeypatch: pytest.MonkeyPatch,
                                                     variable: str) -> None:
    monkeypatch.setenv(variable, "http://proxy.example:3128")
    connector = _connector(_closed_port(), monkeypatch)
    assert connector.probe is False
    with pytest.raises(_Opened):
        await connector.open()


def test_a_proxy_channel_option_turns_the_check_off(monkeypatch: pytest.MonkeyPatch) -> None:
    connector = _connector(1, monkeypatch,
                           channel_options=(("grpc.http_proxy", "http://proxy:3128"),))
    assert connector.probe is False
