"""Webhooks of a live gateway (``chargepath serve --plans`` with a ``webhooks:`` section) to a
real HTTP receiver that fails (500s, then a timeout) before it recovers: a quota driven to
80% and 100% through the Python client, a suspension through the CLI, and a Redis outage
(the gateway's redis-server killed, then restarted). Every event arrives, retries carry the
same id, every signature verifies with the example receiver, and ``chargepath webhooks log``
shows the attempts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from chargepath.store.webhooks import cursor_key
from chargepath_client import Client
from tests.e2e.conftest import start_gateway
from tests.webhook_receiver import Received, Receiver, example_receiver, receiver

pytestmark = pytest.mark.e2e

SECRET = "e2e-webhook-secret"

PLANS = """\
metrics:
  - {{name: api.sms.send, unit: message}}
plans:
  - name: starter
    limits:
      - {{name: sms-daily, metric: api.sms.send, quota: {{amount: 10, per: day}}}}
tenants:
  - {{name: acme, plan: starter}}
webhooks:
  - name: ops
    url: {url}
    events: [quota.80, quota.100, suspension, degraded]
    secret_env: CP_HOOK_SECRET
"""

ENV = {
    "CP_HOOK_SECRET": SECRET,
    "CHARGEPATH_WEBHOOK_TIMEOUT_MS": "500",
    "CHARGEPATH_WEBHOOK_RETRY_BASE_MS": "100",
    "CHARGEPATH_WEBHOOK_RETRY_MAX_MS": "400",
    "CHARGEPATH_WEBHOOK_DEGRADED_INTERVAL_S": "0",
}


def types(r: Receiver) -> list[str]:
    out = []
    for q in r.delivered():
        e = q.event
        out.append(f"{e['type']}:{e['data'].get('degraded', e['data'].get('suspended', ''))}")
    return out


def chargepath(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "chargepath", *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quota_suspension_and_outage_events_reach_a_flaky_receiver(tmp_path: Path) -> None:
    with receiver(["500", "500", "timeout"], hang_s=1.5) as r:
        plans = tmp_path / "plans.yaml"
        plans.write_text(PLANS.format(url=r.url))
        gw = start_gateway(tmp_path, plans=plans, env=ENV)
        assert gw.redis is not None
        try:
            db = redis.Redis.from_url(gw.redis_url, decode_responses=True)
            deadline = time.monotonic() + 10
            while not db.exists(cursor_key("acme")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert db.exists(cursor_key("acme")), gw.log()
            with Client(gw.address, api_key=gw.operator_key) as client:
                assert client.check("acme", "api.sms.send", 8).decision.name == "ALLOW"
                assert client.check("acme", "api.sms.send", 2).decision.name == "ALLOW"
            chargepath(
                "suspend", "acme", "--reason", "unpaid",
                "--target", gw.address, "--data-dir", str(gw.data_dir),
            )  # fmt: skip
            r.wait_for(
                lambda r: {"quota.80:", "quota.100:", "suspension:True"} <= set(types(r)),
                timeout=20,
            )

            gw.redis.kill()
            r.wait_for(lambda r: "degraded:True" in types(r), timeout=20)
            gw.redis.start()
            r.wait_for(lambda r: "degraded:False" in types(r), timeout=30)
            # the attempts made during the outage reach the log once Redis is back
            deadline = time.monotonic() + 10
            log = ""
            while "degraded" not in log and time.monotonic() < deadline:
                time.sleep(0.2)
                log = chargepath("webhooks", "log", "--redis-url", gw.redis_url)
        finally:
            assert gw.stop() == 0, gw.log()
            gw.redis.stop()

        assert sorted(types(r)) == [
            "degraded:False",
            "degraded:True",
            "quota.100:",
            "quota.80:",
            "suspension:True",
        ]
        # the failing answers came first (the two quota events, sent at once, share them)
        # and were retried under the same id, with the same body, until one 2xx each
        assert [q.answer for q in r.received[:3]] == ["500", "500", "timeout"]
        by_id: dict[str, list[Received]] = {}
        for q in r.received:
            by_id.setdefault(q.event["id"], []).append(q)
        assert len(by_id) == 5
        for same in by_id.values():
            assert len({q.body for q in same}) == 1
            assert [q.answer.startswith("2") for q in same][-1]
            assert sum(q.answer.startswith("2") for q in same) == 1
            attempts = [int(q.headers["Chargepath-Delivery-Attempt"]) for q in same]
            assert attempts == list(range(1, len(same) + 1))
        assert len(r.received) == 5 + 3
        example = example_receiver()
        for q in r.received:
            header = q.headers["Chargepath-Signature"]
            assert example.verify(SECRET.encode(), header, q.body)
            with pytest.raises(example.SignatureError):
                example.verify(b"some-other-secret", header, q.body)
        suspended = next(q.event for q in r.delivered() if q.event["type"] == "suspension")
        assert suspended["tenant"] == "acme" and suspended["data"]["reason"] == "unpaid"
        degraded = next(q.event for q in r.delivered() if q.event["type"] == "degraded")
        assert degraded["tenant"] == "" and degraded["data"]["process"]

        lines = log.splitlines()
        assert sum(" delivered " in x for x in lines) == 5, log
        assert sum("[HTTP 500]" in x for x in lines) == 2, log
        assert any("no answer within 0.5 s" in x for x in lines), log
        assert any(" degraded " in x and " delivered " in x for x in lines), log
