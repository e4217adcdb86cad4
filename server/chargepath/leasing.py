"""Quota leases on the engine's side: asks validated and resolved against the policy, then
applied by the lease store, one atomic call per tenant.

It knows nothing of gRPC or Redis (the same rules as :mod:`chargepath.engine`, whose policy,
breaker and store deadline it shares). A lease is never granted in degraded mode: when the
store cannot answer, every ask is answered THROTTLE ``STORE_UNAVAILABLE`` with nothing granted
and nothing recorded, so a holder keeps its report and resends it with the same request id
(which the store then applies once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from chargepath.core.leases import LeaseAnswer, LeaseAsk, missing_lease_settings, validate_ask
from chargepath.core.model import Decision, FieldViolation, Reason
from chargepath.core.policy import Policy, Resolution
from chargepath.deadline import StoreDeadline
from chargepath.engine import Engine, new_decision_ids
from chargepath.store.base import (
    LeaseItem,
    LeaseStore,
    StalePolicyError,
    StoreUnavailableError,
)
from chargepath.telemetry import end_lease_span

log = logging.getLogger("chargepath.leasing")

STALE_RETRIES = 3
#: What a holder is told to wait before resending while the store is away, ms.
UNAVAILABLE_RETRY_MS = 1000


def ask_fingerprint(ask: LeaseAsk) -> str:
    """What must match for a retry to be the same ask (the tenant and request id are in its
    dedup key)."""
    raw = "\x1f".join(
        (
            ask.subject.slice,
            ask.subject.key,
            ask.metric,
            ask.lease_id,
            str(ask.requested),
            str(ask.used),
            "1" if ask.release else "0",
        )
    )
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


def ask_kind(ask: LeaseAsk) -> str:
    """open, renew, report or release: a span attribute."""
    if not ask.lease_id:
        return "open"
    if ask.release:
        return "release"
    return "renew" if ask.requested else "report"


class Leasing:
    """Applies lease asks. One per process, beside the engine; safe for concurrent use from
    one event loop."""

    def __init__(self, engine: Engine, store: LeaseStore) -> None:
        self.engine = engine
        self.store = store

    def violations(self, ask: LeaseAsk, policy: Policy) -> list[FieldViolation]:
        out = validate_ask(ask)
        if (
            ask.metric
            and ask.metric not in policy.metrics
            and not any(v.field == "metric" for v in out)
        ):
            out.append(
                FieldViolation(
                    "metric", f"unknown metric {ask.metric!r}: not in the policy's catalog"
                )
            )
        return out

    async def lease(self, asks: Sequence[LeaseAsk], holders: Sequence[str]) -> list[LeaseAnswer]:
        """Answer ``asks`` in order; ``holders[i]`` names the holder of ``asks[i]`` when the
        ask names none (the caller's identity). Invalid asks are answered DENY
        INVALID_USAGE with their violations; the others go to the store, one atomic call
        per tenant, in order."""
        engine = self.engine
        if any(a.metric not in engine.policy.metrics for a in asks):
            # the metric may be known to a newer policy: one cheap version read
            version = await self._live_version()
            if version > engine.policy.version:
                await engine.reload_policy(version)
        policy = engine.policy
        out: list[LeaseAnswer | None] = [None] * len(asks)
        groups: dict[str, list[int]] = {}
        for i, ask in enumerate(asks):
            bad = self.violations(ask, policy)
            if bad:
                out[i] = LeaseAnswer(
                    request_id=ask.request_id[:128],
                    decision=Decision.DENY,
                    reason=Reason.INVALID_USAGE,
                    lease_id=ask.lease_id[:64],
                    policy_version=policy.version,
                    message="; ".join(str(v) for v in bad),
                    violations=tuple(bad),
                )
            else:
                groups.setdefault(ask.subject.tenant, []).append(i)
        results = await asyncio.gather(
            *(
                self._tenant(t, [asks[i] for i in idxs], [holders[i] for i in idxs])
                for t, idxs in groups.items()
            )
        )
        for idxs, answers in zip(groups.values(), results, strict=True):
            for i, answer in zip(idxs, answers, strict=True):
                out[i] = answer
        return [a for a in out if a is not None]

    async def _live_version(self) -> int:
        try:
            return await asyncio.wait_for(
                self.engine.store.policy_version(), self.engine.settings.store_timeout_s
            )
        except (StoreUnavailableError, TimeoutError):
            return 0

    def _refusal(self, ask: LeaseAsk, res: Resolution, policy: Policy) -> LeaseAnswer | None:
        """An ask the policy refuses before the store: a metric no limit of the subject's
        plan counts, or a limit without lease settings (NO_ENTITLEMENT, naming it). A report
        or release on an open lease of a tenant the policy names is never refused here: its use
        must reach the ledger. A tenant the policy does not name is always refused, and nothing
        is written for it (as for a usage)."""
        if res.tenant_known and ask.lease_id and (ask.used or ask.release) and not ask.requested:
            return None
        message = None
        if not res.tenant_known:
            message = f"no such tenant {ask.subject.tenant!r} in the policy; nothing was written"
        elif not res.entitled or not res.limits:
            message = (
                f"no limit of the plan counts {ask.metric!r} for this subject; a lease needs "
                "one with 'lease' settings"
            )
        else:
            message = missing_lease_settings([(lim.name, lim.lease) for lim in res.limits])
        if message is None:
            return None
        return LeaseAnswer(
            request_id=ask.request_id,
            decision=Decision.DENY,
            reason=Reason.NO_ENTITLEMENT,
            lease_id=ask.lease_id,
            policy_version=policy.version,
            message=message,
        )

    async def _tenant(
        self, tenant: str, asks: list[LeaseAsk], holders: list[str]
    ) -> list[LeaseAnswer]:
        engine = self.engine
        policy = engine.policy
        ids = new_decision_ids(len(asks), tenant)
        tel = engine.telemetry
        spans = [tel.lease_span(tenant, a.metric, ask_kind(a)) for a in asks]
        answers: list[LeaseAnswer] = []
        try:
            for _ in range(STALE_RETRIES):
                answers, stale = await self._apply(tenant, asks, holders, ids, policy)
                if stale is None:
                    break
                try:
                    policy = await engine.reload_policy(stale)
                except StoreUnavailableError:
                    answers = [self._unavailable(a, policy, "policy reload failed") for a in asks]
                    break
            else:
                answers = [
                    self._unavailable(a, policy, "policy reload did not converge") for a in asks
                ]
        finally:
            for n, span in enumerate(spans):
                if n < len(answers):
                    a = answers[n]
                    end_lease_span(
                        span, a.decision.name, a.reason.name, a.policy_version, a.replayed
                    )
                else:  # cancelled or failed
                    end_lease_span(span, "UNSPECIFIED", "UNSPECIFIED", policy.version, False)
        return answers

    async def _apply(
        self,
        tenant: str,
        asks: list[LeaseAsk],
        holders: list[str],
        ids: list[str],
        policy: Policy,
    ) -> tuple[list[LeaseAnswer], int | None]:
        """(answers, None), or ([], the stamped version) when the policy was stale."""
        engine = self.engine
        out: list[LeaseAnswer | None] = [None] * len(asks)
        items: list[LeaseItem] = []
        where: list[int] = []
        for i, (ask, holder, did) in enumerate(zip(asks, holders, ids, strict=True)):
            res = policy.resolve(ask.subject, ask.metric)
            refused = self._refusal(ask, res, policy)
            if refused is not None:
                out[i] = replace(refused, decision_id=did)
                continue
            if any(lim.lease is None for lim in res.limits):
                # a report or release on an open lease whose limits lost their lease
                # settings: the use is recorded, nothing more is granted
                ask = replace(ask, requested=0)
            items.append(
                LeaseItem(
                    ask,
                    res,
                    did,
                    ask_fingerprint(ask),
                    ask.holder or holder,
                    suspended=policy.suspension(ask.subject) is not None,
                )
            )
            where.append(i)
        if items:
            if not engine.breaker.allow():
                for i in where:
                    out[i] = self._unavailable(asks[i], policy, "circuit breaker open")
            else:
                started = time.perf_counter()
                deadline = StoreDeadline(
                    engine.settings.store_timeout_s
                    + engine.settings.store_timeout_per_usage_s * (len(items) - 1)
                )
                try:
                    with engine.telemetry.store_span(tenant, len(items)):
                        async with deadline:
                            answers = await self.store.ask(
                                tenant, policy.version, items, deadline=deadline.latest
                            )
                except StalePolicyError as exc:
                    engine.breaker.success()
                    return [], exc.stamped_version
                except (StoreUnavailableError, TimeoutError) as exc:
                    # as for a decision: a timeout only makes the breaker probe the store
                    engine.store_failed(exc)
                    for i in where:
                        out[i] = self._unavailable(asks[i], policy, str(exc) or "store timeout")
                else:
                    engine.telemetry.store_latency(time.perf_counter() - started)
                    engine.breaker.success()
                    for i, answer in zip(where, answers, strict=True):
                        out[i] = answer
        return [a for a in out if a is not None], None

    @staticmethod
    def _unavailable(ask: LeaseAsk, policy: Policy, why: str) -> LeaseAnswer:
        return LeaseAnswer(
            request_id=ask.request_id,
            decision=Decision.THROTTLE,
            reason=Reason.STORE_UNAVAILABLE,
            lease_id=ask.lease_id,
            retry_after_ms=UNAVAILABLE_RETRY_MS,
            policy_version=policy.version,
            message=(
                f"store unavailable ({why}): nothing granted, recorded or released; resend "
                "with the same request_id"
            ),
        )
