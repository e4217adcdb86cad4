"""The ``chargepath.v1.LeaseService`` servicer: quota leases (lease.proto).

The same rules as MeteringService: a caller acts only for its own tenant (a tenant-scoped
credential; an operator for any); a refusal by the limits is data (THROTTLE or DENY in the
answer), never a gRPC error. Bad input is answered where it is found: on ``Lease``,
INVALID_ARGUMENT naming each bad field; on ``LeaseStream``, a DENY REASON_INVALID_USAGE answer
with the violations in the ask's place, and the stream goes on. A stream message's own fault
(bytes that do not decode, more than ``MAX_BATCH`` asks) ends the stream with
INVALID_ARGUMENT, as on StreamUsage. A stream reads its next message only once the answers to
the previous one were written (flow control, see :mod:`chargepath.transport.metering`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from chargepath.core.leases import LeaseAnswer, LeaseAsk
from chargepath.core.model import Decision, FieldViolation, Reason
from chargepath.core.validation import MAX_BATCH
from chargepath.leasing import Leasing
from chargepath.transport.auth import caller_may_act_for, current_principal
from chargepath.transport.errors import abort, abort_invalid, bad_input
from chargepath.transport.mapping import lease_answer_fields, lease_ask_from_pb
from chargepath.transport.metering import OpenStreams
from chargepath.transport.services import Undecodable, refuse_undecodable
from chargepath.transport.tracing import caller_context, server_span, set_rpc_status
from chargepath_protos.v1 import lease_pb2 as lpb
from chargepath_protos.v1 import lease_pb2_grpc as lpb_grpc

log = logging.getLogger("chargepath.transport")

Context = Any  # grpc.aio.ServicerContext

LEASE_SPAN = "chargepath.v1.LeaseService/Lease"
STREAM_SPAN = "chargepath.LeaseStream.batch"


def _holder() -> str:
    """The holder of a lease whose ask names none: the caller's identity."""
    principal = current_principal()
    return principal.identity if principal is not None else "anonymous"


def _not_yours(tenant: str) -> str:
    return f"this credential may not act for tenant {tenant[:64]!r}"


class LeaseServicer(lpb_grpc.LeaseServiceServicer):
    """Lease and LeaseStream."""

    def __init__(
        self, leasing: Leasing, draining: asyncio.Event, streams: OpenStreams | None = None
    ) -> None:
        self.leasing = leasing
        self.draining = draining
        self.streams = streams or OpenStreams(4096, 1024)

    async def Lease(self, request: lpb.LeaseRequest, context: Context) -> lpb.LeaseResponse:
        telemetry = self.leasing.engine.telemetry
        parent = caller_context(telemetry, context.invocation_metadata())
        with server_span(telemetry, LEASE_SPAN, "Lease", parent) as span:
            tenant = request.ask.subject.tenant
            if not caller_may_act_for(tenant):
                set_rpc_status(span, grpc.StatusCode.PERMISSION_DENIED)
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"ask.subject.tenant: {_not_yours(tenant)}",
                )
            ask = lease_ask_from_pb(request.ask)
            # validated by the leasing, which first checks the live policy for a metric this
            # process does not know yet
            (answer,) = await self._answer([ask], context, span)
            if answer.reason is Reason.INVALID_USAGE and answer.violations:
                set_rpc_status(span, grpc.StatusCode.INVALID_ARGUMENT)
                await abort_invalid(context, [_on_ask(v) for v in answer.violations])
            return lpb.LeaseResponse(answer=lease_answer_fields(answer))

    async def _answer(self, asks: list[LeaseAsk], context: Context, span: Any) -> list[LeaseAnswer]:
        try:
            return await self.leasing.lease(asks, [_holder()] * len(asks))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("Lease failed (incident %s)", incident)
            set_rpc_status(span, grpc.StatusCode.INTERNAL)
            await abort(context, grpc.StatusCode.INTERNAL, f"internal error, incident {incident}")

    async def LeaseStream(
        self, request_iterator: AsyncIterator[lpb.LeaseStreamRequest], context: Context
    ) -> AsyncIterator[lpb.LeaseStreamResponse]:
        telemetry = self.leasing.engine.telemetry
        principal = current_principal()
        credential = principal.identity if principal is not None else None
        refusal = self.streams.open(credential)
        if refusal is not None:
            telemetry.stream_refused()
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
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
                        "gateway is draining: reconnect and resend unanswered asks",
                    )
                request = read.result()
                if request is grpc.aio.EOF:
                    return
                if isinstance(request, Undecodable):
                    await refuse_undecodable(context, request)
                if len(request.asks) > MAX_BATCH:
                    bad_input.refused("oversized batch", f"{len(request.asks)} lease asks")
                    await abort_invalid(
                        context,
                        [
                            FieldViolation(
                                "asks", f"at most {MAX_BATCH} per message, got {len(request.asks)}"
                            )
                        ],
                    )
                with server_span(
                    telemetry,
                    STREAM_SPAN,
                    "LeaseStream",
                    caller,
                    **{"chargepath.batch_size": len(request.asks)},
                ) as span:
                    answers = await self._stream_batch(request, context, span)
                response = lpb.LeaseStreamResponse(
                    answers=[lease_answer_fields(a) for a in answers]
                )
                del request, answers
                yield response
                del response
        finally:
            drain.cancel()
            self.streams.close(credential)

    async def _stream_batch(
        self, request: lpb.LeaseStreamRequest, context: Context, span: Any
    ) -> list[LeaseAnswer]:
        asks = [lease_ask_from_pb(m) for m in request.asks]
        policy_version = self.leasing.engine.policy.version
        foreign = {
            i: LeaseAnswer(
                request_id=a.request_id[:128],
                decision=Decision.DENY,
                reason=Reason.PERMISSION_DENIED,
                lease_id=a.lease_id[:64],
                policy_version=policy_version,
                message=f"subject.tenant: {_not_yours(a.subject.tenant)}; nothing was done",
            )
            for i, a in enumerate(asks)
            if not caller_may_act_for(a.subject.tenant)
        }
        rest = [a for i, a in enumerate(asks) if i not in foreign]
        decided = iter(await self._answer(rest, context, span) if rest else ())
        return [foreign[i] if i in foreign else next(decided) for i in range(len(asks))]


def _on_ask(v: FieldViolation) -> FieldViolation:
    """A violation of a unary Lease names its field under ``ask``."""
    return FieldViolation(f"ask.{v.field}", v.reason)
