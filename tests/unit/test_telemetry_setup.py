"""Which sampler :func:`chargepath.telemetry.setup` picks from the ``OTEL_*`` variables."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

from chargepath import telemetry


def sampler_of(monkeypatch: pytest.MonkeyPatch, otel: str, **env: str) -> object:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    built = telemetry.setup(otel=otel)
    try:
        provider = built.telemetry.tracer_provider
        assert isinstance(provider, TracerProvider)
        return provider.sampler
    finally:
        built.shutdown()


def test_without_a_trace_exporter_nothing_is_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sampler_of(monkeypatch, "") is ALWAYS_OFF
    assert sampler_of(monkeypatch, "none") is ALWAYS_OFF


def test_with_an_exporter_the_sdk_default_records_every_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sampler = sampler_of(monkeypatch, "console")
    assert isinstance(sampler, ParentBased)
    assert "AlwaysOnSampler" in sampler.get_description()
    sampler = sampler_of(monkeypatch, "", OTEL_TRACES_EXPORTER="console")
    assert isinstance(sampler, ParentBased)


def test_an_explicit_sampler_is_kept_even_without_an_exporter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sampler = sampler_of(
        monkeypatch, "", OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.25"
    )
    assert isinstance(sampler, TraceIdRatioBased) and sampler.rate == 0.25


def tracing_of(monkeypatch: pytest.MonkeyPatch, otel: str, **env: str) -> bool:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_TRACES_SAMPLER",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    built = telemetry.setup(otel=otel)
    try:
        return built.telemetry.tracing
    finally:
        built.shutdown()


def test_span_objects_are_built_only_when_a_span_could_be_sampled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no exporter, no sampler: nothing could be sampled, so no span object at all
    assert tracing_of(monkeypatch, "") is False
    assert tracing_of(monkeypatch, "console") is True
    # a sampler named explicitly is the user's choice: spans are built for it
    assert tracing_of(monkeypatch, "", OTEL_TRACES_SAMPLER="always_on") is True
    assert tracing_of(monkeypatch, "console", OTEL_SDK_DISABLED="true") is False
