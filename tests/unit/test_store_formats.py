"""The ledger and trail readers read the layouts the scripts write: a recorded usage's packed
ledger field ``x`` (decide.lua), an aggregate's fields (flush_aggregates.lua), and a trail
batch entry ``e=b``."""

from __future__ import annotations

from chargepath.core.model import Decision, LimitKind, Mode, Reason
from chargepath.store.admin import parse_entry
from chargepath.store.ledger import LedgerEntry
from chargepath.store.protocol import RS, US


def test_a_packed_ledger_entry_reads_every_field() -> None:
    packed = US.join(
        ["r-1", "d" * 32, "1-000001", "sub-1", "slice.bytes", "1500", "report", "1", "1", "7",
         "1800000000000", "1799999999000", '{"cell":"42"}']
    )  # fmt: skip
    e = LedgerEntry.from_fields("1-0", {"x": packed})
    assert e == LedgerEntry(
        id="1-0",
        request_id="r-1",
        decision_id="d" * 32,
        metric="slice.bytes",
        amount=1500,
        mode="report",
        decision=1,
        reason=1,
        policy_version=7,
        decided_at_ms=1800000000000,
        slice="1-000001",
        key="sub-1",
        labels={"cell": "42"},
        occurred_at_ms=1799999999000,
    )
    # no labels, no occurred_at: the packed entry simply ends after decided_at
    short = LedgerEntry.from_fields("2-0", {"x": packed.rsplit(US, 2)[0]})
    assert (short.labels, short.occurred_at_ms, short.decided_at_ms) == ({}, 0, 1800000000000)


def test_an_aggregate_ledger_entry_reads_its_fields() -> None:
    fields = {
        "rid": "agg:1800000000000:s1::api.sms.send", "did": "", "m": "api.sms.send",
        "a": "42", "n": "40", "mo": "admit", "d": "1", "r": "1", "ts": "1800000061000",
        "is": "1800000000000", "ie": "1800000060000", "sl": "s1", "ag": "1",
    }  # fmt: skip
    e = LedgerEntry.from_fields("3-0", fields)
    assert (e.aggregate, e.amount, e.count, e.slice, e.key, e.policy_version) == (
        True,
        42,
        40,
        "s1",
        "",
        0,
    )
    assert (e.interval_start_ms, e.interval_end_ms, e.decision, e.reason) == (
        1800000000000,
        1800000060000,
        Decision.ALLOW,
        Reason.OK,
    )


def test_a_trail_batch_entry_reads_every_decision() -> None:
    limits = "rate,1,1000,400,1000,0;monthly,2,5000,4400,5000,1"
    first = US.join(
        ["r-1", "d" * 32, "s1", "", "slice.bytes", "600", "report", "ab" * 16, "1", "1", "0",
         limits]
    )  # fmt: skip
    second = US.join(
        ["r-2", "e" * 32, "s1", "k", "api.sms.send", "1", "admit", "", "2", "2", "250", ""]
    )
    a, b = parse_entry(
        "mvno", {"e": "b", "x": US.join(["7", "1800000000000"]) + RS + first + RS + second}
    )
    assert (a.mode, a.decision, a.reason, a.policy_version, a.decided_at_ms, a.trace_id) == (
        Mode.REPORT,
        Decision.ALLOW,
        Reason.OK,
        7,
        1800000000000,
        "ab" * 16,
    )
    assert [
        (c.name, c.kind, c.remaining_before, c.remaining_after, c.exceeded) for c in a.limits
    ] == [
        ("rate", LimitKind.RATE, 1000, 400, False),
        ("monthly", LimitKind.QUOTA, 5000, 4400, True),
    ]
    assert (b.subject.key, b.decision, b.reason, b.retry_after_ms, b.limits) == (
        "k",
        Decision.THROTTLE,
        Reason.RATE_LIMITED,
        250,
        (),
    )


def test_entries_that_are_not_decisions_give_none() -> None:
    assert parse_entry("mvno", {"e": "th", "l": "monthly"}) == []
    # one decision per entry ("e=d") was never released: nothing reads it
    assert parse_entry("mvno", {"e": "d", "x": "anything"}) == []
