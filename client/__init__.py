"""Python SDK for a refusal-audit server: `AuditClient` (sync), `AsyncAuditClient` (asyncio).

Thin: needs grpcio, protobuf, pydantic and numpy only (no torch). Prompts are raw text or chat
messages (`user_prompt("...")`); interventions are the pydantic models of `refusal_audit.audit.spec`.
"""

from ..audit.engine import Limits, StreamEvent
from ..audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ChatMessage,
    ClampLatents,
    Request,
    SamplingParams,
    ScaleLatents,
    TokenScope,
    user_prompt,
)
from ..proto.convert import Artifact
from .aio import AsyncAuditClient
from .errors import RemoteError, RemoteInvalidRequest, RemoteLimitExceeded, RemoteNotFound
from .sync import AuditClient

__all__ = [
    "AuditClient",
    "AsyncAuditClient",
    "RemoteError",
    "RemoteInvalidRequest",
    "RemoteNotFound",
    "RemoteLimitExceeded",
    "Artifact",
    "Limits",
    "StreamEvent",
    "AblateLatents",
    "ClampLatents",
    "ScaleLatents",
    "AblateDirection",
    "AddDirection",
    "TokenScope",
    "ChatMessage",
    "Request",
    "SamplingParams",
    "user_prompt",
]
