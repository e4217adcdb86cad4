"""Registration of the ``chargepath.v1`` services on a gRPC server, with request
deserializers that never raise.

grpc's generated ``add_*Servicer_to_server`` decodes requests with the message's
``FromString``: bytes that are not a valid message then fail inside grpc, which answers
UNKNOWN (with the exception's class name in the message) or INTERNAL on a stream, and logs a
stack trace per message. :func:`add_service` registers the same methods from the service's
descriptor, but each request is decoded by :func:`decoder`, which turns bytes that fail to
decode into an :class:`Undecodable`. That is answered INVALID_ARGUMENT ("request: not a valid
chargepath.v1.CheckRequest (protobuf decode failed)", with a ``google.rpc.BadRequest``
detail), and noted in the rate-limited :data:`~chargepath.transport.errors.bad_input` log:

- a unary request (Check, every AdminService and KeyService call, WatchDecisions) is refused
  here, before the servicer runs;
- a message of a client stream (StreamUsage) is handed to the servicer, which must answer it
  itself (:func:`refuse_undecodable` ends the stream with INVALID_ARGUMENT).

Reflection is unaffected: it describes services from their descriptors, not from the handlers.
Interceptors (tracing, authentication) see the same handlers as before, so a caller that is
refused by them never learns whether its bytes decoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from chargepath.core.model import FieldViolation
from chargepath.transport.errors import abort_invalid, bad_input
from chargepath_protos.v1 import admin_pb2, keys_pb2, lease_pb2, metering_pb2

METERING = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"]
LEASE = lease_pb2.DESCRIPTOR.services_by_name["LeaseService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
KEYS = keys_pb2.DESCRIPTOR.services_by_name["KeyService"]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request decodes to when its bytes are not a valid ``message`` (a full name,
    e.g. ``chargepath.v1.CheckRequest``): ``size`` is their length. Holds none of the bytes."""

    message: str
    size: int


def decoder(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A request deserializer for ``message_class`` that never raises."""
    name = message_class.DESCRIPTOR.full_name
    parse = message_class.FromString

    def decode(data: bytes) -> Message | Undecodable:
        try:
            return parse(data)
        except Exception:  # DecodeError, and whatever else a parser may raise on hostile bytes
            return Undecodable(name, len(data))

    return decode


def violation(request: Undecodable) -> FieldViolation:
    return FieldViolation("request", f"not a valid {request.message} (protobuf decode failed)")


async def refuse_undecodable(context: Any, request: Undecodable) -> NoReturn:
    """End the call with INVALID_ARGUMENT naming ``request``, and note it in the bounded log."""
    bad_input.refused(
        f"undecodable {request.message}", f"{request.size} bytes from {context.peer()}"
    )
    await abort_invalid(context, [violation(request)])


Behaviour = Callable[[Any, Any], Any]


def _unary(behaviour: Behaviour) -> Callable[[Any, Any], Awaitable[Any]]:
    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            await refuse_undecodable(context, request)
        return await behaviour(request, context)

    return unary


def _unary_stream(behaviour: Behaviour) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await refuse_undecodable(context, request)
        # closed with this generator, so that the servicer's cleanup (a watch's subscription)
        # runs when the call ends, not when the garbage collector gets to it
        async with contextlib.aclosing(behaviour(request, context)) as responses:
            async for response in responses:
                yield response

    return unary_stream


def method_handlers(servicer: object, service: ServiceDescriptor) -> dict[str, Any]:
    """The RPC method handlers of ``service`` served by ``servicer``'s methods of the same
    names (async functions; a server-streaming one an async generator)."""
    handlers: dict[str, Any] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)
        decode = decoder(GetMessageClass(method.input_type))
        encode = GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming:
            make = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            handlers[method.name] = make(behaviour, decode, encode)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _unary_stream(behaviour), decode, encode
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour), decode, encode
            )
    return handlers


class GenericOnly:
    """``server`` as a generated ``add_*Servicer_to_server`` function sees it (the health
    service's): its generic handler is added, its registered method handlers are not, for the
    reason :func:`add_service` gives."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, name: str, handlers: Any) -> None:
        pass


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Serve ``service`` (e.g. ``metering_pb2.DESCRIPTOR.services_by_name["MeteringService"]``)
    with ``servicer``, as the generated ``add_*Servicer_to_server`` would, but with request
    deserializers that never raise (see the module's docstring)."""
    handlers = method_handlers(servicer, service)
    # A generic handler only, not also ``add_registered_method_handlers`` as the generated
    # code does: grpc.aio's server keeps one pending task per registered method and waits on
    # all of them (``asyncio.wait``) for every call it accepts, so each registered method
    # costs every call of every service CPU; the generic handler finds the method by name.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
