from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from chargepath.core.model import LimitKind, Scope, Subject
from chargepath.core.periods import Period
from chargepath.core.plans import (
    PUBLISHED,
    PolicyDocument,
    PolicyError,
    PolicyIssue,
    RateSpec,
    compile_rate,
    load_policy_text,
    parse_plan,
    parse_policy,
    policy_rules,
)
from chargepath.core.policy import Policy
from chargepath.policy_files import load_policy_file

ROOT = Path(__file__).resolve().parents[2]


def test_demo_policy_loads() -> None:
    doc = load_policy_file(ROOT / "examples" / "plans.yaml")
    assert {t.name for t in doc.tenants} == {"mvno-demo", "cpaas-demo"}


def test_error_names_field_and_line() -> None:
    text = """\
metrics:
  - name: api.sms.send
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        rate: { capacity: -3, refill: 1 }
"""
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="plans.yaml")
    (line,) = e.value.errors
    assert line.startswith("plans.yaml:8: plans.0.limits.0.rate.capacity:")
    assert "greater than 0" in line


def test_policy_errors_are_structures_with_path_and_line() -> None:
    text = """\
metrics:
  - name: api.sms.send
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        rate: { capacity: -3, refill: 1 }
      - name: daily
        metric: api.sms.send
        quota: { amount: 5, per: fortnight }
"""
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="plans.yaml")
    first, second = e.value.issues
    assert (first.source, first.path, first.line) == (
        "plans.yaml",
        "plans.0.limits.0.rate.capacity",
        8,
    )
    assert first.message == "Input should be greater than 0"
    assert (second.path, second.line) == ("plans.0.limits.1.quota.per", 11)
    assert str(e.value) == "invalid policy:\n  " + "\n  ".join(
        f"plans.yaml:{i.line}: {i.path}: {i.message}" for i in (first, second)
    )


def test_a_rule_across_fields_names_the_field_and_its_line() -> None:
    text = "metrics: [{name: api.sms.send}]\ntenants: [{name: t, plan: nope}]\n"
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="plans.yaml")
    (issue,) = e.value.issues
    assert (issue.path, issue.line, issue.column) == ("tenants.0.plan", 2, 27)
    assert issue.message == "unknown plan 'nope': not in 'plans'"
    assert str(issue) == "plans.yaml:2: tenants.0.plan: unknown plan 'nope': not in 'plans'"


def test_text_that_is_not_a_document_is_an_issue_without_a_field_at_its_line() -> None:
    with pytest.raises(PolicyError) as e:
        load_policy_text("metrics: []\nplans: [oops", source="document")
    (issue,) = e.value.issues
    assert (issue.path, issue.line, issue.column) == (None, 2, 13)
    assert issue.message == (
        "not valid YAML: while parsing a flow sequence: expected ',' or ']', but got '<stream end>'"
    )
    assert str(issue) == "document:2: " + issue.message


def test_a_key_written_twice_is_an_issue_at_its_second_line() -> None:
    text = """\
metrics: [{name: api.sms.send}]
plans:
  - name: p
    limits:
      - name: l
        metric: api.sms.send
        quota: {amount: 5, per: day, amount: 500}
        name: l2
tenants: [{name: t, plan: nope}]
"""
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="p.yaml")
    assert e.value.errors == [
        "p.yaml:7: plans.0.limits.0.quota.amount: key written twice in this mapping: only the "
        "last one would count",
        "p.yaml:8: plans.0.limits.0.name: key written twice in this mapping: only the last one "
        "would count",
        "p.yaml:9: tenants.0.plan: unknown plan 'nope': not in 'plans'",
    ]
    # alone, it is refused as well
    with pytest.raises(PolicyError, match="key written twice"):
        load_policy_text("metrics: [{name: api.sms.send, name: api.sms.recv}]\n")


def test_an_unreadable_file_is_a_policy_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as e:
        load_policy_file(missing)
    assert e.value.issues == [
        PolicyIssue(str(missing), None, None, "cannot read: No such file or directory")
    ]
    assert str(e.value) == f"invalid policy:\n  {missing}: cannot read: No such file or directory"


@pytest.mark.parametrize(
    ("snippet", "needle"),
    [
        ("tenants: [{name: t, plan: nope}]", "unknown plan 'nope'"),
        (
            "plans: [{name: p, limits: [{name: l, metric: x.y, quota: {amount: 5, per: day}}]}]",
            "matches no metric",
        ),
        ("plans: [{name: p, limits: [{name: l, metric: api.sms.send}]}]", "exactly one of"),
        (
            "plans: [{name: p, limits: [{name: l, metric: api.sms.send, "
            "quota: {amount: 5, per: year}}]}]",
            "plans.0.limits.0.quota.per",
        ),
        ("tenants: [{name: t}, {name: t}]", "duplicate tenant name 't'"),
        ("colour: blue", "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_documents_are_refused_with_the_reason(snippet: str, needle: str) -> None:
    text = "metrics: [{name: api.sms.send}]\n" + snippet + "\n"
    with pytest.raises(PolicyError) as e:
        load_policy_text(text)
    assert needle in str(e.value)


def test_slice_plan_limits_must_not_be_tenant_scoped() -> None:
    text = """
metrics: [{name: slice.bytes}]
plans: [{name: p, limits: [{name: l, metric: slice.bytes, scope: tenant,
                            rate: {capacity: 5, refill: 1}}]}]
tenants: [{name: t, slices: [{name: s1, plan: p}]}]
"""
    with pytest.raises(PolicyError, match="scope 'tenant'"):
        load_policy_text(text)


@pytest.mark.parametrize(
    ("capacity", "refill", "per", "scale", "per_ms"),
    [
        (20, 10, "second", 100, 1),
        (100, 100, "minute", 600, 1),
        (60, 600, "hour", 6000, 1),
        (2_000_000_000, 1_000_000_000, "second", 1, 1_000_000),
        (10, 7, "second", 1000, 7),
    ],
)
def test_rates_compile_to_exact_integers(
    capacity: int, refill: int, per: str, scale: int, per_ms: int
) -> None:
    c = compile_rate(RateSpec(capacity=capacity, refill=refill, per=per))  # type: ignore[arg-type]
    assert (c.scale, c.refill_per_ms, c.capacity_scaled) == (scale, per_ms, capacity * scale)
    # one period of refill is exactly `refill` units
    period_ms = {"second": 1000, "minute": 60_000, "hour": 3_600_000}[per]
    assert c.refill_per_ms * period_ms == refill * c.scale


def test_rate_too_large_to_count_exactly_is_refused() -> None:
    text = """
metrics: [{name: slice.bytes}]
plans: [{name: p, limits: [{name: l, metric: slice.bytes,
                            rate: {capacity: 9000000000000000, refill: 7, per: hour}}]}]
"""
    with pytest.raises(PolicyError, match="too large to count exactly"):
        load_policy_text(text)


def test_resolution_by_scope_and_pattern() -> None:
    policy = Policy(load_policy_file(ROOT / "examples" / "plans.yaml"), 7)
    r = policy.resolve(Subject("cpaas-demo", key="k1"), "api.sms.send")
    assert r.entitled and [lim.name for lim in r.limits] == [
        "sms-per-key",
        "sms-account",
        "sms-monthly",
    ]
    assert r.limits[0].scope is Scope.KEY and r.limits[2].kind is LimitKind.QUOTA
    assert r.limits[2].period is Period.MONTH
    # without a key the key-scoped limit does not apply
    r = policy.resolve(Subject("cpaas-demo"), "api.sms.send")
    assert [lim.name for lim in r.limits] == ["sms-account", "sms-monthly"]
    # a slice's own plan adds to the tenant's
    r = policy.resolve(Subject("mvno-demo", slice="1-000001"), "slice.bytes")
    assert [lim.name for lim in r.limits] == [
        "tenant-bytes-rate",
        "tenant-bytes-monthly",
        "slice-bytes-rate",
        "slice-bytes-monthly",
    ]
    assert not policy.resolve(Subject("cpaas-demo"), "slice.bytes").entitled
    assert not policy.resolve(Subject("stranger"), "api.sms.send").entitled


def test_a_bad_plan_given_to_the_admin_api_names_its_field() -> None:
    from chargepath.core import policy_edit

    doc = load_policy_file(ROOT / "examples" / "plans.yaml")
    bad = {
        "name": "x",
        "limits": [{"name": "l", "metric": "api.sms.send", "rate": {"capacity": 0, "refill": 1}}],
    }
    with pytest.raises(policy_edit.EditError) as e:
        policy_edit.put_plan(doc, bad)
    assert (e.value.field, e.value.reason) == (
        "plan",
        "limits.0.rate.capacity: Input should be greater than 0",
    )


def test_caps_errors_name_the_field_and_its_line() -> None:
    text = """\
metrics: [{name: api.sms.send}]
plans: [{name: p}]
tenants:
  - name: t
    plan: p
    caps:
      request_ids: 0
      sessions: many
      slice: 5
"""
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="plans.yaml")
    found = {(i.path, i.line) for i in e.value.issues}
    assert found == {
        ("tenants.0.caps.request_ids", 7),
        ("tenants.0.caps.sessions", 8),
        ("tenants.0.caps.slice", 9),
    }
    messages = {i.path: i.message for i in e.value.issues}
    assert messages["tenants.0.caps.request_ids"] == "Input should be greater than or equal to 1"
    assert messages["tenants.0.caps.slice"] == "Extra inputs are not permitted"


def test_caps_default_and_null_means_no_cap() -> None:
    text = """\
metrics: [{name: api.sms.send}]
plans: [{name: p}]
tenants:
  - {name: plain, plan: p}
  - {name: tight, plan: p, caps: {request_ids: 10, keys: null}}
"""
    policy = Policy(load_policy_text(text), 1)
    plain = policy.resolve(Subject("plain"), "api.sms.send").caps
    tight = policy.resolve(Subject("tight"), "api.sms.send").caps
    assert (plain.request_ids, plain.sessions, plain.slices, plain.keys) == (
        1_000_000,
        100_000,
        10_000,
        100_000,
    )
    # given: as written; left out: the default; null: no cap (0 to the store)
    assert (tight.request_ids, tight.sessions, tight.slices, tight.keys) == (10, 100_000, 10_000, 0)
    assert not policy.resolve(Subject("nobody"), "api.sms.send").tenant_known


def test_default_caps_leave_the_canonical_document_and_its_digest_as_before() -> None:
    base = "metrics: [{name: api.sms.send}]\nplans: [{name: p}]\n"
    plain = load_policy_text(base + "tenants: [{name: t, plan: p}]\n")
    assert '"caps"' not in plain.canonical_json()
    spelled = load_policy_text(
        base + "tenants: [{name: t, plan: p, caps: {request_ids: 1000000}}]\n"
    )
    assert spelled.digest() == plain.digest()
    tight = load_policy_text(base + "tenants: [{name: t, plan: p, caps: {request_ids: 5}}]\n")
    assert tight.digest() != plain.digest()
    assert '"request_ids":5' in tight.canonical_json()


# Every kind of issue at once: schema errors (a bad unit, a bad number, a missing choice, an
# unknown field, a malformed name) and rules across fields (duplicates, unknown references, a
# slice's plan with a tenant-scope limit), at the lines below.
MANY_ERRORS = """\
metrics:
  - name: api.sms.send
    unit: MB
  - name: api.sms.send
  - name: slice.bytes
    unit: byte
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.*
        rate: {capacity: -1, refill: 1}
      - name: burst
        metric: api.voice.*
        quota: {amount: 5, per: week}
      - name: monthly
        metric: api.sms.send
        quota: {amount: 5, per: fortnight}
  - name: s
    limits:
      - {name: bytes, metric: slice.bytes, rate: {capacity: 5, refill: 1}}
  - name: p
    colour: blue
tenants:
  - name: t
    plan: nope
    slices:
      - {name: s1, plan: s}
      - {name: s2, plan: gone}
  - name: bad name
webhooks:
  - name: ops
    url: https://example.com/h
    events: [quota.80]
    secret_env: HOOK_SECRET
    tenants: [t, stranger]
"""

MANY_ERRORS_FOUND = [
    (3, "metrics.0.unit", "unknown unit 'MB': did you mean 'megabyte'?"),
    (4, "metrics.1.name", "duplicate metric name 'api.sms.send'"),
    (12, "plans.0.limits.0.rate.capacity", "Input should be greater than 0"),
    (13, "plans.0.limits.1.name", "duplicate limit name 'burst'"),
    (14, "plans.0.limits.1.metric", "'api.voice.*' matches no metric of the catalog"),
    (18, "plans.0.limits.2.quota.per", "Input should be 'hour', 'day', 'week' or 'month'"),
    (22, "plans.2.name", "duplicate plan name 'p'"),
    (23, "plans.2.colour", "Extra inputs are not permitted"),
    (26, "tenants.0.plan", "unknown plan 'nope': not in 'plans'"),
    (28, "tenants.0.slices.0.plan", "plan 's' has limit 'bytes' with scope 'tenant'"),
    (29, "tenants.0.slices.1.plan", "unknown plan 'gone': not in 'plans'"),
    (30, "tenants.1.name", "must be 1 to 64 characters"),
    (36, "webhooks.0.tenants.1", "unknown tenant 'stranger': not in 'tenants'"),
]


def test_every_issue_of_a_file_is_reported_in_one_pass_in_the_order_of_its_lines() -> None:
    with pytest.raises(PolicyError) as e:
        load_policy_text(MANY_ERRORS, source="bad.yaml")
    issues = e.value.issues
    assert [(i.line, i.path) for i in issues] == [(ln, p) for ln, p, _ in MANY_ERRORS_FOUND]
    for issue, (_, _, message) in zip(issues, MANY_ERRORS_FOUND, strict=True):
        assert issue.message.startswith(message), issue
        assert issue.source == "bad.yaml" and issue.column is not None
    assert e.value.errors[0].startswith("bad.yaml:3: metrics.0.unit: unknown unit 'MB'")
    # one issue, one line: a message never breaks a line
    assert all("\n" not in line for line in e.value.errors)


def test_the_rules_also_run_on_a_decoded_document_without_lines() -> None:
    data = yaml.safe_load(MANY_ERRORS)
    with pytest.raises(PolicyError) as e:
        parse_policy(data, source="document")
    assert {i.path for i in e.value.issues} == {p for _, p, _ in MANY_ERRORS_FOUND}
    assert all(i.line is None and i.column is None for i in e.value.issues)


def test_an_issue_a_nested_model_and_the_rules_both_find_is_reported_once() -> None:
    # the duplicate limit is found by the plan's own validator and by the document's rules
    text = """\
metrics: [{name: api.sms.send}]
plans:
  - name: p
    limits:
      - {name: l, metric: api.sms.send, quota: {amount: 1, per: day}}
      - {name: l, metric: api.sms.send, quota: {amount: 2, per: day}}
tenants: [{name: t, plan: nope}]
"""
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="p.yaml")
    assert e.value.errors == [
        "p.yaml:6: plans.0.limits.1.name: duplicate limit name 'l'",
        "p.yaml:7: tenants.0.plan: unknown plan 'nope': not in 'plans'",
    ]


def test_a_plan_given_alone_reports_its_duplicates_with_its_schema_errors() -> None:
    plan = {
        "name": "p",
        "limits": [
            {"name": "l", "metric": "api.sms.send", "quota": {"amount": 0, "per": "day"}},
            {"name": "l", "metric": "api.sms.send", "quota": {"amount": 2, "per": "week"}},
        ],
    }
    with pytest.raises(PolicyError) as e:
        parse_plan(plan)
    assert [(i.path, i.message) for i in e.value.issues] == [
        ("limits.0.quota.amount", "Input should be greater than 0"),
        ("limits.1.name", "duplicate limit name 'l'"),
    ]


def test_a_weekly_quota_compiles_to_the_week_period() -> None:
    text = """\
metrics: [{name: api.sms.send, unit: message}]
plans: [{name: p, limits: [{name: w, metric: api.sms.send, quota: {amount: 7, per: week}}]}]
tenants: [{name: t, plan: p}]
"""
    (limit,) = Policy(load_policy_text(text), 1).resolve(Subject("t"), "api.sms.send").limits
    assert (limit.kind, limit.period, limit.per, limit.amount) == (
        LimitKind.QUOTA,
        Period.WEEK,
        "week",
        7,
    )


def test_a_unit_outside_the_list_is_refused_with_a_suggestion_and_the_list() -> None:
    text = "metrics: [{name: slice.bytes, unit: bytes}, {name: api.x, unit: x-credits}]\n"
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="p.yaml")
    (issue,) = e.value.issues
    assert (issue.path, issue.line) == ("metrics.0.unit", 1)
    assert issue.message.startswith("unknown unit 'bytes': did you mean 'byte'? accepted units")
    assert "x-<name>" in issue.message and "kilobyte" in issue.message


def test_a_published_document_with_an_older_free_unit_still_loads() -> None:
    # published before units came from a list: the store's copy loads; a new one is refused
    stored = '{"metrics": [{"name": "slice.bytes", "unit": "MB"}]}'
    doc = PolicyDocument.model_validate_json(stored, context=PUBLISHED)
    assert doc.metrics[0].unit == "MB"
    with pytest.raises(ValidationError, match="unknown unit 'MB'"):
        PolicyDocument.model_validate_json(stored)


# Valid fields, every rule across fields broken: found by the models' own validators (the
# document's rules on its rule_view) and by the rules on the decoded data, alike.
RULES_ONLY = """\
metrics: [{name: api.sms.send}, {name: api.sms.send}, {name: slice.bytes}]
plans:
  - name: p
    limits:
      - {name: l, metric: api.voice.*, quota: {amount: 1, per: week}}
      - {name: l, metric: api.sms.send, quota: {amount: 1, per: day}}
  - {name: s, limits: [{name: l, metric: slice.bytes, rate: {capacity: 1, refill: 1}}]}
  - {name: p}
tenants:
  - name: t
    plan: p
    slices: [{name: s1, plan: s}, {name: s1}, {name: s2, plan: gone}]
    keys: [{name: k}, {name: k}]
  - {name: t, plan: nope}
envoy:
  - domain: d
    descriptors:
      - {key: a, metric: api.nope}
      - {key: a, subject: tenant, descriptors: [{key: b, subject: tenant, metric: slice.bytes}]}
  - {domain: d, tenant: t, descriptors: [{key: c, metric: slice.bytes}]}
webhooks:
  - {name: w, url: 'https://x/h', events: [quota.80, quota.80], secret_env: S, tenants: [zed]}
  - {name: w, url: 'https://x/h', events: [degraded], secret_env: S}
"""


def test_the_rules_find_the_same_on_the_models_as_on_the_decoded_data() -> None:
    data = yaml.safe_load(RULES_ONLY)
    with pytest.raises(PolicyError) as e:
        parse_policy(data)
    from_models = {(i.path, i.message) for i in e.value.issues}
    on_data = {(".".join(map(str, loc)), message) for loc, message in policy_rules(data)}
    assert from_models == on_data
    paths = {path for path, _ in on_data}
    assert {
        "metrics.1.name",
        "plans.0.limits.0.metric",
        "plans.0.limits.1.name",
        "plans.2.name",
        "tenants.0.slices.0.plan",  # scope 'tenant', and 'l' in both plans
        "tenants.0.slices.1.name",
        "tenants.0.slices.2.plan",
        "tenants.0.keys.1.name",
        "tenants.1.name",
        "tenants.1.plan",
        "envoy.0.descriptors.0.metric",
        "envoy.0.descriptors.0",  # no tenant
        "envoy.0.descriptors.1",  # duplicate (key, value)
        "envoy.0.descriptors.1.descriptors.0.subject",
        "envoy.1.domain",
        "webhooks.0.events.1",
        "webhooks.0.tenants.0",
        "webhooks.1.name",
    } == paths
    # the document's own validator (on its rule_view), when every nested model validates
    nested_ok = (
        RULES_ONLY.replace("{name: l, metric: api.sms.send", "{name: m, metric: api.sms.send")
        .replace("{name: s1}, ", "")
        .replace("{name: k}, {name: k}", "{name: k}")
        .replace("      - {key: a, metric: api.nope}\n", "      - {key: z, metric: api.nope}\n")
        .replace("[quota.80, quota.80]", "[quota.80]")
    )
    data = yaml.safe_load(nested_ok)
    with pytest.raises(ValidationError) as v:
        PolicyDocument.model_validate(data)
    found = {(".".join(map(str, e["loc"])), e["msg"]) for e in v.value.errors()}
    assert found == {(".".join(map(str, loc)), message) for loc, message in policy_rules(data)}
    assert {e["type"] for e in v.value.errors()} == {"policy_rule"} and len(found) == 14
