"""OpenTelemetry for decisions: a span per decision, metrics by outcome and tenant, latencies.

:class:`Telemetry` holds the tracer and the instruments the engine and the servicers use; it
takes its providers as arguments (tests pass in-memory ones). :func:`setup` builds the SDK
providers from the standard ``OTEL_*`` variables, ``--otel`` and ``--metrics-port``;
:func:`for_gateway` does it for one gateway process and announces its Prometheus endpoint.

It imports no grpc: the engine depends on it. The gRPC server spans and statuses are in
:mod:`chargepath.transport.tracing`.

Span attributes are low-cardinality: tenant, slice, metric, mode, decision, reason, policy
version, degraded, replayed, amount. Never a request body, a label value, a key (an API key may
be a secret) or a credential.

Metrics contract: every metric is exported from the start, at zero for the label sets known
then (counters) or with every bucket at zero (histograms, on the Prometheus endpoint), so that
``rate()`` sees the first increase and a dashboard shows 0 rather than "no data". Latencies are
in seconds, in the buckets of :data:`LATENCY_BUCKETS_S`. Per-tenant metrics keep their
``tenant`` label for the busiest ``top_tenants`` tenants of the process only; the rest are
grouped under ``tenant="other"`` (:class:`TenantCap`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind

from chargepath.core.model import Decision, Mode, Reason, Usage, Verdict
from chargepath.core.overlimit import OverLimitStats

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric as PrometheusMetric

    from chargepath.settings import Settings
    from chargepath.store.base import StoreMemory
    from chargepath.store.spool import SpoolStats

log = logging.getLogger("chargepath.telemetry")

#: Upper bounds, in seconds, of the buckets of every latency histogram (set through the SDK's
#: Views in :func:`setup`, and given as the instruments' advice for any other SDK): a decision
#: takes about a millisecond, a store call is bounded by the store timeout (50 ms by default),
#: and one that took seconds is an incident, not a tail. Floats, so that the Prometheus ``le``
#: labels read "1.0", not "1".
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

#: Every latency histogram: OpenTelemetry name -> (Prometheus name, description).
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "chargepath.decision.duration": (
        "chargepath_decision_duration_seconds",
        "Time from receiving a usage to its verdict",
    ),
    "chargepath.store.duration": ("chargepath_store_duration_seconds", "Time of one store call"),
}

#: The ``tenant`` label of everything past the busiest ``top_tenants`` tenants.
OTHER_TENANTS = "other"
DEFAULT_TOP_TENANTS = 20
#: Distinct tenants a process counts one by one. Past it, a new tenant's decisions are counted
#: under ``other`` only: a caller may name any tenant (an unknown one is DENY NO_ENTITLEMENT),
#: and the counts must stay bounded in memory.
MAX_COUNTED_TENANTS = 10_000

#: The outcomes (decision, reason, degraded) the engine gives: ``chargepath.decisions`` has a
#: series for each from the start, at zero until it happens.
OUTCOMES: tuple[tuple[Decision, Reason, bool], ...] = (
    (Decision.ALLOW, Reason.OK, False),
    (Decision.ALLOW, Reason.SOFT_LIMIT_EXCEEDED, False),
    (Decision.THROTTLE, Reason.RATE_LIMITED, False),
    (Decision.DENY, Reason.QUOTA_EXHAUSTED, False),
    (Decision.DENY, Reason.NO_ENTITLEMENT, False),
    (Decision.DENY, Reason.AMOUNT_EXCEEDS_CAPACITY, False),
    (Decision.DENY, Reason.SUSPENDED, False),
    (Decision.DENY, Reason.INVALID_USAGE, False),
    (Decision.DENY, Reason.CAP_REACHED, False),
    (Decision.ALLOW, Reason.STORE_UNAVAILABLE, True),
    (Decision.THROTTLE, Reason.STORE_UNAVAILABLE, True),
    (Decision.DENY, Reason.STORE_UNAVAILABLE, True),
    (Decision.DENY, Reason.NO_ENTITLEMENT, True),
    (Decision.DENY, Reason.SUSPENDED, True),
    (Decision.DENY, Reason.AMOUNT_EXCEEDS_CAPACITY, True),
)
#: What a usage of a store call's late reply came to (``chargepath.store.late_replies``; see
#: ``Engine._reconcile``).
LATE_REPLY_OUTCOMES = (
    "nothing_written",
    "unknown",
    "abandoned",
    "not_recorded",
    "replayed",
    "spooled",
    "resend",
    "reversed",
    "already_reversed",
    "reverse_failed",
)

_DECISION_NAMES = tuple(d.name for d in Decision)


_NO_SPAN: AbstractContextManager[Span | None] = nullcontext(None)


def _unsampled_parent() -> bool:
    """True when the current span is a real span that is not sampled (e.g. a stream batch
    whose caller did not sample its trace)."""
    ctx = trace.get_current_span().get_span_context()
    return ctx.is_valid and not ctx.trace_flags.sampled


class SpanBatch:
    """Open decision spans for a batch; :meth:`finish` closes them with their verdicts.

    For a single usage (``Check``) the decision span is made current, so that the store call
    is its child span. Decision spans follow their parent's sampling decision (the SDK's
    parent-based samplers do the same): under a parent that is not sampled, no span object is
    built at all, since none would be recorded or exported, and the trace ids are empty."""

    def __init__(self, telemetry: Telemetry, usages: Sequence[Usage]) -> None:
        self._t = telemetry
        self._started = time.perf_counter()
        self._usages = usages
        self._token: object | None = None
        if not telemetry.tracing or _unsampled_parent():
            self.spans: list[Span] = []
            self.trace_ids = [""] * len(usages)
            return
        tracer = telemetry.tracer
        self.spans = [
            tracer.start_span(
                "chargepath.decide",
                kind=SpanKind.INTERNAL,
                attributes={
                    "chargepath.tenant": u.subject.tenant,
                    "chargepath.slice": u.subject.slice,
                    "chargepath.metric": u.metric,
                    "chargepath.mode": "report" if u.mode is Mode.REPORT else "admit",
                    "chargepath.amount": u.amount,
                },
            )
            for u in usages
        ]
        self.trace_ids = [
            f"{c.trace_id:032x}" if c.is_valid and c.trace_flags.sampled else ""
            for c in (span.get_span_context() for span in self.spans)
        ]
        if len(self.spans) == 1:
            self._token = otel_context.attach(trace.set_span_in_context(self.spans[0]))

    def finish(self, verdicts: list[Verdict]) -> list[Verdict]:
        elapsed = time.perf_counter() - self._started
        self._detach()
        for span, v in zip(self.spans, verdicts, strict=True) if self.spans else ():
            if span.is_recording():
                span.set_attributes(
                    {
                        "chargepath.decision": v.decision.name,
                        "chargepath.reason": v.reason.name,
                        "chargepath.policy_version": v.policy_version,
                        "chargepath.degraded": v.degraded,
                        "chargepath.replayed": v.replayed,
                    }
                )
            span.end()
        self.spans = []
        self._t.count_decisions(self._usages, verdicts, elapsed)
        return verdicts

    def mark_leased(self) -> None:
        """The batch's verdicts come from a lease this gateway holds (``chargepath.leased``)."""
        for span in self.spans:
            if span.is_recording():
                span.set_attribute("chargepath.leased", True)

    def mark_cached(self) -> None:
        """The batch's verdicts come from the over-limit cache (``chargepath.cached``), not
        from the store."""
        for span in self.spans:
            if span.is_recording():
                span.set_attribute("chargepath.cached", True)

    def __enter__(self) -> SpanBatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.abort()

    def _detach(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def abort(self) -> None:
        """End what :meth:`finish` did not (the decision failed or was cancelled)."""
        if self.spans or self._token is not None:
            self._detach()
            for span in self.spans:
                span.end()
            self.spans = []


class QuotaLevel(NamedTuple):
    """A tenant-scope period quota as the store last read it: whole units of its metric."""

    used: int
    #: the plan's amount plus the grants of the period
    limit: int
    reset_s: float


class TenantCap:
    """Which tenants keep their own ``tenant`` label on the per-tenant metrics, and what the
    cumulative counters of each label read.

    At most ``top`` tenants keep their label: the busiest by decisions (then by name, so that a
    process with at most ``top`` tenants labels all of them from the start). The others are
    counted under ``other``. A tenant outside the top takes the place of the least busy labelled
    one only when it has ``margin`` more decisions than it, so that two tenants of the same
    volume do not trade places at every collection.

    Counters stay monotone when a tenant gains or loses its label: once :meth:`split` has given
    figures, a tenant's series counts what was decided while it held its label (after a
    promotion it starts at zero), and ``other`` everything else. The tenant ``""`` (decisions
    counted without a tenant) is always under ``other``. Not thread-safe: :class:`Telemetry`
    calls it under a lock.
    """

    def __init__(self, top: int, margin: float = 0.1) -> None:
        self.top = top
        self.margin = margin
        self.labelled: frozenset[str] = frozenset()
        #: labelled tenant -> series -> its total when it got its label
        self._base: dict[str, dict[str, int]] = {}
        #: series -> what was counted under tenants' own labels before they lost them
        self._closed: dict[str, int] = {}
        #: whether :meth:`split` gave figures: until then a promoted tenant keeps its history
        self._split = False

    def rank(
        self, totals: Mapping[str, Mapping[str, int]], candidates: Iterable[str] = ()
    ) -> frozenset[str]:
        """Relabel from ``totals`` (tenant -> series -> cumulative count) and ``candidates``
        (tenants known with no count yet, e.g. the policy's); the labelled tenants."""
        known = set(totals).union(candidates)
        known.discard("")
        volume = {t: sum(totals[t].values()) if t in totals else 0 for t in known}
        labelled = {t for t in self.labelled if t in known}
        for t in sorted(known, key=lambda t: (-volume[t], t)):
            if t in labelled:
                continue
            if len(labelled) < self.top:
                labelled.add(t)
                continue
            weakest = min(labelled, key=lambda u: (volume[u], u))
            if volume[t] <= volume[weakest] * (1 + self.margin):
                break  # sorted by volume: no later tenant can take a place either
            labelled.discard(weakest)
            labelled.add(t)
        for t in self.labelled - labelled:
            base = self._base.pop(t, {})
            for series, n in totals.get(t, {}).items():
                self._closed[series] = self._closed.get(series, 0) + n - base.get(series, 0)
        for t in labelled - self.labelled:
            self._base[t] = dict(totals.get(t, {})) if self._split else {}
        self.labelled = frozenset(labelled)
        return self.labelled

    def split(
        self, totals: Mapping[str, Mapping[str, int]], series: Sequence[str]
    ) -> dict[tuple[str, str], int]:
        """(label, series) -> cumulative count, for every labelled tenant and ``other`` and
        every one of ``series`` (zeros included), as of the last :meth:`rank`."""
        self._split = True
        other = {s: -self._closed.get(s, 0) for s in series}
        for by_series in totals.values():
            for s, n in by_series.items():
                other[s] = other.get(s, 0) + n
        out: dict[tuple[str, str], int] = {}
        for t in sorted(self.labelled):
            by_series, base = totals.get(t, {}), self._base.get(t, {})
            for s in series:
                own = by_series.get(s, 0) - base.get(s, 0)
                out[(t, s)] = own
                other[s] -= own
        for s, n in other.items():
            out[(OTHER_TENANTS, s)] = n
        return out

    def label(self, tenant: str) -> str:
        return tenant if tenant in self.labelled else OTHER_TENANTS


class Telemetry:
    """The process's tracer and instruments."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        tracing: bool = True,
        top_tenants: int = DEFAULT_TOP_TENANTS,
    ) -> None:
        self.tracer_provider = tracer_provider or trace.get_tracer_provider()
        self.meter_provider = meter_provider or metrics.get_meter_provider()
        self.tracer = self.tracer_provider.get_tracer("chargepath")
        #: False when no span could ever be sampled (:func:`setup` with no trace exporter):
        #: then no span object is built at all, not even a non-recording one.
        self.tracing = tracing
        meter = self.meter_provider.get_meter("chargepath")
        # Decisions are counted in a dict on the hot path and handed to the SDK when a reader
        # collects (the same cumulative sums a Counter would export): an SDK Counter.add costs
        # more than the rest of the accounting of a Check.
        self._counts: dict[tuple[str, Decision, Reason, bool], int] = {}
        self._counted_tenants: set[str] = set()
        # The cap is used by the collecting threads (one per reader) and by the jobs: a lock,
        # never taken on the hot path.
        self._cap = TenantCap(top_tenants)
        self._cap_lock = threading.Lock()
        self._candidates: tuple[str, ...] = ()
        #: (tenant, consumer group) -> entries not yet acknowledged; kept by the gateway.
        self.ledger_lag: dict[tuple[str, str], int] = {}
        #: (tenant, quota limit name) -> its level; kept by the gateway for labelled tenants.
        self.quota: dict[tuple[str, str], QuotaLevel] = {}
        #: The store's memory, read by the gateway's RedisMemory job (None until read).
        self.store_memory: StoreMemory | None = None
        meter.create_observable_counter(
            "chargepath.decisions",
            callbacks=[self._observe_decisions],
            unit="{decision}",
            description="Decisions by decision, reason and degraded",
        )
        meter.create_observable_counter(
            "chargepath.decisions.degraded",
            callbacks=[self._observe_degraded],
            unit="{decision}",
            description="Decisions taken by the failure policy because the store was unavailable",
        )
        # Before the ledger and quota gauges: it relabels, and they use its labels.
        meter.create_observable_counter(
            "chargepath.tenant.decisions",
            callbacks=[self._observe_tenant_decisions],
            unit="{decision}",
            description="Decisions by tenant (the busiest tenants; the rest as tenant=other) "
            "and decision",
        )
        self._latency = meter.create_histogram(
            "chargepath.decision.duration",
            unit="s",
            description=HISTOGRAMS["chargepath.decision.duration"][1],
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self._store_latency = meter.create_histogram(
            "chargepath.store.duration",
            unit="s",
            description=HISTOGRAMS["chargepath.store.duration"][1],
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self._store_errors = meter.create_counter(
            "chargepath.store.errors",
            unit="{error}",
            description="Store calls that failed or timed out",
        )
        self._store_failures = meter.create_counter(
            "chargepath.store.failures",
            unit="{call}",
            description="Store calls answered by the failure policy, by cause: timeout (no "
            "reply within the store timeout, counted from admission), unavailable (a "
            "connection error), breaker_open (not sent: the breaker was open), queue (not "
            "sent: this process had store_max_in_flight calls in flight for longer than the "
            "queue timeout, i.e. the gateway, not the store, was slow)",
        )
        self._breaker_openings = meter.create_counter(
            "chargepath.store.breaker_opened",
            unit="{opening}",
            description="Times the circuit breaker opened: the store failed a probe (a PING "
            "after a store call failed)",
        )
        self._loop_late = meter.create_counter(
            "chargepath.store.deadline_extended",
            unit="{call}",
            description="Store calls whose timeout ran late because the event loop was stuck "
            "(CPU starvation, a long pause), and that were given one more timeout's worth",
        )
        self._late_replies = meter.create_counter(
            "chargepath.store.late_replies",
            unit="{usage}",
            description="Usages of store calls that timed out (their callers answered by the "
            "failure policy) whose reply came later, by what it meant: nothing_written (refused "
            "as past its deadline, or stale), unknown (failed or not answered in time), "
            "abandoned (not followed), not_recorded, replayed, spooled (the spool's replay "
            "dedups it), resend (a resend is answered from the record), reversed, "
            "already_reversed, reverse_failed (a refused caller still billed)",
        )
        self.open_streams = meter.create_up_down_counter(
            "chargepath.streams.open", unit="{stream}", description="Open StreamUsage streams"
        )
        self._streams_refused = meter.create_counter(
            "chargepath.streams.refused",
            unit="{stream}",
            description="StreamUsage streams refused RESOURCE_EXHAUSTED: the process's or the "
            "credential's cap on open streams was reached",
        )
        self._streams_refused.add(0)
        # adding 0 makes the point, so that these are there (at 0) from the start
        self._store_errors.add(0)
        self._loop_late.add(0)
        for outcome in LATE_REPLY_OUTCOMES:
            self._late_replies.add(0, {"outcome": outcome})
        self.open_streams.add(0)
        meter.create_observable_gauge(
            "chargepath.ledger.lag",
            callbacks=[self._observe_ledger_lag],
            unit="{entry}",
            description="Ledger entries not yet acknowledged by a consumer group",
        )
        meter.create_observable_gauge(
            "chargepath.redis.memory.used",
            callbacks=[self._memory_gauge(lambda m: m.used_bytes)],
            unit="By",
            description="Bytes Redis uses (INFO used_memory)",
        )
        meter.create_observable_gauge(
            "chargepath.redis.memory.limit",
            callbacks=[self._memory_gauge(lambda m: m.limit_bytes)],
            unit="By",
            description="Redis' maxmemory (0: none); past it, with noeviction, writes are refused",
        )
        meter.create_observable_gauge(
            "chargepath.redis.memory.utilization",
            callbacks=[self._memory_gauge(lambda m: m.utilization)],
            unit="1",
            description="used_memory / maxmemory (absent without a maxmemory): alert before 1",
        )
        meter.create_observable_gauge(
            "chargepath.quota.used",
            callbacks=[self._quota_gauge(lambda q: q.used)],
            unit="{unit}",
            description="Units of a tenant-scope period quota used in the current period",
        )
        meter.create_observable_gauge(
            "chargepath.quota.limit",
            callbacks=[self._quota_gauge(lambda q: q.limit)],
            unit="{unit}",
            description="Units of a tenant-scope period quota in the current period (the "
            "plan's amount plus grants)",
        )
        meter.create_observable_gauge(
            "chargepath.quota.reset",
            callbacks=[self._quota_gauge(lambda q: q.reset_s)],
            unit="s",
            description="Time until a tenant-scope period quota resets",
        )

    def stream_refused(self) -> None:
        self._streams_refused.add(1)

    # -- collection (a reader's thread) --------------------------------------------------

    def _observe_decisions(self, _options: CallbackOptions) -> Iterable[Observation]:
        # list() copies in one step under the GIL: the event loop's thread may add a key
        sums = dict.fromkeys(OUTCOMES, 0)
        for (_, d, r, degraded), n in list(self._counts.items()):
            sums[(d, r, degraded)] = sums.get((d, r, degraded), 0) + n
        return [
            Observation(n, {"decision": d.name, "reason": r.name, "degraded": degraded})
            for (d, r, degraded), n in sums.items()
        ]

    def _observe_degraded(self, _options: CallbackOptions) -> Iterable[Observation]:
        by_reason = {r.name: 0 for _, r, degraded in OUTCOMES if degraded}
        for (_, _, r, degraded), n in list(self._counts.items()):
            if degraded:
                by_reason[r.name] = by_reason.get(r.name, 0) + n
        return [Observation(n, {"reason": r}) for r, n in by_reason.items()]

    def _tenant_totals(self) -> dict[str, dict[str, int]]:
        """tenant -> decision name -> decisions counted."""
        out: dict[str, dict[str, int]] = {}
        for (tenant, d, _, _), n in list(self._counts.items()):
            by_decision = out.setdefault(tenant, {})
            by_decision[d.name] = by_decision.get(d.name, 0) + n
        return out

    def _observe_tenant_decisions(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._cap_lock:
            totals = self._tenant_totals()
            self._cap.rank(totals, self._candidates)
            split = self._cap.split(totals, _DECISION_NAMES)
        return [
            Observation(n, {"tenant": tenant, "decision": d}) for (tenant, d), n in split.items()
        ]

    def _observe_ledger_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        lags: dict[tuple[str, str], int] = {}
        for (tenant, group), lag in list(self.ledger_lag.items()):
            key = (self._cap.label(tenant), group)
            lags[key] = lags.get(key, 0) + lag
        return [
            Observation(lag, {"tenant": tenant, "group": group})
            for (tenant, group), lag in lags.items()
        ]

    def _memory_gauge(
        self, value: Callable[[StoreMemory], float | None]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            memory = self.store_memory
            v = value(memory) if memory is not None else None
            return [] if v is None else [Observation(v)]

        return observe

    # -- the outage spool (chargepath.store.spool) ---------------------------------------------

    def observe_spool(self, snapshot: Callable[[], SpoolStats]) -> None:
        """Export the spool of this process: ``snapshot`` (``Spool.snapshot``, no I/O) is
        read when a reader collects. Depth, bytes and the oldest usage's age describe the
        spool file (shared by the processes of one data folder); the counters are this
        process's."""
        meter = self.meter_provider.get_meter("chargepath")
        meter.create_observable_gauge(
            "chargepath.spool.depth",
            callbacks=[lambda _o: [Observation(snapshot().depth)]],
            unit="{usage}",
            description="Usages in the outage spool, waiting to be replayed into the store",
        )
        meter.create_observable_gauge(
            "chargepath.spool.size",
            callbacks=[lambda _o: [Observation(snapshot().bytes)]],
            unit="By",
            description="Bytes of the usages in the outage spool (bounded by spool_max_bytes)",
        )
        meter.create_observable_gauge(
            "chargepath.spool.oldest_age",
            callbacks=[lambda _o: [Observation(snapshot().oldest_age_ms / 1000)]],
            unit="s",
            description="Age of the oldest usage in the outage spool (0 when empty)",
        )

        def usages(_options: CallbackOptions) -> Iterable[Observation]:
            s = snapshot()
            return [
                Observation(n, {"outcome": outcome})
                for outcome, n in (
                    ("appended", s.appended),
                    ("refused", s.refused),
                    ("replayed", s.replayed),
                    ("already_recorded", s.already_recorded),
                    ("dropped", s.dropped),
                )
            ]

        meter.create_observable_counter(
            "chargepath.spool.usages",
            callbacks=[usages],
            unit="{usage}",
            description="Usages appended to the spool, refused by it (full or a disk error), "
            "and settled by the replay (replayed, already_recorded, dropped)",
        )
        meter.create_observable_counter(
            "chargepath.spool.commits",
            callbacks=[lambda _o: [Observation(snapshot().append_commits)]],
            unit="{commit}",
            description="Spool append transactions (one fsync each; appended / commits is the "
            "mean group commit)",
        )

    def observe_overlimit(self, snapshot: Callable[[], OverLimitStats]) -> None:
        """Export the over-limit cache of this process: ``snapshot`` (no I/O) is read when a
        reader collects."""
        meter = self.meter_provider.get_meter("chargepath")
        meter.create_observable_counter(
            "chargepath.overlimit.hits",
            callbacks=[
                lambda _o: [
                    Observation(snapshot().hits, {"kind": "refused"}),
                    Observation(snapshot().replays, {"kind": "replayed"}),
                ]
            ],
            unit="{decision}",
            description="Check admits answered by the over-limit cache without the store: "
            "refused (a fresh cached refusal) or replayed (a request id it answered before)",
        )
        meter.create_observable_counter(
            "chargepath.overlimit.invalidations",
            callbacks=[lambda _o: [Observation(snapshot().invalidations)]],
            unit="{event}",
            description="Room events (grants, policy changes, lease refunds) that emptied the "
            "over-limit cache of a tenant or of every tenant",
        )
        meter.create_observable_counter(
            "chargepath.overlimit.bypassed",
            callbacks=[
                lambda _o: [
                    Observation(snapshot().bypassed_retries, {"why": "retry"}),
                    Observation(snapshot().bypassed_seen, {"why": "allowed_before"}),
                ]
            ],
            unit="{decision}",
            description="Admits the over-limit cache had an entry for but sent to the store: "
            "marked as retries, or request ids this gateway saw allowed",
        )
        meter.create_observable_gauge(
            "chargepath.overlimit.entries",
            callbacks=[lambda _o: [Observation(snapshot().entries)]],
            unit="{entry}",
            description="(subject, metric) entries in the over-limit cache",
        )
        meter.create_observable_gauge(
            "chargepath.overlimit.live",
            callbacks=[lambda _o: [Observation(int(snapshot().live))]],
            unit="1",
            description="1 while the over-limit cache answers (subscribed to the room events)",
        )

    def _quota_gauge(
        self, value: Callable[[QuotaLevel], float]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            labelled = self._cap.labelled
            return [
                Observation(value(q), {"tenant": tenant, "limit": limit})
                for (tenant, limit), q in list(self.quota.items())
                if tenant in labelled
            ]

        return observe

    def decision_totals(self) -> dict[tuple[str, Decision, bool], int]:
        """(tenant, decision, degraded) -> decisions this process counted since it started (the
        counts behind ``chargepath.decisions``); tenant "" holds the tenants past
        :data:`MAX_COUNTED_TENANTS` and invalid stream usages. A copy, for the status page."""
        out: dict[tuple[str, Decision, bool], int] = {}
        for (tenant, d, _, degraded), n in list(self._counts.items()):
            out[(tenant, d, degraded)] = out.get((tenant, d, degraded), 0) + n
        return out

    def labelled_tenants(self, candidates: Iterable[str] = ()) -> frozenset[str]:
        """The tenants that keep their own label on the per-tenant metrics, ranked now;
        ``candidates`` (the policy's tenants) are ranked too, with no decision yet, until the
        next call gives others."""
        with self._cap_lock:
            self._candidates = tuple(candidates)
            return self._cap.rank(self._tenant_totals(), self._candidates)

    # -- the hot path (the event loop's thread) -----------------------------------------

    def decision_spans(self, usages: Sequence[Usage]) -> SpanBatch:
        """The decision spans of a batch, as a context manager: ``finish`` them with the
        verdicts; leaving the block without (an error, a cancellation) ends them unfinished."""
        return SpanBatch(self, usages)

    def lease_span(self, tenant: str, metric: str, kind: str) -> Span | None:
        """A span for one lease ask (``kind``: open, renew, report or release), a child of
        the current span (the RPC's), not made current; the caller ends it with
        :func:`end_lease_span`. None with tracing off or under a parent that is not sampled."""
        if not self.tracing or _unsampled_parent():
            return None
        return self.tracer.start_span(
            "chargepath.lease",
            kind=SpanKind.INTERNAL,
            attributes={
                "chargepath.tenant": tenant,
                "chargepath.metric": metric,
                "chargepath.lease.kind": kind,
            },
        )

    def store_span(self, tenant: str, size: int) -> AbstractContextManager[Span | None]:
        """A client span around one store script call (child of the current span; none with
        tracing off or under a parent that is not sampled)."""
        if not self.tracing or _unsampled_parent():
            return _NO_SPAN
        return self.tracer.start_as_current_span(
            "chargepath.store.decide",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system": "redis",
                "db.operation": "EVALSHA",
                "chargepath.tenant": tenant,
                "chargepath.batch_size": size,
            },
        )

    def count_decisions(
        self, usages: Sequence[Usage], verdicts: Sequence[Verdict], elapsed_s: float
    ) -> None:
        """Count a batch's decisions (``verdicts[i]`` decides ``usages[i]``) by tenant and
        outcome, and record its latency once: the latency histogram counts Check calls and
        stream batches, each decision of a batch having waited the same time."""
        counts = self._counts
        for u, v in zip(usages, verdicts, strict=True):
            key = (u.subject.tenant, v.decision, v.reason, v.degraded)
            n = counts.get(key)
            if n is None:
                key = self._first_count(key)
                n = counts.get(key, 0)
            counts[key] = n + 1
        if verdicts:
            self._latency.record(elapsed_s)

    def _first_count(
        self, key: tuple[str, Decision, Reason, bool]
    ) -> tuple[str, Decision, Reason, bool]:
        """The key to count a new (tenant, outcome) under: itself, or under no tenant once
        :data:`MAX_COUNTED_TENANTS` tenants are counted."""
        tenant = key[0]
        if tenant in self._counted_tenants:
            return key
        if len(self._counted_tenants) < MAX_COUNTED_TENANTS:
            self._counted_tenants.add(tenant)
            return key
        return ("", key[1], key[2], key[3])

    def count_invalid(self) -> None:
        """An invalid stream usage: counted under no tenant (its tenant may be what is
        invalid), so under ``other`` per tenant."""
        key = ("", Decision.DENY, Reason.INVALID_USAGE, False)
        self._counts[key] = self._counts.get(key, 0) + 1

    def store_latency(self, seconds: float) -> None:
        self._store_latency.record(seconds)

    def loop_late(self) -> None:
        self._loop_late.add(1)

    def store_error(self) -> None:
        self._store_errors.add(1)

    def store_failure(self, cause: str) -> None:
        """A store call answered by the failure policy, by ``cause`` (timeout, unavailable,
        breaker_open, queue)."""
        self._store_failures.add(1, {"cause": cause})

    def breaker_opened(self) -> None:
        self._breaker_openings.add(1)

    def late_replies(self, outcome: str, usages: int) -> None:
        """``usages`` of a store call's late reply, by outcome (:data:`LATE_REPLY_OUTCOMES`)."""
        self._late_replies.add(usages, {"outcome": outcome})


class PrometheusScrape:
    """What the Prometheus endpoint serves (a ``prometheus_client`` collector): what the
    OpenTelemetry reader gives (collected from ``source``), plus, for each histogram of
    :data:`HISTOGRAMS` nothing was recorded in yet, the same histogram with every bucket at
    zero. The SDK makes a histogram's point at its first measurement only; this keeps the
    promise that every metric is there from the start. The empty histogram carries the scope
    labels the reader puts on ``chargepath.store.errors`` (a metric with no attributes of its
    own), so that it is the same series the first measurement then continues."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def describe(self) -> list[PrometheusMetric]:
        # nothing to check for duplicates: do not collect at registration
        return []

    def collect(self) -> Iterable[PrometheusMetric]:
        from prometheus_client.core import HistogramMetricFamily

        families = list(self.source.collect())
        yield from families
        names = {f.name for f in families}
        scope: dict[str, str] = next(
            (s.labels for f in families if f.name == "chargepath_store_errors" for s in f.samples),
            {},
        )
        for name, description in HISTOGRAMS.values():
            if name in names:
                continue
            family = HistogramMetricFamily(name, description, labels=list(scope), unit="seconds")
            family.add_metric(
                list(scope.values()),
                buckets=[(str(b), 0) for b in LATENCY_BUCKETS_S] + [("+Inf", 0)],
                sum_value=0,
            )
            yield family


def metric_views() -> list[Any]:
    """The SDK Views of the gateway's metrics: the latency histograms in
    :data:`LATENCY_BUCKETS_S` (the SDK's default boundaries are for milliseconds)."""
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    return [
        View(
            instrument_name=name,
            aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_S),
        )
        for name in HISTOGRAMS
    ]


@dataclasses.dataclass
class TelemetrySetup:
    """What :func:`setup` built; :meth:`shutdown` flushes exporters on exit."""

    telemetry: Telemetry
    providers: list[Any]
    #: run by :meth:`shutdown` first, newest first (the scrape endpoint, its target file)
    closers: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def shutdown(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # a failure at exit must not hide the real exit
                log.exception("telemetry shutdown failed")
        self.closers = []
        for p in self.providers:
            try:
                p.shutdown()
            except Exception:  # an exporter failing at exit must not hide the real exit
                log.exception("telemetry shutdown failed")


def setup(
    *,
    otel: str = "",
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    top_tenants: int = DEFAULT_TOP_TENANTS,
) -> TelemetrySetup:
    """SDK providers configured by ``OTEL_*`` variables.

    ``otel`` (``none``, ``console``, ``otlp``) sets the traces and metrics exporters when the
    ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER`` variables do not. The sampler is the
    SDK's (``OTEL_TRACES_SAMPLER``, default parent-based always-on: every decision is
    recorded) when a trace exporter is configured. With no trace exporter and no
    ``OTEL_TRACES_SAMPLER``, nothing is sampled: a recorded span would go nowhere, and
    recording one per decision costs more CPU than deciding it. ``metrics_port`` serves a
    Prometheus scrape endpoint (``/metrics``) on ``metrics_host`` (:class:`PrometheusScrape`,
    with the process and Python runtime metrics of ``prometheus_client``). ``top_tenants``:
    how many tenants keep their own label on the per-tenant metrics.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from chargepath import __version__

    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "chargepath"),
            "service.version": __version__,
        }
    )
    span_exporters = _exporters("OTEL_TRACES_EXPORTER", otel)
    sampler = None  # the SDK's, from OTEL_TRACES_SAMPLER
    if not span_exporters and "OTEL_TRACES_SAMPLER" not in os.environ:
        sampler = ALWAYS_OFF
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    for name in span_exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    readers: list[MetricReader] = []
    for name in _exporters("OTEL_METRICS_EXPORTER", otel):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    closers: list[Callable[[], None]] = []
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

        # the reader's metrics go through PrometheusScrape, which the default registry
        # serves with prometheus_client's process and runtime metrics
        source = CollectorRegistry(auto_describe=False)
        readers.append(PrometheusMetricReader(registry=source))
        scrape = PrometheusScrape(source)
        REGISTRY.register(scrape)
        closers.append(lambda: REGISTRY.unregister(scrape))
        server, _ = start_http_server(metrics_port, addr=metrics_host)
        closers.append(server.server_close)  # after shutdown (closers run newest first)
        closers.append(server.shutdown)
        log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=metric_views())
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    # Nothing could be sampled (ALWAYS_OFF ignores the caller's flag too), or the SDK is
    # disabled: build no span objects at all.
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    tracing = sampler is not ALWAYS_OFF and not disabled
    return TelemetrySetup(
        Telemetry(tracer_provider, meter_provider, tracing=tracing, top_tenants=top_tenants),
        [tracer_provider, meter_provider],
        closers,
    )


def for_gateway(settings: Settings, worker: int = 0) -> TelemetrySetup:
    """The telemetry of gateway process ``worker`` (0 when it is the only one): :func:`setup`
    from the settings. With ``metrics_port`` set, worker ``i`` serves its Prometheus endpoint
    on ``metrics_port + i`` and announces it in ``<data_dir>/metrics/worker-<i>.json``, a
    Prometheus ``file_sd`` target file (:func:`announce_scrape_target`), which
    :meth:`TelemetrySetup.shutdown` removes."""
    port = settings.metrics_port + worker if settings.metrics_port else 0
    built = setup(
        otel=settings.otel,
        metrics_port=port,
        metrics_host=settings.metrics_host,
        top_tenants=settings.metrics_top_tenants,
    )
    if port:
        try:
            path = announce_scrape_target(
                Path(settings.data_dir) / "metrics",
                worker,
                max(settings.workers, 1),
                settings.metrics_host,
                port,
            )
        except BaseException:
            built.shutdown()
            raise
        built.closers.append(lambda: path.unlink(missing_ok=True))
        log.info("Prometheus scrape target of worker %d in %s (file_sd)", worker, path)
    return built


def announce_scrape_target(
    directory: Path, worker: int, workers: int, host: str, port: int
) -> Path:
    """Write ``directory/worker-<worker>.json``: the scrape target of one gateway process in
    Prometheus' ``file_sd`` format, labelled ``worker``, so that a ``file_sd_configs`` entry
    on ``directory/*.json`` finds every worker of the gateway. Written whole (a rename), so
    Prometheus never reads half a file. Worker 0 also removes the files of workers past
    ``workers`` (left by an earlier run with more); a worker that exits cleanly removes its
    own. A wildcard ``host`` is announced as this machine's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    directory.mkdir(parents=True, exist_ok=True)
    if worker == 0:
        for stale in directory.glob("worker-*.json"):
            index = stale.stem.removeprefix("worker-")
            if index.isdigit() and int(index) >= workers:
                stale.unlink(missing_ok=True)
    path = directory / f"worker-{worker}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{"targets": [address], "labels": {"worker": str(worker)}}]))
    tmp.replace(path)
    return path


def _exporters(variable: str, default: str) -> list[str]:
    names = [n.strip() for n in os.environ.get(variable, default or "none").split(",")]
    for n in names:
        if n not in ("otlp", "console", "none", ""):
            log.warning("%s=%s is not supported; use otlp, console or none", variable, n)
    return [n for n in names if n in ("otlp", "console")]


def end_lease_span(
    span: Span | None, decision: str, reason: str, policy_version: int, replayed: bool
) -> None:
    """Set a lease span's outcome (low-cardinality attributes only) and end it."""
    if span is None:
        return
    if span.is_recording():
        span.set_attributes(
            {
                "chargepath.decision": decision,
                "chargepath.reason": reason,
                "chargepath.policy_version": policy_version,
                "chargepath.replayed": replayed,
            }
        )
    span.end()
