"""The Grafana dashboard against a real Prometheus scraping a live gateway under load.

A gateway with two worker processes announces each worker's scrape endpoint in
``<data_dir>/metrics/*.json``; a real Prometheus (Debian's package: ``make prometheus``),
started here on a free port, finds them through ``file_sd`` and scrapes them every second.
Before any traffic every metric is there at zero; then Checks and a report stream of several
tenants (allowed, throttled, denied) run, and every PromQL expression of
``dashboards/chargepath.json`` is evaluated through Prometheus' HTTP API: each must return
data, with exactly the labels its legend names.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from chargepath.store.embedded import free_port
from chargepath.telemetry import LATENCY_BUCKETS_S, OTHER_TENANTS
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import DEMO_PLANS, ROOT, GatewayProcess, start_gateway

DASHBOARD = ROOT / "dashboards" / "chargepath.json"
#: What Grafana would put in for the dashboard's variables: every tenant, and a rate window of
#: a few scrapes (Prometheus scrapes every second here).
VARIABLES = {"$__rate_interval": "15s", "$tenant": ".*"}
TOP_TENANTS = 2
#: the demo's two tenants, one more on the CPaaS plan, and one the policy does not know
TENANTS = {"cpaas-demo", "cpaas-small", "mvno-demo", "nobody"}
LOAD_S = 8.0


# -- a real Prometheus ------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` gives now: [{"metric": labels, "value": [t, "v"]}]."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def values(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(expr)}

    def wait_for(self, expr: str, ready: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if ready(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr}: still {result} after {timeout} s\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def start_prometheus(workdir: Path, targets: str) -> Prometheus:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("no prometheus on PATH: run 'make prometheus' (Debian's package)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "chargepath",
                        "file_sd_configs": [{"files": [targets], "refresh_interval": "1s"}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{prom.log()}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return prom
        except urllib.error.HTTPError as exc:  # 503 while it starts: close its response
            exc.close()
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"prometheus not ready within 20 s:\n{prom.log()}")


# -- the gateway and its load -----------------------------------------------------------------


def two_free_ports() -> int:
    """A port p with p and p + 1 free: the metrics ports of workers 0 and 1."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, Path]]:
    plans = yaml.safe_load(DEMO_PLANS.read_text())
    plans["tenants"].append({"name": "cpaas-small", "plan": "cpaas-starter"})
    plans_path = tmp_path / "plans.yaml"
    plans_path.write_text(yaml.safe_dump(plans))
    gw = start_gateway(
        tmp_path / "gateway",
        plans=plans_path,
        workers=2,
        extra_args=("--metrics-port", str(two_free_ports())),
        env={
            "CHARGEPATH_METRICS_TOP_TENANTS": str(TOP_TENANTS),
            "CHARGEPATH_QUOTA_BURN_INTERVAL_MS": "500",
            "CHARGEPATH_LEDGER_LAG_INTERVAL_MS": "500",
        },
    )
    try:
        yield gw, tmp_path / "gateway" / "data" / "metrics"
    finally:
        code = gw.stop()
        if gw.redis is not None:
            gw.redis.stop()
        assert code == 0, gw.log()


def check(stub: pb_grpc.MeteringServiceStub, tenant: str, key: str, amount: int = 1) -> None:
    stub.Check(
        pb.CheckRequest(
            usage=pb.Usage(
                request_id=uuid.uuid4().hex,
                subject=pb.Subject(tenant=tenant, key=key),
                metric="api.sms.send",
                amount=amount,
                mode=pb.MODE_ADMIT,
            )
        ),
        timeout=5,
    )


def run_load(gw: GatewayProcess, seconds: float) -> None:
    """Several tenants at once (with the operator key), each client on its own connection (so
    spread over both workers): cpaas-demo's Checks on three keys, fast enough to be throttled
    by the keys' buckets (20, 10/s), and now and then one larger than a bucket (DENY); a
    report stream of mvno-demo's slice past its rate (THROTTLE); a few Checks of cpaas-small,
    and of a tenant the policy does not know (DENY NO_ENTITLEMENT)."""
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def cpaas(key: str) -> None:
        with gw.channel() as ch:
            stub = pb_grpc.MeteringServiceStub(ch)
            i = 0
            while time.monotonic() < stop:
                check(stub, "cpaas-demo", key, amount=21 if i % 25 == 24 else 1)
                i += 1
                time.sleep(0.004)

    def small() -> None:
        with gw.channel() as ch:
            stub = pb_grpc.MeteringServiceStub(ch)
            for _ in range(5):
                check(stub, "nobody", "k")
            i = 0
            while time.monotonic() < stop:
                check(stub, "cpaas-small", f"s{i % 4}")
                i += 1
                time.sleep(0.1)

    def mvno() -> None:
        def batches() -> Iterator[pb.StreamUsageRequest]:
            while time.monotonic() < stop:
                yield pb.StreamUsageRequest(
                    usages=[
                        pb.Usage(
                            request_id=uuid.uuid4().hex,
                            subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
                            metric="slice.bytes",
                            amount=30_000_000,
                            mode=pb.MODE_REPORT,
                        )
                        for _ in range(20)
                    ]
                )
                time.sleep(0.05)

        with gw.channel() as ch:
            for _ in pb_grpc.MeteringServiceStub(ch).StreamUsage(batches(), timeout=seconds + 10):
                pass

    def guarded(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(cpaas, f"k{i}")) for i in range(3)]
    threads += [threading.Thread(target=guarded, args=(f,)) for f in (small, mvno)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 20)
    assert not errors, errors


# -- the dashboard ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    panel: str
    expr: str
    #: the labels each series must carry: the ones the legend names
    labels: frozenset[str]


def dashboard_targets() -> list[Target]:
    """Every query of every panel (rows included), with the dashboard's variables put in as
    Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        panels += [p, *p.get("panels", [])]
    out = []
    for p in panels:
        for t in p.get("targets", []):
            expr = t["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{p['title']}: a variable the test does not know: {expr}"
            labels = frozenset(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            out.append(Target(p["title"], expr, labels))
    return out


def by(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"][label]: float(r["value"][1]) for r in result}


def test_every_dashboard_query_returns_data_with_its_labels_from_a_live_gateway(
    gateway: tuple[GatewayProcess, Path], tmp_path: Path
) -> None:
    # Bounded: every wait below has a timeout; about 30 s in all on a busy two-core machine.
    gw, targets_dir = gateway
    # every worker announces its endpoint as a file_sd target (the gateway is SERVING once one
    # worker is; the other may still be starting)
    deadline = time.monotonic() + 20
    while len(list(targets_dir.glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    announced = sorted(
        json.loads(p.read_text())[0]["labels"]["worker"] for p in targets_dir.glob("*.json")
    )
    assert announced == ["0", "1"]
    prom = start_prometheus(tmp_path / "prometheus", str(targets_dir / "*.json"))
    try:
        up = prom.wait_for('up{job="chargepath"} == 1', lambda r: len(r) == 2)
        assert {r["metric"]["worker"] for r in up} == {"0", "1"}

        # before any traffic: every metric is there, at zero
        prom.wait_for("chargepath_decision_duration_seconds_count == 0", lambda r: len(r) == 2)
        zero = prom.values('chargepath_decisions_total{decision="ALLOW",reason="OK"}')
        assert len(zero) == 2 and set(zero.values()) == {0.0}
        for name in (
            "chargepath_decisions_degraded_total",
            "chargepath_store_errors_total",
            "chargepath_store_duration_seconds_count",
            "chargepath_streams_open",
        ):
            assert set(prom.values(name).values()) == {0.0}, name
        # the policy's tenants, by name, hold the two labels before they decide anything
        at_start = prom.values("sum by (tenant) (chargepath_tenant_decisions_total)")
        assert at_start == {
            (("tenant", "cpaas-demo"),): 0.0,
            (("tenant", "cpaas-small"),): 0.0,
            (("tenant", OTHER_TENANTS),): 0.0,
        }
        quota = prom.wait_for(
            'chargepath_quota_used{tenant="cpaas-demo",limit="sms-monthly"}',
            lambda r: len(r) == 2,
        )
        assert {float(r["value"][1]) for r in quota} == {0.0}

        billing = redis.Redis.from_url(gw.redis_url)
        billing.xgroup_create("cp:{cpaas-demo}:ledger", "billing", id="0", mkstream=True)
        billing.close()
        run_load(gw, LOAD_S)
        time.sleep(3)  # a few scrapes after the last decision

        for target in dashboard_targets():
            result = prom.query(target.expr)
            assert result, f"{target.panel}: no data for {target.expr}"
            for series in result:
                labels = set(series["metric"])
                assert labels == target.labels, (target.panel, target.expr, series)

        # what the panels show is the load that ran
        targets = {t.expr: t for t in dashboard_targets()}
        outcomes = {
            (r["metric"]["decision"], r["metric"]["reason"]): float(r["value"][1])
            for r in prom.query(next(e for e in targets if "by (decision, reason)" in e))
        }
        for outcome in (
            ("ALLOW", "OK"),
            ("THROTTLE", "RATE_LIMITED"),
            ("DENY", "AMOUNT_EXCEEDS_CAPACITY"),
            ("DENY", "NO_ENTITLEMENT"),
        ):
            assert outcomes.get(outcome, 0) > 0, (outcome, outcomes)

        tenant_expr = next(e for e in targets if "by (tenant, decision)" in e)
        tenants = {r["metric"]["tenant"] for r in prom.query(tenant_expr)}
        assert {"cpaas-demo", "mvno-demo", OTHER_TENANTS} <= tenants <= TENANTS | {OTHER_TENANTS}
        # the cap: each worker labels at most TOP_TENANTS tenants
        per_worker = prom.values(
            "count by (instance) (count by (instance, tenant) "
            f'(chargepath_tenant_decisions_total{{tenant!="{OTHER_TENANTS}"}}))'
        )
        assert len(per_worker) == 2 and max(per_worker.values()) <= TOP_TENANTS

        for q in ("0.5", "0.99"):
            for name in ("decision", "store"):
                expr = next(
                    e for e in targets if f"histogram_quantile({q}," in e and f"_{name}_" in e
                )
                (latency,) = prom.query(expr)
                value = float(latency["value"][1])
                # Interpolated inside the buckets, below the largest bound. With the SDK's
                # default bounds (0, 5, 10, ... meant for milliseconds) on a metric in seconds,
                # everything is in (0, 5]: the median reads 2.5 and p99 4.95, whatever the
                # latency. A store call may take less than the first bound (0.5 ms) on a fast
                # machine; the p99 of decisions under this load does not.
                assert 0 < value < LATENCY_BUCKETS_S[-1], (expr, value)
                if name == "decision" and q == "0.99":
                    assert value > LATENCY_BUCKETS_S[0], (expr, value)

        # a share (a store call may time out on a busy test machine, so not necessarily 0)
        degraded = prom.query(next(e for e in targets if "decisions_degraded_total" in e))
        assert len(degraded) == 1 and 0 <= float(degraded[0]["value"][1]) <= 1

        throttled = by(prom.query(next(e for e in targets if 'decision!="ALLOW"' in e)), "tenant")
        assert throttled["cpaas-demo"] > 0

        lag = prom.query(next(e for e in targets if "chargepath_ledger_lag" in e))
        assert sum(float(r["value"][1]) for r in lag if r["metric"]["group"] == "billing") > 0

        burn = {
            (r["metric"]["tenant"], r["metric"]["limit"]): float(r["value"][1])
            for r in prom.query(next(e for e in targets if "/ max by (tenant, limit)" in e))
        }
        assert 0 < burn[("cpaas-demo", "sms-monthly")] < 1
        assert burn[("cpaas-demo", "voice-daily")] == 0
        exhaustion = {
            (r["metric"]["tenant"], r["metric"]["limit"]): float(r["value"][1])
            for r in prom.query(next(e for e in targets if "deriv(" in e))
        }
        # only quotas being used have a time to exhaustion
        assert exhaustion[("cpaas-demo", "sms-monthly")] > 0
        assert ("cpaas-demo", "voice-daily") not in exhaustion

        # the tenant variable's values (label_values(...) is Grafana's, not PromQL)
        variable = json.loads(DASHBOARD.read_text())["templating"]["list"][1]["definition"]
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable).groups()  # type: ignore[union-attr]
        values = prom.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
        assert {"cpaas-demo", OTHER_TENANTS} <= set(values)
    finally:
        prom.process.terminate()
        prom.process.wait(10)
