"""Envoy's rate limit service (RLS v3, ``envoy.service.ratelimit.v3.RateLimitService``) and
quota service (RLQS v3, ``envoy.service.rate_limit_quota.v3.RateLimitQuotaService``), served on
the gateway's port beside ``chargepath.v1``, with the stubs of the ``xds-protos`` package.

Both map Envoy's descriptors (or bucket ids) onto usages through the policy's ``envoy`` section
(:meth:`chargepath.core.policy.Policy.route_descriptor`) and decide them with
:meth:`chargepath.engine.Engine.check`, the path of a ``Check``: the same decision and store
spans, metrics, ledger entries, exactness, failure policy and dedup records.

Contracts that follow from Envoy's side:

* Envoy sends no request id, so every descriptor is a new admit under a request id made here:
  an RLS call that Envoy retries counts again (as with envoyproxy/ratelimit).
* Each descriptor is its own admit, all or nothing over the limits it touches; the
  descriptors of one request are not all or nothing together (envoyproxy/ratelimit also counts
  each descriptor on its own). One descriptor naming tenant, key and metric touches every limit
  of the plan at once.
* A THROTTLE or DENY is ``OVER_LIMIT``; so is a descriptor whose values are not a valid
  subject, or names a tenant the caller may not act for, or a fail-closed tenant's degraded
  DENY while the store is down. Never a gRPC error: Envoy's ``failure_mode_deny`` applies to
  errors, and with its default (false) an error lets the request through, whatever the tenant's
  own failure policy says. gRPC errors are left for real failures (INTERNAL).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2

from chargepath.core.auth import may_act_for
from chargepath.core.model import (
    Decision,
    FieldViolation,
    InvalidUsageError,
    LimitKind,
    LimitState,
    Mode,
    Reason,
    Usage,
    Verdict,
)
from chargepath.core.plans import RATE_PERIOD_MS
from chargepath.core.policy import DescriptorRoute, Limit
from chargepath.engine import Engine
from chargepath.transport import services
from chargepath.transport.auth import current_principal
from chargepath.transport.errors import abort, abort_invalid
from chargepath.transport.services import Undecodable, refuse_undecodable
from chargepath.transport.tracing import caller_context, server_span, set_rpc_status

RLS_DESCRIPTOR = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"]
RLQS_DESCRIPTOR = rlqs_pb2.DESCRIPTOR.services_by_name["RateLimitQuotaService"]

log = logging.getLogger("chargepath.transport")

Context = Any  # grpc.aio.ServicerContext: grpcio ships no type information

RLS_SERVICE: str = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
RLQS_SERVICE: str = rlqs_pb2.DESCRIPTOR.services_by_name["RateLimitQuotaService"].full_name
RLS_SPAN = f"{RLS_SERVICE}/ShouldRateLimit"
RLQS_SPAN = "chargepath.StreamRateLimitQuotas.report"

OK: int = rls_pb2.RateLimitResponse.OK
OVER_LIMIT: int = rls_pb2.RateLimitResponse.OVER_LIMIT
_UNITS = {
    "second": rls_pb2.RateLimitResponse.RateLimit.SECOND,
    "minute": rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    "hour": rls_pb2.RateLimitResponse.RateLimit.HOUR,
    "day": rls_pb2.RateLimitResponse.RateLimit.DAY,
    "week": rls_pb2.RateLimitResponse.RateLimit.WEEK,
    "month": rls_pb2.RateLimitResponse.RateLimit.MONTH,
}
#: The window of a quota in the ``RateLimit-Policy`` header; a month has none (its length
#: varies: ``t`` in ``RateLimit`` says when it resets).
_QUOTA_WINDOW_S = {"hour": 3600, "day": 86400, "week": 604800}
_UINT32_MAX = 2**32 - 1
#: Descriptors in one RLS request: Envoy sends one per rate_limits entry that applies, a few.
MAX_DESCRIPTORS = 64
#: What a fail-closed tenant's OVER_LIMIT during a store outage suggests: the breaker's cooldown.
STORE_DOWN_RETRY_S = 1


def new_request_id(prefix: str) -> str:
    """A request id for a usage Envoy did not name: unique, so every call is a new admit."""
    return f"{prefix}-{uuid.uuid4().hex}"


class DescriptorOutcome(NamedTuple):
    """One descriptor's answer: its code, and the verdict with the specs of the limits it
    touched (None when nothing was decided: an unknown or refused descriptor)."""

    code: int
    verdict: Verdict | None = None
    specs: Mapping[str, Limit] = MappingProxyType({})


def code_of(verdict: Verdict, shadow: bool) -> int:
    """OK for an ALLOW (a soft limit crossed included) and for anything in shadow mode;
    OVER_LIMIT for a THROTTLE or a DENY, a fail-closed degraded DENY included."""
    if verdict.decision is Decision.ALLOW or shadow:
        return OK
    return OVER_LIMIT


def binding_limit(limits: Sequence[LimitState]) -> LimitState | None:
    """The limit a descriptor status reports: the first one exceeded, else the one with the
    fewest units left."""
    exceeded = [lim for lim in limits if lim.exceeded]
    if exceeded:
        return exceeded[0]
    return min(limits, key=lambda lim: lim.remaining, default=None)


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def window_s(spec: Limit) -> int | None:
    """The ``w`` of a limit in ``RateLimit-Policy``: for a token bucket the time to refill it
    from empty, for an hourly, daily or weekly quota its period; None for a monthly quota."""
    if spec.kind is LimitKind.RATE:
        return max(1, math.ceil(spec.capacity * RATE_PERIOD_MS[spec.per] / spec.refill / 1000))
    return _QUOTA_WINDOW_S.get(spec.per)


def descriptor_status(outcome: DescriptorOutcome) -> dict[str, object]:
    """A ``RateLimitResponse.DescriptorStatus`` as constructor arguments: the code, and for a
    decided descriptor its binding limit (a rate limit as its refill per unit of time, a quota
    as its amount per period), the units left and the time until it resets (a bucket: until
    full). Counts above 2**32-1 are clamped (the fields are uint32)."""
    out: dict[str, object] = {"code": outcome.code}
    v = outcome.verdict
    lim = binding_limit(v.limits) if v is not None else None
    if lim is None:
        return out
    spec = outcome.specs.get(lim.name)
    if spec is not None:
        per_unit = spec.refill if spec.kind is LimitKind.RATE else lim.capacity
        out["current_limit"] = {
            "name": lim.name,
            "requests_per_unit": min(per_unit, _UINT32_MAX),
            "unit": _UNITS.get(spec.per, rls_pb2.RateLimitResponse.RateLimit.UNKNOWN),
        }
    out["limit_remaining"] = min(max(lim.remaining, 0), _UINT32_MAX)
    ms = max(lim.reset_after_ms, 0)
    out["duration_until_reset"] = {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000}
    return out


def response_headers(outcomes: Iterable[DescriptorOutcome]) -> list[tuple[str, str]]:
    """The headers Envoy adds to the response: ``RateLimit-Policy`` and ``RateLimit`` (IETF
    httpapi ratelimit-headers draft: one item per limit touched, ``q`` its capacity, ``w`` its
    window in seconds, ``r`` the units left, ``t`` the seconds until it resets), and
    ``retry-after`` (seconds) when the answer is OVER_LIMIT. A limit touched by several
    descriptors (say, a tenant-wide one) is listed once, with the fewest units left."""
    limits: dict[str, tuple[LimitState, Limit | None]] = {}
    retry_ms = 0
    over = False
    for o in outcomes:
        if o.code == OVER_LIMIT:
            over = True
        v = o.verdict
        if v is None:
            continue
        if o.code == OVER_LIMIT:
            retry_ms = max(retry_ms, v.retry_after_ms)
            if v.reason is Reason.STORE_UNAVAILABLE:
                retry_ms = max(retry_ms, STORE_DOWN_RETRY_S * 1000)
        for lim in v.limits:
            seen = limits.get(lim.name)
            if seen is None or lim.remaining < seen[0].remaining:
                limits[lim.name] = (lim, o.specs.get(lim.name))
    headers: list[tuple[str, str]] = []
    if limits:
        policy_items, state_items = [], []
        for name, (lim, spec) in limits.items():
            w = window_s(spec) if spec is not None else None
            policy_items.append(f'"{name}";q={lim.capacity}' + (f";w={w}" if w else ""))
            state_items.append(
                f'"{name}";r={max(lim.remaining, 0)};t={_seconds(lim.reset_after_ms)}'
            )
        headers.append(("RateLimit-Policy", ", ".join(policy_items)))
        headers.append(("RateLimit", ", ".join(state_items)))
    if over and retry_ms > 0:
        headers.append(("retry-after", str(max(1, _seconds(retry_ms)))))
    return headers


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """``ShouldRateLimit``: each descriptor of the request is one admit of ``hits_addend``
    units (default 1) of the metric its mapping names; the answer is OVER_LIMIT when any
    descriptor is."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Context
    ) -> rls_pb2.RateLimitResponse:
        telemetry = self.engine.telemetry
        parent = caller_context(telemetry, context.invocation_metadata())
        with server_span(
            telemetry,
            RLS_SPAN,
            "ShouldRateLimit",
            parent,
            **{"rpc.service": RLS_SERVICE, "chargepath.envoy.domain": request.domain},
        ) as span:
            if len(request.descriptors) > MAX_DESCRIPTORS:
                set_rpc_status(span, grpc.StatusCode.INVALID_ARGUMENT)
                await abort_invalid(
                    context,
                    [
                        FieldViolation(
                            "descriptors",
                            f"at most {MAX_DESCRIPTORS} per request, "
                            f"got {len(request.descriptors)}",
                        )
                    ],
                )
            policy = self.engine.policy
            default_amount = max(1, request.hits_addend)
            jobs = []
            for d in request.descriptors:
                route = policy.route_descriptor(
                    request.domain, [(e.key, e.value) for e in d.entries]
                )
                amount = d.hits_addend.value if d.HasField("hits_addend") else default_amount
                jobs.append(self._decide(route, max(1, amount)))
            try:
                outcomes = await asyncio.gather(*jobs)
            except Exception:
                incident = uuid.uuid4().hex[:12]
                log.exception("ShouldRateLimit failed (incident %s)", incident)
                set_rpc_status(span, grpc.StatusCode.INTERNAL)
                await abort(
                    context, grpc.StatusCode.INTERNAL, f"internal error, incident {incident}"
                )
            over = any(o.code == OVER_LIMIT for o in outcomes)
            return rls_pb2.RateLimitResponse(
                overall_code=OVER_LIMIT if over else OK,
                statuses=[descriptor_status(o) for o in outcomes],
                response_headers_to_add=[
                    {"key": k, "value": v} for k, v in response_headers(outcomes)
                ],
            )

    async def _decide(self, route: DescriptorRoute, amount: int) -> DescriptorOutcome:
        if not route.matched:
            return DescriptorOutcome(OVER_LIMIT if route.strict else OK)
        principal = current_principal()
        if principal is not None and not may_act_for(principal, route.subject.tenant):
            return DescriptorOutcome(OVER_LIMIT)
        usage = Usage(new_request_id("rls"), route.subject, route.metric, amount, Mode.ADMIT)
        try:
            verdict = await self.engine.check(usage)
        except InvalidUsageError:
            # a value that is no valid tenant or key: refused, counted nowhere
            return DescriptorOutcome(OVER_LIMIT)
        specs = {
            lim.name: lim for lim in self.engine.policy.resolve(usage.subject, usage.metric).limits
        }
        return DescriptorOutcome(code_of(verdict, route.shadow), verdict, specs)


# -- RLQS ---------------------------------------------------------------------------------

#: Bounds of an assignment's refill interval: Envoy's reporting interval, as the time between
#: two reports of a bucket shows it.
MIN_INTERVAL_MS = 1_000
MAX_INTERVAL_MS = 60_000


@dataclass
class BucketAccount:
    """What one stream has admitted for one bucket and Envoy has not yet reported as used."""

    prepaid: int = 0


class QuotaAnswer(NamedTuple):
    """A bucket's assignment: ``tokens`` > 0 is a token bucket of that many units refilled
    every ``interval_ms``; 0 is DENY_ALL, None ALLOW_ALL. It expires after ``ttl_ms``."""

    tokens: int | None
    interval_ms: int
    ttl_ms: int


def interval_of(time_elapsed_ms: int) -> int:
    return min(max(time_elapsed_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS)


def bucket_action(bucket: dict[str, str], answer: QuotaAnswer) -> dict[str, object]:
    """A ``RateLimitQuotaResponse.BucketAction`` as constructor arguments."""
    strategy: dict[str, object]
    if answer.tokens is None:
        strategy = {"blanket_rule": ratelimit_strategy_pb2.RateLimitStrategy.ALLOW_ALL}
    elif answer.tokens == 0:
        strategy = {"blanket_rule": ratelimit_strategy_pb2.RateLimitStrategy.DENY_ALL}
    else:
        ms = answer.interval_ms
        strategy = {
            "token_bucket": {
                "max_tokens": min(answer.tokens, _UINT32_MAX),
                "tokens_per_fill": {"value": min(answer.tokens, _UINT32_MAX)},
                "fill_interval": {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000},
            }
        }
    ttl = answer.ttl_ms
    return {
        "bucket_id": {"bucket": bucket},
        "quota_assignment_action": {
            "assignment_time_to_live": {"seconds": ttl // 1000, "nanos": (ttl % 1000) * 1_000_000},
            "rate_limit_strategy": strategy,
        },
    }


class QuotaServicer(rlqs_pb2_grpc.RateLimitQuotaServiceServicer):  # type: ignore[misc]
    """``StreamRateLimitQuotas``: usage reports in, a bucket action per reported bucket out.

    There are no leases yet, so an assignment is an admit. Per report of a bucket:

    1. The requests Envoy allowed are first set against the units this stream admitted for
       the bucket earlier (``prepaid``); any beyond them (allowed before the first assignment,
       or after one expired, by Envoy's own no-assignment behaviour) are recorded as a report,
       debited even past a limit, like any usage that already happened.
    2. The bucket's demand over the last interval (allowed + denied requests, at least 1) is
       topped up by an admit of what ``prepaid`` lacks. If it does not fit, the units the
       binding limit still has are admitted instead (one more admit), if any.
    3. The answer is a token bucket of the prepaid units, refilled by as many every reporting
       interval, expiring after two intervals (one lost report does not expire it); with
       nothing prepaid, DENY_ALL until the verdict's ``retry_after`` (at least a second).

    Admitted units are in the ledger when admitted: units granted and never used by Envoy are
    billed (a lease would give them back). So the grant is at most one interval's demand. An
    unmapped bucket gets ALLOW_ALL (DENY_ALL if its domain is strict); shadow mode records what
    Envoy reports and answers ALLOW_ALL. While the store is down a fail-closed tenant gets
    DENY_ALL, a fail-open tenant its local allowance, unrecorded.
    """

    def __init__(self, engine: Engine, draining: asyncio.Event) -> None:
        self.engine = engine
        self.draining = draining

    async def StreamRateLimitQuotas(
        self,
        request_iterator: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports],
        context: Context,
    ) -> AsyncIterator[rlqs_pb2.RateLimitQuotaResponse]:
        telemetry = self.engine.telemetry
        telemetry.open_streams.add(1)
        caller = caller_context(telemetry, context.invocation_metadata())
        drain = asyncio.ensure_future(self.draining.wait())
        domain = ""
        accounts: dict[frozenset[tuple[str, str]], BucketAccount] = {}
        try:
            while True:
                read = asyncio.ensure_future(context.read())
                done, _ = await asyncio.wait({read, drain}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    await abort(
                        context,
                        grpc.StatusCode.UNAVAILABLE,
                        "gateway is draining: reconnect and report again",
                    )
                reports = read.result()
                if reports is grpc.aio.EOF:
                    return
                if isinstance(reports, Undecodable):
                    await refuse_undecodable(context, reports)
                assert isinstance(reports, rlqs_pb2.RateLimitQuotaUsageReports)
                domain = reports.domain or domain  # Envoy names it in the first message only
                with server_span(
                    telemetry,
                    RLQS_SPAN,
                    "StreamRateLimitQuotas",
                    caller,
                    **{"rpc.service": RLQS_SERVICE, "chargepath.envoy.domain": domain},
                ) as span:
                    jobs = []
                    for usage in reports.bucket_quota_usages:
                        bucket = dict(usage.bucket_id.bucket)
                        account = accounts.setdefault(frozenset(bucket.items()), BucketAccount())
                        elapsed = usage.time_elapsed
                        jobs.append(
                            self._settle(
                                domain,
                                bucket,
                                account,
                                usage.num_requests_allowed,
                                usage.num_requests_denied,
                                elapsed.seconds * 1000 + elapsed.nanos // 1_000_000,
                            )
                        )
                    try:
                        actions = await asyncio.gather(*jobs)
                    except Exception:
                        incident = uuid.uuid4().hex[:12]
                        log.exception("StreamRateLimitQuotas failed (incident %s)", incident)
                        set_rpc_status(span, grpc.StatusCode.INTERNAL)
                        await abort(
                            context,
                            grpc.StatusCode.INTERNAL,
                            f"internal error, incident {incident}",
                        )
                yield rlqs_pb2.RateLimitQuotaResponse(bucket_action=actions)
        finally:
            drain.cancel()
            telemetry.open_streams.add(-1)

    async def _settle(
        self,
        domain: str,
        bucket: dict[str, str],
        account: BucketAccount,
        allowed: int,
        denied: int,
        elapsed_ms: int,
    ) -> dict[str, object]:
        interval = interval_of(elapsed_ms)
        ttl = 2 * interval
        route = self.engine.policy.route_bucket(domain, bucket)
        principal = current_principal()
        if not route.matched or (
            principal is not None and not may_act_for(principal, route.subject.tenant)
        ):
            refused = route.strict or route.matched
            return bucket_action(bucket, QuotaAnswer(0 if refused else None, interval, ttl))
        covered = 0 if route.shadow else min(allowed, account.prepaid)
        account.prepaid -= covered
        if allowed > covered:
            await self._check(route, allowed - covered, Mode.REPORT)
        if route.shadow:
            return bucket_action(bucket, QuotaAnswer(None, interval, ttl))
        want = max(1, allowed + denied) - account.prepaid
        tokens = account.prepaid
        retry_ms = 0
        if want > 0:
            verdict = await self._check(route, want, Mode.ADMIT)
            if verdict is not None and verdict.decision is not Decision.ALLOW:
                fit = min((lim.remaining for lim in verdict.limits), default=0)
                retry_ms = verdict.retry_after_ms
                if 0 < fit < want:
                    want, verdict = fit, await self._check(route, fit, Mode.ADMIT)
            if verdict is not None and verdict.decision is Decision.ALLOW:
                tokens += want
                if verdict.recorded:
                    account.prepaid += want
        if tokens > 0:
            return bucket_action(bucket, QuotaAnswer(tokens, interval, ttl))
        deny_ms = min(max(retry_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS)
        return bucket_action(bucket, QuotaAnswer(0, interval, deny_ms))

    async def _check(self, route: DescriptorRoute, amount: int, mode: Mode) -> Verdict | None:
        """The verdict of one usage of the bucket; None when it is invalid (a bucket value
        that is no valid tenant or key)."""
        usage = Usage(new_request_id("rlqs"), route.subject, route.metric, amount, mode)
        try:
            return await self.engine.check(usage)
        except InvalidUsageError:
            return None


def add_envoy_services(server: grpc.aio.Server, engine: Engine, draining: asyncio.Event) -> None:
    """Serve RLS and RLQS on ``server``, deciding with ``engine``; RLQS streams end on
    ``draining``."""
    # deserializers that never raise: undecodable bytes are INVALID_ARGUMENT (services.py)
    services.add_service(server, RateLimitServicer(engine), RLS_DESCRIPTOR)
    services.add_service(server, QuotaServicer(engine, draining), RLQS_DESCRIPTOR)
