"""DESIGN property 7 with in-memory exporters: a span per decision, the caller's traceparent as
parent, the store call as a child span, and the verdict's trace id equal to the span's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis
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
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Traced:
    def __init__(self, gateway: Gateway, spans: InMemorySpanExporter, reader: InMemoryMetricReader):
        self.gateway, self.spans, self.reader = gateway, spans, reader
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        self.stub = pb_grpc.MeteringServiceStub(self.channel)


@pytest_asyncio.fixture
async def traced(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    # Tracing, not authentication, is under test here (tests/e2e/test_auth.py has that).
    settings = Settings(
        port=0,
        redis_url=redis_server.url,
        plans=str(ROOT / "examples" / "plans.yaml"),
        auth="none",
        data_dir=str(tmp_path),  # its outage spool; not the working directory's
    )
    gateway = Gateway(settings, telemetry)
    await gateway.start()
    t = Traced(gateway, exporter, reader)
    yield t
    await t.channel.close()
    await gateway.stop()


def usage(tenant: str = "cpaas-demo", **kw: object) -> pb.Usage:
    base: dict[str, object] = dict(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant=tenant, key="secret-api-key"),
        metric="api.sms.send",
        amount=2,
        mode=pb.MODE_ADMIT,
        labels={"msisdn": "+46700000000"},
    )
    base.update(kw)
    return pb.Usage(**base)  # type: ignore[arg-type]


def report(amount: int = 10) -> pb.Usage:
    """A slice report of the MVNO demo tenant."""
    return usage(
        "mvno-demo",
        subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
        metric="slice.bytes",
        amount=amount,
        mode=pb.MODE_REPORT,
    )


TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),)


async def test_check_span_has_the_callers_parent_and_a_store_child(traced: Traced) -> None:
    response = await traced.stub.Check(pb.CheckRequest(usage=usage()), metadata=TRACEPARENT)
    v = response.verdict
    assert v.trace_id == TRACE_ID
    spans = {s.name: s for s in traced.spans.get_finished_spans()}
    decide, store = spans["chargepath.decide"], spans["chargepath.store.decide"]
    rpc = next(s for s in spans.values() if s.name.endswith("MeteringService/Check"))
    assert rpc.parent is not None and f"{rpc.parent.span_id:016x}" == PARENT_SPAN
    assert rpc.kind is SpanKind.SERVER and rpc.status.is_ok
    assert dict(rpc.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "chargepath.v1.MeteringService",
        "rpc.method": "Check",
    }
    assert f"{decide.context.trace_id:032x}" == TRACE_ID
    assert decide.parent is not None and decide.parent.span_id == rpc.context.span_id
    assert store.parent is not None and store.parent.span_id == decide.context.span_id
    attrs = dict(decide.attributes or {})
    assert attrs == {
        "chargepath.tenant": "cpaas-demo",
        "chargepath.slice": "",
        "chargepath.metric": "api.sms.send",
        "chargepath.mode": "admit",
        "chargepath.amount": 2,
        "chargepath.decision": "ALLOW",
        "chargepath.reason": "OK",
        "chargepath.policy_version": v.policy_version,
        "chargepath.degraded": False,
        "chargepath.replayed": False,
    }
    # no label value, no API key, no request body in any span
    for s in traced.spans.get_finished_spans():
        flat = repr(dict(s.attributes or {}))
        assert "+46700000000" not in flat and "secret-api-key" not in flat


async def test_a_refused_check_has_its_grpc_status_on_the_server_span(traced: Traced) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await traced.stub.Check(pb.CheckRequest(usage=usage(amount=0)), metadata=TRACEPARENT)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    (rpc,) = traced.spans.get_finished_spans()  # invalid: no decision, no store call
    assert rpc.name.endswith("MeteringService/Check") and not rpc.status.is_ok
    assert dict(rpc.attributes or {})["rpc.grpc.status_code"] == 3


async def test_every_item_of_a_stream_batch_has_its_own_span(traced: Traced) -> None:
    usages = [report(100 + i) for i in range(5)]
    usages.append(usage(amount=-1))  # an invalid one is answered, not traced as a decision
    call = traced.stub.StreamUsage(metadata=TRACEPARENT)
    await call.write(pb.StreamUsageRequest(usages=usages))
    response = await call.read()
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    verdicts = response.verdicts
    decides = [s for s in traced.spans.get_finished_spans() if s.name == "chargepath.decide"]
    assert len(decides) == 5
    batch = next(
        s for s in traced.spans.get_finished_spans() if s.name == "chargepath.StreamUsage.batch"
    )
    assert all(s.parent is not None and s.parent.span_id == batch.context.span_id for s in decides)
    assert {s.context.trace_id for s in decides} == {int(TRACE_ID, 16)}
    assert [dict(s.attributes or {})["chargepath.amount"] for s in decides] == [
        100,
        101,
        102,
        103,
        104,
    ]
    assert all(v.trace_id == TRACE_ID for v in verdicts[:5])
    assert verdicts[5].reason == pb.REASON_INVALID_USAGE
    # the decisions counter agrees
    data = traced.reader.get_metrics_data()
    points = [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "chargepath.decisions"
        for p in m.data.data_points  # type: ignore[union-attr]
    ]
    by = {(p.attributes["decision"], p.attributes["reason"]): p.value for p in points}  # type: ignore[index]
    assert by[("ALLOW", "OK")] == 5 and by[("DENY", "INVALID_USAGE")] == 1


async def test_a_batch_the_caller_did_not_sample_records_no_span(traced: Traced) -> None:
    """Decision spans follow their batch's sampling: under an unsampled traceparent (flags
    00) nothing is recorded, the verdicts carry no trace id, and the decisions still count."""
    unsampled = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-00"),)
    usages = [report() for _ in range(3)]
    call = traced.stub.StreamUsage(metadata=unsampled)
    await call.write(pb.StreamUsageRequest(usages=usages))
    response = await call.read()
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert [v.decision for v in response.verdicts] == [pb.DECISION_ALLOW] * 3
    assert all(v.trace_id == "" for v in response.verdicts)
    assert traced.spans.get_finished_spans() == ()
    data = traced.reader.get_metrics_data()
    counted = sum(
        p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "chargepath.decisions"
        for p in m.data.data_points  # type: ignore[union-attr]
    )
    assert counted == 3


async def test_with_tracing_off_no_span_is_built_and_decisions_still_count(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """``Telemetry(tracing=False)`` (what setup() gives when nothing could be sampled): no
    span reaches even a processor that is attached, a sampled caller included, the verdicts
    carry no trace id, and the decisions counter still counts every decision."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]), tracing=False)
    # Tracing, not authentication, is under test here (tests/e2e/test_auth.py has that).
    settings = Settings(
        port=0,
        redis_url=redis_server.url,
        plans=str(ROOT / "examples" / "plans.yaml"),
        auth="none",
        data_dir=str(tmp_path),  # its outage spool; not the working directory's
    )
    gateway = Gateway(settings, telemetry)
    await gateway.start()
    t = Traced(gateway, exporter, reader)
    try:
        checked = await t.stub.Check(pb.CheckRequest(usage=usage()), metadata=TRACEPARENT)
        call = t.stub.StreamUsage(metadata=TRACEPARENT)
        await call.write(
            pb.StreamUsageRequest(
                usages=[report(), usage(metric="")]  # the second is invalid: DENY INVALID_USAGE
            )
        )
        streamed = await call.read()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    finally:
        await t.channel.close()
        await gateway.stop()
    assert checked.verdict.decision == pb.DECISION_ALLOW and checked.verdict.trace_id == ""
    assert [v.reason for v in streamed.verdicts] == [pb.REASON_OK, pb.REASON_INVALID_USAGE]
    assert all(v.trace_id == "" for v in streamed.verdicts)
    assert exporter.get_finished_spans() == ()
    data = reader.get_metrics_data()
    by = {
        (m.name, tuple(sorted(p.attributes.items()))): p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name.startswith("chargepath.decisions")
        for p in m.data.data_points  # type: ignore[union-attr]
    }
    allow = ("chargepath.decisions", (("decision", "ALLOW"), ("degraded", False), ("reason", "OK")))
    invalid = (
        "chargepath.decisions",
        (("decision", "DENY"), ("degraded", False), ("reason", "INVALID_USAGE")),
    )
    # every other known outcome is there too, at zero
    assert {k: v for k, v in by.items() if v} == {allow: 2, invalid: 1}


async def test_the_instrumentation_traces_other_services_and_not_the_metering_ones(
    traced: Traced,
) -> None:
    """The OpenTelemetry gRPC instrumentation (behind transport.tracing.InstrumentedServices)
    makes the server span of a health (or admin) call, child of the caller's traceparent; a
    Check has only the span its servicer makes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(traced.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), metadata=TRACEPARENT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    (rpc,) = traced.spans.get_finished_spans()
    assert rpc.name == "/grpc.health.v1.Health/Check" and rpc.kind is SpanKind.SERVER
    assert rpc.parent is not None and f"{rpc.parent.span_id:016x}" == PARENT_SPAN
    traced.spans.clear()
    await traced.stub.Check(pb.CheckRequest(usage=usage()), metadata=TRACEPARENT)
    servers = [s for s in traced.spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert [s.name for s in servers] == ["chargepath.v1.MeteringService/Check"]
