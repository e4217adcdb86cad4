"""The gRPC side of tracing: the caller's trace context from gRPC metadata, the server span
of a ``Check`` call or a ``StreamUsage`` batch, and the gRPC status it ended with.

:mod:`chargepath.telemetry` keeps what the engine needs (decision and store spans, counters)
and imports no grpc; this module adds what only a gRPC servicer needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from grpc import StatusCode
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
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
