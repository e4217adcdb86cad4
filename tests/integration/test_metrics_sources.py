"""Where the metrics come from: the quota burn job reads a real Redis, and each gateway process
announces its Prometheus endpoint as a ``file_sd`` target and serves every metric from the
start."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from chargepath import telemetry
from chargepath.core.model import Decision, Mode, Subject, Usage
from chargepath.jobs import QuotaBurn
from chargepath.settings import Settings
from chargepath.store.admin import AdminStore
from chargepath.store.embedded import free_port
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import QuotaLevel, Telemetry
from tests.conftest import make_engine

POLICY = """
metrics:
  - {name: api.sms.send, unit: message}
plans:
  - name: p
    limits:
      - {name: sms-monthly, metric: api.sms.send, scope: tenant, quota: {amount: 100, per: month}}
      - {name: sms-daily-per-key, metric: api.sms.send, scope: key, quota: {amount: 50, per: day}}
      - name: sms-rate
        metric: api.sms.send
        scope: tenant
        rate: {capacity: 1000, refill: 1000, per: second}
tenants:
  - {name: busy, plan: p}
  - {name: quiet, plan: p}
  - {name: idle, plan: p}
"""


def usage(tenant: str, amount: int) -> Usage:
    return Usage(
        f"r-{tenant}-{amount}", Subject(tenant, key="k"), "api.sms.send", amount, Mode.ADMIT
    )


async def test_quota_burn_reads_the_tenant_scope_quotas_of_the_labelled_tenants(
    store: RedisStore,
) -> None:
    engine = await make_engine(store, POLICY)
    reader = InMemoryMetricReader()
    t = Telemetry(
        TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False, top_tenants=2
    )
    engine.telemetry = t  # the engine counts its decisions: busy 3, quiet 1, idle none
    for i in range(3):
        assert (await engine.check(usage("busy", 10 + i))).decision is Decision.ALLOW
    assert (await engine.check(usage("quiet", 5))).decision is Decision.ALLOW
    state = AdminStore(store)
    limits = engine.policy.resolve(Subject("busy"), "api.sms.send").limits
    (monthly,) = [lim for lim in limits if lim.name == "sms-monthly"]
    await state.grant(Subject("busy"), monthly, 40, 0, "")

    job = QuotaBurn(state, engine, t, period_s=0.05)
    draining = asyncio.Event()
    task = asyncio.create_task(job.run(draining))
    try:
        for _ in range(100):
            if t.quota:
                break
            await asyncio.sleep(0.02)
    finally:
        draining.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # busy and quiet decided, idle did not: with two labels, idle's quota is not read
    assert set(t.quota) == {("busy", "sms-monthly"), ("quiet", "sms-monthly")}
    busy = t.quota[("busy", "sms-monthly")]
    assert (busy.used, busy.limit) == (10 + 11 + 12, 100 + 40)
    assert 0 < busy.reset_s <= 31 * 86_400
    assert t.quota[("quiet", "sms-monthly")][:2] == (5, 100)


async def test_quota_burn_keeps_the_last_figures_when_the_store_cannot_answer(
    store: RedisStore,
) -> None:
    engine = await make_engine(store, POLICY)
    t = Telemetry(TracerProvider(), MeterProvider(), tracing=False)
    last = QuotaLevel(7, 100, 60.0)
    before = t.quota = {("busy", "sms-monthly"): last}
    broken = RedisStore.from_url("redis://127.0.0.1:1/0", connect_timeout=0.1)
    job = QuotaBurn(AdminStore(broken), engine, t, period_s=0.05)
    draining = asyncio.Event()
    task = asyncio.create_task(job.run(draining))
    await asyncio.sleep(0.5)
    assert not task.done()  # the job survives a store that cannot answer
    draining.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await broken.close()
    assert t.quota is not before  # a round ran
    assert t.quota == {("busy", "sms-monthly"): last}


def test_each_worker_announces_its_endpoint_and_serves_every_metric_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    targets = tmp_path / "metrics"
    targets.mkdir()
    (targets / "worker-3.json").write_text("[]")  # left by an earlier run with 4 workers
    port = free_port()
    settings = Settings(data_dir=str(tmp_path), metrics_port=port - 1, workers=2)
    built = telemetry.for_gateway(settings, worker=1)
    try:
        assert json.loads((targets / "worker-1.json").read_text()) == [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"worker": "1"}}
        ]
        assert (targets / "worker-3.json").exists()  # only worker 0 clears stale files
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        for name in (
            "chargepath_decisions_total",
            "chargepath_tenant_decisions_total",
            "chargepath_decision_duration_seconds_bucket",
            "chargepath_store_duration_seconds_count",
            "chargepath_store_errors_total",
            "chargepath_streams_open",
            "process_resident_memory_bytes",
        ):
            assert f"\n{name}" in body, name
        assert 'chargepath_decision_duration_seconds_bucket{le="0.0005"' in body
    finally:
        built.shutdown()
    assert not (targets / "worker-1.json").exists()
    # the endpoint left the registry with its process: a new one can be set up
    again = telemetry.for_gateway(
        Settings(data_dir=str(tmp_path), metrics_port=free_port(), workers=1), worker=0
    )
    try:
        assert sorted(p.name for p in targets.glob("*.json")) == ["worker-0.json"]
    finally:
        again.shutdown()
