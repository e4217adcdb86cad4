"""Ledger rows and totals without Redis: ISO times exact to the millisecond over the whole
stored range, rows that read back to their entry (JSON and CSV), names for the enums, overage,
Parquet types, and summary periods at month ends."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pytest

from chargepath.cli.ledger import parquet_schema, parquet_table, parse_time_ms
from chargepath.core.model import Decision, Reason
from chargepath.store.ledger import (
    ROW_COLUMNS,
    LedgerEntry,
    LedgerSummary,
    iso_ms,
    parse_iso_ms,
)

pytestmark = pytest.mark.unit

MAX_MS = 2**53 - 1  # the largest occurred_at the store keeps


def entry(**kw: object) -> LedgerEntry:
    base: dict[str, object] = {
        "id": "1772366400300-0",
        "request_id": "r-1",
        "decision_id": "d" * 32,
        "metric": "slice.bytes",
        "amount": 1500,
        "mode": "report",
        "decision": int(Decision.ALLOW),
        "reason": int(Reason.OK),
        "policy_version": 7,
        "decided_at_ms": 1_772_366_400_300,
        "slice": "1-000001",
    }
    return LedgerEntry(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_772_366_400_250, "2026-03-01T12:00:00.250Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        (253_402_300_800_000, "+10000-01-01T00:00:00.000Z"),
        (MAX_MS, "+287396-10-12T08:59:00.991Z"),
    ],
)
def test_iso_times_are_exact_over_the_stored_range(ms: int, text: str) -> None:
    assert iso_ms(ms) == text
    assert parse_iso_ms(text) == ms


def test_a_row_reads_back_to_its_entry_in_json_and_csv() -> None:
    entries = [
        entry(),
        entry(labels={"cell": "A1", "b": "x,y\"z"}, occurred_at_ms=1_772_366_400_250),
        entry(decision=int(Decision.THROTTLE), reason=int(Reason.RATE_LIMITED), amount=10**15),
        entry(reversal=True, mode="admit", decision=int(Decision.DENY),
              reason=int(Reason.STORE_UNAVAILABLE)),
        entry(aggregate=True, count=12, decision_id="", policy_version=0,
              interval_start_ms=1_772_366_400_000, interval_end_ms=1_772_366_460_000),
        entry(reason=99),  # a reason this version does not know: kept as its number
    ]  # fmt: skip
    rows = [e.to_row("mvno", "byte") for e in entries]
    for e, r in zip(entries, rows, strict=True):
        assert list(r) == list(ROW_COLUMNS)
        assert LedgerEntry.from_row(json.loads(json.dumps(r))) == e
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(ROW_COLUMNS)
    for r in rows:
        w.writerow(LedgerEntry.csv_cells(r))
    back = list(csv.DictReader(io.StringIO(text.getvalue())))
    assert [LedgerEntry.from_row(r) for r in back] == entries
    first, labelled, throttled, reversal, aggregate, unknown = rows
    assert (first["decision"], first["reason"], first["occurred_at"]) == ("ALLOW", "OK", None)
    assert back[0]["occurred_at"] == "" and back[0]["labels"] == ""
    assert labelled["occurred_at"] == "2026-03-01T12:00:00.250Z"
    assert (throttled["decision"], throttled["reason"], throttled["overage"]) == (
        "THROTTLE",
        "RATE_LIMITED",
        True,
    )
    assert '"amount": 1000000000000000' in json.dumps(throttled)
    assert reversal["billed_amount"] == -1500 and reversal["overage"] is False
    assert aggregate["interval_end"] == "2026-03-01T12:01:00.000Z" and aggregate["count"] == 12
    assert unknown["reason"] == "99"


def test_overage_is_a_usage_recorded_past_a_limit() -> None:
    assert entry(reason=int(Reason.SOFT_LIMIT_EXCEEDED)).is_overage
    assert entry(decision=int(Decision.DENY), reason=int(Reason.QUOTA_EXHAUSTED)).is_overage
    assert not entry(decision=int(Decision.DENY), reason=int(Reason.SUSPENDED)).is_overage
    assert not entry().is_overage


def test_parquet_columns_have_their_types() -> None:
    schema = parquet_schema()
    rows = [entry(occurred_at_ms=MAX_MS).to_row("t", ""), entry().to_row("t", "byte")]
    table = parquet_table(rows)
    assert table.schema == schema and schema.names == list(ROW_COLUMNS)
    assert schema.field("decided_at").type == pa.timestamp("ms", tz="UTC")
    occurred = table.column("occurred_at").cast(pa.int64()).to_pylist()
    assert occurred == [MAX_MS, None]
    assert table.column("amount").type == pa.int64()


def test_summary_periods_are_utc_hours_days_and_months() -> None:
    feb_end = parse_iso_ms("2028-02-29T23:59:59.999Z")  # a leap day
    mar = parse_iso_ms("2028-03-01T00:00:00.000Z")
    s = LedgerSummary("month")
    for at, amount in ((feb_end, 5), (mar, 7), (mar + 1, 1)):
        s.add("t", entry(decided_at_ms=at, amount=amount), "byte")
    s.add("t", entry(decided_at_ms=mar + 5, amount=1, reversal=True), "byte")
    lines = s.lines()
    assert [(x.to_json_dict()["period_start"], x.units, x.entries, x.reversals) for x in lines] == [
        ("2028-02-01T00:00:00.000Z", 5, 1, 0),
        ("2028-03-01T00:00:00.000Z", 7, 2, 1),
    ]
    # occurred_at counts before the decision time; hours split at the hour
    h = LedgerSummary("hour")
    h.add("t", entry(decided_at_ms=mar + 3_600_000, occurred_at_ms=mar + 10), "byte")
    assert [x.period_start_ms for x in h.lines()] == [mar]
    with pytest.raises(ValueError, match="period"):
        LedgerSummary("week")


def test_times_on_the_command_line() -> None:
    assert parse_time_ms("2026-03-01T12:00:00.250Z") == 1_772_366_400_250
    assert parse_time_ms("1772366400250") == 1_772_366_400_250
    assert parse_time_ms("2026-03-01T12:00:00") == 1_772_366_400_000  # no offset: UTC
