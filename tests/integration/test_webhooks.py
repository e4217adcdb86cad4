"""Webhook deliveries on a real Redis to a real HTTP receiver (http.server in a thread): quota
thresholds and suspensions relayed once, signed, retried through failures and timeouts,
delivered by one of several processes, taken over when the process holding them dies, and
logged."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from chargepath.cli import main as cli_main
from chargepath.core.model import Mode, Subject, Usage
from chargepath.core.plans import load_policy_text
from chargepath.core.webhooks import RetrySchedule
from chargepath.engine import Engine
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from chargepath.store.webhooks import (
    GROUP,
    SUSPENSION_OUTBOX,
    WebhookStore,
    cursor_key,
    outbox_key,
)
from chargepath.webhooks import WebhookDispatcher, WebhookSettings
from tests.conftest import make_engine
from tests.webhook_receiver import Receiver, example_receiver, receiver

pytestmark = pytest.mark.integration

SECRET = "s3cret-for-tests"
ENV = {"HOOK_SECRET": SECRET}
FAST = WebhookSettings(timeout_s=0.4, retry=RetrySchedule(0.05, 0.2, 8), poll_s=0.05, lease_s=1.0)
VERIFY = example_receiver()


def policy(url: str, events: str = "[quota.80, quota.100]", acme: str = "") -> str:
    return f"""
metrics: [{{name: api.sms.send}}]
plans:
  - name: p
    limits:
      - {{name: sms-daily, metric: api.sms.send, quota: {{amount: 10, per: day}}}}
tenants:
  - {{name: acme, plan: p{acme}}}
  - {{name: globex, plan: p}}
webhooks:
  - name: ops
    url: {url}
    events: {events}
    secret_env: HOOK_SECRET
"""


_n = 0


async def spend(engine: Engine, tenant: str, amount: int) -> None:
    global _n
    _n += 1
    verdict = await engine.check(
        Usage(f"r{_n}", Subject(tenant), "api.sms.send", amount, Mode.ADMIT)
    )
    assert verdict.recorded, verdict


async def until(done: Callable[[], bool], within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s")
        await asyncio.sleep(0.05)


def dispatcher(
    store: RedisStore, engine: Engine, consumer: str, settings: WebhookSettings = FAST, **kw: Any
) -> WebhookDispatcher:
    return WebhookDispatcher(
        WebhookStore.of_store(store),
        lambda: engine.policy,
        settings,
        consumer=consumer,
        environ=kw.pop("environ", ENV),
        **kw,
    )


@contextlib.asynccontextmanager
async def running(*dispatchers: WebhookDispatcher) -> AsyncIterator[list[asyncio.Task[None]]]:
    draining = asyncio.Event()
    tasks = [asyncio.create_task(d.run(draining)) for d in dispatchers]
    try:
        yield tasks
    finally:
        draining.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


async def relaying(raw_redis: redis.Redis, *tenants: str) -> None:
    """Wait until the threshold relay has started for the tenants (its first round sets the
    cursor at the trail's end: crossings before it are not events)."""
    await until(lambda: all(raw_redis.exists(cursor_key(t)) for t in tenants))


def verifies(r: Receiver) -> None:
    """Every request's signature verifies with the example receiver's verifier, and fails
    with another secret."""
    for req in r.received:
        header = req.headers["Chargepath-Signature"]
        assert VERIFY.verify(SECRET.encode(), header, req.body) > 0
        with pytest.raises(VERIFY.SignatureError):
            VERIFY.verify(b"not-the-secret", header, req.body)
        assert req.headers["Chargepath-Event-Id"] == req.event["id"]


async def test_thresholds_arrive_through_errors_and_timeouts_with_one_id_each(
    store: RedisStore, raw_redis: redis.Redis, redis_server: EmbeddedRedis, capsys: Any
) -> None:
    with receiver(["500", "500", "timeout", "503"], hang_s=1.0) as r:
        engine = await make_engine(store, policy(r.url))
        async with running(dispatcher(store, engine, "gw-a")):
            await relaying(raw_redis, "acme")
            await spend(engine, "acme", 8)  # 80%
            await spend(engine, "acme", 2)  # 100%
            await until(
                lambda: {x.event["type"] for x in r.delivered()} >= {"quota.80", "quota.100"}
            )
            await asyncio.sleep(0.3)  # the acknowledgements and the log
        by_id: dict[str, list[Any]] = {}
        for req in r.received:
            by_id.setdefault(req.event["id"], []).append(req)
        assert len(by_id) == 2, by_id.keys()
        for reqs in by_id.values():
            # a retried event is the same bytes, the same id, and reaches 2xx once
            assert len({q.body for q in reqs}) == 1
            assert sum(q.answer.startswith("2") for q in reqs) == 1
        answers = [q.answer for q in r.received]
        assert answers.count("500") == 2 and "timeout" in answers and "503" in answers
        assert len(r.received) == 2 + 4  # two events, four failed attempts
        verifies(r)
        events = {q.event["type"]: q.event for q in r.delivered()}
        assert events["quota.80"]["tenant"] == "acme"
        assert events["quota.80"]["data"] == {
            "limit": "sms-daily",
            "slice": "",
            "key": "",
            "percent": 80,
            "used": 8,
            "capacity": 10,
        }
        assert events["quota.100"]["data"]["used"] == 10
        attempts = [int(q.headers["Chargepath-Delivery-Attempt"]) for q in r.received]
        assert max(attempts) >= 3

    # delivered events leave the outbox; every attempt is in the log
    assert raw_redis.xlen(outbox_key("acme")) == 0
    assert raw_redis.xpending(outbox_key("acme"), GROUP)["pending"] == 0
    log = await WebhookStore.of_store(store).read_log()
    assert [x.outcome for x in log].count("delivered") == 2
    assert [x.outcome for x in log].count("retry") == 4
    failed = await WebhookStore.of_store(store).read_log(failed=True, tenant="acme")
    assert len(failed) == 4 and all(x.outcome == "retry" for x in failed)
    assert {x.status for x in failed} == {500, 503, 0}
    assert any("no answer within 0.4 s" in x.error for x in failed)

    capsys.readouterr()
    args = ["webhooks", "log", "--redis-url", redis_server.url]
    assert await asyncio.to_thread(cli_main, [*args, "--failed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert all(" retry in " in line and " acme " in line for line in lines)
    assert sum("[HTTP 500]" in line for line in lines) == 2
    assert await asyncio.to_thread(cli_main, [*args, "--tenant", "globex"]) == 0
    assert capsys.readouterr().out == ""


async def test_two_processes_deliver_each_event_once(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    with receiver() as r:
        engine = await make_engine(store, policy(r.url))
        a, b = dispatcher(store, engine, "gw-a"), dispatcher(store, engine, "gw-b")
        async with running(a, b):
            await relaying(raw_redis, "acme", "globex")
            for tenant in ("acme", "globex"):
                await spend(engine, tenant, 9)
                await spend(engine, tenant, 1)
            await until(lambda: len(r.received) >= 4)
            await asyncio.sleep(1.0)  # time for a duplicate to show up, if there were one
        ids = [q.event["id"] for q in r.received]
        assert len(ids) == 4 and len(set(ids)) == 4
        assert sorted((q.event["tenant"], q.event["type"]) for q in r.received) == [
            ("acme", "quota.100"),
            ("acme", "quota.80"),
            ("globex", "quota.100"),
            ("globex", "quota.80"),
        ]
        verifies(r)


async def test_a_dead_process_s_event_is_delivered_by_another(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    # a slow first process: its attempt times out and it waits long before retrying
    slow = WebhookSettings(
        timeout_s=0.4, retry=RetrySchedule(30.0, 30.0, 8), poll_s=0.05, lease_s=1.0
    )
    with receiver(["timeout"], hang_s=1.0) as r:
        engine = await make_engine(store, policy(r.url, events="[quota.80]"))
        draining = asyncio.Event()
        a = dispatcher(store, engine, "gw-a", slow)
        task_a = asyncio.create_task(a.run(draining))
        await relaying(raw_redis, "acme")
        await spend(engine, "acme", 8)
        await until(lambda: len(r.received) == 1)
        await until(lambda: a.held == 1)
        # the process dies holding the event (what it held stays pending in Redis)
        task_a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task_a
        assert raw_redis.xpending(outbox_key("acme"), GROUP)["pending"] == 1
        died = time.monotonic()
        async with running(dispatcher(store, engine, "gw-b")):
            await until(lambda: len(r.delivered()) == 1)
            taken_after = time.monotonic() - died
            await asyncio.sleep(0.3)
        first, second = r.received
        assert first.event["id"] == second.event["id"] and first.body == second.body
        assert second.answer == "204"
        assert taken_after >= 0.5  # not before the lease had lapsed
        verifies(r)
    assert raw_redis.xlen(outbox_key("acme")) == 0
    assert raw_redis.xpending(outbox_key("acme"), GROUP)["pending"] == 0


async def test_suspensions_and_resumptions_are_sent_once_per_change(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    with receiver() as r:
        events = "[suspension]"
        engine = await make_engine(store, policy(r.url, events=events))
        engine_b = await make_engine(store, policy(r.url, events=events))
        async with running(dispatcher(store, engine, "gw-a"), dispatcher(store, engine_b, "gw-b")):
            await until(lambda: bool(raw_redis.exists("cp:{cp:policy}:hooks:susp_v")))
            for acme in (", suspended: unpaid invoice", ""):
                await store.publish_policy(load_policy_text(policy(r.url, events, acme)))
                await engine.reload_policy()
                await engine_b.reload_policy()
                before = len(r.received)
                await until(lambda: len(r.received) == before + 1)  # noqa: B023
            await asyncio.sleep(0.5)
        suspended, resumed = (q.event for q in r.received)
        assert len(r.received) == 2
        assert suspended["type"] == resumed["type"] == "suspension"
        assert suspended["tenant"] == resumed["tenant"] == "acme"
        assert suspended["data"]["suspended"] is True
        assert suspended["data"]["reason"] == "unpaid invoice"
        assert resumed["data"]["suspended"] is False
        assert resumed["data"]["policy_version"] > suspended["data"]["policy_version"]
        verifies(r)
    assert raw_redis.xlen(SUSPENSION_OUTBOX) == 0


async def test_a_missing_secret_fails_each_attempt_and_the_event_is_given_up(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    settings = WebhookSettings(
        timeout_s=0.4, retry=RetrySchedule(0.05, 0.1, 2), poll_s=0.05, lease_s=1.0
    )
    with receiver() as r:
        engine = await make_engine(store, policy(r.url, events="[quota.80]"))
        d = dispatcher(store, engine, "gw-a", settings, environ={})
        async with running(d):
            await relaying(raw_redis, "acme")
            await spend(engine, "acme", 8)
            await until(lambda: raw_redis.xlen("cp:{cp:hooks}:log") >= 2)
            await until(lambda: raw_redis.xlen(outbox_key("acme")) == 0)
        assert r.received == []  # nothing unsigned is ever sent
    log = await WebhookStore.of_store(store).read_log()
    assert [x.outcome for x in log] == ["retry", "failed"]
    assert all("secret_env HOOK_SECRET is not set" in x.error for x in log)
