"""Domain error -> gRPC status translation, shared by the servicers.

A servicer never lets an exception escape as a traceback: domain errors become the status in
:data:`~azolla.domain.errors.GRPC_STATUS_BY_CODE` with the error's own message; anything else is
logged (with its traceback, on the server) and answered ``INTERNAL`` with a short message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio

from azolla.adapters.grpc.convert import FeatureNotImplemented
from azolla.domain.errors import GRPC_STATUS_BY_CODE, AzollaDomainError

__all__ = ["RefusedRequest", "abort_for", "status_code_for", "status_for"]

log = logging.getLogger("azolla.grpc")

_EXTRA: dict[str, str] = {FeatureNotImplemented.code: "UNIMPLEMENTED"}


@dataclass(frozen=True, slots=True)
class RefusedRequest:
    """A message of a stream that an interceptor refused, handed on in place of the message.

    Streams that answer each message on its own (``SubmitTasks``) answer this one with ``code``
    and ``message`` and go on; the others end with that status.

    Attributes:
        request: The refused message.
        code: The status to answer it with.
        message: Why.
    """

    request: Any
    code: grpc.StatusCode
    message: str


def status_code_for(exc: AzollaDomainError) -> grpc.StatusCode:
    """Return the gRPC status for a domain error (its class, or the nearest base, decides)."""
    for cls in type(exc).__mro__:
        code = getattr(cls, "code", None)
        if not isinstance(code, str):
            continue
        name = _EXTRA.get(code) or GRPC_STATUS_BY_CODE.get(code)
        if name is not None:
            return grpc.StatusCode[name]
    return grpc.StatusCode.INTERNAL


def status_for(exc: BaseException, operation: str) -> tuple[grpc.StatusCode, str]:
    """Return the status and readable message that ``exc`` maps to (unexpected errors logged).

    Args:
        exc: The error that ended the operation.
        operation: What was being done, for the log of unexpected errors.
    """
    if isinstance(exc, AzollaDomainError):
        return status_code_for(exc), exc.message
    log.error("%s failed unexpectedly", operation, exc_info=exc)
    return grpc.StatusCode.INTERNAL, (f"{operation} failed: internal error "
                                      f"({type(exc).__name__}); see the server log")


async def abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException,
                    operation: str) -> NoReturn:
    """End the RPC with the status that ``exc`` maps to (see :func:`status_for`).

    Args:
        context: The RPC's context.
        exc: The error that ended the operation.
        operation: What was being done, for the log of unexpected errors.
    """
    code, message = status_for(exc, operation)
    await context.abort(code, message)
