"""Requests that do not parse get ``INTERNAL`` with a readable message, not a traceback.

gRPC documents ``INTERNAL`` as the status of a request that cannot be parsed ("Error parsing
request proto", ``doc/statuscodes.md`` of grpc/grpc; Go, Java and C++ answer so). ``grpc.aio``
instead lets the ``DecodeError`` escape: the caller gets ``UNKNOWN "Unexpected <class ...>"`` and
the server logs a traceback at ERROR for every such request, so any client could flood the log.
Protobuf refuses, for instance, a ``string`` field holding invalid UTF-8, or truncated bytes.

:func:`add_guarded_servicer` registers a servicer like the generated ``add_*_to_server``
functions, with a request deserializer that turns a parse failure into a marker instead of an
exception; the method then ends the call with ``INTERNAL`` (unary requests) or, for a request
stream, raises :class:`UndecodableRequest` out of the request iterator after setting the call's
status to ``INTERNAL``. Handlers are wrapped once, at registration: no cost per call beyond one
type check.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from azolla.domain.errors import AzollaDomainError

__all__ = ["UndecodableRequest", "add_guarded_servicer"]

Context = grpc.aio.ServicerContext[Any, Any]


class UndecodableRequest(AzollaDomainError):
    """A request message could not be parsed (answered ``INTERNAL``)."""

    code = "undecodable_request"


class _Undecodable:
    """What the guarded deserializer returns for bytes that do not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    parse = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def decode(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            reason = str(exc).rsplit(": ", 1)[-1] or "malformed bytes"
            return _Undecodable(f"the request is not a valid {name} message ({reason})")

    return decode


async def _checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is _Undecodable:
            # The status holds even if the servicer swallows the exception and ends normally.
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(request.message)
            raise UndecodableRequest(request.message)
        yield request


def _guard(behavior: Any, kind: tuple[bool, bool], request_class: Any,
           response_class: Any) -> grpc.RpcMethodHandler[Any, Any]:
    kwargs: dict[str, Any] = {"request_deserializer": _deserializer(request_class),
                              "response_serializer": response_class.SerializeToString}
    client_streaming, server_streaming = kind
    if not client_streaming and not server_streaming:
        inner_uu: Any = behavior

        async def unary_unary(request: Any, context: Context) -> Any:
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INTERNAL, request.message)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if not client_streaming:
        inner_us: Any = behavior

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INTERNAL, request.message)
            async with contextlib.aclosing(inner_us(request, context)) as responses:
                async for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if not server_streaming:
        inner_su: Any = behavior

        async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            try:
                return await inner_su(_checked(requests, context), context)
            except UndecodableRequest as exc:
                await context.abort(grpc.StatusCode.INTERNAL, exc.message)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    inner_ss: Any = behavior

    async def stream_stream(requests: AsyncIterator[Any],
                            context: Context) -> AsyncIterator[Any]:
        try:
            async with contextlib.aclosing(
                    inner_ss(_checked(requests, context), context)) as responses:
                async for response in responses:
                    yield response
        except UndecodableRequest as exc:
            await context.abort(grpc.StatusCode.INTERNAL, exc.message)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


def add_guarded_servicer(server: grpc.aio.Server, service: ServiceDescriptor,
                         servicer: object) -> None:
    """Register ``servicer`` for every method of ``service``, with guarded deserializers.

    Args:
        server: The server (before it starts).
        service: The service's descriptor, e.g.
            ``orchestrator_pb2.DESCRIPTOR.services_by_name["ClientService"]``.
        servicer: An object with one async method per RPC, named as in the ``.proto``.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        handlers[method.name] = _guard(
            getattr(servicer, method.name),
            (method.client_streaming, method.server_streaming),
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
