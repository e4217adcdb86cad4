"""The spool: a durable local queue of the usages a gateway answered while the store was
unavailable and that the client may act on (reports, and admits allowed under fail-open), kept
until they are replayed into the store (:mod:`chargepath.spool_replay`).

Contract:

* :meth:`Spool.append` returns True only once the usage is on disk (the WAL fsync'd); the
  verdict may then say ``spooled``. False means the usage is NOT spooled (the spool is full,
  the disk failed, or the write was withdrawn at its ``timeout_s``) and never will be: the
  verdict must then say neither recorded nor spooled, so the client keeps the obligation to
  resend. An appended usage leaves the spool only through :meth:`Spool.settle` (the
  replayer, once the store answered for it) or :meth:`Spool.settle_held` (the engine, once
  the late reply of its first store call says the store recorded it), with its outcome
  counted (and, for a dropped one, logged by the replayer): nothing acknowledged as spooled
  is ever removed silently.
* Holds: a usage appended with ``hold_ms`` (its first store call timed out in flight and may
  still commit) is not replayed until the engine ends the hold (:meth:`Spool.settle_held`) or
  the hold lapses; the replayer keeps its tenant's order and stops at it.
* Full policy: an append that would pass ``max_entries`` usages or ``max_bytes`` bytes of
  encoded usages is refused; nothing already spooled is evicted to make room.
* Order: :meth:`Spool.head` returns usages in append order (commit order across processes).
* Several gateway processes may share one data folder: they share one spool file. Appends of
  every process go into it (SQLite serialises writers); one process at a time replays, the one
  holding the replay lease (:meth:`Spool.claim_replay`), which expires if its holder dies.
* No call blocks the event loop: every SQLite call runs on the spool's own thread. Appends
  queued while a commit is in progress are written together in the next transaction, so many
  verdicts answered at the same moment share one fsync (group commit).

Why SQLite in WAL mode with ``synchronous=FULL`` rather than an append-only file: a spool is
appended by several processes and consumed from its head while still being appended, and a
replayed usage must be removed for good. SQLite gives that in the standard library:
transactions make a group of appends and the removal of replayed usages atomic and crash-safe
(a torn write is rolled back from the WAL's checksums, never half-read), ``BEGIN IMMEDIATE``
serialises the processes sharing the file, the replay lease is a row, and the size counters
live in the same transaction as the usages they count. An append-only file would need, for the
same guarantees, a record framing with checksums, a consumed-offset file kept in step with it,
compaction, and a lock protocol between processes. In WAL mode with ``synchronous=FULL`` a
commit fsyncs the WAL once; readers (stats, the replayer) never block the writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from chargepath.core.model import Mode, Subject, Usage

log = logging.getLogger("chargepath.spool")

SPOOL_FILE = "spool.sqlite3"
FORMAT_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS spool_usage (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- append order, never reused
        spooled_at_ms INTEGER NOT NULL,         -- wall clock, ms since the Unix epoch
        size INTEGER NOT NULL,                  -- bytes of body
        body BLOB NOT NULL                      -- SpooledUsage.encode()
    )""",
    """CREATE TABLE IF NOT EXISTS spool_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        depth INTEGER NOT NULL,                 -- rows in spool_usage
        bytes INTEGER NOT NULL,                 -- sum of spool_usage.size
        lease_holder TEXT NOT NULL DEFAULT '',  -- the process replaying, if any
        lease_until_ms INTEGER NOT NULL DEFAULT 0
    )""",
    "INSERT OR IGNORE INTO spool_meta (id, depth, bytes) VALUES (1, 0, 0)",
    # A usage whose first store call may still commit (it timed out in flight) is held: the
    # replayer leaves it (and its tenant's later ones) until the engine has read that call's
    # late reply (Spool.settle_held) or until_ms has passed (its process died meanwhile).
    """CREATE TABLE IF NOT EXISTS spool_hold (
        seq INTEGER PRIMARY KEY,                -- spool_usage.seq
        decision_id TEXT NOT NULL,              -- the degraded verdict's decision id
        until_ms INTEGER NOT NULL               -- wall clock, ms since the Unix epoch
    )""",
    "CREATE INDEX IF NOT EXISTS spool_hold_decision ON spool_hold (decision_id)",
)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class SpooledUsage:
    """A usage answered degraded, as it must be replayed.

    ``fingerprint`` is the usage's dedup fingerprint as its first attempt had it: a unary
    usage's (mode included), a stream usage's session fingerprint (its request id and
    content). The replay is keyed on the request id, with this fingerprint, so that it finds
    the request-id record a late first attempt left (and that attempt finds the replay's).
    ``decision_id`` is the degraded verdict's, so that the ledger entry written by the replay
    carries the id the client saw, and a late commit of the same attempt is recognised by it.
    ``spooled_at_ms`` is the wall clock at the degraded verdict.
    """

    usage: Usage
    fingerprint: str
    decision_id: str
    trace_id: str = ""
    spooled_at_ms: int = 0

    def __post_init__(self) -> None:
        if not self.fingerprint:
            raise ValueError("a spooled usage needs its fingerprint (the replay's dedup check)")
        if self.usage.mode not in (Mode.ADMIT, Mode.REPORT):
            raise ValueError("a spooled usage is an admit or a report")

    def encode(self) -> bytes:
        """JSON, so that an operator can read a spool with the ``sqlite3`` shell."""
        u = self.usage
        return json.dumps(
            {
                "v": FORMAT_VERSION,
                "request_id": u.request_id,
                "tenant": u.subject.tenant,
                "slice": u.subject.slice,
                "key": u.subject.key,
                "metric": u.metric,
                "amount": u.amount,
                "mode": u.mode.name.lower(),
                "labels": [list(kv) for kv in u.labels],
                "occurred_at_ms": u.occurred_at_ms,
                "session_id": u.session_id,
                "sequence": u.sequence,
                "fingerprint": self.fingerprint,
                "decision_id": self.decision_id,
                "trace_id": self.trace_id,
                "spooled_at_ms": self.spooled_at_ms,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SpooledUsage:
        d: dict[str, Any] = json.loads(raw)
        if d.get("v") != FORMAT_VERSION:
            raise ValueError(f"spool entry format {d.get('v')!r} is not {FORMAT_VERSION}")
        usage = Usage(
            request_id=d["request_id"],
            subject=Subject(d["tenant"], d["slice"], d["key"]),
            metric=d["metric"],
            amount=int(d["amount"]),
            mode=Mode[d["mode"].upper()],
            labels=tuple((str(k), str(v)) for k, v in d["labels"]),
            occurred_at_ms=int(d["occurred_at_ms"]),
            session_id=d["session_id"],
            sequence=int(d["sequence"]),
        )
        return cls(usage, d["fingerprint"], d["decision_id"], d["trace_id"], d["spooled_at_ms"])


class SpoolRecord(NamedTuple):
    """A spooled usage with its place in the spool, and the wall-clock time (ms) until which
    it is held (0: not held; see :meth:`Spool.settle_held`)."""

    seq: int
    entry: SpooledUsage
    held_until_ms: int = 0


class Outcome(enum.Enum):
    """How a spooled usage left the spool."""

    #: the replay recorded it (a ledger entry now carries its request id)
    REPLAYED = "replayed"
    #: the store had already recorded it (a late commit, an earlier replay, a resend)
    ALREADY_RECORDED = "already_recorded"
    #: the store refused to record it (no entitlement any more, a request id reused for
    #: another usage, a late commit that refused the admit); the replayer logs each one
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """The spool as this process last saw it.

    ``depth``, ``bytes`` and ``oldest_age_ms`` describe the spool file (shared by every process
    of the data folder); the counters are this process's since it opened the spool: usages
    appended, appends refused (full or a disk error), usages settled by outcome, and the append
    transactions committed (one fsync each: ``appended / append_commits`` is the mean group).
    """

    depth: int = 0
    bytes: int = 0
    oldest_age_ms: int = 0
    max_entries: int = 0
    max_bytes: int = 0
    appended: int = 0
    refused: int = 0
    replayed: int = 0
    already_recorded: int = 0
    dropped: int = 0
    append_commits: int = 0

    @property
    def full(self) -> bool:
        return self.depth >= self.max_entries or self.bytes >= self.max_bytes

    def health_detail(self) -> str:
        """One line for the health report, e.g. ``spool: 12 usages, oldest 4.2 s``."""
        if not self.depth:
            return "spool: empty"
        text = (
            f"spool: {self.depth} usage{'s' if self.depth != 1 else ''}, "
            f"oldest {self.oldest_age_ms / 1000:.1f} s"
        )
        if self.full:
            text += f" (full: {self.max_entries} usages or {self.max_bytes} bytes)"
        return text


class SpoolClosedError(RuntimeError):
    """The spool was used after :meth:`Spool.close`."""


_Job = tuple[str, Any, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class Spool:
    """The spool file ``path`` (normally ``<data_dir>/spool.sqlite3``), opened by
    :meth:`open` and closed by :meth:`close`. Safe for concurrent use from one event loop;
    other processes may open the same file.

    ``max_entries`` and ``max_bytes`` bound the spool (see the full policy above); the bytes
    counted are the encoded usages (about 300 bytes each; the file holds some more, and
    does not shrink when the usages are replayed, since SQLite reuses its free pages).
    ``clock_ms`` is the wall clock in milliseconds (injected by tests).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_entries: int = 1_000_000,
        max_bytes: int = 512 * 1024 * 1024,
        busy_timeout_ms: int = 10_000,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._busy_timeout_ms = busy_timeout_ms
        self._clock_ms = clock_ms
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._stats = SpoolStats(max_entries=max_entries, max_bytes=max_bytes)
        self._oldest_at_ms: int | None = None  # when the oldest usage was spooled, if any
        self._closed = False

    # -- life cycle -----------------------------------------------------------------------

    async def open(self) -> SpoolStats:
        """Create or open the spool file and start its thread; returns what it holds (usages
        left by an earlier run are replayed like any other)."""
        if self._thread is not None:
            raise RuntimeError("spool already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="chargepath-spool", daemon=True)
        self._thread.start()
        try:
            await self._submit("open", None)
        except BaseException:
            await self.close()
            raise
        return self._stats

    async def close(self) -> None:
        """Finish the queued work, then close the file. Idempotent."""
        if self._closed or self._thread is None:
            self._closed = True
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- appending ------------------------------------------------------------------------

    async def append(self, entry: SpooledUsage, *, timeout_s: float | None = None) -> bool:
        """Write one usage durably; True once it is fsync'd, False if it was refused."""
        return bool((await self.append_all([entry], timeout_s=timeout_s))[0])

    async def append_all(
        self,
        entries: Sequence[SpooledUsage],
        *,
        timeout_s: float | None = None,
        hold_ms: int = 0,
    ) -> list[bool]:
        """Write usages durably, in order, in the same transaction as whatever else is queued;
        per usage True once fsync'd, False if refused (full: this usage, and not necessarily
        the ones after it, since a smaller one may still fit; or a disk error: all of them).

        ``timeout_s`` bounds the wait for the spool's write lock (a commit in progress, another
        process's transaction): past it the usages are withdrawn, all False, and never
        written. Usages already taken into a transaction when it expires are waited for to
        the end of that transaction (their inserts and one fsync), so the answer is always
        what the file holds.

        ``hold_ms`` > 0: the usages are held that long (by their decision ids) in the same
        transaction: the replayer leaves them until :meth:`settle_held` names them or the hold
        lapses. For usages whose first store call is still in flight."""
        if not entries:
            return []
        now = self._clock_ms()
        stamped = [e if e.spooled_at_ms else replace(e, spooled_at_ms=now) for e in entries]
        until = now + hold_ms if hold_ms > 0 else 0
        encoded = [(e.spooled_at_ms, e.encode(), until, e.decision_id) for e in stamped]
        claim = _Claim()
        written: asyncio.Future[list[bool]] = self._submit("append", (encoded, claim))
        if timeout_s is None:
            return await written
        try:
            return await asyncio.wait_for(asyncio.shield(written), timeout_s)
        except TimeoutError:
            if claim.withdraw():
                return [False] * len(entries)
            return await written  # in a transaction already: its outcome is the truth

    # -- consuming ------------------------------------------------------------------------

    async def head(self, limit: int) -> list[SpoolRecord]:
        """The oldest ``limit`` usages, oldest first, left in the spool, with their holds."""
        rows: list[tuple[int, bytes, int]] = await self._submit("head", limit)
        return [SpoolRecord(seq, SpooledUsage.decode(body), held) for seq, body, held in rows]

    async def settle_held(self, decision_ids: Sequence[str], *, recorded: bool) -> int:
        """End the holds of the held usages with these decision ids, in one transaction.
        ``recorded``: the store recorded them (their first call committed late): they leave
        the spool as :attr:`Outcome.ALREADY_RECORDED`; else they stay, free to be replayed.
        Only the engine calls this, once it has read the late reply of their first call.
        Returns how many usages left the spool."""
        if not decision_ids:
            return 0
        removed: int = await self._submit("settle_held", (list(decision_ids), recorded))
        return removed

    async def settle(self, outcomes: Sequence[tuple[int, Outcome]]) -> None:
        """Remove the usages ``(seq, outcome)`` for good, in one transaction, and count their
        outcomes. Only the replayer calls this, after the store answered for each of them."""
        if outcomes:
            await self._submit("settle", list(outcomes))

    async def claim_replay(self, holder: str, lease_ms: int) -> bool:
        """Take (or renew) the replay lease for ``lease_ms``; False while another holder's
        lease runs. The holder renews it before every batch; a dead holder's lapses."""
        claimed: bool = await self._submit("claim", (holder, lease_ms))
        return claimed

    async def release_replay(self, holder: str) -> None:
        await self._submit("release", holder)

    # -- observing ------------------------------------------------------------------------

    async def stats(self) -> SpoolStats:
        """Read the spool's depth, bytes and oldest usage now."""
        await self._submit("stats", None)
        return self._stats

    def snapshot(self) -> SpoolStats:
        """The stats without I/O, for metric callbacks and the health report: depth and bytes
        as of this process's last spool operation, the oldest usage's age as of now."""
        oldest = self._oldest_at_ms
        if oldest is None:
            return self._stats
        return replace(self._stats, oldest_age_ms=max(0, self._clock_ms() - oldest))

    # -- the spool thread -----------------------------------------------------------------

    def _submit(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        if self._closed or self._thread is None:
            raise SpoolClosedError("the spool is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((kind, payload, future, loop))
        return future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            stop = False
            while True:  # take everything already queued: one transaction for the appends
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            appends = [j for j in batch if j[0] == "append"]
            if appends:
                self._answer_appends(appends)
            for j in batch:
                if j[0] != "append":
                    self._answer(j)
            if stop:
                break
        if self._db is not None:
            self._db.close()
            self._db = None

    @staticmethod
    def _deliver(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        Spool._deliver_all([job], [result], error)

    @staticmethod
    def _deliver_all(
        jobs: Sequence[_Job], results: Sequence[Any], error: BaseException | None = None
    ) -> None:
        """Answer ``jobs`` with one wake-up of each waiting event loop (not one per job: under
        load a group commit answers hundreds of appends)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for job, result in zip(jobs, results, strict=True):
            by_loop.setdefault(job[3], []).append((job[2], result))

        def resolve(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
            for future, result in answers:
                if future.done():  # the caller went away; the work is done all the same
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(resolve, answers)

    def _answer(self, job: _Job) -> None:
        kind, payload = job[0], job[1]
        try:
            if kind == "open":
                self._connect()
                result: Any = None
            else:
                db = self._connection()
                if kind == "head":
                    result = db.execute(
                        "SELECT u.seq, u.body, COALESCE(h.until_ms, 0) FROM spool_usage u "
                        "LEFT JOIN spool_hold h ON h.seq = u.seq ORDER BY u.seq LIMIT ?",
                        (payload,),
                    ).fetchall()
                elif kind == "settle_held":
                    result = self._settle_held(db, *payload)
                elif kind == "settle":
                    self._settle(db, payload)
                    result = None
                elif kind == "claim":
                    result = self._claim(db, *payload)
                elif kind == "release":
                    with self._transaction(db):
                        db.execute(
                            "UPDATE spool_meta SET lease_holder = '', lease_until_ms = 0 "
                            "WHERE id = 1 AND lease_holder = ?",
                            (payload,),
                        )
                    result = None
                else:
                    result = None
            self._refresh(self._connection())
        except Exception as exc:  # the caller gets it; the thread lives on for the others
            self._deliver(job, error=exc)
            return
        self._deliver(job, result)

    def _answer_appends(self, queued: list[_Job]) -> None:
        """One transaction, hence one fsync, for every append queued and not withdrawn."""
        accepted: list[list[bool]] = []
        jobs, withdrawn = queued, []
        try:
            db = self._connection()
            with self._transaction(db):
                # once the write lock is held: an append withdrawn while waiting for it is
                # left out, one taken now is answered by this transaction's outcome
                jobs = [j for j in queued if j[1][1].take()]
                withdrawn = [j for j in queued if j[1][1].withdrawn]
                depth, size = db.execute("SELECT depth, bytes FROM spool_meta").fetchone()
                rows: list[tuple[int, int, bytes]] = []
                holds: list[tuple[int, str, int]] = []  # (row number, decision id, until)
                for job in jobs:
                    flags = []
                    for at_ms, body, until, decision_id in job[1][0]:
                        fits = depth < self.max_entries and size + len(body) <= self.max_bytes
                        if fits:
                            depth += 1
                            size += len(body)
                            if until:
                                holds.append((len(rows), decision_id, until))
                            rows.append((at_ms, len(body), body))
                        flags.append(fits)
                    accepted.append(flags)
                if holds:  # one by one, for the seq of each held row (append order kept)
                    seqs = [
                        db.execute(
                            "INSERT INTO spool_usage (spooled_at_ms, size, body) "
                            "VALUES (?, ?, ?) RETURNING seq",
                            row,
                        ).fetchone()[0]
                        for row in rows
                    ]
                    db.executemany(
                        "INSERT INTO spool_hold (seq, decision_id, until_ms) VALUES (?, ?, ?)",
                        [(seqs[n], did, until) for n, did, until in holds],
                    )
                else:
                    db.executemany(
                        "INSERT INTO spool_usage (spooled_at_ms, size, body) VALUES (?, ?, ?)",
                        rows,
                    )
                db.execute("UPDATE spool_meta SET depth = ?, bytes = ? WHERE id = 1", (depth, size))
        except Exception as exc:  # refused, never left waiting: the engine awaits the answer
            # ``jobs``: every queued append if the lock was never taken, else those taken
            jobs = jobs + withdrawn
            refused = sum(len(j[1][0]) for j in jobs)
            log.error("spool: %d usage(s) not spooled: %s", refused, exc)
            self._stats = replace(self._stats, refused=self._stats.refused + refused)
            self._deliver_all(jobs, [[False] * len(job[1][0]) for job in jobs])
            return
        n_ok = sum(f.count(True) for f in accepted)
        n_refused = sum(f.count(False) for f in accepted)
        n_withdrawn = sum(len(j[1][0]) for j in withdrawn)
        if n_refused:
            log.warning("spool full: %d usage(s) refused", n_refused)
        if n_withdrawn:
            log.warning("spool: %d usage(s) withdrawn by their writer's timeout", n_withdrawn)
        self._stats = replace(
            self._stats,
            appended=self._stats.appended + n_ok,
            refused=self._stats.refused + n_refused + n_withdrawn,
            append_commits=self._stats.append_commits + 1,
        )
        try:
            self._refresh(db)
        except Exception as exc:
            log.warning("spool: stats not refreshed: %s", exc)
        self._deliver_all(jobs, accepted)
        self._deliver_all(withdrawn, [[False] * len(j[1][0]) for j in withdrawn])

    def _connect(self) -> None:
        db = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,  # transactions are explicit (BEGIN IMMEDIATE)
        )
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        # Several processes may create the file at once: the first to switch it to WAL wins,
        # the others find it switched (a busy file is retried by the busy timeout).
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"spool: journal_mode is {mode}, not wal")
        db.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit
        with self._transaction(db):
            for statement in _SCHEMA:
                db.execute(statement)
        self._db = db

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolClosedError("the spool is not open")
        return self._db

    @staticmethod
    def _transaction(db: sqlite3.Connection) -> _Transaction:
        return _Transaction(db)

    def _settle(self, db: sqlite3.Connection, outcomes: list[tuple[int, Outcome]]) -> None:
        counts = {o: 0 for o in Outcome}
        with self._transaction(db):
            freed = 0
            removed = 0
            for seq, outcome in outcomes:
                row = db.execute(
                    "DELETE FROM spool_usage WHERE seq = ? RETURNING size", (seq,)
                ).fetchone()
                if row is not None:  # settled twice: counted once
                    freed += row[0]
                    removed += 1
                    counts[outcome] += 1
                    db.execute("DELETE FROM spool_hold WHERE seq = ?", (seq,))
            db.execute(
                "UPDATE spool_meta SET depth = depth - ?, bytes = bytes - ? WHERE id = 1",
                (removed, freed),
            )
        s = self._stats
        self._stats = replace(
            s,
            replayed=s.replayed + counts[Outcome.REPLAYED],
            already_recorded=s.already_recorded + counts[Outcome.ALREADY_RECORDED],
            dropped=s.dropped + counts[Outcome.DROPPED],
        )

    def _settle_held(self, db: sqlite3.Connection, decision_ids: list[str], recorded: bool) -> int:
        removed = freed = 0
        with self._transaction(db):
            for did in decision_ids:
                for (seq,) in db.execute(
                    "DELETE FROM spool_hold WHERE decision_id = ? RETURNING seq", (did,)
                ).fetchall():
                    if not recorded:
                        continue
                    row = db.execute(
                        "DELETE FROM spool_usage WHERE seq = ? RETURNING size", (seq,)
                    ).fetchone()
                    if row is not None:
                        freed += row[0]
                        removed += 1
            if removed:
                db.execute(
                    "UPDATE spool_meta SET depth = depth - ?, bytes = bytes - ? WHERE id = 1",
                    (removed, freed),
                )
        if removed:
            s = self._stats
            self._stats = replace(s, already_recorded=s.already_recorded + removed)
        return removed

    def _claim(self, db: sqlite3.Connection, holder: str, lease_ms: int) -> bool:
        now = self._clock_ms()
        with self._transaction(db):
            current, until = db.execute(
                "SELECT lease_holder, lease_until_ms FROM spool_meta WHERE id = 1"
            ).fetchone()
            if current and current != holder and until > now:
                return False
            db.execute(
                "UPDATE spool_meta SET lease_holder = ?, lease_until_ms = ? WHERE id = 1",
                (holder, now + lease_ms),
            )
        return True

    def _refresh(self, db: sqlite3.Connection) -> None:
        depth, size = db.execute("SELECT depth, bytes FROM spool_meta").fetchone()
        oldest = db.execute("SELECT spooled_at_ms FROM spool_usage ORDER BY seq LIMIT 1").fetchone()
        self._oldest_at_ms = oldest[0] if oldest else None
        age = max(0, self._clock_ms() - oldest[0]) if oldest else 0
        self._stats = replace(self._stats, depth=depth, bytes=size, oldest_age_ms=age)


class _Claim:
    """Who settles a queued append, first come first served: the spool thread, which takes it
    into a transaction once it holds the write lock, or its writer, which withdraws it at its
    timeout. Either is final."""

    __slots__ = ("_lock", "_state")

    _QUEUED, _TAKEN, _WITHDRAWN = 0, 1, 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = self._QUEUED

    def take(self) -> bool:
        with self._lock:
            if self._state == self._QUEUED:
                self._state = self._TAKEN
            return self._state == self._TAKEN

    def withdraw(self) -> bool:
        """True if the append is (now) withdrawn: it will never be written."""
        with self._lock:
            if self._state == self._QUEUED:
                self._state = self._WITHDRAWN
            return self._state == self._WITHDRAWN

    @property
    def withdrawn(self) -> bool:
        return self._state == self._WITHDRAWN


class _Transaction:
    """``BEGIN IMMEDIATE`` (the write lock at once, so two processes never deadlock upgrading
    a read lock), then COMMIT, or ROLLBACK on an error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


def worker_holder() -> str:
    """A replay lease holder name for this process: host-local, unique while it lives."""
    return f"pid-{os.getpid()}-{os.urandom(4).hex()}"
