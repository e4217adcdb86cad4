"""Telemetry leaves the process: OTLP/gRPC to a real receiver, and a Prometheus scrape."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import redis
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from chargepath.store.embedded import free_port
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway


class Collector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """A minimal OTLP/gRPC receiver: keeps what it is sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, dict[str, object]]] = []
        self.resource: dict[str, object] = {}
        self.metric_names: set[str] = set()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    self.resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            attrs = {a.key: a.value for a in s.attributes}
                            self.spans.append((s.name, attrs))
                return trace_service_pb2.ExportTraceServiceResponse()
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metric_names |= {m.name for m in sm.metrics}
            return metrics_service_pb2.ExportMetricsServiceResponse()


def check(gw: GatewayProcess, n: int, amount: int = 1) -> list[pb.Verdict]:
    with gw.channel() as ch:
        stub = pb_grpc.MeteringServiceStub(ch)
        return [
            stub.Check(
                pb.CheckRequest(
                    usage=pb.Usage(
                        request_id=str(uuid.uuid4()),
                        subject=pb.Subject(tenant="cpaas-demo", key="k-otel"),
                        metric="api.sms.send",
                        amount=amount,
                        mode=pb.MODE_ADMIT,
                    )
                ),
                timeout=5,
            ).verdict
            for _ in range(n)
        ]


def test_otlp_export_to_a_real_receiver_configured_only_by_otel_variables(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_SERVICE_NAME": "chargepath-under-test",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    gw = start_gateway(tmp_path, env=env)
    try:
        verdicts = check(gw, 5)
        # the decisions counter is exported (at zero) from the start; the latency histograms
        # only once a decision was timed: wait for the export that has them
        expected = {
            "chargepath.decisions",
            "chargepath.decision.duration",
            "chargepath.store.duration",
        }
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with collector.lock:
                decides = [a for name, a in collector.spans if name == "chargepath.decide"]
                if len(decides) >= 5 and expected <= collector.metric_names:
                    break
            time.sleep(0.1)
        assert len(decides) == 5
        assert {a["chargepath.decision"].string_value for a in decides} == {"ALLOW"}
        assert collector.resource["service.name"] == "chargepath-under-test"
        assert expected <= collector.metric_names
        assert all(len(v.trace_id) == 32 for v in verdicts)
        names = {name for name, _ in collector.spans}
        assert "chargepath.store.decide" in names
    finally:
        assert gw.stop() == 0
        if gw.redis:
            gw.redis.stop()
        server.stop(0)


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r"chargepath_decisions_total\{(.*)\} ([0-9.e+]+)$", line)
        if m and float(m.group(2)):  # every known outcome is also there at 0
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[f"{labels['decision']}/{labels['reason']}"] = float(m.group(2))
    return out


def test_prometheus_counters_equal_the_decisions_made(tmp_path: Path) -> None:
    port = free_port()
    gw = start_gateway(
        tmp_path,
        extra_args=("--metrics-port", str(port)),
        env={"CHARGEPATH_LEDGER_LAG_INTERVAL_MS": "200"},
    )
    try:
        raw = redis.Redis.from_url(gw.redis_url)
        raw.xgroup_create("cp:{cpaas-demo}:ledger", "billing", id="0", mkstream=True)
        # key-scoped bucket: capacity 20, so 25 admits of 1 give 20 ALLOW then THROTTLEs (the
        # bucket refills 10/s, so a few more may be allowed on a slow machine)
        verdicts = check(gw, 25)
        verdicts += check(gw, 2, amount=21)  # larger than the bucket: DENY
        counts: dict[str, float] = {}
        for v in verdicts:
            key = f"{pb.Decision.Name(v.decision)[9:]}/{pb.Reason.Name(v.reason)[7:]}"
            counts[key] = counts.get(key, 0) + 1
        assert counts["DENY/AMOUNT_EXCEEDS_CAPACITY"] == 2 and "THROTTLE/RATE_LIMITED" in counts
        assert scrape(port) == counts
        # the ledger lag gauge: every allowed admit is an entry billing has not acknowledged
        allowed = counts.get("ALLOW/OK", 0)
        deadline = time.monotonic() + 5
        lag = None
        while time.monotonic() < deadline and lag != allowed:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            m = re.search(
                rb'chargepath_ledger_lag\{[^}]*group="billing"[^}]*tenant="cpaas-demo"[^}]*\} '
                rb"([0-9.e+]+)",
                body,
            )
            lag = float(m.group(1)) if m else None
            time.sleep(0.2)
        assert lag == allowed
        raw.close()
    finally:
        assert gw.stop() == 0
        if gw.redis:
            gw.redis.stop()
