"""Quota leases on a live gateway (``chargepath serve``, auth on), driven over gRPC with raw
LeaseService stubs: validation and refusals, the exactness of eight holders in four processes
on one bucket (with the under-admission measured), and a holder SIGKILLed whose units come back
at expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from chargepath.store.ledger import LedgerEntry
from chargepath.store.redis_store import ledger_key
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import keys_pb2_grpc as kpb_grpc
from chargepath_protos.v1 import lease_pb2 as lpb
from chargepath_protos.v1 import lease_pb2_grpc as lpb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from tests.e2e.conftest import ROOT, GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

TENANT = "lessee"
OTHER = "neighbour"
#: the exactness test's own tenant: no lease granted before its window is refunded inside it
EXACT = "exact"
CAPACITY = 200
REFILL = 100  # per second

PLANS = f"""\
metrics:
  - name: api.sms.send
  - name: api.mms.send
  - name: api.voice.minutes
plans:
  - name: leased
    limits:
      - name: burst
        metric: api.sms.send
        rate: {{ capacity: {CAPACITY}, refill: {REFILL} }}
        lease: {{ max_units: 50, max_share_pct: 25, validity: 2s }}
      - name: minutes
        metric: api.voice.minutes
        quota: {{ amount: 1000, per: month }}
        lease: {{ max_units: 100, max_share_pct: 100, validity: 1s }}
      - name: mms
        metric: api.mms.send
        rate: {{ capacity: 10, refill: 1 }}
tenants:
  - name: {TENANT}
    plan: leased
  - name: {OTHER}
    plan: leased
  - name: {EXACT}
    plan: leased
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("leases")
    plans = work / "plans.yaml"
    plans.write_text(PLANS)
    gw = start_gateway(work, plans=plans, workers=2)
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


def create_meter_key(gateway: GatewayProcess, tenant: str) -> str:
    with gateway.channel() as ch:
        stub = kpb_grpc.KeyServiceStub(ch)
        request = kpb.CreateKeyRequest(tenant=tenant, role=kpb.ROLE_METER)
        return str(stub.CreateKey(request, timeout=5).secret_key)


@pytest.fixture(scope="module")
def meter_key(gateway: GatewayProcess) -> str:
    return create_meter_key(gateway, TENANT)


def ask(**kw: Any) -> lpb.LeaseAsk:
    fields: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "subject": pb.Subject(tenant=TENANT),
        "metric": "api.sms.send",
        "requested": 10,
    }
    fields.update(kw)
    return lpb.LeaseAsk(**fields)


def lease(gateway: GatewayProcess, key: str, a: lpb.LeaseAsk) -> lpb.LeaseAnswer:
    with gateway.channel(key) as ch:
        return lpb_grpc.LeaseServiceStub(ch).Lease(lpb.LeaseRequest(ask=a), timeout=5).answer


def ledger(url: str, tenant: str) -> list[LedgerEntry]:
    with redis.Redis.from_url(url, decode_responses=True) as client:
        entries: Any = client.xrange(ledger_key(tenant))
    return [LedgerEntry.from_fields(i, f) for i, f in entries]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"request_id": ""}, "ask.request_id"),
        ({"subject": pb.Subject(tenant="")}, "ask.subject.tenant"),
        ({"subject": pb.Subject(tenant=TENANT, slice="a b")}, "ask.subject.slice"),
        ({"subject": pb.Subject(tenant=TENANT, key="k" * 129)}, "ask.subject.key"),
        ({"metric": "No.Such"}, "ask.metric"),
        ({"metric": "api.unknown"}, "ask.metric"),
        ({"lease_id": "bad id!"}, "ask.lease_id"),
        ({"requested": -1}, "ask.requested"),
        ({"requested": 0}, "ask.requested"),
        ({"used": -5, "lease_id": "abc"}, "ask.used"),
        ({"used": 3}, "ask.used"),
        ({"release": True}, "ask.release"),
        ({"labels": {f"k{i}": "v" for i in range(17)}}, "ask.labels"),
        ({"holder": "has space"}, "ask.holder"),
    ],
)
def test_lease_refuses_each_bad_field(
    gateway: GatewayProcess, changes: dict[str, Any], field: str
) -> None:
    # the operator acts for every tenant (a meter key is refused an empty tenant before
    # validation: PERMISSION_DENIED, as on Check)
    with pytest.raises(grpc.RpcError) as err:
        lease(gateway, gateway.operator_key, ask(**changes))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert field in err.value.details(), err.value.details()  # type: ignore[attr-defined]
    assert "Traceback" not in err.value.details()  # type: ignore[attr-defined]


def test_a_stream_answers_bad_asks_in_place_and_goes_on(
    gateway: GatewayProcess, meter_key: str
) -> None:
    batches = [
        lpb.LeaseStreamRequest(asks=[ask(requested=-1), ask(requested=5)]),
        lpb.LeaseStreamRequest(
            asks=[ask(subject=pb.Subject(tenant=OTHER)), ask(metric="api.mms.send")]
        ),
    ]
    with gateway.channel(meter_key) as ch:
        replies = list(lpb_grpc.LeaseServiceStub(ch).LeaseStream(iter(batches), timeout=10))
    first, second = (list(r.answers) for r in replies)
    assert first[0].reason == pb.REASON_INVALID_USAGE
    assert [v.field for v in first[0].violations] == ["requested"]
    assert (first[1].decision, first[1].granted) == (pb.DECISION_ALLOW, 5)
    # another tenant's lease: refused in place, nothing done
    assert (second[0].decision, second[0].reason) == (pb.DECISION_DENY, pb.REASON_PERMISSION_DENIED)
    # a limit without lease settings
    assert second[1].reason == pb.REASON_NO_ENTITLEMENT and "'mms'" in second[1].message


def test_callers_who_must_be_refused(gateway: GatewayProcess, meter_key: str) -> None:
    with gateway.raw_channel() as ch, pytest.raises(grpc.RpcError) as err:
        lpb_grpc.LeaseServiceStub(ch).Lease(lpb.LeaseRequest(ask=ask()), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as err:
        lease(gateway, meter_key, ask(subject=pb.Subject(tenant=OTHER)))
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert not [e for e in ledger(gateway.redis_url, OTHER) if e.mode == "lease"]


def _holder_process(
    gateway: GatewayProcess, key: str, tmp: Path, name: str, tenant: str = TENANT, **cfg: Any
) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"{name}.json"
    config = tmp / f"{name}.config.json"
    config.write_text(
        json.dumps(
            {
                "address": gateway.address,
                "key": key,
                "tenant": tenant,
                "metric": "api.sms.send",
                "name": name,
                "out": str(out),
                **cfg,
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.lease_holder", str(config)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    return proc, out


def test_eight_holders_in_four_processes_never_overspend(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """Over the window from the first grant to the last release (on Redis' clock), the units
    spent never exceed capacity + refill x window. (The bound holds for units taken in the
    window: a lease granted before it and refunded inside it would add its units back, which
    is why this test has a tenant of its own.)"""
    key = create_meter_key(gateway, EXACT)
    seconds = 4.0
    procs = [
        _holder_process(
            gateway, key, tmp_path, f"p{n}", EXACT, holders=2, seconds=seconds, rate=400, want=50
        )
        for n in range(4)
    ]
    # Under-admission: what open leases hold unspent while others may wait, sampled from state.
    idle: list[int] = []
    with gateway.channel() as ch:
        admin = apb_grpc.AdminServiceStub(ch)
        while any(p.poll() is None for p, _ in procs):
            s = admin.GetState(apb.GetStateRequest(subject=pb.Subject(tenant=EXACT)), timeout=5)
            idle.append(sum(ls.available for ls in s.leases if ls.metric == "api.sms.send"))
            time.sleep(0.05)
    for p, _ in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode(errors="replace")
    holders = [h for _, out in procs for h in json.loads(out.read_text())]
    assert len(holders) == 8
    spent = sum(h["spent"] for h in holders)
    reported = sum(h["reported"] for h in holders)
    assert spent == reported
    times = [t for h in holders for t in h["decided_at"]]
    window_ms = max(times) - min(times)  # first grant to last release, on Redis' clock
    ceiling = CAPACITY + REFILL * window_ms // 1000 + 1
    assert spent <= ceiling, (spent, ceiling)
    assert sum(h["overage"] for h in holders) == 0  # nobody spent past a grant
    entries = [e for e in ledger(gateway.redis_url, EXACT) if e.mode == "lease"]
    mine = {rid for h in holders for rid in h["request_ids"]}
    ours = [e for e in entries if e.request_id in mine]
    assert sum(e.amount for e in ours) == reported
    assert len({e.request_id for e in ours}) == len(ours)  # no request id twice
    # every holder got units; the bucket, not the holders, was the bottleneck
    assert all(h["granted"] > 0 for h in holders)
    assert sum(h["refused"] for h in holders) > 0
    bound = 8 * 50  # at most every holder's largest grant idle at once
    figures = {
        "spent": spent,
        "ceiling": ceiling,
        "window_ms": window_ms,
        "under_admission_units": ceiling - spent,
        "idle_max": max(idle),
        "idle_mean": round(sum(idle) / len(idle), 1),
        "idle_bound": bound,
        "samples": len(idle),
    }
    print("LEASE EXACTNESS", json.dumps(figures))
    assert max(idle) <= bound


def test_a_holder_killed_gets_its_units_back_at_expiry(
    gateway: GatewayProcess, meter_key: str, tmp_path: Path
) -> None:
    def minutes_left() -> tuple[int, int]:
        with gateway.channel() as ch:
            s = apb_grpc.AdminServiceStub(ch).GetState(
                apb.GetStateRequest(subject=pb.Subject(tenant=TENANT)), timeout=5
            )
        (lim,) = [lim for lim in s.limits if lim.name == "minutes"]
        return lim.remaining, len([ls for ls in s.leases if ls.metric == "api.voice.minutes"])

    before, _ = minutes_left()
    proc, out = _holder_process(
        gateway,
        meter_key,
        tmp_path,
        "doomed",
        metric="api.voice.minutes",
        holders=1,
        want=100,
        report_then_hold=30,
        hold_forever=True,
    )
    deadline = time.monotonic() + 20
    while not out.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.05)
    (h,) = json.loads(out.read_text())
    assert (h["granted"], h["reported"]) == (100, 30)
    held, open_leases = minutes_left()
    assert (held, open_leases) == (before - 100, 1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    # validity 1 s; the sweeper runs every second on each worker. The 70 unreported units
    # come back; the 30 reported stay spent (and in the ledger).
    deadline = time.monotonic() + 15
    while minutes_left() != (before - 30, 0):
        assert time.monotonic() < deadline, f"not refunded: {minutes_left()}"
        time.sleep(0.1)
    with redis.Redis.from_url(gateway.redis_url) as client:
        assert client.zscore(f"cp:{{{TENANT}}}:leases", h["lease_id"]) is None
        assert not client.exists(f"cp:{{{TENANT}}}:lease:{h['lease_id']}")
    entries = [e for e in ledger(gateway.redis_url, TENANT) if e.lease_id == h["lease_id"]]
    assert sum(e.amount for e in entries) == 30


def test_state_and_explain_show_a_lease(gateway: GatewayProcess, meter_key: str) -> None:
    a = lease(gateway, meter_key, ask(requested=7, holder="gw-test"))
    assert a.decision == pb.DECISION_ALLOW and a.granted == 7
    b = lease(gateway, meter_key, ask(lease_id=a.lease_id, used=2, requested=0))
    with gateway.channel() as ch:
        admin = apb_grpc.AdminServiceStub(ch)
        s = admin.GetState(apb.GetStateRequest(subject=pb.Subject(tenant=TENANT)), timeout=5)
        (ls,) = [x for x in s.leases if x.lease_id == a.lease_id]
        assert (ls.holder, ls.granted, ls.used, ls.available) == ("gw-test", 7, 2, 5)
        assert 0 < ls.expires_in.ToMilliseconds() <= 2000
        e = admin.ExplainDecision(
            apb.ExplainDecisionRequest(tenant=TENANT, decision_id=b.decision_id),
            timeout=5,
        )
    assert e.HasField("lease")
    assert (e.lease.lease_id, e.lease.used, e.lease.recorded) == (a.lease_id, 2, 2)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "chargepath",
            "state",
            TENANT,
            "--target",
            gateway.address,
            "--api-key",
            gateway.operator_key,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert cli.returncode == 0, cli.stderr
    assert "open leases" in cli.stdout and "gw-test" in cli.stdout
    explained = subprocess.run(
        [
            sys.executable,
            "-m",
            "chargepath",
            "explain",
            b.decision_id,
            "--tenant",
            TENANT,
            "--target",
            gateway.address,
            "--api-key",
            gateway.operator_key,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert explained.returncode == 0, explained.stderr
    assert "lease ask ALLOW OK" in explained.stdout
    assert f"lease {a.lease_id}" in explained.stdout and "used 2 (recorded 2" in explained.stdout


def test_the_readme_example_runs(gateway: GatewayProcess, meter_key: str) -> None:
    """README "Quota leases": its Python example, run against this gateway (its tenant
    swapped for this module's, whose plan grants leases)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quota leases", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"acme"', f'"{TENANT}"').replace("gw3-000", uuid.uuid4().hex[:8])
    with gateway.channel(meter_key) as channel:
        scope: dict[str, Any] = {"channel": channel}
        exec(compile(code, "README.md", "exec"), scope)
    a, b = scope["a"], scope["b"].answer
    assert (a.decision, a.granted) == (pb.DECISION_ALLOW, 50)  # max_units of 'burst'
    assert (b.recorded, b.overage) == (50, 370)  # used 420 of 50 granted: overage
