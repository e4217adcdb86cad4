"""Quota leases, pure: the plan's ``lease:`` settings, the sizing rule, ask validation."""

from __future__ import annotations

import pytest

from chargepath.core.leases import (
    LeaseAsk,
    LeaseTerms,
    LimitRoom,
    grant_size,
    limit_cap,
    missing_lease_settings,
    renew_below,
    validate_ask,
)
from chargepath.core.model import Subject
from chargepath.core.plans import PolicyError, load_policy_text
from chargepath.core.policy import Policy

POLICY = """\
metrics:
  - name: api.sms.send
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        rate: {{ capacity: 100, refill: 10 }}
        lease: {lease}
tenants:
  - name: t1
    plan: p
"""


def test_lease_settings_compile_into_the_limit() -> None:
    doc = load_policy_text(
        POLICY.format(lease="{ max_units: 50, max_share_pct: 25, validity: 30s, gateway: true }")
    )
    (limit,) = Policy(doc, 1).resolve(Subject("t1"), "api.sms.send").limits
    assert limit.lease == LeaseTerms(50, 25, 30_000, 20, True)


@pytest.mark.parametrize(
    ("lease", "path", "words"),
    [
        ("{ max_units: 0, max_share_pct: 10, validity: 1s }", "max_units", "greater than"),
        ("{ max_units: 5, max_share_pct: 0, validity: 1s }", "max_share_pct", "greater than"),
        ("{ max_units: 5, max_share_pct: 101, validity: 1s }", "max_share_pct", "less than"),
        ("{ max_units: 5, max_share_pct: 10, validity: 30 }", "validity", "with a unit"),
        ("{ max_units: 5, max_share_pct: 10, validity: 10ms }", "validity", "between"),
        ("{ max_units: 5, max_share_pct: 10, validity: 25h }", "validity", "between"),
        (
            "{ max_units: 5, max_share_pct: 10, validity: 1s, renew_below_pct: 120 }",
            "renew_below_pct",
            "less than",
        ),
        ("{ max_units: 5, validity: 1s }", "max_share_pct", "required"),
        ("{ max_units: 5, max_share_pct: 10, validity: 1s, colour: red }", "colour", "Extra"),
    ],
)
def test_bad_lease_settings_name_the_field_and_line(lease: str, path: str, words: str) -> None:
    with pytest.raises(PolicyError) as e:
        load_policy_text(POLICY.format(lease=lease), source="plans.yaml")
    (line,) = e.value.errors
    assert line.startswith(f"plans.yaml:9: plans.0.limits.0.lease.{path}:"), line
    assert words in line


def test_a_validity_is_kept_in_its_largest_exact_unit() -> None:
    forms = {"60s": "1m", "60000ms": "1m", "90s": "90s", "1500ms": "1500ms", "2h": "2h"}
    for written, kept in forms.items():
        doc = load_policy_text(
            POLICY.format(lease=f"{{ max_units: 5, max_share_pct: 10, validity: {written} }}")
        )
        lease = doc.plans[0].limits[0].lease
        assert lease is not None and lease.validity == kept


def test_a_limit_without_lease_settings_keeps_its_canonical_form() -> None:
    without = load_policy_text(POLICY.replace("        lease: {lease}\n", "").format())
    assert '"lease"' not in without.canonical_json()
    with_lease = load_policy_text(
        POLICY.format(lease="{ max_units: 5, max_share_pct: 10, validity: 1s }")
    )
    assert '"lease":{' in with_lease.canonical_json()


TERMS = LeaseTerms(max_units=100, max_share_pct=10, validity_ms=1000)


@pytest.mark.parametrize(
    ("remaining", "requested", "expected"),
    [
        (10_000, 500, 100),  # max_units
        (500, 500, 50),  # 10% of what remains
        (9, 500, 1),  # the share rounds to 0: still one unit while one is left
        (1, 500, 1),
        (0, 500, 0),
        (-5, 500, 0),  # a bucket in debt grants nothing
        (10_000, 7, 7),  # never more than requested
    ],
)
def test_grant_size(remaining: int, requested: int, expected: int) -> None:
    assert grant_size(requested, [LimitRoom(remaining, TERMS)]) == expected


def test_grant_size_takes_the_smallest_cap_of_every_limit() -> None:
    other = LeaseTerms(max_units=30, max_share_pct=100, validity_ms=1000)
    rooms = [LimitRoom(10_000, TERMS), LimitRoom(1_000, other)]
    assert grant_size(1_000, rooms) == 30
    assert grant_size(1_000, [LimitRoom(10_000, TERMS), LimitRoom(0, other)]) == 0


def test_a_soft_limit_caps_by_its_max_units_only() -> None:
    assert limit_cap(LimitRoom(-50, TERMS, soft=True)) == 100
    assert grant_size(1_000, [LimitRoom(0, TERMS, soft=True)]) == 100


def test_renew_below_rounds_up() -> None:
    assert renew_below(100, 20) == 20
    assert renew_below(7, 20) == 2
    assert renew_below(1, 1) == 1
    assert renew_below(0, 20) == 0
    assert renew_below(5, 0) == 0


def test_missing_lease_settings_names_the_limit() -> None:
    assert missing_lease_settings([("a", TERMS), ("b", None)]) == (
        "limit 'b' grants no lease (it has no 'lease' settings in its plan)"
    )
    assert missing_lease_settings([("a", TERMS)]) is None


GOOD = LeaseAsk("r-1", Subject("t1", "s", "k"), "api.sms.send", requested=10, holder="gw-1")


def test_a_good_ask_passes() -> None:
    assert validate_ask(GOOD) == []
    renew = LeaseAsk("r-2", Subject("t1"), "api.sms.send", lease_id="ab12", used=5, release=True)
    assert validate_ask(renew) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"request_id": "a b"}, "request_id"),
        ({"subject": Subject("")}, "subject.tenant"),
        ({"subject": Subject("t 1")}, "subject.tenant"),
        ({"subject": Subject("t1", "s s")}, "subject.slice"),
        ({"subject": Subject("t1", "", "k" * 129)}, "subject.key"),
        ({"metric": ""}, "metric"),
        ({"metric": "API.SMS"}, "metric"),
        ({"lease_id": "no/slash"}, "lease_id"),
        ({"lease_id": "x" * 65}, "lease_id"),
        ({"requested": -1}, "requested"),
        ({"requested": 10**12 + 1}, "requested"),
        ({"requested": 0}, "requested"),  # opening a lease asks for something
        ({"used": -1}, "used"),
        ({"used": 3}, "used"),  # nothing granted yet
        ({"release": True}, "release"),
        ({"lease_id": "ab", "release": True}, "requested"),  # release asks for nothing
        ({"labels": tuple((f"k{i}", "v") for i in range(17))}, "labels"),
        ({"labels": (("", "v"),)}, "labels"),
        ({"labels": (("k", "v" * 257),)}, "labels[k]"),
        ({"holder": "a holder"}, "holder"),
        ({"holder": "h" * 129}, "holder"),
    ],
)
def test_each_bad_field_is_named(changes: dict[str, object], field: str) -> None:
    fields = {
        "request_id": GOOD.request_id,
        "subject": GOOD.subject,
        "metric": GOOD.metric,
        "requested": GOOD.requested,
        "holder": GOOD.holder,
    }
    fields.update(changes)
    violations = validate_ask(LeaseAsk(**fields))  # type: ignore[arg-type]
    assert field in [v.field for v in violations], violations
