"""The gRPC side of tracing: the caller's trace context from gRPC metadata, the server span
of a ``Check`` call or a ``StreamUsage`` batch, and the gRPC status it ended with.

:mod:`chargepath.telemetry` keeps what the engine needs (decision and store spans, counters)
and imports no grpc; this module adds what only a gRPC servicer needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc
from grpc import StatusCode
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.trace import Span, SpanKind, Status
from opentelemetry.trace import StatusCode as SpanStatusCode

from chargepath.telemetry import Telemetry

_EMPTY_CONTEXT = otel_context.Context()
_NO_SERVER_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)


def caller_context(
    telemetry: Telemetry, metadata: Iterable[tuple[str, Any]] | None
) -> otel_context.Context:
    """The caller's trace context from its gRPC metadata (W3C ``traceparent``); an empty one,
    without reading the metadata, when tracing is off."""
    if not telemetry.tracing:
        return _EMPTY_CONTEXT
    return propagate.extract({k: v for k, v in metadata or ()})


def server_span(
    telemetry: Telemetry,
    name: str,
    method: str,
    parent: otel_context.Context,
    **attributes: Any,
) -> AbstractContextManager[Span]:
    """The server span ``name`` of one ``Check`` call or one ``StreamUsage`` batch, child of
    the caller's trace context (``parent``, from :func:`caller_context`). The servicer makes
    both, so that Check and stream batches are traced alike: the gRPC instrumentation's
    stream wrapper fails to detach its context when a client cancels a stream, and one span
    for a stream that lives for hours helps no one. A gRPC error sets
    ``rpc.grpc.status_code`` and an error status (see :func:`set_rpc_status`). With tracing
    off, the invalid span, which records nothing."""
    if not telemetry.tracing:
        return _NO_SERVER_SPAN
    return telemetry.tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": "chargepath.v1.MeteringService",
            "rpc.method": method,
            **attributes,
        },
        record_exception=False,
        set_status_on_exception=False,
    )


def set_rpc_status(span: Span, code: StatusCode) -> None:
    """Mark a server span with the gRPC status it ended with (an error for any but OK)."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(Status(SpanStatusCode.ERROR, code.name))


class InstrumentedServices(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The OpenTelemetry gRPC instrumentation's server spans, for every method but those whose
    full name starts with one of ``own_spans`` (services that make their own spans: the
    metering, lease and Envoy services, see :func:`server_span`).

    The instrumentation's own ``filter_`` costs more than the rest of a locally answered
    Check's interceptors together: it runs on every call, and matches the method name with an
    ``isinstance`` against ``grpc.HandlerCallDetails`` (a ``typing.Protocol`` in grpcio 1.85,
    whose check walks the protocol's attributes) and ``os.path`` calls. Here the calls of the
    services in ``own_spans`` pass on after one ``str.startswith``.
    """

    def __init__(self, tracer_provider: Any, own_spans: tuple[str, ...]) -> None:
        self._instrumentation = aio_server_interceptor(tracer_provider=tracer_provider)
        self._own_spans = own_spans

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        if handler_call_details.method.startswith(self._own_spans):
            return await continuation(handler_call_details)
        return await self._instrumentation.intercept_service(continuation, handler_call_details)
