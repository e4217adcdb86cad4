"""The ``chargepath.v1.MeteringService`` servicer."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from chargepath.core.model import Decision, FieldViolation, InvalidUsageError, Reason, Verdict
from chargepath.core.validation import MAX_BATCH
from chargepath.engine import Engine, new_decision_id
from chargepath.transport.auth import caller_may_act_for, current_principal
from chargepath.transport.errors import abort, abort_invalid
from chargepath.transport.mapping import usage_from_pb, verdict_fields
from chargepath.transport.tracing import caller_context, server_span, set_rpc_status
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc

log = logging.getLogger("chargepath.transport")

Context = Any  # grpc.aio.ServicerContext: grpcio ships no type information

CHECK_SPAN = "chargepath.v1.MeteringService/Check"
BATCH_SPAN = "chargepath.StreamUsage.batch"


class MeteringServicer(pb_grpc.MeteringServiceServicer):
    """Check and StreamUsage. A THROTTLE or DENY is data; gRPC errors are for real failures.

    ``draining`` is set on SIGTERM: open streams finish the batch in hand, then end with
    UNAVAILABLE so that clients reconnect (to another gateway) and resend what is unanswered.
    """

    def __init__(self, engine: Engine, draining: asyncio.Event) -> None:
        self.engine = engine
        self.draining = draining

    async def Check(self, request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        telemetry = self.engine.telemetry
        parent = caller_context(telemetry, context.invocation_metadata())
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
            try:
                verdict = await self.engine.check(usage)
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
                assert isinstance(request, pb.StreamUsageRequest)
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
                view = request.view
                yield pb.StreamUsageResponse(verdicts=[verdict_fields(v, view) for v in verdicts])
        finally:
            drain.cancel()
            telemetry.open_streams.add(-1)

    async def _decide(self, request: pb.StreamUsageRequest) -> list[Verdict]:
        if len(request.usages) > MAX_BATCH:
            too_many = (
                FieldViolation(
                    "usages", f"at most {MAX_BATCH} per message, got {len(request.usages)}"
                ),
            )
            return [
                Verdict(
                    request_id=u.request_id[:128],
                    decision=Decision.DENY,
                    reason=Reason.INVALID_USAGE,
                    decision_id=new_decision_id(),
                    policy_version=self.engine.policy.version,
                    message=str(too_many[0]),
                    violations=too_many,
                )
                for u in request.usages
            ]
        ok_limits = request.view != pb.VERDICT_VIEW_BASIC
        refused = self._foreign(request.usages)
        if not refused:
            return await self.engine.decide_batch(
                [usage_from_pb(u) for u in request.usages], ok_limits=ok_limits
            )
        # Usages for a tenant the caller may not act for never reach the engine (nothing is
        # counted, no session sequence moves); the others are decided as one batch.
        mine = [i for i in range(len(request.usages)) if i not in refused]
        decided = iter(
            await self.engine.decide_batch(
                [usage_from_pb(request.usages[i]) for i in mine], ok_limits=ok_limits
            )
            if mine
            else ()
        )
        return [refused[i] if i in refused else next(decided) for i in range(len(request.usages))]

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
