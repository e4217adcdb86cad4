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
