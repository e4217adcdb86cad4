"""Exceptions raised by the client, and the mapping from gRPC statuses to them.

A THROTTLE or a DENY is never an exception: it is a `Verdict`. Exceptions are for real
failures: a bad argument (`InvalidUsage`, raised before sending or mapped from the server's
INVALID_ARGUMENT), the gateway being unreachable (`Unavailable`), the deadline running out
(`DeadlineExceeded`), and so on. Every exception is a `ChargepathError` and carries the gRPC
status code it stands for (`None` when the error was detected client-side without a call).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

import grpc

# googleapis-common-protos ships .pyi files but no py.typed marker.
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from chargepath_protos.v1 import metering_pb2 as pb


class ChargepathError(Exception):
    """Base class of every error the client raises.

    `code` is the gRPC status code (None for errors found client-side), `details` the
    status message, and `request_id` the id of the usage concerned, when there is one.
    """

    default_code: grpc.StatusCode | None = None

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(details)
        self.details = details
        self.code = code if code is not None else self.default_code
        self.request_id = request_id


class InvalidUsage(ChargepathError, ValueError):
    """A usage argument is invalid: `field` names it, `reason` says why.

    Raised before anything is sent when client-side validation finds the problem, and for the
    server's INVALID_ARGUMENT (field taken from the google.rpc.BadRequest detail) or a stream
    verdict with REASON_INVALID_USAGE. Field names are the argument names of `check`/`report`
    (`tenant`, `slice`, `key`, `metric`, `amount`, `labels`, `request_id`, `session_id`).
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        field: str,
        reason: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
        violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{field}: {reason}", code=code, request_id=request_id)
        self.field = field
        self.reason = reason
        #: Every (field, reason) the server reported; the first is `field`/`reason`.
        self.violations = violations or ((field, reason),)

    def __reduce__(self) -> tuple[type[InvalidUsage], tuple[str, str]]:
        return (type(self), (self.field, self.reason))


class Unavailable(ChargepathError):
    """The gateway could not be reached, or is draining (UNAVAILABLE), after every retry."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ChargepathError, TimeoutError):
    """No answer came within the call's overall deadline (DEADLINE_EXCEEDED)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ChargepathError):
    """The gateway refused the call for lack of resources (RESOURCE_EXHAUSTED).

    Not a throttle: a rate limit comes back as a Verdict with decision THROTTLE.
    """

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ChargepathError):
    """The call carried no valid credentials (UNAUTHENTICATED)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ChargepathError):
    """The credentials may not act for this tenant (PERMISSION_DENIED)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class StreamFull(ChargepathError):
    """`UsageStream.submit_nowait` found `max_in_flight` usages already unanswered.

    `await stream.submit(...)` waits for room instead.
    """


class StreamClosed(ChargepathError):
    """The usage stream is closed, aborted or broken; it accepts no more usages."""


_BY_CODE: dict[grpc.StatusCode, type[ChargepathError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}

# Server field paths look like "usage.subject.tenant", "usages[3].amount",
# 'usage.labels["country"]' or "labels.region"; users know the argument names ("tenant",
# "amount", "labels").
_FIELD_PREFIX = re.compile(r"^(?:usages?(?:\[\d+\])?\.)?(?:subject\.)?")


def public_field(path: str) -> str:
    """Map a server field path to the client argument name it concerns."""
    field = _FIELD_PREFIX.sub("", path.strip())
    if field.startswith("labels"):
        return "labels"
    return field or path


def invalid_usage(
    violations: Iterable[tuple[str, str]], details: str, *, request_id: str | None = None
) -> InvalidUsage:
    """The InvalidUsage of the server's structured (field path, description) violations.

    `details` is the server's text for people; it is never parsed. With no violation (a
    gateway too old to send them) the error names the whole `usage` and quotes the text.
    """
    public = tuple((public_field(path), reason or details) for path, reason in violations)
    if not public:
        return InvalidUsage("usage", details or "invalid", request_id=request_id)
    field, reason = public[0]
    return InvalidUsage(field, reason, request_id=request_id, violations=public)


def invalid_usage_from_verdict(verdict: pb.Verdict) -> InvalidUsage:
    """The InvalidUsage of a REASON_INVALID_USAGE verdict (a stream's), from `violations`."""
    return invalid_usage(
        ((v.field, v.description) for v in verdict.violations),
        verdict.message,
        request_id=verdict.request_id,
    )


def _bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    try:
        # from_call only reads code(), details() and trailing_metadata(), which both the
        # sync call error and grpc.aio.AioRpcError provide.
        status = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:  # the rich status disagrees with the plain one: ignore it
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return bad_request
    return None


def from_rpc_error(error: grpc.RpcError, *, request_id: str | None = None) -> ChargepathError:
    """Turn a failed call (sync or grpc.aio) into the matching ChargepathError."""
    code = error.code()
    details = error.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad_request = _bad_request(error)
        violations = [] if bad_request is None else bad_request.field_violations
        return invalid_usage(
            ((v.field, v.description) for v in violations), details, request_id=request_id
        )
    cls = _BY_CODE.get(code, ChargepathError)
    return cls(f"{code.name}: {details}", code=code, request_id=request_id)
