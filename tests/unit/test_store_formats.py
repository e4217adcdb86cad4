"""The ledger and trail readers understand both layouts: the packed one decide.lua writes now,
and the one-field-per-value one of earlier versions, which a rolling upgrade leaves in the
streams."""

from __future__ import annotations

from chargepath.core.model import Decision, LimitKind, Mode, Reason
from chargepath.store.admin import parse_entry
from chargepath.store.ledger import LedgerEntry

US, RS = "\x1f", "\x1e"


def test_a_ledger_entry_reads_the_same_in_both_layouts() -> None:
    old = {
        "rid": "r-1", "did": "d" * 32, "m": "slice.bytes", "a": "1500", "mo": "report",
        "d": "1", "r": "1", "v": "7", "ts": "1800000000000", "sl": "1-000001",
        "k": "sub-1", "lb": '{"cell":"42"}', "oc": "1799999999000",
    }  # fmt: skip
    packed = US.join(
        ["r-1", "d" * 32, "1-000001", "sub-1", "slice.bytes", "1500", "report", "1", "1", "7",
         "1800000000000", "1799999999000", '{"cell":"42"}']
    )  # fmt: skip
    a = LedgerEntry.from_fields("1-0", old)
    b = LedgerEntry.from_fields("1-0", {"x": packed})
    assert a == b
    assert (b.amount, b.labels, b.occurred_at_ms, b.slice) == (
        1500,
        {"cell": "42"},
        1799999999000,
        "1-000001",
    )
    # no labels, no occurred_at: the packed entry simply ends after decided_at
    short = LedgerEntry.from_fields("2-0", {"x": packed.rsplit(US, 2)[0]})
    assert (short.labels, short.occurred_at_ms, short.decided_at_ms) == ({}, 0, 1800000000000)


def test_a_trail_entry_reads_the_same_in_both_layouts() -> None:
    limits = "rate,1,1000,400,1000,0;monthly,2,5000,4400,5000,0"
    old = {
        "e": "d",
        "x": US.join(
            ["d" * 32, "r-1", "s1", "", "slice.bytes", "600", "report", "1", "1", "7",
             "1800000000000", "ab" * 16, "0", limits]
        ),
    }  # fmt: skip
    decision = US.join(
        ["r-1", "d" * 32, "s1", "", "slice.bytes", "600", "report", "ab" * 16, "1", "1", "0",
         limits]
    )  # fmt: skip
    new = {"e": "b", "x": US.join(["7", "1800000000000"]) + RS + decision}
    (a,) = parse_entry("mvno", old)
    (b,) = parse_entry("mvno", new)
    assert a == b
    assert (b.mode, b.decision, b.reason, b.policy_version) == (
        Mode.REPORT,
        Decision.ALLOW,
        Reason.OK,
        7,
    )
    assert [(c.name, c.kind, c.remaining_before, c.remaining_after) for c in b.limits] == [
        ("rate", LimitKind.RATE, 1000, 400),
        ("monthly", LimitKind.QUOTA, 5000, 4400),
    ]
    assert parse_entry("mvno", {"e": "th", "l": "monthly"}) == []
