"""The orchestrator's gRPC server: Client, Cluster and Admin services, health, reflection.

:class:`GrpcServer` owns one ``grpc.aio.Server`` bound to one address. It does not own the
orchestrator: start the orchestrator first and stop it after the server (the composition root,
:mod:`azolla.app.containers`, does both in that order).

Shutdown (:meth:`GrpcServer.stop`): the health status turns ``NOT_SERVING``, shepherd streams
are closed *without* ending their attempts (the shepherds reconnect to the next server, which
reconciles what they still run), new RPCs are refused, and RPCs in flight get ``grace``
seconds to finish (a submit that is waiting for its commit completes) before they are cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from azolla.adapters.grpc.admin_service import AdminService
from azolla.adapters.grpc.client_service import ClientService
from azolla.adapters.grpc.cluster_service import ClusterService
from azolla.adapters.grpc.decoding import add_guarded_servicer
from azolla.adapters.grpc.pb import orchestrator_pb2

if TYPE_CHECKING:
    from azolla.app.orchestrator import Orchestrator

__all__ = ["SERVICE_NAMES", "GrpcServer", "GrpcServerOptions", "ServerBindError"]

log = logging.getLogger("azolla.grpc.server")

_ORCHESTRATOR = orchestrator_pb2.DESCRIPTOR.services_by_name
#: Fully qualified names of the services this server exposes.
SERVICE_NAMES: tuple[str, ...] = (
    _ORCHESTRATOR["ClientService"].full_name,
    _ORCHESTRATOR["ClusterService"].full_name,
    _ORCHESTRATOR["AdminService"].full_name,
)


def _bind_problem(host: str, port: int) -> str:
    """Explain why ``host:port`` cannot be bound (gRPC's own error says little)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host!r} ({exc.strerror or exc})"
    for family, kind, proto, _, sockaddr in infos:
        with contextlib.suppress(OSError), socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                return exc.strerror or str(exc)
    return "the address is in use or not available on this machine"


class ServerBindError(RuntimeError):
    """The server could not listen on the requested address."""


@dataclass(frozen=True, slots=True)
class GrpcServerOptions:
    """How the gRPC server listens and behaves.

    Attributes:
        host: Address to listen on (``127.0.0.1`` = this machine only).
        port: TCP port; 0 picks a free one (see :attr:`GrpcServer.port`).
        ping_interval: Seconds between ``Ping`` messages on each shepherd stream.
        max_message_bytes: Largest message received or sent.
        max_batch: Most tasks in one ``CreateTasks`` request or ``SubmitTasks`` message.
        max_tasks_per_message: Most tasks in one ``TaskBatch`` pushed to a shepherd.
        shutdown_grace: Seconds RPCs in flight get to finish at shutdown.
        report_retry_seconds: How long a shepherd's results are retried while the store is
            unavailable before its stream is closed.
        reflection: Serve gRPC server reflection (for ``grpcurl`` and similar tools).
        max_concurrent_rpcs: Most RPCs (streams included) served at once; further calls are
            answered ``RESOURCE_EXHAUSTED``. Also gRPC core's backlog of calls not yet accepted
            (beyond it, new calls are cancelled at random).
        hello_timeout: Seconds a new ClusterService stream may take to send its ``Hello``.
    """

    host: str = "127.0.0.1"
    port: int = 52710
    ping_interval: float = 5.0
    max_message_bytes: int = 64 * 1024 * 1024
    max_batch: int = 10_000
    max_tasks_per_message: int = 1000
    shutdown_grace: float = 5.0
    report_retry_seconds: float = 30.0
    reflection: bool = True
    max_concurrent_rpcs: int = 10_000
    hello_timeout: float = 10.0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """Serves an :class:`~azolla.app.orchestrator.Orchestrator` over gRPC.

    Args:
        orchestrator: A started orchestrator.
        options: Listening address and tunables.
        interceptors: Extra ``grpc.aio.ServerInterceptor`` objects (e.g. authentication,
            :class:`~azolla.adapters.grpc.auth.TokenAuthInterceptor`).
        credentials: TLS credentials (see :func:`~azolla.adapters.grpc.auth.server_credentials`);
            None serves plain text.
    """

    def __init__(self, orchestrator: Orchestrator, options: GrpcServerOptions | None = None,
                 *, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.orchestrator = orchestrator
        self.options = options or GrpcServerOptions()
        self.client_service = ClientService(orchestrator, max_batch=self.options.max_batch)
        self.cluster_service = ClusterService(
            orchestrator, ping_interval=self.options.ping_interval,
            report_retry_seconds=self.options.report_retry_seconds,
            max_tasks_per_message=self.options.max_tasks_per_message,
            hello_timeout=self.options.hello_timeout)
        self.admin_service = AdminService(orchestrator)
        self.health = health.aio.HealthServicer()
        self._interceptors = list(interceptors)
        self._credentials = credentials
        self._server: grpc.aio.Server | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The bound TCP port (0 before :meth:`start`)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        return _address(self.options.host, self._port)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    async def start(self) -> None:
        """Bind, start serving and report ``SERVING`` to health checks.

        Raises:
            ServerBindError: The address could not be bound (in use, not local, ...).
        """
        opts = self.options
        server = grpc.aio.server(
            interceptors=self._interceptors or None,
            maximum_concurrent_rpcs=opts.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", opts.max_message_bytes),
                ("grpc.max_send_message_length", opts.max_message_bytes),
                # Never share the port with another process silently (Linux's default for
                # gRPC is SO_REUSEPORT on).
                ("grpc.so_reuseport", 0),
                # Clients and shepherds may keep idle connections alive with pings.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                ("grpc.http2.max_ping_strikes", 0),
                # gRPC core cancels new calls at random once more than 1000 wait to be
                # accepted: a burst of streams within the concurrency limit is queued instead.
                ("grpc.server.max_pending_requests", opts.max_concurrent_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 2 * opts.max_concurrent_rpcs),
            ],
        )
        # Registered with guarded deserializers: a request that does not parse is answered
        # INTERNAL with a readable message (see azolla.adapters.grpc.decoding).
        for name, servicer in (("ClientService", self.client_service),
                               ("ClusterService", self.cluster_service),
                               ("AdminService", self.admin_service)):
            add_guarded_servicer(server, _ORCHESTRATOR[name], servicer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if opts.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = _address(opts.host, opts.port)
        try:
            if self._credentials is not None:
                port = server.add_secure_port(address, self._credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            problem = _bind_problem(opts.host, opts.port)
            raise ServerBindError(f"cannot listen on {address}: {problem}")
        self._port = port
        await server.start()
        self._server = server
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        for name in SERVICE_NAMES:
            await self.health.set(name, serving)
        log.info("gRPC server listening on %s (%s)", self.address,
                 "TLS" if self._credentials is not None else "plain text")

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (see the module docstring); safe to call twice.

        Args:
            grace: Seconds RPCs in flight may still take; default ``options.shutdown_grace``.
        """
        server, self._server = self._server, None
        if server is None:
            return
        await self.health.enter_graceful_shutdown()
        self.cluster_service.drain()
        self.client_service.drain()
        await server.stop(self.options.shutdown_grace if grace is None else grace)
        await self.cluster_service.wait_background()
        log.info("gRPC server on %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        """Wait until the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    def __repr__(self) -> str:
        state: Any = "running" if self.running else "stopped"
        return f"GrpcServer({self.address}, {state})"
