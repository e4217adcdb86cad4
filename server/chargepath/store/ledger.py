"""The billing ledger: how billing reads, acknowledges and trims what Chargepath recorded.

Every ALLOWed admit and every report is written to the tenant's ledger, the Redis Stream
``cp:{T}:ledger``, by ``decide.lua`` in the same atomic step as its debit and its dedup record
(DESIGN property 3). Plans with ``ledger: {mode: aggregate}`` add allowed admits to a
per-interval aggregate (hash ``cp:{T}:agg``) instead; :meth:`Ledger.flush_aggregates` moves every
ended interval into the ledger as one entry carrying the sum and the count, atomically
(``flush_aggregates.lua``), so the ledger's totals always equal the units decided.

Contract
--------

* **Exactly once in the ledger.** A recorded usage has exactly one ledger entry (or is counted
  in exactly one aggregate entry): the script that debits also writes the entry, a retried or
  resent usage is answered from its dedup record and writes nothing, and an aggregate is
  written and deleted in one script.
* **Reversals.** A usage the store recorded after its caller had been answered by the failure
  policy and refused (a store call that timed out, then committed: an admit answered DENY or
  THROTTLE) is followed by a reversal entry (``reversal``, same request id and decision id,
  the same amount to subtract), written at most once (``reverse.lua``). Billing sums
  :attr:`LedgerEntry.billed_amount`: a refused caller nets to 0.
* **At least once to a consumer group.** :meth:`Ledger.consume` reads with ``XREADGROUP``. An
  entry stays in the group's pending list (PEL) until :meth:`Ledger.ack`; the consumer must
  ack only after it has durably handed the entry on (the CLI writes and flushes stdout first).
  A consumer that crashes between handing on and acking gets those entries again: a consumer
  restarted under the same name first re-reads its own pending entries (``XREADGROUP`` from id
  ``0``), then new ones (``>``); with ``claim_idle_ms``, a consumer also takes over
  (``XAUTOCLAIM``) entries left pending by any other consumer for that long, e.g. a crashed
  one that restarted under a new name. So an acknowledged entry is never delivered again to
  the group, and an entry delivered but not acknowledged is delivered again, never lost.
  Billing deduplicates redeliveries by entry id (or ``request_id``).
* **Export.** :meth:`Ledger.export` reads a range with ``XRANGE`` in pages of ``page_size``
  (memory bounded by a page, whatever the ledger's length). With ``mark`` it records the id
  of the last entry exported in ``cp:{T}:ledger:exported``; the mark only moves forward, and
  only over a contiguous export (an export starting past unexported entries does not move
  it). ``chargepath ledger export`` never marks unless given ``--ack``, and then only what it
  has written and flushed.
* **Rows.** :meth:`LedgerEntry.to_row` is what billing reads (:data:`ROW_COLUMNS`, in that
  order): names for decision and reason, ISO 8601 UTC times (None when unset), the tenant and
  the metric's unit; :meth:`LedgerEntry.from_row` reads one back (JSON line or CSV row).
  :class:`LedgerSummary` sums entries per tenant, subject, metric and period, reversals
  netted out.
* **What is trimmed, when.** :meth:`Ledger.trim` (called after every :meth:`Ledger.ack` and
  every export mark) removes, with ``XTRIM MINID`` in one Lua script (``trim_ledger.lua``):
  when the stream has consumer groups, the entries that every group has acknowledged: below the
  smallest of each group's safe point, which is its smallest pending id if it has pending
  entries, else the id just after its last-delivered id; when it has no group, the entries up
  to the export mark. An unacknowledged (or, without groups, unexported) entry is never
  trimmed; reading the groups and trimming are one atomic step, so no delivery or ack can slip
  in between. A group that lags holds the ledger back for every group.
* **Memory stays bounded** while consumers keep up: the ledger holds only entries not yet
  acknowledged by every group (plus, per group, its PEL of delivered-unacknowledged entries,
  bounded by the consumers' batch size), the aggregates hash holds only the current intervals,
  and consumers that left no pending entry behind are removed when another consumer claims.
  If no consumer reads, the ledger grows: that is the price of never losing a recorded unit
  (watch :meth:`Ledger.lag`).
* **Durability.** The ledger lives in Redis; with the default configuration (AOF, fsync every
  second) an acknowledged report survives a restart of Redis.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import ResponseError

from chargepath.core.model import Decision, Reason
from chargepath.core.periods import DAY_MS, Period, civil_from_days, days_from_civil, period_bounds
from chargepath.core.plans import PolicyDocument
from chargepath.store.connect import RedisClient, RedisTarget, connect
from chargepath.store.protocol import US, ledger_key, read_script, tenant_prefix
from chargepath.store.protocol import aggregates_key as aggregates_key

if TYPE_CHECKING:
    from chargepath.store.redis_store import RedisStore

__all__ = [
    "OVERAGE_REASONS",
    "ROW_COLUMNS",
    "SUMMARY_COLUMNS",
    "Ledger",
    "LedgerEntry",
    "LedgerSummary",
    "SummaryLine",
    "aggregates_key",
    "exported_key",
    "iso_ms",
    "parse_iso_ms",
    "parse_stream_id",
]

#: The columns of a ledger row (``chargepath ledger export`` and ``consume``, every format), in
#: this order; README's "The billing ledger" documents each. Add new columns at the end only.
ROW_COLUMNS: Final = (
    "id",
    "tenant",
    "slice",
    "key",
    "metric",
    "unit",
    "amount",
    "billed_amount",
    "count",
    "mode",
    "decision",
    "reason",
    "overage",
    "reversal",
    "aggregate",
    "request_id",
    "decision_id",
    "policy_version",
    "occurred_at",
    "decided_at",
    "interval_start",
    "interval_end",
    "labels",
    "overage_units",
    "lease_id",
)

#: Reasons with which a usage is recorded past a limit: a soft limit crossed (an admit or a
#: report), or a report that took a bucket into debt or a quota past its amount.
OVERAGE_REASONS: Final = frozenset(
    {
        Reason.SOFT_LIMIT_EXCEEDED,
        Reason.RATE_LIMITED,
        Reason.QUOTA_EXHAUSTED,
        Reason.AMOUNT_EXCEEDS_CAPACITY,
    }
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_EXPANDED: Final = re.compile(r"([+-]\d{5,})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})Z")


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds:
    ``2026-03-01T12:00:00.250Z`` (exact: integer arithmetic, no float). A time past the year
    9999 (stored times go up to 2^53 - 1 ms) takes ISO 8601's expanded year, ``+285616-...``."""
    days, rem = divmod(ms, DAY_MS)
    y, mo, d = civil_from_days(days)
    h, rem = divmod(rem, 3_600_000)
    mi, rem = divmod(rem, 60_000)
    sec, milli = divmod(rem, 1000)
    year = f"{y:04d}" if 0 <= y <= 9999 else f"{y:+06d}"
    return f"{year}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}.{milli:03d}Z"


def parse_iso_ms(text: str) -> int:
    """The inverse of :func:`iso_ms` (also any ISO 8601 time :mod:`datetime` reads; UTC when it
    has no offset)."""
    m = _EXPANDED.fullmatch(text)
    if m:
        y, mo, d, h, mi, sec, milli = (int(g) for g in m.groups())
        return days_from_civil(y, mo, d) * DAY_MS + ((h * 60 + mi) * 60 + sec) * 1000 + milli
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS


def _enum_name(enum: type[Decision] | type[Reason], code: int) -> str:
    """The name of a ``chargepath.v1`` enum code as the CLI spells it (``ALLOW``,
    ``RATE_LIMITED``); a code this version does not know stays a number, as text."""
    try:
        return enum(code).name
    except ValueError:
        return str(code)


def _enum_code(enum: type[Decision] | type[Reason], raw: Any) -> int:
    if isinstance(raw, int):
        return raw
    text = str(raw)
    return int(text) if text.lstrip("-").isdigit() else int(enum[text])


def _flag(raw: Any) -> bool:
    return raw is True or str(raw).lower() in ("true", "1")


def _opt_ms(raw: Any) -> int:
    return parse_iso_ms(str(raw)) if raw not in (None, "") else 0


def exported_key(tenant: str) -> str:
    """The export mark: id of the last ledger entry exported (string)."""
    return f"{tenant_prefix(tenant)}ledger:exported"


def parse_stream_id(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a tuple that sorts like Redis sorts stream ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _int(fields_: Mapping[str, str], name: str, default: int = 0) -> int:
    raw = fields_.get(name)
    return int(raw) if raw else default


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger entry: a recorded usage, or (``aggregate``) the sum of ``count`` allowed
    admits of one subject and metric over ``[interval_start_ms, interval_end_ms)``, or
    (``reversal``) the cancellation of a recorded usage: the store recorded it after its caller
    had been answered by the failure policy and refused (an admit answered DENY or THROTTLE,
    ``decision``/``reason`` those of that answer). A reversal names the usage by
    ``request_id`` and ``decision_id`` (those of its entry, or of the admit counted in an
    aggregate) and carries its ``amount``: billing subtracts it (:attr:`billed_amount`).

    ``id`` is the stream id; times are milliseconds since the Unix epoch on Redis' clock;
    ``decision`` and ``reason`` are the numbers of the ``chargepath.v1`` enums; an aggregate has
    no decision id and policy version 0 (its admits may span versions).
    """

    id: str
    request_id: str
    decision_id: str
    metric: str
    amount: int
    mode: str
    decision: int
    reason: int
    policy_version: int
    decided_at_ms: int
    slice: str = ""
    key: str = ""
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    occurred_at_ms: int = 0
    count: int = 1
    aggregate: bool = False
    interval_start_ms: int = 0
    interval_end_ms: int = 0
    reversal: bool = False
    #: a lease report (``mode`` "lease"): the lease, and the units of ``amount`` beyond what
    #: the lease had available (overage, RFC 8506); ``amount`` is all the use reported
    lease_id: str = ""
    overage: int = 0

    @property
    def billed_amount(self) -> int:
        """What the entry adds to the units billed: its amount, negative for a reversal."""
        return -self.amount if self.reversal else self.amount

    @classmethod
    def from_fields(cls, entry_id: str, f: Mapping[str, str]) -> LedgerEntry:
        """From the stream entry's fields: the packed field ``x`` of a recorded usage
        (written by decide.lua, see ``scripts/lib/ledger.lua``), or the fields of an aggregate
        (written by flush_aggregates.lua, see its header), of a reversal (reverse.lua) or of
        a lease report (lease.lua)."""
        packed = f.get("x")
        if packed is not None:
            return cls._from_packed(entry_id, packed)
        return cls(
            id=entry_id,
            request_id=f.get("rid", ""),
            decision_id=f.get("did", ""),
            metric=f.get("m", ""),
            amount=_int(f, "a"),
            mode=f.get("mo", ""),
            decision=_int(f, "d"),
            reason=_int(f, "r"),
            policy_version=_int(f, "pv"),
            decided_at_ms=_int(f, "ts"),
            slice=f.get("sl", ""),
            key=f.get("k", ""),
            count=_int(f, "n", 1),
            aggregate=f.get("ag") == "1",
            interval_start_ms=_int(f, "is"),
            interval_end_ms=_int(f, "ie"),
            reversal=f.get("rv") == "1",
            labels={str(k): str(v) for k, v in json.loads(f["lb"]).items()} if f.get("lb") else {},
            lease_id=f.get("ls", ""),
            overage=_int(f, "ov"),
        )

    @classmethod
    def _from_packed(cls, entry_id: str, packed: str) -> LedgerEntry:
        """``request_id US decision_id US slice US key US metric US amount US mode US decision
        US reason US policy_version US decided_at_ms [US occurred_at_ms US labels]``."""
        p = packed.split(US)
        labels = p[12] if len(p) > 12 else ""
        return cls(
            id=entry_id,
            request_id=p[0],
            decision_id=p[1],
            metric=p[4],
            amount=int(p[5]),
            mode=p[6],
            decision=int(p[7]),
            reason=int(p[8]),
            policy_version=int(p[9]),
            decided_at_ms=int(p[10]),
            slice=p[2],
            key=p[3],
            labels={str(k): str(v) for k, v in json.loads(labels).items()} if labels else {},
            occurred_at_ms=int(p[11]) if len(p) > 11 else 0,
        )

    # -- rows for people and finance -----------------------------------------------------

    @property
    def is_overage(self) -> bool:
        """Recorded past a limit: a usage with a reason of :data:`OVERAGE_REASONS`, or a lease
        report with use beyond what its lease had available; never a reversal."""
        if self.reversal:
            return False
        if self.lease_id:
            return self.overage > 0
        return self.reason in OVERAGE_REASONS

    @property
    def overage_units(self) -> int:
        """The units of the entry recorded past a limit: all of a usage's amount when it is
        overage, the lease report's ``overage`` units beyond its grant; 0 for a reversal."""
        if self.reversal:
            return 0
        if self.lease_id:
            return self.overage
        return self.amount if self.reason in OVERAGE_REASONS else 0

    @property
    def usage_time_ms(self) -> int:
        """When the usage happened, as billing periods count it: ``occurred_at`` if the caller
        gave one, else the start of an aggregate's interval, else when it was decided (for a
        reversal: when the reversal was written)."""
        if self.occurred_at_ms:
            return self.occurred_at_ms
        if self.aggregate and self.interval_start_ms:
            return self.interval_start_ms
        return self.decided_at_ms

    def to_row(self, tenant: str, unit: str) -> dict[str, Any]:
        """The entry as a row of :data:`ROW_COLUMNS` (JSON-ready: plain names, integers as
        numbers, times as ISO 8601 UTC or None when unset, labels as an object).

        ``unit`` is the metric's unit in the policy's catalog ("" if the metric is not in it)."""
        return {
            "id": self.id,
            "tenant": tenant,
            "slice": self.slice,
            "key": self.key,
            "metric": self.metric,
            "unit": unit,
            "amount": self.amount,
            "billed_amount": self.billed_amount,
            "count": self.count,
            "mode": self.mode,
            "decision": _enum_name(Decision, self.decision),
            "reason": _enum_name(Reason, self.reason),
            "overage": self.is_overage,
            "reversal": self.reversal,
            "aggregate": self.aggregate,
            "request_id": self.request_id,
            "decision_id": self.decision_id,
            "policy_version": self.policy_version,
            "occurred_at": iso_ms(self.occurred_at_ms) if self.occurred_at_ms else None,
            "decided_at": iso_ms(self.decided_at_ms),
            "interval_start": iso_ms(self.interval_start_ms) if self.aggregate else None,
            "interval_end": iso_ms(self.interval_end_ms) if self.aggregate else None,
            "labels": dict(sorted(self.labels.items())),
            "overage_units": self.overage_units,
            "lease_id": self.lease_id,
        }

    @staticmethod
    def csv_cells(row: Mapping[str, Any]) -> list[str]:
        """A row of :meth:`to_row` as CSV cells in :data:`ROW_COLUMNS` order: None as "",
        booleans as ``true``/``false``, labels as compact JSON ("" if none)."""
        cells: list[str] = []
        for name in ROW_COLUMNS:
            v = row[name]
            if name == "labels":
                cells.append(json.dumps(v, separators=(",", ":"), sort_keys=True) if v else "")
            elif v is None:
                cells.append("")
            elif isinstance(v, bool):
                cells.append("true" if v else "false")
            else:
                cells.append(str(v))
        return cells

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> LedgerEntry:
        """The inverse of :meth:`to_row`, from a JSON line or a ``csv.DictReader`` row (tenant,
        unit and the derived columns are dropped)."""
        labels = row.get("labels") or {}
        if isinstance(labels, str):
            labels = json.loads(labels)
        return cls(
            id=str(row["id"]),
            request_id=str(row["request_id"]),
            decision_id=str(row["decision_id"]),
            metric=str(row["metric"]),
            amount=int(row["amount"]),
            mode=str(row["mode"]),
            decision=_enum_code(Decision, row["decision"]),
            reason=_enum_code(Reason, row["reason"]),
            policy_version=int(row["policy_version"]),
            decided_at_ms=_opt_ms(row["decided_at"]),
            slice=str(row["slice"]),
            key=str(row["key"]),
            labels={str(k): str(v) for k, v in labels.items()},
            occurred_at_ms=_opt_ms(row["occurred_at"]),
            count=int(row["count"]),
            aggregate=_flag(row["aggregate"]),
            interval_start_ms=_opt_ms(row["interval_start"]),
            interval_end_ms=_opt_ms(row["interval_end"]),
            reversal=_flag(row["reversal"]),
        )


#: The columns of ``chargepath ledger summary --json`` lines, in order.
SUMMARY_COLUMNS: Final = (
    "tenant",
    "slice",
    "key",
    "metric",
    "unit",
    "period",
    "period_start",
    "units",
    "overage",
    "entries",
    "usages",
    "reversals",
    "reversed_units",
)


@dataclass(slots=True)
class SummaryLine:
    """The totals of one tenant, subject (slice, key: "" when none), metric and period.

    ``units``: the units recorded, reversals netted out (the sum of
    :attr:`LedgerEntry.billed_amount`); ``overage``: the units of entries recorded past a
    limit; ``entries``: ledger entries other than reversals; ``usages``: the usages they carry
    (an aggregate entry counts its admits); ``reversals`` and ``reversed_units``: the
    reversal entries and the units they took off."""

    tenant: str
    slice: str
    key: str
    metric: str
    unit: str
    period: str
    period_start_ms: int
    units: int = 0
    overage: int = 0
    entries: int = 0
    usages: int = 0
    reversals: int = 0
    reversed_units: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "slice": self.slice,
            "key": self.key,
            "metric": self.metric,
            "unit": self.unit,
            "period": self.period,
            "period_start": iso_ms(self.period_start_ms),
            "units": self.units,
            "overage": self.overage,
            "entries": self.entries,
            "usages": self.usages,
            "reversals": self.reversals,
            "reversed_units": self.reversed_units,
        }


_PERIODS: Final = {"hour": Period.HOUR, "day": Period.DAY, "month": Period.MONTH}


class LedgerSummary:
    """Totals of ledger entries per tenant, subject, metric and UTC period (``hour``, ``day``
    or ``month``) of :attr:`LedgerEntry.usage_time_ms`. Memory grows with the number of
    distinct (subject, metric, period), not with the number of entries."""

    PERIODS: Final = tuple(_PERIODS)

    def __init__(self, period: str = "day") -> None:
        if period not in _PERIODS:
            raise ValueError(f"period must be one of {', '.join(_PERIODS)}, got {period!r}")
        self.period = period
        self._lines: dict[tuple[str, str, str, str, int], SummaryLine] = {}

    def add(self, tenant: str, entry: LedgerEntry, unit: str) -> None:
        start, _ = period_bounds(entry.usage_time_ms, _PERIODS[self.period])
        k = (tenant, entry.slice, entry.key, entry.metric, start)
        line = self._lines.get(k)
        if line is None:
            line = self._lines[k] = SummaryLine(
                tenant, entry.slice, entry.key, entry.metric, unit, self.period, start
            )
        line.units += entry.billed_amount
        if entry.reversal:
            line.reversals += 1
            line.reversed_units += entry.amount
            return
        line.entries += 1
        line.usages += entry.count
        line.overage += entry.overage_units

    def lines(self) -> list[SummaryLine]:
        """The totals, by tenant, period, slice, key and metric."""
        return sorted(
            self._lines.values(),
            key=lambda x: (x.tenant, x.period_start_ms, x.slice, x.key, x.metric),
        )


Batch = list[tuple[str, LedgerEntry]]


class Ledger:
    """Reads, acknowledges and trims tenants' ledgers through ``redis.asyncio``.

    ``client`` must decode responses (``decode_responses=True``). ``page_size``: entries per
    ``XRANGE`` of an export.
    """

    def __init__(self, client: RedisClient, *, page_size: int = 1000) -> None:
        self.client = client
        self.page_size = page_size
        self._flush = client.register_script(read_script("flush_aggregates.lua"))
        self._trim = client.register_script(read_script("trim_ledger.lua"))

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **kwargs: Any) -> Ledger:
        return cls.connect(RedisTarget(url=url, cluster=cluster), **kwargs)

    @classmethod
    def connect(cls, target: RedisTarget, *, connect_timeout: float = 1.0, **kwargs: Any) -> Ledger:
        """A ledger on its own connections to ``target`` (one node, a cluster, or
        Sentinel's master); :meth:`close` closes them."""
        return cls(connect(target, connect_timeout=connect_timeout), **kwargs)

    @classmethod
    def of_store(cls, store: RedisStore, **kwargs: Any) -> Ledger:
        """The ledger on ``store``'s connections (a gateway's background jobs); closing the
        store closes them."""
        return cls(store.client, **kwargs)

    async def close(self) -> None:
        await self.client.aclose()

    # -- export ---------------------------------------------------------------------------

    async def export(
        self,
        tenant: str,
        since_ms: int | None,
        until_ms: int | None = None,
        *,
        mark: bool = True,
    ) -> AsyncIterator[LedgerEntry]:
        """The entries written in ``[since_ms, until_ms)`` (by their stream id, i.e. the time
        they were written on Redis' clock; None: unbounded), oldest first.

        With ``mark``, an entry counts as exported once the caller asks for the next one (or
        the iteration ends): the mark is moved at the end of every page and at the end, then
        the ledger is trimmed. Write each entry out before asking for the next one, or use
        ``mark=False`` and :meth:`mark_exported` once the output is durable.
        """
        key = ledger_key(tenant)
        first = "-" if not since_ms or since_ms <= 0 else f"{since_ms}-0"
        if until_ms is not None and until_ms <= 0:
            return
        last = "+" if until_ms is None else str(until_ms - 1)
        start = first
        while True:
            page = await self._xrange(key, start, last, self.page_size)
            if not page:
                break
            for entry_id, f in page:
                yield LedgerEntry.from_fields(entry_id, f)
            # the caller has taken every entry of the page
            if mark:
                await self.mark_exported(tenant, page[-1][0], start_id=first)
            if len(page) < self.page_size:
                break
            start = "(" + page[-1][0]

    async def mark_exported(self, tenant: str, last_id: str, *, start_id: str = "-") -> int:
        """Record that every entry from ``start_id`` to ``last_id`` was exported, then trim.

        The mark only moves forward, and only if no entry lies between the current mark and
        ``start_id``. Returns the number of entries trimmed."""
        trimmed, _, _ = await self._run_trim(tenant, last_id, start_id)
        return trimmed

    async def exported_mark(self, tenant: str) -> str | None:
        mark = await self.client.get(exported_key(tenant))
        return None if mark is None else str(mark)

    async def policy(self) -> PolicyDocument | None:
        """The live policy document (tenants, the metric catalog with units), or None if none
        was ever published. Read-only."""
        from chargepath.store.redis_store import POLICY_KEY

        doc = await self.client.hget(POLICY_KEY, "doc")
        return None if doc is None else PolicyDocument.model_validate_json(doc)

    async def has_ledger(self, tenant: str) -> bool:
        """Whether the tenant has a ledger stream (possibly empty) in Redis."""
        return bool(await self.client.exists(ledger_key(tenant)))

    async def _xrange(
        self, key: str, start: str, end: str, count: int
    ) -> list[tuple[str, dict[str, str]]]:
        page = await self.client.xrange(key, start, end, count=count) or []
        return [(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in page]

    # -- consumer groups ------------------------------------------------------------------

    async def ensure_group(self, tenant: str, group: str, start_id: str = "0") -> bool:
        """Create ``group`` on the tenant's ledger (and the stream) if missing; True if
        created. ``start_id`` "0": the group reads the ledger from its oldest entry."""
        try:
            await self.client.xgroup_create(ledger_key(tenant), group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    async def consume_batches(
        self,
        tenant: str,
        group: str,
        consumer: str,
        *,
        count: int = 100,
        block_ms: int = 1000,
        claim_idle_ms: int | None = None,
        limit: int | None = None,
    ) -> AsyncGenerator[Batch, None]:
        """Batches of ``(entry id, entry)`` delivered to ``consumer`` of ``group``.

        First this consumer's pending entries (delivered before, never acknowledged: a
        restart after a crash), then, if ``claim_idle_ms`` is set, entries pending for at least
        that long on other consumers, then new entries, waiting up to ``block_ms`` for each
        batch. An empty batch means "nothing new within block_ms" (so the caller can stop
        when idle). Nothing is acknowledged here: call :meth:`ack` once a batch is handed on.
        ``limit`` bounds the number of entries delivered in total (nothing beyond it is read).
        """
        key = ledger_key(tenant)
        await self.ensure_group(tenant, group)
        delivered = 0

        def want() -> int:
            return count if limit is None else min(count, limit - delivered)

        # 1. this consumer's own pending entries
        start = "0"
        while want() > 0:
            raw = await self.client.xreadgroup(group, consumer, {key: start}, count=want())
            entries = _stream_entries(raw)
            if not entries:
                break
            start = entries[-1][0]
            batch = await self._batch(tenant, group, entries)
            delivered += len(batch)
            if batch:
                yield batch

        last_claim = float("-inf")
        while want() > 0:
            # 2. entries abandoned by other consumers
            if claim_idle_ms is not None and time.monotonic() - last_claim >= max(
                claim_idle_ms / 1000, 1.0
            ):
                last_claim = time.monotonic()
                cursor = "0-0"
                while want() > 0:
                    reply = await self.client.xautoclaim(
                        key, group, consumer, claim_idle_ms, cursor, count=want()
                    )
                    cursor = str(reply[0])
                    batch = await self._batch(tenant, group, list(reply[1]))
                    delivered += len(batch)
                    if batch:
                        yield batch
                    if cursor == "0-0":
                        break
                await self._prune_consumers(tenant, group, consumer, claim_idle_ms)
                continue
            # 3. new entries
            raw = await self.client.xreadgroup(
                group, consumer, {key: ">"}, count=want(), block=block_ms
            )
            batch = await self._batch(tenant, group, _stream_entries(raw))
            delivered += len(batch)
            yield batch

    async def consume(
        self,
        tenant: str,
        group: str,
        consumer: str,
        *,
        count: int = 100,
        block_ms: int = 1000,
        claim_idle_ms: int | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[tuple[str, LedgerEntry]]:
        """The entries of :meth:`consume_batches`, one at a time (runs until closed)."""
        async for batch in self.consume_batches(
            tenant,
            group,
            consumer,
            count=count,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            limit=limit,
        ):
            for item in batch:
                yield item

    async def ack(self, tenant: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge ``ids`` for ``group``, then trim. Returns the number acknowledged."""
        if not ids:
            return 0
        acked = int(await self.client.xack(ledger_key(tenant), group, *ids))
        await self.trim(tenant)
        return acked

    async def _batch(self, tenant: str, group: str, entries: list[tuple[str, Any]]) -> Batch:
        """Entries as :class:`LedgerEntry`; a pending id whose entry no longer exists (deleted
        by hand: trim never removes a pending entry) is acknowledged and skipped."""
        out: Batch = []
        gone: list[str] = []
        for entry_id, f in entries:
            if f:
                out.append((entry_id, LedgerEntry.from_fields(entry_id, f)))
            else:
                gone.append(entry_id)
        if gone:
            await self.client.xack(ledger_key(tenant), group, *gone)
        return out

    async def _prune_consumers(self, tenant: str, group: str, consumer: str, idle_ms: int) -> None:
        """Remove consumers of ``group`` that hold no pending entry and were idle for
        ``idle_ms``: deleting them loses nothing, and a live one is re-created by its next
        read. Keeps a group's consumer list bounded when consumers restart under new names."""
        for c in await self.client.xinfo_consumers(ledger_key(tenant), group):
            if c["name"] != consumer and int(c["pending"]) == 0 and int(c["idle"]) >= idle_ms:
                await self.client.xgroup_delconsumer(ledger_key(tenant), group, c["name"])

    async def groups(self, tenant: str) -> list[str]:
        """The names of the consumer groups of the tenant's ledger (``XINFO GROUPS``); a
        ``ResponseError`` if the tenant has no ledger yet."""
        groups: Any = await self.client.xinfo_groups(ledger_key(tenant))
        return [str(g["name"]) for g in groups]

    async def lag(self, tenant: str, group: str) -> int:
        """Entries of the ledger not yet acknowledged by ``group``.

        Redis 7 reports it (``XINFO GROUPS`` ``lag``, when it can); Redis 6.2 does not, so it is
        computed as the group's pending count (delivered, unacknowledged: ``XINFO GROUPS``
        ``pending``, the same count as ``XPENDING``) plus the entries after its last-delivered
        id: 0 if that id is the stream's last-generated id, the stream's length (``XLEN``
        arithmetic) if every entry is after it, else counted with ``XRANGE (<id> +`` in pages.
        Both infos are read in one MULTI, so the figure is a consistent snapshot; the count
        costs one round trip per 10,000 undelivered entries.
        """
        key = ledger_key(tenant)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xinfo_groups(key)
                pipe.xinfo_stream(key)
                groups, stream = await pipe.execute()
        except ResponseError as exc:
            raise LookupError(f"tenant {tenant!r} has no ledger") from exc
        info = next((g for g in groups if g["name"] == group), None)
        if info is None:
            raise LookupError(f"ledger of tenant {tenant!r} has no consumer group {group!r}")
        pending = int(info["pending"])
        if info.get("lag") is not None:
            return pending + int(info["lag"])
        delivered = parse_stream_id(str(info["last-delivered-id"]))
        first = stream.get("first-entry")
        if not stream["length"] or delivered >= parse_stream_id(str(stream["last-generated-id"])):
            return pending
        if first is not None and parse_stream_id(str(first[0])) > delivered:
            return pending + int(stream["length"])
        after = 0
        start = "(" + str(info["last-delivered-id"])
        while True:
            page = await self._xrange(key, start, "+", 10_000)
            after += len(page)
            if len(page) < 10_000:
                return pending + after
            start = "(" + page[-1][0]

    # -- trimming and aggregates ------------------------------------------------------------

    async def trim(self, tenant: str) -> int:
        """Trim the tenant's ledger up to its safe point (see the module docstring); returns
        the number of entries removed."""
        trimmed, _, _ = await self._run_trim(tenant, "", "-")
        return trimmed

    async def _run_trim(self, tenant: str, mark: str, start_id: str) -> tuple[int, str, bool]:
        reply = await self._trim(
            keys=[ledger_key(tenant), exported_key(tenant)], args=[mark, start_id]
        )
        return int(reply[0]), str(reply[1]), bool(int(reply[2]))

    async def flush_aggregates(self, tenant: str, clock_offset_ms: int = 0) -> int:
        """Write every ended ledger aggregate of the tenant to its ledger (one entry each);
        returns the number of entries written. Safe to call from any number of processes."""
        n = await self._flush(
            keys=[aggregates_key(tenant), ledger_key(tenant)], args=[clock_offset_ms]
        )
        return int(n)


def _stream_entries(raw: Any) -> list[tuple[str, Any]]:
    """The entries of an ``XREADGROUP`` reply on one stream (RESP2 list or RESP3 dict)."""
    if not raw:
        return []
    if isinstance(raw, dict):
        values = list(raw.values())
        return list(values[0][0]) if values and values[0] else []
    return list(raw[0][1])
