"""The lease script's protocol without Redis: the KEYS and payload ``encode_lease_batch`` sends,
and the answers ``decode_lease_reply`` reads, slot by slot (store/protocol.py)."""

from __future__ import annotations

import msgpack
import pytest

from chargepath.core.leases import LeaseAsk
from chargepath.core.model import Decision, Reason, Subject
from chargepath.core.plans import load_policy_text
from chargepath.core.policy import Policy
from chargepath.store.base import LeaseItem, StalePolicyError, StoreDeadlineError
from chargepath.store.protocol import (
    ANS_SLOTS,
    ASK_NEW,
    ASK_RELEASE,
    ASK_SLOTS,
    LEASE_ARG_MAX_OPEN,
    LEASE_ARG_PAYLOAD,
    LEASE_CLOSED,
    LEASE_CONFLICT,
    LEASE_FINAL,
    LSPEC_SLOTS,
    REPLY_DECIDED,
    REPLY_LATE,
    REPLY_STALE,
    decode_lease_reply,
    encode_lease_batch,
    read_script,
)

pytestmark = pytest.mark.unit

POLICY = load_policy_text(
    """\
metrics: [{name: m.x}]
plans:
  - name: p
    limits:
      - name: b
        metric: m.x
        rate: {capacity: 10, refill: 1}
        lease: {max_units: 5, max_share_pct: 50, validity: 2s, renew_below_pct: 30}
      - name: q
        metric: m.x
        scope: key
        quota: {amount: 100, per: day}
        lease: {max_units: 50, max_share_pct: 100, validity: 1s}
tenants: [{name: t, plan: p}]
"""
)


class Settings:
    dedup_window_ms = 600_000
    recent_length = 1000
    clock_offset_ms = 7
    max_open_leases = 5


def items() -> list[LeaseItem]:
    policy = Policy(POLICY, 3)
    res = policy.resolve(Subject("t", "", "k"), "m.x")
    return [
        LeaseItem(LeaseAsk("r1", Subject("t", "", "k"), "m.x", requested=9), res, "d1", "f1", "h"),
        LeaseItem(
            LeaseAsk("r2", Subject("t", "", "k"), "m.x", lease_id="L", used=2, release=True),
            res,
            "d2",
            "f2",
            "h",
        ),
    ]


def test_encode_keys_specs_and_asks() -> None:
    keys, args = encode_lease_batch("t", 3, items(), ["NEW", "L"], Settings(), deadline_ms=99)
    assert keys[:4] == ["cp:{t}:ent", "cp:{t}:ledger", "cp:{t}:leases", "cp:{t}:ltrail"]
    assert "cp:{t}:lease:NEW" in keys and "cp:{t}:ld:r1" in keys
    assert args[:5] == [3, 7, 600_000, 99, 1000] and args[LEASE_ARG_MAX_OPEN - 1] == 5
    specs, sets, asks = msgpack.unpackb(args[LEASE_ARG_PAYLOAD - 1])
    assert len(specs) == 2 * LSPEC_SLOTS and sets == [[1, 2]]
    # the lease terms after decide.lua's spec slots
    assert specs[LSPEC_SLOTS - 4 : LSPEC_SLOTS] == [5, 50, 2000, 30]
    assert specs[2 * LSPEC_SLOTS - 4 :] == [50, 100, 1000, 20]
    assert len(asks) == 2 * ASK_SLOTS
    assert asks[0] == ASK_NEW and asks[1:3] == [9, 0]
    assert asks[ASK_SLOTS] == ASK_RELEASE and asks[ASK_SLOTS + 2] == 2


def test_a_limit_without_lease_terms_is_refused_before_the_script() -> None:
    doc = load_policy_text(
        "metrics: [{name: m.x}]\nplans: [{name: p, limits: [{name: b, metric: m.x, "
        "rate: {capacity: 1, refill: 1}}]}]\ntenants: [{name: t, plan: p}]\n"
    )
    res = Policy(doc, 1).resolve(Subject("t"), "m.x")
    item = LeaseItem(LeaseAsk("r", Subject("t"), "m.x", requested=1), res, "d", "f", "h")
    with pytest.raises(ValueError, match="'b' has no lease terms"):
        encode_lease_batch("t", 1, [item], ["x"], Settings())
    # a report on an open lease whose limit lost its settings: sent, with no terms
    report = LeaseItem(LeaseAsk("r", Subject("t"), "m.x", lease_id="L", used=2), res, "d", "f", "h")
    _, args = encode_lease_batch("t", 1, [report], ["L"], Settings())
    specs, _, _ = msgpack.unpackb(args[LEASE_ARG_PAYLOAD - 1])
    assert specs[-4:] == [0, 0, 0, 0]


def test_decode_answers() -> None:
    first = [
        1,
        1,
        LEASE_FINAL,
        "NEW",
        5,
        5,
        2000,
        2,
        0,
        0,
        0,
        0,
        "d1",
        1234,
        5,
        0,
        10,
        45,
        86_000,
        100,
    ]
    second = [3, 7, LEASE_CONFLICT, "L", 0, 0, 0, 0, 0, 0, 0, 0, "d0", 1234]
    third = [1, 1, LEASE_CLOSED, "L", 0, 0, 0, 0, 0, 2, 0, 3, "d2", 1234, 8, 0, 10, 48, 86_000, 100]
    assert len(second) == ANS_SLOTS
    a, b = decode_lease_reply([REPLY_DECIDED, 1234, first, second], items(), 3)
    assert (a.decision, a.reason, a.granted, a.final_units, a.valid_for_ms) == (
        Decision.ALLOW,
        Reason.OK,
        5,
        True,
        2000,
    )
    assert [(s.name, s.remaining, s.capacity) for s in a.limits] == [("b", 5, 10), ("q", 45, 100)]
    assert (b.reason, b.violations[0].field, b.decision_id) == (
        Reason.INVALID_USAGE,
        "request_id",
        "d0",
    )
    _, c = decode_lease_reply([REPLY_DECIDED, 1234, first, third], items(), 3)
    assert (c.closed, c.recorded, c.refunded) == (True, 2, 3)
    with pytest.raises(StalePolicyError):
        decode_lease_reply([REPLY_STALE, 4], items(), 3)
    with pytest.raises(StoreDeadlineError):
        decode_lease_reply([REPLY_LATE, 99], items(), 3)


def test_the_lease_scripts_assemble_with_their_constants() -> None:
    for name in ("lease.lua", "lease_sweep.lua", "lease_read.lua"):
        text = read_script(name)
        body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
        for constant in ("ASK_SLOTS", "ANS_DECISION_ID", "HOLD_SLOTS", "LEASE_CLOSED", "KIND_RATE"):
            assert constant not in body, (name, constant)
