"""Explain by decision id alone, through a store outage: a real gateway on its own real
redis-server, a client reporting all along, Redis paused (SIGSTOP) for two seconds. Every
report acknowledged (``recorded`` or ``spooled``) is in the ledger exactly once, none other is,
and every acknowledged decision id is explained from the id alone once the spool has drained
(the trail entry is written in the same script as the ledger entry)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis

from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.conftest import ledger_entries
from tests.e2e.conftest import start_gateway

pytestmark = pytest.mark.e2e

PLANS = """
metrics: [{name: slice.bytes, unit: byte}]
plans:
  - name: roomy
    limits:
      - {name: bytes-rate, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000000000, refill: 1000000000, per: second}}
tenants:
  - {name: ctl, plan: roomy, failure_policy: {mode: allow}}
"""


def test_acknowledged_reports_are_in_the_ledger_once_and_explained_by_id(tmp_path: Path) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS)
    gw = start_gateway(tmp_path / "gw", plans=plans)
    assert gw.redis is not None and gw.redis.process is not None
    redis_pid = gw.redis.process.pid
    answers: list[tuple[str, pb.Verdict]] = []
    unanswered: list[str] = []
    stop = threading.Event()

    def report() -> None:
        with gw.channel() as ch:
            stub = pb_grpc.MeteringServiceStub(ch)
            while not stop.is_set():
                u = pb.Usage(
                    request_id=f"r-{uuid.uuid4().hex[:16]}",
                    subject=pb.Subject(tenant="ctl", slice="s1"),
                    metric="slice.bytes",
                    amount=7,
                    mode=pb.MODE_REPORT,
                )
                try:
                    answers.append(
                        (u.request_id, stub.Check(pb.CheckRequest(usage=u), timeout=5).verdict)
                    )
                except grpc.RpcError:
                    unanswered.append(u.request_id)

    client = threading.Thread(target=report, daemon=True)
    paused = False
    try:
        client.start()
        _wait(lambda: len(answers) >= 50, "50 answers before the outage")
        os.kill(redis_pid, signal.SIGSTOP)
        paused = True
        before = len(answers)
        _wait(lambda: any(v.spooled for _, v in answers[before:]), "a spooled answer")
        time.sleep(2)  # the outage itself: a fixed length of time is what is tested
        os.kill(redis_pid, signal.SIGCONT)
        paused = False
        after = len(answers)
        _wait(lambda: any(v.recorded for _, v in answers[after:]), "a recorded answer")
        stop.set()
        client.join(30)
        assert not client.is_alive()

        acknowledged = {rid: v for rid, v in answers if v.recorded or v.spooled}
        others = {rid for rid, v in answers if not (v.recorded or v.spooled)} | set(unanswered)
        spooled = sum(v.spooled for v in acknowledged.values())
        assert spooled > 0 and len(acknowledged) > spooled
        raw = redis.Redis.from_url(gw.redis_url, decode_responses=True)
        try:

            def ledger() -> list[str]:
                return [e.request_id for e in ledger_entries(raw, "ctl")]

            _wait(lambda: set(acknowledged) <= set(ledger()), "the spool to drain", 60)
            ids = ledger()
            assert len(ids) == len(set(ids)), "a report counted twice"
            assert set(ids) == set(acknowledged), "missing, or not acknowledged but recorded"
            assert not (set(ids) & others)
        finally:
            raw.close()
        with gw.channel() as ch:
            admin = apb_grpc.AdminServiceStub(ch)
            for rid, v in acknowledged.items():
                record = admin.ExplainDecision(
                    apb.ExplainDecisionRequest(decision_id=v.decision_id), timeout=10
                ).decision
                assert (record.request_id, record.amount) == (rid, 7)
                assert record.subject.tenant == "ctl"
    finally:
        stop.set()
        if paused:
            os.kill(redis_pid, signal.SIGCONT)
        assert gw.stop() == 0, gw.log()
        gw.redis.stop()


def _wait(condition: object, what: str, timeout: float = 30) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
