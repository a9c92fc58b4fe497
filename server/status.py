"""The one error -> gRPC status map, used by every service (AuditService, its job RPCs, JudgeService).

InvalidRequest / pydantic ValidationError -> INVALID_ARGUMENT, NotFound -> NOT_FOUND,
LimitExceeded (a full queue, a limit) -> RESOURCE_EXHAUSTED, RpcCancelled -> CANCELLED,
NotImplementedError -> UNIMPLEMENTED; anything else -> INTERNAL, with the traceback logged.
The message always comes from the exception, which names the offending field.
"""

from __future__ import annotations

import logging

import grpc
from pydantic import ValidationError

from ..audit.errors import InvalidRequest, LimitExceeded, NotFound, validation_message

log = logging.getLogger("refusal_audit.server")


class RpcCancelled(Exception):
    """The RPC was cancelled (client gone, deadline passed, or server draining)."""


STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RpcCancelled, grpc.StatusCode.CANCELLED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


def status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an exception raised while serving `method`."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            if isinstance(exc, ValidationError):
                return code, validation_message(exc, "request")
            if isinstance(exc, RpcCancelled):
                return code, f"{method} cancelled"
            if isinstance(exc, NotImplementedError):
                return code, f"{method}: {exc}" if str(exc) else f"{method} is not implemented"
            return code, str(exc)
    log.error("internal error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Abort an async RPC with the status of `exc` (never returns)."""
    code, msg = status_for(exc, method)
    await context.abort(code, msg)


def abort_with_sync(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    """Abort a sync RPC with the status of `exc` (never returns)."""
    code, msg = status_for(exc, method)
    context.abort(code, msg)
