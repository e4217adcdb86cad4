"""Redis memory under hostile input (issue #12, item 7): unique request ids, sessions, keys and
unknown tenants against one tenant with caps. Redis' used_memory stays within a bound that
depends on the caps, not on how much is sent, and every refusal is counted.

CI sends CHARGEPATH_MEMORY_N = 10,000 of each (the default); the issue's figure is 100,000:
``CHARGEPATH_MEMORY_N=100000 .venv/bin/python -m pytest -s tests/integration/
test_memory_bounds.py``. The bound is the same either way: it is the caps' worth of records."""

from __future__ import annotations

import os
import uuid

import redis

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.store.redis_store import RedisStore
from tests.conftest import make_engine

N = int(os.environ.get("CHARGEPATH_MEMORY_N", "10000"))
CAP = 1000
BATCH = 1000

POLICY = f"""
metrics: [{{name: api.sms.send}}]
plans:
  - name: p
    limits:
      - {{name: per-key, metric: api.sms.send, scope: key,
         quota: {{amount: 1000000, per: month}}}}
      - {{name: tenant-wide, metric: api.sms.send, scope: tenant,
         rate: {{capacity: 1000000000, refill: 1000000000, per: second}}}}
tenants:
  - {{name: target, plan: p, caps: {{request_ids: {CAP}, sessions: {CAP}, keys: {CAP}}}}}
"""

#: bytes per live record at most, as measured (README "Bounded memory"): a request id's
#: dedup record and its entry in the cap's count (~300), a session with its 128 replay slots
#: (~8.5 KB: 128 x 65 bytes), a key's quota counter and its entry (~250); plus the bounded
#: trail (1,000 decisions) and the ledger of the usages accepted.
PER_ID, PER_SESSION, PER_KEY = 600, 10_000, 600
LEDGER_ENTRY = 300
SLACK = 4 * 1024 * 1024


def used_memory(raw: redis.Redis) -> int:
    return int(raw.info("memory")["used_memory"])  # type: ignore[index]


def sms(rid: str, *, tenant: str = "target", key: str = "k", **kw: object) -> Usage:
    return Usage(rid, Subject(tenant, "", key), "api.sms.send", 1, Mode.ADMIT, **kw)  # type: ignore[arg-type]


async def test_hostile_input_against_a_capped_tenant_keeps_redis_memory_bounded(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine = await make_engine(store, POLICY)
    raw_redis.execute_command("MEMORY", "PURGE")
    before = used_memory(raw_redis)
    run = uuid.uuid4().hex[:8]

    streams: dict[str, list[Usage]] = {
        # a new request id each (Check-style dedup records), one key
        "request ids": [sms(f"{run}-id-{i}") for i in range(N)],
        # a new key each, on one session: only the keys grow
        "keys": [
            sms(f"{run}-k-{i}", key=f"key-{i}", session_id=f"{run}-keys", sequence=i + 1)
            for i in range(N)
        ],
        # a new session each (request ids repeat: a session's dedup is its sequence)
        "sessions": [sms(f"{run}-s-{i}", session_id=f"{run}-{i}", sequence=1) for i in range(N)],
        # a tenant the policy does not name, each new
        "unknown tenants": [sms(f"{run}-t-{i}", tenant=f"nobody-{i}") for i in range(N)],
    }
    verdicts: dict[str, list[Verdict]] = {}
    for name, usages in streams.items():
        out: list[Verdict] = []
        for i in range(0, len(usages), BATCH):
            out += await engine.decide_batch(usages[i : i + BATCH])
        verdicts[name] = out

    def refused(name: str) -> int:
        return sum(v.reason is Reason.CAP_REACHED for v in verdicts[name])

    # The first CAP of each kind fit (the keys stream's session is one of the CAP sessions,
    # and the request ids' "k" one of the CAP keys), the rest are refused, by their cap.
    assert refused("request ids") == N - CAP
    assert all(
        v.message.startswith("caps.request_ids:")
        for v in verdicts["request ids"]
        if v.reason is Reason.CAP_REACHED
    )
    assert refused("sessions") == N - (CAP - 1)
    assert refused("keys") == N - (CAP - 1)
    assert {(v.decision, v.reason) for v in verdicts["unknown tenants"]} == {
        (Decision.DENY, Reason.NO_ENTITLEMENT)
    }
    # the engine's counts (chargepath.decisions{reason="CAP_REACHED"}) say the same
    counted = sum(
        n for (_, _, r, _), n in engine.telemetry._counts.items() if r is Reason.CAP_REACHED
    )
    assert counted == refused("request ids") + refused("sessions") + refused("keys")

    # nothing of the unknown tenants, and only the caps' worth of the rest
    assert not raw_redis.keys("cp:{nobody-*")
    assert raw_redis.zcard("cp:{target}:cap:request_ids") == CAP
    assert raw_redis.zcard("cp:{target}:cap:sessions") == CAP
    assert raw_redis.zcard("cp:{target}:cap:keys") == CAP
    raw_redis.execute_command("MEMORY", "PURGE")
    after = used_memory(raw_redis)
    accepted = 3 * CAP
    bound = CAP * (PER_ID + PER_SESSION + PER_KEY) + accepted * LEDGER_ENTRY + SLACK
    print(
        f"\n{N:,} each of request ids, sessions, keys, unknown tenants; caps {CAP:,}: "
        f"used_memory {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
        f"(+{(after - before) / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB); refused "
        f"{refused('request ids'):,} request ids, {refused('sessions'):,} sessions, "
        f"{refused('keys'):,} keys"
    )
    assert after - before <= bound
