"""The assembled server with bearer tokens and TLS configured through its settings."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from _server_harness import RunningServer, start_server

from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc
from azolla.app.settings import Settings

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

TOKEN = "client-token-0123456789"
AUTH = {"tokens": [{"name": "app", "token": TOKEN, "domains": ["*"],
                    "roles": ["client", "shepherd"]}]}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:  # pragma: no cover - openssl is on every CI image
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
async def secure(certificate: tuple[Path, Path]) -> AsyncIterator[RunningServer]:
    cert, key = certificate
    settings = Settings.model_validate({"store": "memory", "port": 0, "auth": AUTH,
                                        "tls_cert_file": cert, "tls_key_file": key})
    server = await start_server(settings)
    try:
        yield server
    finally:
        await server.close()


async def test_tls_and_token(secure: RunningServer, certificate: tuple[Path, Path]) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[0].read_bytes())
    async with grpc.aio.secure_channel(secure.server.address, credentials) as channel:
        stub = orchestrator_pb2_grpc.ClientServiceStub(channel)
        request = pbo.CreateTaskRequest(name="t")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateTask(request)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        created = await stub.CreateTask(request, metadata=(("authorization",
                                                            f"Bearer {TOKEN}"),))
        assert created.task_id


async def test_plain_text_is_refused_by_a_tls_server(secure: RunningServer) -> None:
    async with grpc.aio.insecure_channel(secure.server.address) as channel:
        stub = orchestrator_pb2_grpc.ClientServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateTask(pbo.CreateTaskRequest(name="t"), timeout=2,
                                  metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)
