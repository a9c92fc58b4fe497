"""What a failed call raises on the client: `RemoteError`, and for the statuses the server uses
for bad input, subclasses that are also the library's own errors (so `except InvalidRequest`
works the same in-process and remotely)."""

from __future__ import annotations

import grpc

from ..audit.errors import InvalidRequest, LimitExceeded, NotFound


class RemoteError(RuntimeError):
    """A gRPC call failed; `code` is the grpc.StatusCode and `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class RemoteInvalidRequest(RemoteError, InvalidRequest):
    """INVALID_ARGUMENT from the server (also an InvalidRequest)."""


class RemoteNotFound(RemoteError, NotFound):
    """NOT_FOUND from the server (also a NotFound)."""


class RemoteLimitExceeded(RemoteError, LimitExceeded):
    """RESOURCE_EXHAUSTED from the server (also a LimitExceeded)."""


_ERROR_TYPES: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: RemoteInvalidRequest,
    grpc.StatusCode.NOT_FOUND: RemoteNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RemoteLimitExceeded,
}


def map_error(exc: grpc.RpcError) -> RemoteError:
    """The RemoteError (subclass) for a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    code = code or grpc.StatusCode.UNKNOWN
    return _ERROR_TYPES.get(code, RemoteError)(code, details or "")
