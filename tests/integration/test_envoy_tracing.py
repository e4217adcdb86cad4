"""An RLS call and an RLQS report are traced and counted as a Check is: one server span (the
instrumentation does not add a second), the caller's traceparent as parent, a decision span
per descriptor with the store call below it, and the decisions counter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest_asyncio
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as rl
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from chargepath.app import Gateway
from chargepath.settings import Settings
from chargepath.store.embedded import EmbeddedRedis
from chargepath.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),)


class Traced:
    def __init__(
        self, gateway: Gateway, spans: InMemorySpanExporter, reader: InMemoryMetricReader
    ) -> None:
        self.gateway, self.spans, self.reader = gateway, spans, reader
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")

    def decisions(self) -> dict[tuple[str, str], int]:
        """The outcomes counted (every known outcome is also exported at zero: left out)."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            (str(p.attributes["decision"]), str(p.attributes["reason"])): int(p.value)  # type: ignore[index, union-attr]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == "chargepath.decisions"
            for p in m.data.data_points  # type: ignore[union-attr]
            if p.value  # type: ignore[union-attr]
        }


@pytest_asyncio.fixture
async def traced(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    # Tracing, not authentication, is under test here (tests/e2e/test_envoy.py calls the
    # Envoy services with keys).
    settings = Settings(
        port=0,
        redis_url=redis_server.url,
        plans=str(ROOT / "examples" / "plans.yaml"),
        store_timeout_ms=2000,
        auth="none",
        data_dir=str(tmp_path),  # its outage spool; not the working directory's
    )
    gateway = Gateway(settings, telemetry)
    await gateway.start()
    t = Traced(gateway, exporter, reader)
    yield t
    await t.channel.close()
    await gateway.stop()


def entries(*pairs: tuple[str, str]) -> list[rl.RateLimitDescriptor.Entry]:
    return [rl.RateLimitDescriptor.Entry(key=k, value=v) for k, v in pairs]


async def test_an_rls_call_is_traced_and_counted_as_a_check(traced: Traced) -> None:
    stub = rls_pb2_grpc.RateLimitServiceStub(traced.channel)
    request = rls_pb2.RateLimitRequest(
        domain="cpaas-edge",
        descriptors=[
            rl.RateLimitDescriptor(
                entries=entries(("tenant", "cpaas-demo"), ("api_key", "k1"), ("route", "sms-send"))
            ),
            rl.RateLimitDescriptor(entries=entries(("tenant", "cpaas-demo"), ("route", "nope"))),
        ],
        hits_addend=2,
    )
    response = await stub.ShouldRateLimit(request, metadata=TRACEPARENT)
    assert response.overall_code == rls_pb2.RateLimitResponse.OK
    spans = traced.spans.get_finished_spans()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in servers] == [
        "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    ]
    (rpc,) = servers
    assert rpc.parent is not None and f"{rpc.parent.span_id:016x}" == PARENT_SPAN
    assert dict(rpc.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "envoy.service.ratelimit.v3.RateLimitService",
        "rpc.method": "ShouldRateLimit",
        "chargepath.envoy.domain": "cpaas-edge",
    }
    # one decision (the unknown descriptor is not one), below the call, the store call below it
    (decide,) = [s for s in spans if s.name == "chargepath.decide"]
    (store,) = [s for s in spans if s.name == "chargepath.store.decide"]
    assert f"{decide.context.trace_id:032x}" == TRACE_ID
    assert decide.parent is not None and decide.parent.span_id == rpc.context.span_id
    assert store.parent is not None and store.parent.span_id == decide.context.span_id
    attrs = dict(decide.attributes or {})
    assert attrs["chargepath.tenant"] == "cpaas-demo" and attrs["chargepath.amount"] == 2
    assert (attrs["chargepath.decision"], attrs["chargepath.mode"]) == ("ALLOW", "admit")
    assert "k1" not in str(attrs)  # a key is never an attribute
    assert traced.decisions() == {("ALLOW", "OK"): 1}


async def test_each_rlqs_report_is_a_span_with_its_decisions(traced: Traced) -> None:
    stub = rlqs_pb2_grpc.RateLimitQuotaServiceStub(traced.channel)
    outbox: asyncio.Queue[rlqs_pb2.RateLimitQuotaUsageReports] = asyncio.Queue()

    async def reports() -> AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports]:
        for _ in range(2):
            yield await outbox.get()

    call = stub.StreamRateLimitQuotas(reports(), metadata=TRACEPARENT)
    bucket = {"tenant": "cpaas-demo", "api_key": "k1", "route": "sms-send"}
    for domain, allowed in (("cpaas-edge", 0), ("", 3)):
        msg = rlqs_pb2.RateLimitQuotaUsageReports(domain=domain)
        usage = msg.bucket_quota_usages.add(num_requests_allowed=allowed)
        usage.bucket_id.bucket.update(bucket)
        await outbox.put(msg)
        response = await call.read()
        (action,) = response.bucket_action
        assert action.quota_assignment_action.rate_limit_strategy.token_bucket.max_tokens >= 1
    spans = traced.spans.get_finished_spans()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in servers] == ["chargepath.StreamRateLimitQuotas.report"] * 2
    assert all(s.parent is not None and f"{s.parent.span_id:016x}" == PARENT_SPAN for s in servers)
    # first report: one admit ahead; second: 3 allowed, 1 prepaid -> a report of 2, an admit of 3
    decides = [s for s in spans if s.name == "chargepath.decide"]
    assert sorted(
        (str((s.attributes or {})["chargepath.mode"]), (s.attributes or {})["chargepath.amount"])
        for s in decides
    ) == [("admit", 1), ("admit", 3), ("report", 2)]
    assert traced.decisions() == {("ALLOW", "OK"): 3}
