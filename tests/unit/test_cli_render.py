"""What people and scripts read from the CLI: one spelling of decisions and reasons, human units,
tables that never cut a number, and plain JSON."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from chargepath.cli import render
from chargepath_client import Decision, Reason, Verdict
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0 ms"),
        (850, "850 ms"),
        (1500, "1.5 s"),
        (59_999, "60 s"),
        (120_000, "2 min"),
        (90_000, "1.5 min"),
        (3 * 3_600_000, "3 h"),
        (36 * 3_600_000, "1.5 d"),
        (-1500, "-1.5 s"),
    ],
)
def test_durations_in_human_units(ms: int, text: str) -> None:
    assert render.human_ms(ms) == text


@pytest.mark.parametrize(
    ("n", "unit", "text"),
    [
        (512, "byte", "512 B"),
        (1536, "byte", "1.5 KiB"),
        (200_000_000, "byte", "190.7 MiB"),
        (2 * 1024**3, "bytes", "2 GiB"),
        (50_000_000_000_000, "byte", "45.5 TiB"),
        (-2048, "byte", "-2 KiB"),
        (1_000_000, "message", "1,000,000"),
        (1234567890123, "", "1,234,567,890,123"),
    ],
)
def test_amounts_in_the_metrics_unit(n: int, unit: str, text: str) -> None:
    assert render.amount(n, unit) == text


def test_a_pattern_has_a_unit_only_when_its_metrics_agree() -> None:
    units = {"api.sms.send": "message", "api.sms.recv": "message", "api.voice": "minute"}
    assert render.unit_of("api.sms.*", units) == "message"
    assert render.unit_of("api.*", units) == ""
    assert render.unit_of("api.voice", units) == "minute"


def _big_state() -> apb.GetStateResponse:
    s = apb.GetStateResponse(policy_version=7, plan="mvno-base")
    for name, metric, kind in (
        ("tenant-bytes-monthly-with-a-long-name", "slice.bytes", pb.LIMIT_KIND_QUOTA),
        ("sessions-monthly", "slice.sessions", pb.LIMIT_KIND_QUOTA),
        ("sessions-rate", "slice.sessions", pb.LIMIT_KIND_RATE),
    ):
        lim = s.limits.add(
            name=name,
            kind=kind,
            scope=pb.SCOPE_TENANT,
            metric=metric,
            plan="mvno-base-with-a-long-plan-name",
            remaining=1234567890123,
            capacity=9876543210987,
            refill=5555555555555,
            per="month" if kind == pb.LIMIT_KIND_QUOTA else "second",
            used=8641975320864,
            granted=1000000000000,
        )
        lim.reset_after.FromMilliseconds(1_500)
    return s


def _rendered(renderable: object, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


@pytest.mark.parametrize("width", [100, 80, 200])
def test_state_never_cuts_a_number(width: int) -> None:
    """13-digit numbers: at 200 columns one table, at 100 (and 80) one block per limit; never
    an ellipsis, never a line wider than the console, every number whole on its line."""
    units = {"slice.bytes": "byte", "slice.sessions": "session"}
    text = _rendered(render.state(_big_state(), units, width), width)
    assert all(len(line) <= width for line in text.splitlines()), text
    assert "…" not in text
    words = set(text.split())
    # bytes in IEC units, counts with separators, each whole on its line
    assert {"1.1", "TiB", "9", "1,234,567,890,123", "9,876,543,210,987"} <= words, text
    assert "8,641,975,320,864" in words and "5,555,555,555,555/second" in words, text
    assert "1.5 s" in text
    assert ("┏" in text) is (width == 200), text  # the one wide table only where it fits


def test_plain_json_uses_names_numbers_and_milliseconds() -> None:
    v = pb.Verdict(
        decision=pb.DECISION_THROTTLE,
        reason=pb.REASON_RATE_LIMITED,
        policy_version=2**53 + 1,
        decision_id="ab" * 16,
    )
    v.retry_after.FromMilliseconds(1500)
    v.decided_at.FromMilliseconds(1_765_000_000_123)
    v.limits.add(name="x", kind=pb.LIMIT_KIND_RATE, scope=pb.SCOPE_KEY, remaining=-5)
    data = json.loads(json.dumps(render.plain(v)))
    assert (data["decision"], data["reason"]) == ("THROTTLE", "RATE_LIMITED")
    assert data["policy_version"] == 2**53 + 1 and isinstance(data["policy_version"], int)
    assert data["retry_after_ms"] == 1500 and "retry_after" not in data
    assert data["decided_at"] == "2025-12-06T05:46:40.123Z"
    limit = data["limits"][0]
    assert (limit["kind"], limit["scope"], limit["remaining"]) == ("RATE", "KEY", -5)
    assert limit["reset_after_ms"] == 0
    assert data["violations"] == [] and data["recorded"] is False


def test_plain_json_of_an_unset_time_is_null() -> None:
    g = apb.GrantState(grant_id="g", amount=3)
    assert render.plain(g)["expires_at"] is None


def test_a_decision_line_spells_the_decision_once() -> None:
    d = apb.DecisionRecord(
        decision=pb.DECISION_DENY, reason=pb.REASON_QUOTA_EXHAUSTED, metric="slice.bytes"
    )
    d.amount = 3 * 1024**2
    line = render.decision_line(d, "byte")
    assert "DENY" in line and "QUOTA_EXHAUSTED" in line and "3 MiB" in line
    assert not re.search(r"DECISION_|REASON_|\bdeny\b", line)


def test_the_client_shows_decisions_and_reasons_as_the_cli_does() -> None:
    v = Verdict.from_pb(pb.Verdict(decision=pb.DECISION_ALLOW, reason=pb.REASON_OK))
    assert (str(v.decision), str(v.reason)) == ("ALLOW", "OK")
    assert f"{v.decision} {v.reason}" == "ALLOW OK"
    assert repr(Decision.THROTTLE) == "Decision.THROTTLE"
    assert "Decision.ALLOW" in repr(v) and "Reason.OK" in repr(v)
    # compatible with 0.1: the values, equality and lookups by value are unchanged
    assert v.decision == "allow" and Decision.DENY.value == "deny"
    assert Decision("allow") is Decision("ALLOW") is Decision("DECISION_ALLOW") is v.decision
    assert Reason("rate_limited") is Reason("RATE_LIMITED") is Reason("REASON_RATE_LIMITED")
    with pytest.raises(ValueError):
        Decision("maybe")
