"""The spool's pure parts: the entry format, the health line, how a replay verdict settles a
spooled usage, and the usage a replay sends."""

from __future__ import annotations

import pytest

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.spool_replay import outcome_of, replay_usage
from chargepath.store.spool import Outcome, SpooledUsage, SpoolStats

pytestmark = pytest.mark.unit

ADMIT = Usage(
    "req-1",
    Subject("acme", "1-000001", "k1"),
    "api.sms.send",
    3,
    Mode.ADMIT,
    labels=(("country", "fr"), ("route", "a")),
    session_id="sess-9",
    sequence=42,
)


def entry(usage: Usage = ADMIT, spooled_at_ms: int = 1_700_000_000_123) -> SpooledUsage:
    return SpooledUsage(usage, "0123456789abcdef", "d" * 32, "t" * 32, spooled_at_ms)


def test_an_entry_survives_its_encoding_field_for_field() -> None:
    e = entry()
    assert SpooledUsage.decode(e.encode()) == e
    report = entry(ADMIT._replace(mode=Mode.REPORT, labels=(), occurred_at_ms=5))
    assert SpooledUsage.decode(report.encode()) == report


def test_an_entry_needs_a_fingerprint_and_a_known_format() -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        SpooledUsage(ADMIT, "", "d")
    with pytest.raises(ValueError, match="format"):
        SpooledUsage.decode(entry().encode().replace(b'"v":1', b'"v":9'))


def test_health_line_names_depth_age_and_fullness() -> None:
    assert SpoolStats(max_entries=10, max_bytes=10_000).health_detail() == "spool: empty"
    s = SpoolStats(depth=12, bytes=3600, oldest_age_ms=4240, max_entries=100, max_bytes=10**6)
    assert s.health_detail() == "spool: 12 usages, oldest 4.2 s"
    full = SpoolStats(depth=100, bytes=3600, oldest_age_ms=1000, max_entries=100, max_bytes=10**6)
    assert full.full
    assert full.health_detail() == (
        "spool: 100 usages, oldest 1.0 s (full: 100 usages or 1000000 bytes)"
    )


def verdict(**kw: object) -> Verdict:
    base: dict[str, object] = {
        "request_id": "req-1",
        "decision": Decision.ALLOW,
        "reason": Reason.OK,
        "decision_id": "d" * 32,
        "policy_version": 1,
    }
    base.update(kw)
    return Verdict(**base)  # type: ignore[arg-type]


def test_verdicts_settle_a_spooled_usage() -> None:
    e = entry()
    assert outcome_of(e, verdict(recorded=True)) == (Outcome.REPLAYED, "")
    # a record of this request id that says recorded: the late commit or an earlier replay
    assert outcome_of(e, verdict(recorded=True, replayed=True)) == (Outcome.ALREADY_RECORDED, "")
    # a resend decided after the outage, recorded under another decision id
    resent = verdict(recorded=True, replayed=True, decision_id="x" * 32)
    assert outcome_of(e, resent)[0] is Outcome.ALREADY_RECORDED
    late_refusal = verdict(
        decision=Decision.THROTTLE, reason=Reason.RATE_LIMITED, replayed=True, recorded=False
    )
    outcome, why = outcome_of(e, late_refusal)
    assert outcome is Outcome.DROPPED and "decided late" in why and "RATE_LIMITED" in why
    conflict = verdict(
        decision=Decision.DENY, reason=Reason.INVALID_USAGE, replayed=False, message="request_id"
    )
    assert outcome_of(e, conflict)[0] is Outcome.DROPPED
    gone = verdict(decision=Decision.DENY, reason=Reason.NO_ENTITLEMENT)
    outcome, why = outcome_of(e, gone)
    assert outcome is Outcome.DROPPED and "NO_ENTITLEMENT" in why


def test_a_replay_is_a_report_under_the_request_id_at_the_time_it_happened() -> None:
    u = replay_usage(entry())
    assert u.mode is Mode.REPORT
    assert (u.session_id, u.sequence) == ("", 0)
    assert u.occurred_at_ms == 1_700_000_000_123
    assert (u.request_id, u.subject, u.metric, u.amount, u.labels) == (
        ADMIT.request_id,
        ADMIT.subject,
        ADMIT.metric,
        ADMIT.amount,
        ADMIT.labels,
    )
    # a time the client gave is kept
    assert replay_usage(entry(ADMIT._replace(occurred_at_ms=7))).occurred_at_ms == 7
