"""The ``chargepath.v1.MeteringService`` servicer.

Bad input is answered at the level where it is found. A usage's fault (a field out of bounds,
an ``occurred_at`` outside the window) is that usage's: INVALID_ARGUMENT on Check, a
REASON_INVALID_USAGE verdict in its place on a stream, which goes on. A stream message's own
fault, one that cannot be answered usage by usage, ends the stream with INVALID_ARGUMENT:
bytes that do not decode (field ``request``: nothing in them can be trusted, not even how many
usages they held) and more than ``MAX_BATCH`` usages (field ``usages``: refused once, without
a verdict per usage). The stream contract is a response per message with its verdicts in the
order of its usages; a response of one error verdict for a message of N usages would break it
for every client that matches verdicts by position. Responses sent before such a message
stand, nothing of it is decided, and a client that reconnects resends what was unanswered.

Memory per stream is bounded by flow control. A stream reads its next message only once the
response to the previous one was taken by grpc.aio (the servicer's ``yield`` returns when the
write completes), and grpc's write completes only while the client's HTTP/2 window has room:
a client that writes and never reads fills its window, then the server's write waits, and the
stream is not read again until the client reads. So an open stream holds at most one message
of usages and its verdicts in this process, beyond what HTTP/2 buffers; the number of open
streams is capped per process and per credential (:class:`OpenStreams`), past which a new
stream gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn

import grpc

from chargepath.core.model import (
    Decision,
    FieldViolation,
    InvalidUsageError,
    Reason,
    Usage,
    Verdict,
)
from chargepath.core.validation import (
    MAX_BATCH,
    OccurredAtWindow,
    check_occurred_at,
    validate_usage,
)
from chargepath.engine import Engine, new_decision_id
from chargepath.transport.auth import caller_may_act_for, current_principal
from chargepath.transport.errors import abort, abort_invalid, bad_input
from chargepath.transport.mapping import usage_from_pb, verdict_fields
from chargepath.transport.services import Undecodable, refuse_undecodable
from chargepath.transport.tracing import caller_context, server_span, set_rpc_status
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc

log = logging.getLogger("chargepath.transport")

Context = Any  # grpc.aio.ServicerContext: grpcio ships no type information

CHECK_SPAN = "chargepath.v1.MeteringService/Check"
#: Metadata a client sends on every attempt of a Check after the first (any value): the call
#: is a retry of a request id that may have been decided already, so the over-limit cache
#: never answers it (the store's dedup record does). The Python client sends it; README says
#: how other clients do.
RETRY_METADATA = "chargepath-retry"


def is_retry(metadata: Sequence[tuple[str, Any]] | None) -> bool:
    """Whether the call's metadata carries :data:`RETRY_METADATA`."""
    if not metadata:
        return False
    return any(k == RETRY_METADATA for k, _ in metadata)


BATCH_SPAN = "chargepath.StreamUsage.batch"


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def occurred_at_violation(
    m: pb.Usage, now_ms: int, window: OccurredAtWindow
) -> FieldViolation | None:
    """Whether the wire usage's ``occurred_at`` (if it has one) is out of bounds."""
    if not m.HasField("occurred_at"):
        return None
    return check_occurred_at(m.occurred_at.seconds, m.occurred_at.nanos, now_ms, window)


def usage_violations(
    m: pb.Usage, usage: Usage, *, on_stream: bool, now_ms: int, window: OccurredAtWindow
) -> list[FieldViolation]:
    """Every violation of the input rules in the wire usage ``m`` (mapped as ``usage``): the
    core's rules, with ``occurred_at`` judged on the wire's seconds and nanos."""
    out = validate_usage(usage, on_stream=on_stream)
    late = occurred_at_violation(m, now_ms, window)
    if late is not None:
        out = [v for v in out if not v.field.startswith("occurred_at")] + [late]
    return out


class OpenStreams:
    """The StreamUsage streams open in this process, by credential. :meth:`open` admits a new
    stream within ``per_process`` and ``per_credential`` (the API key's id or the client
    certificate's identity; a gateway without authentication has only the process cap), or
    says why not. Used from the event loop's thread only."""

    def __init__(self, per_process: int, per_credential: int) -> None:
        self.per_process = per_process
        self.per_credential = per_credential
        self.total = 0
        self.by_credential: dict[str, int] = {}

    def open(self, credential: str | None) -> str | None:
        """Count a new stream and return None, or return why it is refused (counting
        nothing)."""
        if self.total >= self.per_process:
            return (
                f"this gateway process serves at most {self.per_process} streams at once: "
                "retry later or on another process"
            )
        if credential is not None:
            n = self.by_credential.get(credential, 0)
            if n >= self.per_credential:
                return (
                    f"this credential has {n} streams open on this gateway process, the most "
                    "it may: close one or send more usages per stream"
                )
            self.by_credential[credential] = n + 1
        self.total += 1
        return None

    def close(self, credential: str | None) -> None:
        self.total -= 1
        if credential is not None:
            n = self.by_credential[credential] - 1
            if n:
                self.by_credential[credential] = n
            else:
                del self.by_credential[credential]


class MeteringServicer(pb_grpc.MeteringServiceServicer):
    """Check and StreamUsage. A THROTTLE or DENY is data; gRPC errors are for real failures.

    ``draining`` is set on SIGTERM: open streams finish the batch in hand, then end with
    UNAVAILABLE so that clients reconnect (to another gateway) and resend what is unanswered.
    """

    def __init__(
        self,
        engine: Engine,
        draining: asyncio.Event,
        occurred_at: OccurredAtWindow | None = None,
        wall_ms: Callable[[], int] = wall_ms,
        streams: OpenStreams | None = None,
    ) -> None:
        self.engine = engine
        self.draining = draining
        self.occurred_at = occurred_at or OccurredAtWindow()
        self.wall_ms = wall_ms
        self.streams = streams or OpenStreams(4096, 1024)

    async def Check(self, request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        telemetry = self.engine.telemetry
        metadata = context.invocation_metadata()
        parent = caller_context(telemetry, metadata)
        with server_span(telemetry, CHECK_SPAN, "Check", parent) as span:
            tenant = request.usage.subject.tenant
            if not caller_may_act_for(tenant):
                set_rpc_status(span, grpc.StatusCode.PERMISSION_DENIED)
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"usage.subject.tenant: {_not_yours(tenant)}",
                )
            usage = usage_from_pb(request.usage)
            now_ms = self.wall_ms()
            if occurred_at_violation(request.usage, now_ms, self.occurred_at) is not None:
                set_rpc_status(span, grpc.StatusCode.INVALID_ARGUMENT)
                await abort_invalid(
                    context,
                    usage_violations(
                        request.usage,
                        usage,
                        on_stream=False,
                        now_ms=now_ms,
                        window=self.occurred_at,
                    ),
                )
            try:
                verdict = await self.engine.check(usage, retried=is_retry(metadata))
            except InvalidUsageError as exc:
                set_rpc_status(span, grpc.StatusCode.INVALID_ARGUMENT)
                await abort_invalid(context, exc.violations)
            except Exception:
                incident = uuid.uuid4().hex[:12]
                log.exception("Check failed (incident %s)", incident)
                set_rpc_status(span, grpc.StatusCode.INTERNAL)
                await abort(
                    context, grpc.StatusCode.INTERNAL, f"internal error, incident {incident}"
                )
            return pb.CheckResponse(verdict=verdict_fields(verdict, request.view))

    async def StreamUsage(
        self, request_iterator: AsyncIterator[pb.StreamUsageRequest], context: Context
    ) -> AsyncIterator[pb.StreamUsageResponse]:
        telemetry = self.engine.telemetry
        principal = current_principal()
        credential = principal.identity if principal is not None else None
        refusal = self.streams.open(credential)
        if refusal is not None:
            telemetry.stream_refused()
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        telemetry.open_streams.add(1)
        # the caller's W3C traceparent: every batch span of this stream is its child
        caller = caller_context(telemetry, context.invocation_metadata())
        drain = asyncio.ensure_future(self.draining.wait())
        try:
            while True:
                read = asyncio.ensure_future(context.read())
                done, _ = await asyncio.wait({read, drain}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    await abort(
                        context,
                        grpc.StatusCode.UNAVAILABLE,
                        "gateway is draining: reconnect and resend unanswered usages",
                    )
                request = read.result()
                if request is grpc.aio.EOF:
                    return
                if isinstance(request, Undecodable):
                    await refuse_undecodable(context, request)
                if len(request.usages) > MAX_BATCH:
                    await self._refuse_oversized(context, len(request.usages))
                try:
                    with server_span(
                        telemetry,
                        BATCH_SPAN,
                        "StreamUsage",
                        caller,
                        **{"chargepath.batch_size": len(request.usages)},
                    ) as span:
                        try:
                            verdicts = await self._decide(request)
                        except Exception:
                            set_rpc_status(span, grpc.StatusCode.INTERNAL)
                            raise
                except Exception:
                    incident = uuid.uuid4().hex[:12]
                    log.exception("StreamUsage batch failed (incident %s)", incident)
                    await abort(
                        context, grpc.StatusCode.INTERNAL, f"internal error, incident {incident}"
                    )
                response = pb.StreamUsageResponse(
                    verdicts=[verdict_fields(v, request.view) for v in verdicts]
                )
                # held no longer than needed: while the client does not read, this stream
                # holds only the response grpc is writing
                del request, verdicts
                # returns once grpc.aio's write completed: flow control (module docstring)
                yield response
                del response
        finally:
            drain.cancel()
            self.streams.close(credential)
            telemetry.open_streams.add(-1)

    async def _refuse_oversized(self, context: Context, count: int) -> NoReturn:
        bad_input.refused("oversized batch", f"{count} usages from {context.peer()}")
        await abort_invalid(
            context, [FieldViolation("usages", f"at most {MAX_BATCH} per message, got {count}")]
        )

    async def _decide(self, request: pb.StreamUsageRequest) -> list[Verdict]:
        ok_limits = request.view != pb.VERDICT_VIEW_BASIC
        usages = [usage_from_pb(u) for u in request.usages]
        # Answered here, in their places, without reaching the engine: a usage for a tenant the
        # caller may not act for (nothing is counted, no session sequence moves), and one whose
        # occurred_at is out of bounds (the engine knows no wall clock). The rest are decided as
        # one batch.
        answered = self._foreign(request.usages)
        now_ms = self.wall_ms()
        window = self.occurred_at
        for i, (m, u) in enumerate(zip(request.usages, usages, strict=True)):
            if i in answered or occurred_at_violation(m, now_ms, window) is None:
                continue
            bad = usage_violations(m, u, on_stream=True, now_ms=now_ms, window=window)
            self.engine.telemetry.count_invalid()
            answered[i] = Verdict(
                request_id=u.request_id[:128],
                decision=Decision.DENY,
                reason=Reason.INVALID_USAGE,
                decision_id=new_decision_id(),
                policy_version=self.engine.policy.version,
                message="; ".join(str(v) for v in bad),
                violations=tuple(bad),
            )
        if not answered:
            return await self.engine.decide_batch(usages, ok_limits=ok_limits)
        rest = [u for i, u in enumerate(usages) if i not in answered]
        decided = iter(await self.engine.decide_batch(rest, ok_limits=ok_limits) if rest else ())
        return [answered[i] if i in answered else next(decided) for i in range(len(usages))]

    def _foreign(self, usages: Sequence[pb.Usage]) -> dict[int, Verdict]:
        """A DENY PERMISSION_DENIED verdict for each usage (by index) whose tenant the caller
        may not act for."""
        principal = current_principal()
        if principal is None or principal.tenant is None:  # no authentication, or an operator
            return {}
        return {
            i: Verdict(
                request_id=u.request_id[:128],
                decision=Decision.DENY,
                reason=Reason.PERMISSION_DENIED,
                decision_id=new_decision_id(),
                policy_version=self.engine.policy.version,
                message=f"subject.tenant: {_not_yours(u.subject.tenant)}; nothing was counted",
            )
            for i, u in enumerate(usages)
            if not caller_may_act_for(u.subject.tenant)
        }


def _not_yours(tenant: str) -> str:
    return f"this credential may not act for tenant {tenant[:64]!r}"
