"""Undecodable request bytes -> INVALID_ARGUMENT naming the field, on every service of a server.

gRPC deserializes a request before any handler runs; when protobuf refuses the bytes (invalid
UTF-8 in a string field, a truncated message, a wrong wire type) grpc answers UNKNOWN (aio) or
INTERNAL (sync) with no hint of what was wrong. The interceptors here wrap each unary-request
handler's deserializer so that a refusal reaches the handler as a marker, which then aborts with
INVALID_ARGUMENT and a message naming the field: ``items[0].prompt.text: invalid UTF-8 in a
string field (GenerateRequest)``. The field is found by re-parsing the bytes with a copy of the
message's schema whose string fields are bytes fields (protobuf's own parser, not a hand-rolled
one) and finding the value that is not UTF-8.

Request-streaming handlers (only grpc's reflection service has them: a bidi stream) get each
request of the stream through the same deserializer; the first undecodable one aborts the call.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


class Undecodable:
    """What a wrapped deserializer returns for bytes protobuf refuses: the message to abort with."""

    def __init__(self, message: str) -> None:
        self.message = message


# ---------------------------------------------------------------------------- finding the field


def _bytes_for_strings(msg: descriptor_pb2.DescriptorProto) -> None:
    if msg.options.map_entry:  # map keys cannot be bytes: parse map entries as plain key/value messages
        msg.options.ClearField("map_entry")
    for f in msg.field:
        if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    for nested in msg.nested_type:
        _bytes_for_strings(nested)


@functools.lru_cache(maxsize=256)
def _lenient_class(desc: Descriptor) -> type[Message]:
    """A message class with desc's schema in which every string field is a bytes field."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file_desc: Any) -> None:
        if file_desc.name in added:
            return
        for dep in file_desc.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file_desc.CopyToProto(proto)
        for m in proto.message_type:
            _bytes_for_strings(m)
        pool.Add(proto)
        added.add(file_desc.name)

    add(desc.file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(desc.full_name))  # type: ignore[no-any-return]


def _not_utf8(value: Any) -> bool:
    try:
        bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _find_bad_string(lenient: Message, desc: Descriptor, path: str) -> str | None:
    """The path of the first string field (by the original schema `desc`) whose bytes are not UTF-8."""
    for lf, value in lenient.ListFields():
        f = desc.fields_by_name[lf.name]
        name = f"{path}.{f.name}" if path else f.name
        entry = f.message_type if f.message_type is not None and f.message_type.GetOptions().map_entry else None
        if entry is not None:  # a map, parsed as repeated key/value messages
            key_f, val_f = entry.fields_by_name["key"], entry.fields_by_name["value"]
            for e in value:
                if key_f.type == _STRING and _not_utf8(e.key):
                    return f"{name} (a key)"
                label = f"{name}[{e.key.decode('utf-8') if isinstance(e.key, bytes) else e.key!r}]"
                if val_f.type == _STRING and _not_utf8(e.value):
                    return label
                if val_f.type == _MESSAGE and e.HasField("value"):
                    found = _find_bad_string(e.value, val_f.message_type, label)
                    if found:
                        return found
            continue
        repeated = isinstance(value, Sequence) and not isinstance(value, (bytes, str))
        items = list(enumerate(value)) if repeated else [(None, value)]
        for i, v in items:
            label = f"{name}[{i}]" if repeated else name
            if f.type == _STRING and _not_utf8(v):
                return label
            if f.type == _MESSAGE:
                found = _find_bad_string(v, f.message_type, label)
                if found:
                    return found
    return None


def describe(message_cls: type[Message] | None, data: bytes, exc: BaseException) -> str:
    """Why `data` does not decode as `message_cls`, naming the field when a string is not UTF-8."""
    if message_cls is None:
        return f"request: undecodable request bytes ({exc})"
    desc = message_cls.DESCRIPTOR
    try:
        lenient = _lenient_class(desc)()
        lenient.ParseFromString(data)
    except Exception:  # noqa: BLE001 - not a UTF-8 problem: the bytes are not this message at all
        return f"request: cannot decode the bytes as {desc.name} (truncated or not a {desc.name} message)"
    path = _find_bad_string(lenient, desc, "")
    if path is None:  # pragma: no cover - protobuf refused it for a reason the lenient parse accepts
        return f"request: cannot decode the bytes as {desc.name} ({exc})"
    return f"{path}: invalid UTF-8 in a string field ({desc.name})"


# ---------------------------------------------------------------------------- handler wrapping


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_cls = getattr(deserializer, "__self__", None)
    if not (isinstance(message_cls, type) and issubclass(message_cls, Message)):
        message_cls = None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any refusal of the bytes is the client's
            return Undecodable(describe(message_cls, data, exc))

    return deserialize


def _aio_behavior(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):  # a coroutine that writes with context.write
                await result
            else:
                for item in result:
                    yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def _sync_behavior(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    if streaming:

        def stream(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            yield from behavior(request, context)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behavior(request, context)

    return unary


def _aio_requests(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A request-streaming aio behavior whose request iterator aborts at an undecodable request."""

    async def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            yield request

    def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return behavior(checked(requests, context), context)

    return call


def _sync_requests(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """The same for thread-pool servers."""

    def checked(requests: Any, context: grpc.ServicerContext) -> Any:
        for request in requests:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            yield request

    def call(requests: Any, context: grpc.ServicerContext) -> Any:
        return behavior(checked(requests, context), context)

    return call


def handler_like(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
                 request_deserializer: Callable[[bytes], Any] | None) -> grpc.RpcMethodHandler:
    """A method handler of `handler`'s shape (request / response streaming or not) that runs `behavior`."""
    kw = dict(request_deserializer=request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kw)
    return grpc.unary_unary_rpc_method_handler(behavior, **kw)


def wrap_handler(handler: grpc.RpcMethodHandler | None, aio: bool) -> grpc.RpcMethodHandler | None:
    """The same handler with undecodable requests answered INVALID_ARGUMENT naming the field."""
    if handler is None or handler.request_deserializer is None:
        return handler
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if handler.request_streaming:  # the requests arrive as an iterator: check each one as it is read
        behavior = (_aio_requests if aio else _sync_requests)(behavior)
    make = _aio_behavior if aio else _sync_behavior
    return handler_like(handler, make(behavior, handler.response_streaming), _safe(handler.request_deserializer))


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio servers: undecodable requests -> INVALID_ARGUMENT naming the field (put it last)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return wrap_handler(await continuation(handler_call_details), aio=True)  # type: ignore[return-value]


class SyncDecodeErrorInterceptor(grpc.ServerInterceptor):
    """Thread-pool grpc servers (the judge sidecar): the same."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return wrap_handler(continuation(handler_call_details), aio=False)  # type: ignore[return-value]
