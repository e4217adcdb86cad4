"""The spool on disk (issue #13, item 4): order, the size bound and its full policy, group
commit, durability through a SIGKILL, writers in several processes, the replay lease."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from chargepath.core.model import Mode, Subject, Usage
from chargepath.store.spool import SPOOL_FILE, Outcome, Spool, SpoolClosedError, SpooledUsage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def spooled(rid: str, amount: int = 1, tenant: str = "mvno") -> SpooledUsage:
    return SpooledUsage(
        Usage(rid, Subject(tenant, "s1"), "slice.bytes", amount, Mode.REPORT),
        "fp-" + rid,
        "d-" + rid,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


async def test_usages_come_back_in_append_order_and_leave_only_when_settled(
    tmp_path: Path,
) -> None:
    clock = Clock()
    spool = Spool(tmp_path / SPOOL_FILE, clock_ms=clock)
    await spool.open()
    try:
        assert await spool.append(spooled("a"))
        clock.now += 1000
        oks = await asyncio.gather(*(spool.append(spooled(f"b{i}")) for i in range(50)))
        assert all(oks)
        assert await spool.append_all([spooled("c1"), spooled("c2")]) == [True, True]
        clock.now += 3200
        stats = await spool.stats()
        assert stats.depth == 53 and stats.appended == 53
        assert stats.oldest_age_ms == 4200
        assert stats.health_detail() == "spool: 53 usages, oldest 4.2 s"
        clock.now += 800
        assert spool.snapshot().oldest_age_ms == 5000  # ages without I/O

        head = await spool.head(100)
        # gather starts its tasks in order, and the spool keeps the order they appended in
        assert [r.entry.usage.request_id for r in head] == [
            "a",
            *(f"b{i}" for i in range(50)),
            "c1",
            "c2",
        ]
        assert [r.seq for r in head] == sorted(r.seq for r in head)
        assert head[0].entry.spooled_at_ms == 1_700_000_000_000  # stamped at append

        await spool.settle([(r.seq, Outcome.REPLAYED) for r in head[:3]])
        await spool.settle([(head[3].seq, Outcome.DROPPED), (head[3].seq, Outcome.DROPPED)])
        left = await spool.head(100)
        assert [r.entry.usage.request_id for r in left] == [f"b{i}" for i in range(3, 50)] + [
            "c1",
            "c2",
        ]
        stats = await spool.stats()
        assert (stats.depth, stats.replayed, stats.dropped) == (49, 3, 1)
        assert stats.bytes == sum(len(r.entry.encode()) for r in left)
        assert stats.oldest_age_ms == 4000  # "a" has gone: the oldest is now a "b"
    finally:
        await spool.close()


async def test_a_full_spool_refuses_and_evicts_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / SPOOL_FILE, max_entries=3)
    await spool.open()
    try:
        assert await spool.append_all([spooled(f"r{i}") for i in range(4)]) == [
            True,
            True,
            True,
            False,
        ]
        assert not await spool.append(spooled("r4"))
        stats = await spool.stats()
        assert (stats.depth, stats.appended, stats.refused) == (3, 3, 2)
        assert stats.full and "(full" in stats.health_detail()
        assert [r.entry.usage.request_id for r in await spool.head(10)] == ["r0", "r1", "r2"]
        first = (await spool.head(1))[0]
        await spool.settle([(first.seq, Outcome.REPLAYED)])
        assert await spool.append(spooled("r5"))  # room again
    finally:
        await spool.close()

    # the bound counts the encoded usages (stamped with the time they were spooled)
    xs = [replace(spooled(f"x{i}"), spooled_at_ms=1_700_000_000_000) for i in range(3)]
    one = len(xs[0].encode())
    spool = Spool(tmp_path / "bytes.sqlite3", max_bytes=2 * one + 5)
    await spool.open()
    try:
        assert await spool.append_all(xs) == [
            True,
            True,
            False,
        ]
        stats = await spool.stats()
        assert stats.bytes == 2 * one and stats.depth == 2
    finally:
        await spool.close()


async def test_a_write_that_fails_refuses_the_usage_and_the_spool_recovers(
    tmp_path: Path,
) -> None:
    """A spool that cannot write (here: another process holds the write lock past the busy
    timeout) answers "not spooled" instead of leaving the verdict waiting."""
    spool = Spool(tmp_path / SPOOL_FILE, busy_timeout_ms=100)
    await spool.open()
    blocker = sqlite3.connect(tmp_path / SPOOL_FILE, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert await spool.append_all([spooled("x"), spooled("y")]) == [False, False]
        blocker.execute("ROLLBACK")
        assert await spool.append(spooled("z"))
        stats = await spool.stats()
        assert (stats.depth, stats.appended, stats.refused) == (1, 1, 2)
        assert [r.entry.usage.request_id for r in await spool.head(10)] == ["z"]
    finally:
        blocker.close()
        await spool.close()


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """Group commit: 2,000 verdicts answered at once do not cost 2,000 fsyncs."""
    spool = Spool(tmp_path / SPOOL_FILE)
    await spool.open()
    try:
        oks = await asyncio.gather(*(spool.append(spooled(f"r{i}")) for i in range(2000)))
        assert all(oks)
        stats = spool.snapshot()
        assert stats.appended == 2000
        assert stats.append_commits <= 200, stats
    finally:
        await spool.close()


async def test_the_file_is_sqlite_in_wal_mode_and_reopens_with_its_usages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nested" / SPOOL_FILE
    spool = Spool(path)
    await spool.open()
    await spool.append_all([spooled(f"r{i}") for i in range(5)])
    await spool.close()
    await spool.close()  # idempotent
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = Spool(path)
    stats = await again.open()
    try:
        assert stats.depth == 5
        assert [r.entry.usage.request_id for r in await again.head(10)] == [
            f"r{i}" for i in range(5)
        ]
    finally:
        await again.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from chargepath.core.model import Mode, Subject, Usage
    from chargepath.store.spool import Spool, SpooledUsage

    path, name, count, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def append(spool, i):
        u = Usage(f"{name}-{i}", Subject("mvno", "s1"), "slice.bytes", 1, Mode.REPORT)
        if await spool.append(SpooledUsage(u, "fp", f"d-{name}-{i}")):
            print(f"{name}-{i}", flush=True)  # acknowledged: on disk

    async def main():
        spool = Spool(path)
        await spool.open()
        print("open", flush=True)
        for start in range(0, count, width):
            await asyncio.gather(*(append(spool, i) for i in range(start, start + width)))
        await spool.close()
        print("done", flush=True)

    asyncio.run(main())
    """
)


def child(path: Path, name: str, count: int, width: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), name, str(count), str(width)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


async def test_every_acknowledged_usage_survives_a_sigkill(tmp_path: Path) -> None:
    path = tmp_path / SPOOL_FILE
    proc = child(path, "k", 1_000_000, 20)
    assert proc.stdout is not None
    acknowledged: list[str] = []
    assert proc.stdout.readline().strip() == "open"
    while len(acknowledged) < 500:
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line, "the child ended early"
        acknowledged.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)  # mid-append: more usages were queued
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    spool = Spool(path)
    stats = await spool.open()
    try:
        held = [r.entry.usage.request_id for r in await spool.head(10**6)]
        assert set(acknowledged) <= set(held)
        assert stats.depth == len(held)  # the counters agree with the rows after the crash
        # in order and without a gap: the child appended batch after batch, and the last
        # transaction either committed whole or not at all
        assert [int(rid.split("-")[1]) for rid in held] == list(range(len(held)))
    finally:
        await spool.close()


async def test_writers_in_several_processes_share_one_spool(tmp_path: Path) -> None:
    path = tmp_path / SPOOL_FILE
    procs = [child(path, f"w{n}", 300, 30) for n in range(3)]
    outputs = await asyncio.gather(*(asyncio.to_thread(p.communicate) for p in procs))
    for p, (out, _) in zip(procs, outputs, strict=True):
        assert p.returncode == 0
        lines = out.split()
        assert lines[0] == "open" and lines[-1] == "done" and len(lines) == 302

    spool = Spool(path)
    stats = await spool.open()
    try:
        held = [r.entry.usage.request_id for r in await spool.head(10**6)]
        assert stats.depth == 900 and len(held) == 900 and len(set(held)) == 900
        assert stats.bytes == sum(len(r.entry.encode()) for r in await spool.head(10**6))
        for n in range(3):
            mine = [int(rid.split("-")[1]) for rid in held if rid.startswith(f"w{n}-")]
            assert len(mine) == 300
            # each process's batches of 30 stay in order relative to each other
            assert [i // 30 for i in mine] == sorted(i // 30 for i in mine)
    finally:
        await spool.close()


async def test_one_process_at_a_time_holds_the_replay_lease(tmp_path: Path) -> None:
    clock = Clock()
    a = Spool(tmp_path / SPOOL_FILE, clock_ms=clock)
    b = Spool(tmp_path / SPOOL_FILE, clock_ms=clock)
    await a.open()
    await b.open()
    try:
        assert await a.claim_replay("a", 10_000)
        assert not await b.claim_replay("b", 10_000)
        clock.now += 5_000
        assert await a.claim_replay("a", 10_000)  # renewed until now + 10 s
        clock.now += 9_000
        assert not await b.claim_replay("b", 10_000)
        clock.now += 1_001  # a died: its lease lapses
        assert await b.claim_replay("b", 10_000)
        assert not await a.claim_replay("a", 10_000)
        await b.release_replay("b")
        assert await a.claim_replay("a", 10_000)
    finally:
        await a.close()
        await b.close()


async def test_a_spool_that_cannot_open_says_so(tmp_path: Path) -> None:
    (tmp_path / SPOOL_FILE).mkdir()  # a folder where the file should be
    spool = Spool(tmp_path / SPOOL_FILE)
    with pytest.raises(sqlite3.Error):
        await spool.open()
    with pytest.raises(SpoolClosedError):
        await spool.append(spooled("r"))
