"""OpenTelemetry for decisions: a span per decision, metrics by outcome, store latency.

:class:`Telemetry` holds the tracer and the instruments the engine and the servicers use; it
takes its providers as arguments (tests pass in-memory ones). :func:`setup` builds the SDK
providers from the standard ``OTEL_*`` variables, ``--otel`` and ``--metrics-port``.

It imports no grpc: the engine depends on it. The gRPC server spans and statuses are in
:mod:`chargepath.transport.tracing`.

Span attributes are low-cardinality: tenant, slice, metric, mode, decision, reason, policy
version, degraded, replayed, amount. Never a request body, a label value, a key (an API key may
be a secret) or a credential.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind

from chargepath.core.model import Decision, Mode, Reason, Usage, Verdict

if TYPE_CHECKING:
    from chargepath.store.spool import SpoolStats

log = logging.getLogger("chargepath.telemetry")

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
        self._t.count_decisions(verdicts, elapsed)
        return verdicts

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


class Telemetry:
    """The process's tracer and instruments."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        tracing: bool = True,
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
        self._counts: dict[tuple[Decision, Reason, bool], int] = {}
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
        self._latency = meter.create_histogram(
            "chargepath.decision.duration",
            unit="s",
            description="Time from receiving a usage to its verdict",
        )
        self._store_latency = meter.create_histogram(
            "chargepath.store.duration", unit="s", description="Time of one store call"
        )
        self._store_errors = meter.create_counter(
            "chargepath.store.errors",
            unit="{error}",
            description="Store calls that failed or timed out",
        )
        self._loop_late = meter.create_counter(
            "chargepath.store.deadline_extended",
            unit="{call}",
            description="Store calls whose timeout ran late because the event loop was stuck "
            "(CPU starvation, a long pause), and that were given one more timeout's worth",
        )
        self.open_streams = meter.create_up_down_counter(
            "chargepath.streams.open", unit="{stream}", description="Open StreamUsage streams"
        )
        #: (tenant, consumer group) -> entries not yet acknowledged; kept by the gateway.
        self.ledger_lag: dict[tuple[str, str], int] = {}
        meter.create_observable_gauge(
            "chargepath.ledger.lag",
            callbacks=[self._observe_ledger_lag],
            unit="{entry}",
            description="Ledger entries not yet acknowledged by a consumer group",
        )

    def _observe_decisions(self, _options: CallbackOptions) -> Iterable[Observation]:
        # list() copies in one step under the GIL: the event loop's thread may add a key
        return [
            Observation(n, {"decision": d.name, "reason": r.name, "degraded": degraded})
            for (d, r, degraded), n in list(self._counts.items())
        ]

    def _observe_degraded(self, _options: CallbackOptions) -> Iterable[Observation]:
        by_reason: dict[str, int] = {}
        for (_, r, degraded), n in list(self._counts.items()):
            if degraded:
                by_reason[r.name] = by_reason.get(r.name, 0) + n
        return [Observation(n, {"reason": r}) for r, n in by_reason.items()]

    def _observe_ledger_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(lag, {"tenant": tenant, "group": group})
            for (tenant, group), lag in list(self.ledger_lag.items())
        ]

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

    def decision_spans(self, usages: Sequence[Usage]) -> SpanBatch:
        """The decision spans of a batch, as a context manager: ``finish`` them with the
        verdicts; leaving the block without (an error, a cancellation) ends them unfinished."""
        return SpanBatch(self, usages)

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

    def count_decisions(self, verdicts: Sequence[Verdict], elapsed_s: float) -> None:
        """Count a batch's decisions and record its latency once: the latency histogram counts
        Check calls and stream batches, each decision of a batch having waited the same
        time."""
        counts = self._counts
        for v in verdicts:
            key = (v.decision, v.reason, v.degraded)
            counts[key] = counts.get(key, 0) + 1
        if verdicts:
            self._latency.record(elapsed_s)

    def count_invalid(self) -> None:
        key = (Decision.DENY, Reason.INVALID_USAGE, False)
        self._counts[key] = self._counts.get(key, 0) + 1

    def store_latency(self, seconds: float) -> None:
        self._store_latency.record(seconds)

    def loop_late(self) -> None:
        self._loop_late.add(1)

    def store_error(self) -> None:
        self._store_errors.add(1)


@dataclasses.dataclass
class TelemetrySetup:
    """What :func:`setup` built; :meth:`shutdown` flushes exporters on exit."""

    telemetry: Telemetry
    providers: list[Any]

    def shutdown(self) -> None:
        for p in self.providers:
            try:
                p.shutdown()
            except Exception:  # an exporter failing at exit must not hide the real exit
                log.exception("telemetry shutdown failed")


def setup(
    *, otel: str = "", metrics_port: int = 0, metrics_host: str = "127.0.0.1"
) -> TelemetrySetup:
    """SDK providers configured by ``OTEL_*`` variables.

    ``otel`` (``none``, ``console``, ``otlp``) sets the traces and metrics exporters when the
    ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER`` variables do not. The sampler is the
    SDK's (``OTEL_TRACES_SAMPLER``, default parent-based always-on: every decision is
    recorded) when a trace exporter is configured. With no trace exporter and no
    ``OTEL_TRACES_SAMPLER``, nothing is sampled: a recorded span would go nowhere, and
    recording one per decision costs more CPU than deciding it. ``metrics_port`` serves a
    Prometheus scrape endpoint.
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
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host)
        readers.append(PrometheusMetricReader())
        log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    # Nothing could be sampled (ALWAYS_OFF ignores the caller's flag too), or the SDK is
    # disabled: build no span objects at all.
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    tracing = sampler is not ALWAYS_OFF and not disabled
    return TelemetrySetup(
        Telemetry(tracer_provider, meter_provider, tracing=tracing),
        [tracer_provider, meter_provider],
    )


def _exporters(variable: str, default: str) -> list[str]:
    names = [n.strip() for n in os.environ.get(variable, default or "none").split(",")]
    for n in names:
        if n not in ("otlp", "console", "none", ""):
            log.warning("%s=%s is not supported; use otlp, console or none", variable, n)
    return [n for n in names if n in ("otlp", "console")]
