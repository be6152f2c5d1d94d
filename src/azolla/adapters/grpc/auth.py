"""Bearer-token authentication and domain scoping for the gRPC server, plus TLS credentials.

Tokens are configured with the domains and roles they grant::

    [[auth.tokens]]
    name = "billing-app"
    sha256 = "9f86d0..."          # or token = "..." (plain text, for development)
    domains = ["billing"]          # "*" = every domain
    roles = ["client"]             # client (ClientService), shepherd (ClusterService), admin

A call must carry ``authorization: Bearer <token>``. The token is hashed and compared with every
configured digest in constant time (:func:`hmac.compare_digest`, no early exit). A request that
names a domain the token does not grant is refused: ``NOT_FOUND`` for calls about one task (so a
client can never learn that a task of another domain exists), ``PERMISSION_DENIED`` otherwise.
Health checks and reflection stay open.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from azolla.adapters.grpc.status import RefusedRequest

__all__ = ["Principal", "TokenAuthInterceptor", "hash_token", "server_credentials"]

ALL_DOMAINS = "*"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_ROLE_BY_SERVICE = {
    "azolla.orchestrator.ClientService": "client",
    "azolla.orchestrator.ClusterService": "shepherd",
    "azolla.orchestrator.AdminService": "admin",
    "azolla.shepherd.Worker": "shepherd",
}
#: Methods whose request names one task: a foreign domain answers NOT_FOUND.
#: Streams whose messages are answered one by one: a refused message fails only its own answer.
_PER_MESSAGE_METHODS = frozenset({"SubmitTasks"})
_TASK_METHODS = frozenset({"WaitForTask", "GetTaskStatus", "CancelTask", "WatchTask",
                           "RequeueTask"})


def hash_token(token: str) -> str:
    """Return the hex SHA-256 of a token (what the configuration stores)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token belongs to and what it may do.

    Attributes:
        name: A label for logs.
        domains: Domains it may use; ``"*"`` grants all.
        roles: ``client``, ``shepherd`` and/or ``admin``.
    """

    name: str
    domains: frozenset[str]
    roles: frozenset[str]

    def allows_domain(self, domain: str) -> bool:
        """True when the token grants ``domain`` ("" means every domain, needs ``*``)."""
        if ALL_DOMAINS in self.domains:
            return True
        return bool(domain) and domain in self.domains


def _domains_of(request: Any) -> list[str]:
    """The domains a request message names ("" = all, for list/tail calls)."""
    if hasattr(request, "tasks") and not hasattr(request, "domain"):  # CreateTasksRequest
        return [task.domain or "default" for task in request.tasks]
    if hasattr(request, "hello"):  # ClientMsg: only Hello names a domain
        return [request.hello.domain or "default"] if request.HasField("hello") else []
    if hasattr(request, "domain"):
        name = type(request).__name__
        if name in ("ListShepherdsRequest", "TailEventsRequest"):
            return [request.domain]
        return [request.domain or "default"]
    return []


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call by bearer token and scopes it to the token's domains.

    Args:
        tokens: ``sha256 hex digest → Principal``.
    """

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._digests = [(bytes.fromhex(digest), principal)
                         for digest, principal in tokens.items()]

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal | None:
        """Return the principal of the call's bearer token, or None."""
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                if text[:7].lower() == "bearer ":
                    presented = hashlib.sha256(text[7:].strip().encode()).digest()
        if not presented:
            return None
        found: Principal | None = None
        for digest, principal in self._digests:  # no early exit: constant time
            if hmac.compare_digest(digest, presented):
                found = principal
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the handler so that it checks the token and every request's domain."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        service, _, name = method.lstrip("/").partition("/")
        principal = self.authenticate(handler_call_details.invocation_metadata)
        refusal: _Refusal | None = None
        if principal is None:
            refusal = _Refusal(grpc.StatusCode.UNAUTHENTICATED,
                               "missing or invalid bearer token (metadata 'authorization: "
                               "Bearer <token>')")
        elif _ROLE_BY_SERVICE.get(service, "admin") not in principal.roles:
            refusal = _Refusal(grpc.StatusCode.PERMISSION_DENIED,
                               f"this token may not call {service}")
        return _wrap(handler, principal, name, refusal)


def _check(principal: Principal, method: str, request: Any) -> None:
    for domain in _domains_of(request):
        if not principal.allows_domain(domain):
            if method in _TASK_METHODS:
                raise _Refusal(grpc.StatusCode.NOT_FOUND, "task not found")
            shown = domain or "all domains"
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"this token is not valid for {shown}")


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], principal: Principal | None, method: str,
          refusal: _Refusal | None) -> grpc.RpcMethodHandler[Any, Any]:
    def gate(request: Any) -> None:
        if refusal is not None:
            raise refusal
        assert principal is not None
        _check(principal, method, request)

    async def checked_iterator(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            gate(request)
            yield request

    async def answered_iterator(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            try:
                gate(request)
            except _Refusal as exc:
                yield RefusedRequest(request, exc.code, exc.message)
                continue
            yield request

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                gate(request)
            except _Refusal as exc:
                await context.abort(exc.code, exc.message)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def unary_stream(request: Any,
                               context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                gate(request)
            except _Refusal as exc:
                await context.abort(exc.code, exc.message)
            async for response in inner_us(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_unary is not None:
        inner_su: Any = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await inner_su(checked_iterator(requests), context)
            except _Refusal as exc:
                await context.abort(exc.code, exc.message)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    inner_ss: Any = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if refusal is not None:
            await context.abort(refusal.code, refusal.message)
        check = answered_iterator if method in _PER_MESSAGE_METHODS else checked_iterator
        try:
            async for response in inner_ss(check(requests), context):
                yield response
        except _Refusal as exc:
            await context.abort(exc.code, exc.message)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None,
                       require_client_auth: bool = False) -> grpc.ServerCredentials:
    """Load TLS server credentials (with a client CA for mutual TLS).

    Args:
        cert_file: PEM certificate chain of the server.
        key_file: PEM private key of the server.
        client_ca_file: PEM CA that signs client (e.g. shepherd) certificates.
        require_client_auth: Refuse connections without a client certificate signed by the CA.
    """
    with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
        pair = [(key.read(), cert.read())]
    root: bytes | None = None
    if client_ca_file:
        with open(client_ca_file, "rb") as ca:
            root = ca.read()
    return grpc.ssl_server_credentials(pair, root_certificates=root,
                                       require_client_auth=require_client_auth and bool(root))
