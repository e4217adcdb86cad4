"""The one place that builds `chargepath.v1` messages and knows the method paths."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from chargepath_client._validation import validate_occurred_at, validate_usage
from chargepath_client._verdict import MODES, Mode
from chargepath_protos.v1 import lease_pb2
from chargepath_protos.v1 import metering_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["MeteringService"].full_name
CHECK_METHOD = f"/{_SERVICE}/Check"
STREAM_USAGE_METHOD = f"/{_SERVICE}/StreamUsage"
LEASE_METHOD = f"/{lease_pb2.DESCRIPTOR.services_by_name['LeaseService'].full_name}/Lease"

# Metadata as grpc wants it: a tuple of (lower-case key, value) pairs.
Metadata = tuple[tuple[str, str | bytes], ...]


# The few grpc call shapes the client uses, typed here so that strict checking covers the
# client's code whether or not grpc itself carries type information.
class CheckCall(Protocol):
    """`Check` on a grpc.aio channel."""

    def __call__(
        self, request: pb.CheckRequest, *, timeout: float, metadata: Metadata
    ) -> Awaitable[pb.CheckResponse]: ...


class BlockingCheckCall(Protocol):
    """`Check` on a synchronous grpc channel."""

    def __call__(
        self, request: pb.CheckRequest, *, timeout: float, metadata: Metadata
    ) -> pb.CheckResponse: ...


class LeaseCall(Protocol):
    """`LeaseService.Lease` on a grpc.aio channel."""

    def __call__(
        self, request: lease_pb2.LeaseRequest, *, timeout: float, metadata: Metadata
    ) -> Awaitable[lease_pb2.LeaseResponse]: ...


class BlockingLeaseCall(Protocol):
    """`LeaseService.Lease` on a synchronous grpc channel."""

    def __call__(
        self, request: lease_pb2.LeaseRequest, *, timeout: float, metadata: Metadata
    ) -> lease_pb2.LeaseResponse: ...


class UsageStreamCall(Protocol):
    """One `StreamUsage` call in progress (a grpc.aio.StreamStreamCall)."""

    async def write(self, request: pb.StreamUsageRequest) -> None: ...

    async def read(self) -> pb.StreamUsageResponse | object:
        """The next response, or grpc.aio.EOF."""

    async def done_writing(self) -> None: ...

    def cancel(self) -> bool: ...


class StartUsageStream(Protocol):
    """`StreamUsage` on a grpc.aio channel: starts a call."""

    def __call__(self, *, metadata: Metadata) -> UsageStreamCall: ...


# Channel options: after a dropped connection our own policy retries within the call's
# deadline, so grpc's reconnect backoff (1 s at first by default, during which every call
# fails at once) is shortened. Not "grpc.min_reconnect_backoff_ms": despite its name it is
# also the connect timeout, and must stay generous for slow (TLS, WAN) handshakes.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def new_id() -> str:
    """A fresh request or session id: a random UUID (32 hex digits and dashes)."""
    return str(uuid.uuid4())


def metadata(*parts: Sequence[tuple[str, str | bytes]] | None) -> Metadata:
    """Join metadata sequences, lower-casing keys as HTTP/2 requires."""
    joined: list[tuple[str, str | bytes]] = []
    for part in parts:
        if part:
            joined.extend((key.lower(), value) for key, value in part)
    return tuple(joined)


def usage(
    mode: Mode,
    tenant: str,
    metric: str,
    amount: int,
    slice: str,
    key: str,
    labels: Mapping[str, str] | None,
    request_id: str | None,
    occurred_at: datetime | None,
    *,
    validate: bool,
    session_id: str = "",
) -> pb.Usage:
    """Validate (unless told not to) and build one usage; a request id is generated if none
    is given. Every retry (or resend on a stream) sends this same message; a stream sets
    `sequence` once the usage is accepted."""
    if validate:
        validate_usage(
            tenant=tenant,
            metric=metric,
            amount=amount,
            slice=slice,
            key=key,
            labels=labels,
            request_id=request_id,
        )
        validate_occurred_at(occurred_at)
    message = pb.Usage(
        request_id=request_id if request_id is not None else new_id(),
        subject=pb.Subject(tenant=tenant, slice=slice, key=key),
        metric=metric,
        amount=amount,
        mode=MODES[mode],
        labels=dict(labels) if labels else None,
        session_id=session_id,
    )
    if occurred_at is not None:
        message.occurred_at.FromDatetime(occurred_at)
    return message


def lease_ask(
    *,
    tenant: str,
    slice: str,
    key: str,
    metric: str,
    lease_id: str,
    requested: int,
    used: int,
    release: bool,
    labels: Mapping[str, str] | None,
    holder: str,
) -> lease_pb2.LeaseAsk:
    """One lease ask with a fresh request id (every retry of it sends this same message).
    The arguments were validated when the lease was made."""
    return lease_pb2.LeaseAsk(
        request_id=new_id(),
        subject=pb.Subject(tenant=tenant, slice=slice, key=key),
        metric=metric,
        lease_id=lease_id,
        requested=requested,
        used=used,
        release=release,
        labels=labels,
        holder=holder,
    )
