"""The billing feed (DESIGN property 3) against a real redis-server: export, aggregates, consumer
groups with a consumer process killed and restarted, and trimming that never drops an entry
someone still needs."""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from chargepath.cli.ledger import LedgerCliError, parse_time_ms, resolve_redis_url
from chargepath.core.model import Decision, Mode, Subject, Usage, Verdict
from chargepath.engine import Engine
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.ledger import (
    ROW_COLUMNS,
    Ledger,
    LedgerEntry,
    aggregates_key,
    exported_key,
)
from chargepath.store.redis_store import RedisStore, ledger_key
from tests.conftest import make_engine
from tests.integration.policies import OPEN

AGGREGATE = """
metrics: [{name: api.sms.send}, {name: slice.bytes}]
plans:
  - name: agg
    ledger: {mode: aggregate, interval_s: 1}
    limits:
      - {name: sms, metric: api.sms.send, scope: key,
         rate: {capacity: 40, refill: 20, per: second}}
      - {name: bytes, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000, refill: 100, per: second}}
tenants:
  - {name: agg, plan: agg}
"""

# Used when `chargepath ledger` is not wired into cli.py yet: the same two functions behind a
# parser of their own.
SHIM = (
    "import argparse, sys\n"
    "from chargepath.cli.ledger import add_parser, run\n"
    "p = argparse.ArgumentParser(prog='chargepath')\n"
    "add_parser(p.add_subparsers(dest='command', required=True))\n"
    "sys.exit(run(p.parse_args(sys.argv[1:])))\n"
)


@functools.cache
def ledger_argv() -> tuple[str, ...]:
    """``python -m chargepath ledger`` if cli.py has the command, else the shim."""
    probe = subprocess.run(
        [sys.executable, "-m", "chargepath", "ledger", "consume", "--help"],
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return (sys.executable, "-m", "chargepath", "ledger")
    return (sys.executable, "-c", SHIM, "ledger")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ledger_argv(), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.fixture
async def ledger(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> AsyncIterator[Ledger]:
    lg = Ledger.from_url(redis_server.url, page_size=100)
    yield lg
    await lg.close()


async def drain(lg: Ledger, tenant: str, group: str, consumer: str, **kw: int) -> list[str]:
    """Consume and ack until nothing new comes within block_ms; the request ids seen."""
    seen: list[str] = []
    batches = lg.consume_batches(tenant, group, consumer, **kw)
    try:
        async for batch in batches:
            if not batch:
                break
            seen += [x.request_id for _, x in batch]
            await lg.ack(tenant, group, [i for i, _ in batch])
    finally:
        await batches.aclose()
    return seen


def totals(items: Iterable[tuple[str, str, str, int, int]]) -> dict[tuple[str, str, str], tuple]:
    """(slice, key, metric) -> (count, sum) of (slice, key, metric, count, amount) items."""
    out: dict[tuple[str, str, str], list[int]] = {}
    for sl, k, m, n, a in items:
        acc = out.setdefault((sl, k, m), [0, 0])
        acc[0] += n
        acc[1] += a
    return {k: tuple(v) for k, v in out.items()}


def recorded(usages: list[Usage], verdicts: list[Verdict]) -> list[Usage]:
    by_id = {u.request_id: u for u in usages}
    seen: set[str] = set()
    out = []
    for v in verdicts:
        if v.recorded and v.request_id not in seen:
            seen.add(v.request_id)
            out.append(by_id[v.request_id])
    return out


async def mixed_run(e: Engine, n: int = 400, seed: int = 11) -> tuple[list[Usage], list[Verdict]]:
    """Admits (some refused by a small bucket) and reports, unary and batched, with retries."""
    rng = random.Random(seed)
    usages = []
    for i in range(n):
        if rng.random() < 0.5:
            usages.append(
                Usage(
                    f"a{seed}-{i}",
                    Subject("acme", key=f"k{rng.randrange(3)}"),
                    "api.sms.send",
                    rng.randint(1, 3),
                    Mode.ADMIT,
                    labels=(("app", f"app{rng.randrange(2)}"),) if rng.random() < 0.5 else (),
                )
            )
        else:
            usages.append(
                Usage(
                    f"r{seed}-{i}",
                    Subject("acme", f"s{rng.randrange(2)}"),
                    "slice.bytes",
                    rng.randint(1, 10**6),
                    Mode.REPORT,
                    occurred_at_ms=1_700_000_000_000 + i,
                )
            )
    verdicts = [await e.check(u) for u in usages[: n // 4]]
    for i in range(n // 4, n, 50):
        verdicts.extend(await e.decide_batch(usages[i : i + 50]))
    for u in usages[: n // 4 : 5]:
        verdicts.append(await e.check(u))  # retries: replayed, change nothing
    return usages, verdicts


async def test_export_equals_the_decisions_made(
    store: RedisStore, ledger: Ledger, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, OPEN)
    usages, verdicts = await mixed_run(e)
    assert any(v.decision is not Decision.ALLOW and not v.recorded for v in verdicts)
    should = recorded(usages, verdicts)
    entries = [x async for x in ledger.export("acme", None, mark=False)]
    assert len(entries) == len(should) == raw_redis.xlen(ledger_key("acme"))
    assert Counter(x.request_id for x in entries) == Counter(u.request_id for u in should)
    assert totals((x.slice, x.key, x.metric, x.count, x.amount) for x in entries) == totals(
        (u.subject.slice, u.subject.key, u.metric, 1, u.amount) for u in should
    )
    by_id = {u.request_id: u for u in usages}
    first = {v.request_id: v for v in reversed(verdicts)}
    for x in entries:
        u, v = by_id[x.request_id], first[x.request_id]
        assert x.mode == ("report" if u.mode is Mode.REPORT else "admit")
        assert (x.decision, x.reason, x.decision_id) == (v.decision, v.reason, v.decision_id)
        assert x.policy_version == v.policy_version and x.decided_at_ms == v.decided_at_ms
        assert x.labels == dict(u.labels) and x.occurred_at_ms == u.occurred_at_ms
        assert not x.aggregate and x.count == 1
    # no mark: nothing was trimmed, and nothing is marked
    assert raw_redis.xlen(ledger_key("acme")) == len(should)
    assert raw_redis.get(exported_key("acme")) is None
    # a time range selects by entry id (write time on Redis' clock), [since, until)
    ids = [x.id for x in entries]
    mid = int(ids[len(ids) // 2].split("-")[0])
    before = [x.id async for x in ledger.export("acme", None, mid, mark=False)]
    after = [x.id async for x in ledger.export("acme", mid, None, mark=False)]
    assert before + after == ids and all(int(i.split("-")[0]) < mid for i in before)


async def test_cli_export_csv_and_jsonl_parse_back(
    store: RedisStore, ledger: Ledger, redis_server: EmbeddedRedis
) -> None:
    e = await make_engine(store, OPEN)
    await mixed_run(e, 200, seed=3)
    want = [x async for x in ledger.export("acme", None, mark=False)]
    url = ["--tenant", "acme", "--redis-url", redis_server.url, "--no-mark"]
    out = run_cli("export", *url, "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    got = [LedgerEntry.from_row(json.loads(line)) for line in out.stdout.splitlines()]
    assert got == want
    out = run_cli("export", *url, "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == list(ROW_COLUMNS)
    assert [LedgerEntry.from_row(r) for r in rows] == want
    assert any(x.labels for x in want) and any(x.occurred_at_ms for x in want)
    # --since/--until as ISO 8601 and as ms
    mid_ms = int(want[len(want) // 2].id.split("-")[0])
    iso = datetime.fromtimestamp(mid_ms / 1000, UTC).isoformat().replace("+00:00", "Z")
    assert parse_time_ms(iso) == mid_ms
    a = run_cli("export", *url, "--until", iso)
    b = run_cli("export", *url, "--since", str(mid_ms))
    ids = [json.loads(line)["id"] for line in (a.stdout + b.stdout).splitlines()]
    assert ids == [x.id for x in want]
    # a bad time is a usage error
    bad = run_cli("export", *url, "--since", "yesterday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_redis_url_resolution(tmp_path: Path) -> None:
    ns = argparse.Namespace(redis_url=None, data_dir=str(tmp_path))
    with pytest.raises(LedgerCliError, match="no Redis URL"):
        resolve_redis_url(ns, env={})
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "url").write_text("redis://127.0.0.1:1/0\n")
    assert resolve_redis_url(ns, env={}) == "redis://127.0.0.1:1/0"
    assert resolve_redis_url(ns, env={"CHARGEPATH_REDIS_URL": "redis://e:2/0"}) == "redis://e:2/0"
    ns.redis_url = "redis://flag:3/0"
    assert resolve_redis_url(ns, env={"CHARGEPATH_REDIS_URL": "x"}) == "redis://flag:3/0"
    # the CLI says so and exits 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPATH_")}
    env["CHARGEPATH_DATA_DIR"] = str(tmp_path / "nowhere")
    out = run_cli("export", "--tenant", "acme", env=env)
    assert out.returncode == 2 and "no Redis URL" in out.stderr and out.stdout == ""


async def test_aggregates_reach_the_ledger_with_exact_totals(
    store: RedisStore, ledger: Ledger, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, AGGREGATE)
    rng = random.Random(5)
    usages: list[Usage] = []
    verdicts: list[Verdict] = []
    flushed = 0

    async def flusher(stop: asyncio.Event) -> None:
        nonlocal flushed
        while not stop.is_set():
            flushed += await ledger.flush_aggregates("agg")  # concurrent with decisions
            await asyncio.sleep(0.05)

    stop = asyncio.Event()
    task = asyncio.create_task(flusher(stop))
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 2.5:  # spans at least two 1 s intervals
        batch = []
        for _ in range(20):
            i += 1
            if rng.random() < 0.8:
                batch.append(
                    Usage(
                        f"a{i}",
                        Subject("agg", "", f"k{rng.randrange(3)}"),
                        "api.sms.send",
                        rng.randint(1, 4),
                        Mode.ADMIT,
                    )
                )
            else:
                batch.append(
                    Usage(
                        f"r{i}",
                        Subject("agg", "s1"),
                        "slice.bytes",
                        rng.randint(1, 50),
                        Mode.REPORT,
                    )
                )
        usages += batch
        verdicts += await e.decide_batch(batch)
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert flushed > 0  # ended intervals were flushed while deciding
    # the intervals still open: a flush "2 s later" (the clock offset trick) closes them all
    await ledger.flush_aggregates("agg", clock_offset_ms=2000)
    assert raw_redis.hlen(aggregates_key("agg")) == 0
    entries = [x async for x in ledger.export("agg", None, mark=False)]
    admitted = [
        u for u, v in zip(usages, verdicts, strict=True) if u.mode is Mode.ADMIT and v.recorded
    ]
    reports = [u for u in usages if u.mode is Mode.REPORT]
    assert admitted and len(admitted) < sum(u.mode is Mode.ADMIT for u in usages)  # some refused
    aggs = [x for x in entries if x.aggregate]
    assert {x.mode for x in aggs} == {"admit"} and all(
        x.mode == "report" for x in entries if not x.aggregate
    )
    assert totals((x.slice, x.key, x.metric, x.count, x.amount) for x in aggs) == totals(
        (u.subject.slice, u.subject.key, u.metric, 1, u.amount) for u in admitted
    )
    for x in aggs:
        assert x.interval_end_ms - x.interval_start_ms == 1000 and x.interval_start_ms % 1000 == 0
        assert x.request_id == f"agg:{x.interval_start_ms}::{x.key}:api.sms.send"
        assert (x.decision, x.reason, x.decision_id) == (1, 1, "")
    # one aggregate per (interval, subject, metric), never two
    assert len({(x.interval_start_ms, x.slice, x.key, x.metric) for x in aggs}) == len(aggs)
    assert len({x.interval_start_ms for x in aggs}) >= 2
    # reports: still one entry each
    assert sorted(x.request_id for x in entries if not x.aggregate) == sorted(
        u.request_id for u in reports
    )
    # flushing again writes nothing
    assert await ledger.flush_aggregates("agg", clock_offset_ms=10_000) == 0


async def produce_reports(e: Engine, start: int, n: int, batch: int = 100) -> list[str]:
    ids: list[str] = []
    for i in range(start, start + n, batch):
        us = [
            Usage(f"p{j}", Subject("acme", "s1"), "slice.bytes", j + 1, Mode.REPORT)
            for j in range(i, min(i + batch, start + n))
        ]
        vs = await e.decide_batch(us)
        assert all(v.recorded for v in vs)
        ids += [u.request_id for u in us]
    return ids


def pending_ids(raw: redis.Redis, tenant: str, group: str) -> set[str]:
    rows = raw.xpending_range(ledger_key(tenant), group, "-", "+", 1_000_000)
    return {str(r["message_id"]) for r in rows}  # type: ignore[union-attr]


async def test_consumer_killed_mid_stream_and_restarted_loses_and_repeats_nothing_acked(
    store: RedisStore, ledger: Ledger, raw_redis: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    e = await make_engine(store, OPEN)
    produced = await produce_reports(e, 0, 5000)
    cmd = [
        *ledger_argv(),
        "consume",
        "--tenant",
        "acme",
        "--group",
        "billing",
        "--consumer",
        "c1",
        "--batch",
        "20",
        "--redis-url",
        redis_server.url,
    ]
    first = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    assert first.stdout is not None
    lines: list[str] = []
    while len(lines) < 600:
        line = await asyncio.wait_for(first.stdout.readline(), 20)
        assert line, "consumer ended early"
        lines.append(line.decode())
    # stop reading: the consumer fills the pipe and blocks writing a batch it has not acked
    await asyncio.sleep(1.0)
    more = asyncio.create_task(produce_reports(e, 5000, 1000))  # keeps flowing meanwhile
    first.send_signal(signal.SIGKILL)
    rest = await first.stdout.read()
    await first.wait()
    assert first.returncode == -signal.SIGKILL
    lines += rest.decode().splitlines(keepends=True)
    run1 = [json.loads(x) for x in lines if x.endswith("\n")]  # a torn last line is dropped
    unacked = pending_ids(raw_redis, "acme", "billing")
    assert unacked, "the consumer was killed with a batch delivered and not acknowledged"
    produced += await more

    second = await asyncio.create_subprocess_exec(
        *cmd, "--idle-exit-s", "1.5", stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == 0
    run2 = [json.loads(x) for x in out.decode().splitlines()]

    ids1 = [x["id"] for x in run1]
    ids2 = [x["id"] for x in run2]
    assert len(set(ids1)) == len(ids1) and len(set(ids2)) == len(ids2)
    twice = set(ids1) & set(ids2)
    assert twice <= unacked  # only unacknowledged entries are printed again
    assert unacked <= set(ids2)  # and every one of them is
    # the union is the ledger: every recorded report, once
    union = {x["id"]: x["request_id"] for x in run1 + run2}
    assert sorted(union.values()) == sorted(produced)
    print(
        f"\nconsumer: {len(ids1)} printed before SIGKILL, {len(unacked)} delivered unacked, "
        f"{len(twice)} printed again after restart, {len(ids2)} printed by the restart"
    )
    # everything acknowledged, so everything trimmed
    assert pending_ids(raw_redis, "acme", "billing") == set()
    assert await ledger.lag("acme", "billing") == 0
    assert raw_redis.xlen(ledger_key("acme")) == 0


async def test_consumer_restarted_under_a_new_name_takes_over_pending_entries(
    store: RedisStore, ledger: Ledger, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, OPEN)
    produced = await produce_reports(e, 0, 300)
    c1 = ledger.consume_batches("acme", "billing", "host-1", count=50)
    taken = await anext(c1)
    await c1.aclose()  # "crashed" holding 50 delivered entries
    assert len(pending_ids(raw_redis, "acme", "billing")) == 50
    await asyncio.sleep(0.2)
    seen = await drain(
        ledger, "acme", "billing", "host-2", count=100, block_ms=50, claim_idle_ms=100
    )
    assert sorted(seen) == sorted(produced)
    assert {x.request_id for _, x in taken} <= set(seen)
    # the crashed consumer left nothing pending, so it was removed from the group
    names = [c["name"] for c in raw_redis.xinfo_consumers(ledger_key("acme"), "billing")]  # type: ignore[union-attr]
    assert names == ["host-2"]
    assert raw_redis.xlen(ledger_key("acme")) == 0


async def test_trim_never_drops_an_entry_a_group_has_not_acknowledged(
    store: RedisStore, ledger: Ledger, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, OPEN)
    key = ledger_key("acme")
    await ledger.ensure_group("acme", "billing")
    await ledger.ensure_group("acme", "audit")
    all_ids: list[str] = []
    counter = 0

    async def add(n: int) -> None:
        nonlocal counter
        known = set(all_ids)
        await produce_reports(e, 10_000 + counter, n, batch=n)
        counter += n
        all_ids.extend(i for i, _ in raw_redis.xrange(key) if i not in known)  # type: ignore[union-attr]

    def read_new(group: str, n: int) -> list[str]:
        reply = raw_redis.xreadgroup(group, group[0], {key: ">"}, count=n)
        return [i for i, _ in reply[0][1]] if reply else []  # type: ignore[index]

    await add(400)
    # billing reads and acks everything; audit has read nothing: nothing may go
    assert len(await drain(ledger, "acme", "billing", "b", count=1000, block_ms=10)) == 400
    assert raw_redis.xlen(key) == 400
    assert await ledger.lag("acme", "billing") == 0 and await ledger.lag("acme", "audit") == 400
    # audit is delivered 300 and acks 100, then 50 out of order: only the first 100 may go
    got = read_new("audit", 300)
    await ledger.ack("acme", "audit", got[:100])
    assert raw_redis.xlen(key) == 300
    await ledger.ack("acme", "audit", got[150:200])
    assert raw_redis.xlen(key) == 300
    assert await ledger.lag("acme", "audit") == 250  # 150 pending + 100 never delivered

    # a random walk of reads, acks, trims and writes by both groups; after every step, each
    # entry that either group has not acknowledged is still in the stream
    rng = random.Random(1)
    acked = {"billing": set(all_ids), "audit": set(got[:100]) | set(got[150:200])}
    held = {"billing": [], "audit": got[100:150] + got[200:]}
    for _ in range(200):
        g = rng.choice(["billing", "audit"])
        step = rng.random()
        if step < 0.2:
            await add(rng.randint(1, 30))
        elif step < 0.55:
            held[g] += read_new(g, rng.randint(1, 40))
        elif step < 0.95 and held[g]:
            pick = rng.sample(held[g], rng.randint(1, len(held[g])))
            await ledger.ack("acme", g, pick)
            acked[g] |= set(pick)
            held[g] = [i for i in held[g] if i not in acked[g]]
        else:
            await ledger.trim("acme")
        present = {i for i, _ in raw_redis.xrange(key)}  # type: ignore[union-attr]
        needed = {i for i in all_ids if i not in acked["billing"] or i not in acked["audit"]}
        assert needed <= present
        for name in ("billing", "audit"):
            assert pending_ids(raw_redis, "acme", name) == set(held[name])
            assert await ledger.lag("acme", name) == len(set(all_ids) - acked[name])
    # trimming did happen along the way
    assert raw_redis.xlen(key) < len(all_ids)
    # both catch up: all gone
    for g in ("billing", "audit"):
        await ledger.ack("acme", g, held[g])
        await drain(ledger, "acme", g, g[0], count=500, block_ms=1)
    assert raw_redis.xlen(key) == 0


async def test_export_with_mark_trims_when_there_are_no_groups(
    store: RedisStore, ledger: Ledger, raw_redis: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    e = await make_engine(store, OPEN)
    key = ledger_key("acme")
    await produce_reports(e, 0, 250)
    # stopped after 150 entries: the mark covers the first page (100) only
    n = 0
    async for _ in ledger.export("acme", None):
        n += 1
        if n == 150:
            break
    assert raw_redis.xlen(key) == 150
    # a full export: everything exported is trimmed, and the mark is its last id
    rest = [x async for x in ledger.export("acme", None)]
    assert len(rest) == 150 and raw_redis.xlen(key) == 0
    assert raw_redis.get(exported_key("acme")) == rest[-1].id
    # an export that starts past unexported entries does not let them go
    await produce_reports(e, 1000, 100)
    await asyncio.sleep(0.005)
    later = int(time.time() * 1000) + 2
    await asyncio.sleep(0.01)
    await produce_reports(e, 2000, 100)
    skipped = [x async for x in ledger.export("acme", later)]
    assert len(skipped) == 100 and raw_redis.xlen(key) == 200
    assert raw_redis.get(exported_key("acme")) == rest[-1].id
    # the CLI export reads only; with --ack it takes it all
    url = ["--tenant", "acme", "--redis-url", redis_server.url]
    assert run_cli("export", *url).stdout.count("\n") == 200
    assert raw_redis.xlen(key) == 200
    out = run_cli("export", *url, "--format", "csv", "--ack")
    assert out.returncode == 0 and out.stdout.count("\n") == 201
    assert raw_redis.xlen(key) == 0
    # with a consumer group, the group decides: an export does not trim what it has not acked
    await produce_reports(e, 3000, 50)
    await ledger.ensure_group("acme", "billing")
    assert len([x async for x in ledger.export("acme", None)]) == 50
    assert raw_redis.xlen(key) == 50
