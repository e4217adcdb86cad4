"""OpenTelemetry for decisions: a span per decision, metrics by outcome, store latency.

Only the API is used here; :func:`configure` installs the SDK providers from the standard
``OTEL_*`` variables. Span attributes are low-cardinality and never carry a request body, a
label value or a credential.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind

from chargepath.core.model import Usage, Verdict

log = logging.getLogger("chargepath.telemetry")


class SpanBatch:
    """Open decision spans for a batch; :meth:`finish` closes them with their verdicts."""

    def __init__(self, telemetry: Telemetry, usages: Sequence[Usage]) -> None:
        self._t = telemetry
        self._started = time.perf_counter()
        tracer = telemetry.tracer
        self.spans: list[Span] = [
            tracer.start_span(
                "chargepath.decide",
                kind=SpanKind.INTERNAL,
                attributes={
                    "chargepath.tenant": u.subject.tenant,
                    "chargepath.metric": u.metric,
                    "chargepath.mode": "report" if u.mode == 2 else "admit",
                    "chargepath.amount": u.amount,
                    "chargepath.slice": u.subject.slice,
                },
            )
            for u in usages
        ]

    def finish(self, verdicts: list[Verdict]) -> list[Verdict]:
        elapsed = time.perf_counter() - self._started
        out = []
        for span, v in zip(self.spans, verdicts, strict=True):
            ctx = span.get_span_context()
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
            if ctx.is_valid:
                v = dataclasses.replace(v, trace_id=f"{ctx.trace_id:032x}")
            self._t.count_decision(v, elapsed)
            out.append(v)
        self.spans = []
        return out

    def abort(self) -> None:
        for span in self.spans:
            span.end()


class Telemetry:
    """The process's tracer and instruments."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("chargepath")
        meter = metrics.get_meter("chargepath")
        self._decisions = meter.create_counter(
            "chargepath.decisions", unit="{decision}", description="Decisions by outcome and reason"
        )
        self._latency = meter.create_histogram(
            "chargepath.decision.duration", unit="s", description="Time to decide a batch"
        )
        self._store_latency = meter.create_histogram(
            "chargepath.store.duration", unit="s", description="Time of one store call"
        )
        self._store_errors = meter.create_counter(
            "chargepath.store.errors", unit="{error}", description="Store calls that failed"
        )
        self.open_streams = meter.create_up_down_counter(
            "chargepath.streams.open", unit="{stream}", description="Open StreamUsage streams"
        )

    @contextmanager
    def decision_spans(self, usages: Sequence[Usage]) -> Iterator[SpanBatch]:
        batch = SpanBatch(self, usages)
        try:
            yield batch
        finally:
            batch.abort()

    def count_decision(self, v: Verdict, elapsed_s: float) -> None:
        self._decisions.add(
            1,
            {
                "decision": v.decision.name,
                "reason": v.reason.name,
                "degraded": v.degraded,
            },
        )
        self._latency.record(elapsed_s)

    def count_invalid(self) -> None:
        self._decisions.add(1, {"decision": "DENY", "reason": "INVALID_USAGE", "degraded": False})

    def store_latency(self, seconds: float) -> None:
        self._store_latency.record(seconds)

    def store_error(self) -> None:
        self._store_errors.add(1)


def configure(service_name: str = "chargepath") -> None:
    """Install the SDK tracer and meter providers, configured by the standard ``OTEL_*``
    variables. Without an exporter configured, decisions are still recorded as spans (so
    verdicts carry trace ids) but nothing leaves the process."""
    import os

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    exporter_names = os.environ.get("OTEL_TRACES_EXPORTER", "none")
    for name in (n.strip() for n in exporter_names.split(",")):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name not in ("none", ""):
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported; use otlp, console or none", name)
    trace.set_tracer_provider(provider)
