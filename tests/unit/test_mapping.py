"""The mapping module covers every core enum value, so a new reason cannot go out unmapped,
and the numbers agree, so a core enum can go out as it is."""

from chargepath.core.model import Decision, LimitKind, Reason, Scope
from chargepath.transport import mapping
from chargepath_protos.v1 import metering_pb2 as pb


def test_every_core_enum_maps_to_the_wire_value_of_the_same_name() -> None:
    for table, enum, prefix, wire in (
        (mapping.REASONS, Reason, "REASON_", pb.Reason),
        (mapping.DECISIONS, Decision, "DECISION_", pb.Decision),
        (mapping.KINDS, LimitKind, "LIMIT_KIND_", pb.LimitKind),
        (mapping.SCOPES, Scope, "SCOPE_", pb.Scope),
    ):
        assert set(table) == set(enum)
        for member, value in table.items():  # type: ignore[attr-defined]
            assert wire.Name(value) == prefix + member.name
            # the verdict's hot path passes core enums as they are: the numbers must agree
            assert int(member) == value


def test_verdict_round_trip_keeps_durations_in_ms() -> None:
    from chargepath.core.model import LimitState, Verdict

    v = Verdict(
        request_id="r",
        decision=Decision.THROTTLE,
        reason=Reason.RATE_LIMITED,
        decision_id="d" * 32,
        policy_version=3,
        retry_after_ms=1234,
        limits=(LimitState("l", LimitKind.RATE, Scope.KEY, -5, 20, 2500, False, True),),
        decided_at_ms=1_800_000_000_123,
    )
    m = pb.Verdict(**mapping.verdict_fields(v))  # type: ignore[arg-type]
    assert m.retry_after.ToMilliseconds() == 1234
    assert m.limits[0].reset_after.ToMilliseconds() == 2500 and m.limits[0].remaining == -5
    assert m.decided_at.ToMilliseconds() == 1_800_000_000_123


def test_the_violations_of_an_invalid_usage_go_out_as_structures() -> None:
    from chargepath.core.model import FieldViolation, Verdict

    bad = (
        FieldViolation("amount", "must be between 1 and 1000000000000, got 0"),
        FieldViolation("subject.tenant", "is required"),
    )
    v = Verdict(
        request_id="r",
        decision=Decision.DENY,
        reason=Reason.INVALID_USAGE,
        decision_id="d" * 32,
        policy_version=1,
        message="; ".join(str(x) for x in bad),
        violations=bad,
    )
    m = pb.Verdict(**mapping.verdict_fields(v))  # type: ignore[arg-type]
    assert [(f.field, f.description) for f in m.violations] == [
        ("amount", "must be between 1 and 1000000000000, got 0"),
        ("subject.tenant", "is required"),
    ]
    assert m.message == v.message
    ok = v._replace(reason=Reason.OK, decision=Decision.ALLOW, message="", violations=())
    assert len(pb.Verdict(**mapping.verdict_fields(ok)).violations) == 0  # type: ignore[arg-type]


def test_policy_issues_become_field_violations_of_the_document_without_parsing_text() -> None:
    import pytest

    from chargepath.core.model import FieldViolation
    from chargepath.core.plans import PolicyError, PolicyIssue, load_policy_text

    text = (
        "metrics: [{name: api.sms.send}]\nplans:\n  - name: p\n"
        "    limits: [{name: l, metric: api.sms.send, rate: {capacity: 0, refill: 1}}]\n"
    )
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="document")
    assert mapping.policy_violations(e.value) == [
        FieldViolation(
            "document.plans.0.limits.0.rate.capacity", "line 4: Input should be greater than 0"
        )
    ]
    # a message that looks like "field: reason" stays the message: the structure decides
    err = PolicyError(
        [
            PolicyIssue("document", "", 3, "tenant 't': unknown plan 'x': see plans"),
            PolicyIssue("document", None, None, "not valid YAML: while parsing: here"),
        ]
    )
    assert mapping.policy_violations(err) == [
        FieldViolation("document", "line 3: tenant 't': unknown plan 'x': see plans"),
        FieldViolation("document", "not valid YAML: while parsing: here"),
    ]


def test_a_plan_goes_to_the_wire_and_back_unchanged() -> None:
    from chargepath.core.plans import PlanSpec

    spec = PlanSpec.model_validate(
        {
            "name": "p",
            "description": "d",
            "limits": [
                {
                    "name": "burst",
                    "metric": "api.*",
                    "scope": "key",
                    "rate": {"capacity": 5, "refill": 2, "per": "minute"},
                    "lease": {
                        "max_units": 3,
                        "max_share_pct": 40,
                        "validity": "1500ms",
                        "renew_below_pct": 25,
                        "gateway": True,
                    },
                },
                {
                    "name": "daily",
                    "metric": "api.sms.send",
                    "soft": True,
                    "quota": {"amount": 9, "per": "day"},
                },
            ],
        }
    )
    wire = mapping.plan_to_pb(spec)
    assert wire.limits[0].scope == pb.SCOPE_KEY and wire.limits[1].quota.amount == 9
    assert wire.limits[0].lease.validity.ToMilliseconds() == 1500
    assert not wire.limits[1].HasField("lease")
    back = PlanSpec.model_validate(mapping.plan_from_pb(wire))
    assert back == spec


def test_admin_records_and_grants_keep_times_in_ms() -> None:
    from chargepath.core.model import DecisionRecord, LimitChange, Mode, Subject
    from chargepath.store.base import GrantReading

    r = DecisionRecord(
        decision_id="d" * 32,
        request_id="r",
        subject=Subject("t", "s", "k"),
        metric="api.sms.send",
        amount=3,
        mode=Mode.REPORT,
        decision=Decision.THROTTLE,
        reason=Reason.RATE_LIMITED,
        policy_version=4,
        decided_at_ms=1_800_000_000_123,
        trace_id="",
        retry_after_ms=250,
        limits=(LimitChange("l", LimitKind.RATE, 2, -1, 5, True),),
    )
    m = mapping.record_to_pb(r)
    assert (m.subject.slice, m.subject.key, m.mode) == ("s", "k", pb.MODE_REPORT)
    assert m.decided_at.ToMilliseconds() == 1_800_000_000_123
    assert m.retry_after.ToMilliseconds() == 250
    assert (m.limits[0].remaining_after, m.limits[0].exceeded) == (-1, True)
    g = mapping.grant_to_pb(GrantReading("g1", "daily", 10, 1_800_000_000_500, "n"))
    assert g.expires_at.ToMilliseconds() == 1_800_000_000_500
    assert not mapping.grant_to_pb(GrantReading("g2", "daily", 1, 0, "")).HasField("expires_at")


def test_spooled_goes_out_only_when_set() -> None:
    from chargepath.core.model import Verdict

    v = Verdict("r", Decision.ALLOW, Reason.STORE_UNAVAILABLE, "d" * 32, 1, degraded=True)
    assert not pb.Verdict(**mapping.verdict_fields(v)).spooled  # type: ignore[arg-type]
    assert "spooled" not in mapping.verdict_fields(v)
    m = pb.Verdict(**mapping.verdict_fields(v._replace(spooled=True)))  # type: ignore[arg-type]
    assert m.spooled and m.degraded and not m.recorded
