"""Admin input rules and the audit's pure parts: empty documents, removals that need prune,
the tenants a change affects, bounded events, request summaries without secrets or documents,
and the per-identity limit on audited refusals. No I/O."""

from __future__ import annotations

import pytest

from chargepath.core import policy_edit
from chargepath.core.audit import ANONYMOUS, MAX_TENANTS, MAX_TEXT, AuditEvent
from chargepath.core.auth import PERMISSIONS, FailedAttempts, Principal, Role
from chargepath.core.plans import load_policy_text
from chargepath.transport.audit import AUDITED, AuditInterceptor
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import keys_pb2

pytestmark = pytest.mark.unit

POLICY = """
metrics: [{name: api.sms.send}]
plans:
  - {name: gold, limits: [{name: q, metric: api.sms.send, scope: tenant,
                           quota: {amount: 100, per: day}}]}
  - {name: silver, limits: [{name: q, metric: api.sms.send, scope: tenant,
                             quota: {amount: 10, per: day}}]}
  - {name: slice-sms, limits: [{name: q, metric: api.sms.send, scope: slice,
                                quota: {amount: 5, per: day}}]}
tenants:
  - {name: acme, plan: gold}
  - {name: globex, plan: silver}
  - {name: initech, slices: [{name: s1, plan: slice-sms}]}
"""


@pytest.mark.parametrize("text", ["", "  \n\t", "{}", "null", "~", "metrics: [{name: a.b}]"])
def test_an_empty_document_is_refused_naming_the_field(text: str) -> None:
    doc = load_policy_text(text) if text.strip() else None
    bad = policy_edit.check_not_empty(text, doc)
    assert bad is not None and bad.field == "document"


def test_a_document_with_plans_or_tenants_is_not_empty() -> None:
    doc = load_policy_text(POLICY)
    assert policy_edit.check_not_empty(POLICY, doc) is None
    plans_only = load_policy_text(POLICY.split("tenants:")[0])
    assert policy_edit.check_not_empty("x", plans_only) is None


def test_removals_lists_the_live_plans_and_tenants_a_document_leaves_out() -> None:
    live = load_policy_text(POLICY)
    smaller = load_policy_text(
        POLICY.replace("  - {name: globex, plan: silver}\n", "").replace(
            "  - {name: initech, slices: [{name: s1, plan: slice-sms}]}\n", ""
        )
    )
    assert [str(r) for r in policy_edit.removals(live, smaller)] == [
        "tenant globex",
        "tenant initech",
    ]
    no_silver = load_policy_text(POLICY.split("  - {name: silver")[0] + "tenants: []\n")
    assert [(r.kind, r.name) for r in policy_edit.removals(live, no_silver)] == [
        ("plan", "silver"),
        ("plan", "slice-sms"),
        ("tenant", "acme"),
        ("tenant", "globex"),
        ("tenant", "initech"),
    ]
    assert policy_edit.removals(None, smaller) == []  # nothing live yet
    assert policy_edit.removals(live, live) == []


def test_affected_tenants_follow_plan_changes_to_their_tenants_and_slices() -> None:
    live = load_policy_text(POLICY)
    silver_up = load_policy_text(POLICY.replace("amount: 10,", "amount: 20,"))
    assert policy_edit.affected_tenants(live, silver_up) == {"globex"}
    slice_up = load_policy_text(POLICY.replace("amount: 5,", "amount: 6,"))
    assert policy_edit.affected_tenants(live, slice_up) == {"initech"}
    acme_moves = load_policy_text(POLICY.replace("{name: acme, plan: gold}", "{name: acme}"))
    assert policy_edit.affected_tenants(live, acme_moves) == {"acme"}
    assert policy_edit.affected_tenants(live, live) == set()
    assert policy_edit.affected_tenants(None, live) == {"acme", "globex", "initech"}


def test_an_event_is_bounded_and_names_the_caller_or_anonymous() -> None:
    long = "x" * 10_000
    e = AuditEvent.of(None, "Suspend", long, [f"t{i}" for i in range(500)] + ["", "t1"])
    assert (e.identity, e.role) == (ANONYMOUS, "")
    assert len(e.summary) == MAX_TEXT and e.summary.endswith("...")
    assert len(e.tenants) == MAX_TENANTS and "" not in e.tenants
    assert list(e.tenants) == sorted(e.tenants)
    op = AuditEvent.of(Principal("abcdefghijkl", Role.OPERATOR, None), "Grant", "s", ["acme"])
    assert (op.identity, op.role, op.tenants) == ("abcdefghijkl", "operator", ("acme",))
    assert op.with_outcome("NOT_FOUND", long).detail.endswith("...")


def test_every_mutating_rpc_is_audited_and_no_read_is() -> None:
    reads = {
        "GetPolicy",
        "GetPlan",
        "ListPlans",
        "GetState",
        "ExplainDecision",
        "WatchDecisions",
        "ListAuditEvents",
        "ListKeys",
    }
    services = (
        apb.DESCRIPTOR.services_by_name["AdminService"],
        keys_pb2.DESCRIPTOR.services_by_name["KeyService"],
    )
    methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    assert set(AUDITED) == {m for m in methods if m.rsplit("/", 1)[1] not in reads}
    assert set(AUDITED) <= set(PERMISSIONS)


def test_summaries_hold_no_document_and_no_key() -> None:
    document = "metrics: [{name: secret.metric}]\nplans: []\n"
    summary, tenants = AUDITED["/chargepath.v1.AdminService/ApplyPolicy"](
        apb.ApplyPolicyRequest(document=document, prune=True, expected_version=7)
    )
    assert "secret.metric" not in summary and list(tenants) == []
    assert summary.startswith(f"document={len(document)} bytes sha256:")
    assert summary.endswith(" prune expected_version=7")
    create, tenants = AUDITED["/chargepath.v1.KeyService/CreateKey"](
        keys_pb2.CreateKeyRequest(role=keys_pb2.ROLE_METER, tenant="acme", description="ci")
    )
    assert create == "role=1 tenant=acme description=ci" and list(tenants) == ["acme"]
    # values are cut before validation: a hostile request cannot bloat the trail
    huge, _ = AUDITED["/chargepath.v1.AdminService/AssignPlan"](
        apb.AssignPlanRequest(tenant="t" * 100_000, plan="p" * 100_000)
    )
    assert len(huge) < 250


class FakeTrail:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def append(self, event: AuditEvent) -> str:
        self.events.append(event)
        return f"{len(self.events)}-0"

    async def read(
        self, *, after: str = "", since_ms: int = 0, tenant: str = "", limit: int = 100
    ) -> tuple[list[AuditEvent], str]:
        return self.events, after


async def test_refusals_are_limited_per_identity_and_unauthenticated_calls_are_not_audited() -> (
    None
):
    now = [0]
    trail = FakeTrail()
    interceptor = AuditInterceptor(
        trail, refusals=FailedAttempts(lambda: now[0], burst=3, interval_ms=1000)
    )
    refused = AuditEvent("meterkey1234", "meter", "ApplyPolicy", "s", outcome="PERMISSION_DENIED")
    other = AuditEvent("meterkey5678", "meter", "Suspend", "s", outcome="PERMISSION_DENIED")
    for _ in range(10):
        await interceptor.record(refused)
    await interceptor.record(other)
    await interceptor.record(AuditEvent(ANONYMOUS, "", "Suspend", "s", outcome="UNAUTHENTICATED"))
    for _ in range(5):  # changes and other errors are never limited
        await interceptor.record(AuditEvent("opkey", "operator", "Suspend", "s"))
        await interceptor.record(
            AuditEvent("opkey", "operator", "Suspend", "s", outcome="NOT_FOUND")
        )
    assert [e.identity for e in trail.events].count("meterkey1234") == 3
    assert [e.identity for e in trail.events].count("meterkey5678") == 1
    assert [e.identity for e in trail.events].count("opkey") == 10
    assert ANONYMOUS not in [e.identity for e in trail.events]
    assert interceptor.suppressed == 7
    now[0] = 1000  # one more refusal after a second
    await interceptor.record(refused)
    assert [e.identity for e in trail.events].count("meterkey1234") == 4
