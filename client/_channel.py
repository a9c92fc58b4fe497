"""Connecting to a server: `ClientBase`, the connection state both clients (blocking and asyncio)
open in the same way: address ($REFUSAL_AUDIT_SERVER), bearer token ($REFUSAL_AUDIT_TOKEN), TLS."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from ..audit.engine import Limits, ModelInfo
from ..proto.generated import audit_pb2_grpc as pb_grpc

SERVER_ENV = "REFUSAL_AUDIT_SERVER"
TOKEN_ENV = "REFUSAL_AUDIT_TOKEN"
DEFAULT_ADDRESS = "localhost:50051"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_credentials(tls_ca: str | bytes | os.PathLike[str] | None, tls: bool) -> grpc.ChannelCredentials | None:
    """TLS credentials (a CA file/PEM, or system roots when tls=True); None for plaintext."""
    if tls_ca is None and not tls:
        return None
    root: bytes | None = None
    if isinstance(tls_ca, bytes):
        root = tls_ca
    elif tls_ca is not None:
        with open(tls_ca, "rb") as f:
            root = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root)


class ClientBase:
    """The connection both clients hold: address, bearer metadata, default timeout, channel, stubs,
    the cached ModelInfo/Limits and the jobs API. Subclasses name the grpc flavour (`grpc` or
    `grpc.aio`) that opens the channel, and the jobs API class."""

    _grpc: Any = grpc
    _jobs_api: Any
    jobs: Any

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        tls_ca: str | bytes | os.PathLike[str] | None = None,
        timeout: float | None = None,
        *,
        tls: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address or os.environ.get(SERVER_ENV) or DEFAULT_ADDRESS
        self.timeout = timeout
        token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        creds = channel_credentials(tls_ca, tls)
        # large messages: residuals, full log-prob distributions
        opts = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                *options]
        self.channel = (self._grpc.insecure_channel(self.address, options=opts) if creds is None
                        else self._grpc.secure_channel(self.address, creds, options=opts))
        self.stub = pb_grpc.AuditServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._info: ModelInfo | None = None
        self._limits: Limits | None = None
        self.jobs = self._jobs_api(self.stub, self.metadata)

    def _timeout(self, timeout: float | None) -> float | None:
        """A call's own timeout, else the client's default."""
        return timeout if timeout is not None else self.timeout
