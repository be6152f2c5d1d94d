"""A shepherd over TLS with a client certificate and a bearer token (real server, real processes).

The certificates are made for the test with ``openssl``: a CA, a server certificate for
``localhost``/127.0.0.1 and a client certificate, both signed by the CA. The server requires
mutual TLS and tokens; the shepherd's token has only the ``shepherd`` role.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from azolla import Client
from azolla.adapters.grpc.pb import orchestrator_pb2 as opb
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc as opb_grpc
from support.procs import ServerProc, ShepherdProc

pytestmark = [pytest.mark.grpc, pytest.mark.postgres, pytest.mark.slow,
              pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")]

CLIENT_TOKEN = "client-token-0123456789abcdef"
SHEPHERD_TOKEN = "shepherd-token-0123456789abcdef"
TASKS = '''
from azolla import azolla_task


@azolla_task
def add(a: int, b: int) -> int:
    return a + b
'''


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> None:
    """ca.pem/ca.key, server.pem/server.key (localhost), client.pem/client.key."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=azolla-test-ca", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=shepherd")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", subject, cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=folder)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    folder.mkdir()
    make_pki(folder)
    return folder


def _credentials(pki: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes(),
        certificate_chain=(pki / "client.pem").read_bytes())


@pytest.fixture
def server(fresh_database_url: str, pki: Path, tmp_path: Path) -> Iterator[ServerProc]:
    config = tmp_path / "server.toml"
    config.write_text(f'''
tls_cert_file = "{pki / 'server.pem'}"
tls_key_file = "{pki / 'server.key'}"
tls_client_ca_file = "{pki / 'ca.pem'}"
tls_require_client_auth = true

[[auth.tokens]]
name = "client"
token = "{CLIENT_TOKEN}"
domains = ["*"]
roles = ["client", "admin"]

[[auth.tokens]]
name = "shepherds"
token = "{SHEPHERD_TOKEN}"
domains = ["default"]
roles = ["shepherd"]
''')
    proc = ServerProc(fresh_database_url, extra=("--config", str(config)))
    try:
        deadline = time.monotonic() + 60
        while asyncio.run(_list(proc, pki, quiet=True)) is None:  # until it answers
            assert proc.process.poll() is None, proc.output()[-3000:]
            assert time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.05)
        yield proc
    finally:
        proc.stop()


async def _list(server: ServerProc, pki: Path, quiet: bool = False) -> list[str] | None:
    """Connected shepherd ids (None while the server does not answer, when ``quiet``)."""
    try:
        async with grpc.aio.secure_channel(f"localhost:{server.port}",
                                           _credentials(pki)) as channel:
            reply = await opb_grpc.AdminServiceStub(channel).ListShepherds(
                opb.ListShepherdsRequest(), timeout=5,
                metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),))
    except grpc.aio.AioRpcError:
        if quiet:
            return None
        raise
    return [s.shepherd_id for s in reply.shepherds]


def test_a_shepherd_over_mutual_tls_with_a_token(server: ServerProc, pki: Path,
                                                 tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tls_tasks.py").write_text(TASKS)
    good_token = tmp_path / "shepherd.token"
    good_token.write_text(SHEPHERD_TOKEN + "\n")
    bad_token = tmp_path / "bad.token"
    bad_token.write_text("not-the-token-at-all-0000\n")
    url = f"https://localhost:{server.port}"
    tls = ("--ca-file", str(pki / "ca.pem"), "--cert-file", str(pki / "client.pem"),
           "--key-file", str(pki / "client.key"))
    intruder = ShepherdProc(url, ["tls_tasks"], pythonpath=str(tasks),
                            extra=(*tls, "--token-file", str(bad_token)))
    shepherd = ShepherdProc(url, ["tls_tasks"], pythonpath=str(tasks),
                            extra=(*tls, "--token-file", str(good_token)))
    try:
        async def flow() -> int:
            deadline = time.monotonic() + 30
            while not await _list(server, pki):
                assert shepherd.process.poll() is None, shepherd.output()[-3000:]
                assert time.monotonic() < deadline, shepherd.output()[-3000:]
                await asyncio.sleep(0.05)
            assert len(await _list(server, pki) or []) == 1  # the intruder is not in
            async with Client.connect(url, token=CLIENT_TOKEN, ca_file=pki / "ca.pem",
                                      cert_file=pki / "client.pem",
                                      key_file=pki / "client.key") as client:
                result = await asyncio.wait_for(
                    (await client.submit_task("add").args(2, 40).submit()).wait(), 60)
                assert result.success, result.error
                return int(result.value)

        assert asyncio.run(flow()) == 42
        # The refused shepherd keeps trying (it never gives up) and says why.
        deadline = time.monotonic() + 30
        while "UNAUTHENTICATED" not in intruder.output():
            assert intruder.process.poll() is None, intruder.output()[-3000:]
            assert time.monotonic() < deadline, intruder.output()[-3000:]
            time.sleep(0.05)
        assert intruder.output().count("UNAUTHENTICATED") <= 3  # the log does not flood
    finally:
        intruder.kill()
        shepherd.stop()
