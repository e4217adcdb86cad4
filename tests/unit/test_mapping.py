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
