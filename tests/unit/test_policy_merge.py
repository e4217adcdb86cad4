"""The plan file against the live policy at start: which source wins, field by field
(chargepath.core.policy_merge), and what a start decides (chargepath.policy_sync.plan_start)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chargepath.core import policy_edit
from chargepath.core.model import Subject
from chargepath.core.plans import PolicyDocument, PolicyError, parse_policy
from chargepath.core.policy_merge import ABSENT, FieldChange, diff, merge, summary
from chargepath.policy_files import load_policy_file
from chargepath.policy_sync import plan_start
from chargepath.store.base import AppliedPlanFile, PublishedPolicy

ROOT = Path(__file__).resolve().parents[2]
DEMO = load_policy_file(ROOT / "examples" / "plans.yaml")

PLATINUM = {
    "name": "platinum",
    "limits": [
        {"name": "sms", "metric": "api.sms.send", "rate": {"capacity": 5, "refill": 1}},
    ],
}


def edited(doc: PolicyDocument, change: Any) -> PolicyDocument:
    """``doc`` with ``change`` applied to its JSON form, revalidated."""
    data = doc.model_dump(mode="json")
    change(data)
    return parse_policy(data)


def tenant(doc: PolicyDocument, name: str) -> Any:
    return next(t for t in doc.tenants if t.name == name)


def runtime_edits(doc: PolicyDocument) -> PolicyDocument:
    """What an operator did through the admin API since the last start."""
    doc = policy_edit.set_suspension(doc, Subject("cpaas-demo", "", "k-stolen"), "fraud")
    doc = policy_edit.set_suspension(doc, Subject("mvno-demo", "1-000001", ""), "unpaid")
    doc = policy_edit.set_failure_mode(doc, "cpaas-demo", "allow")
    doc = policy_edit.assign(doc, "mvno-demo", "1-000002", "slice-embb")
    plan = DEMO.plans[-1].model_dump(mode="json")  # cpaas-starter
    plan["limits"][0]["rate"]["capacity"] = 40
    doc = policy_edit.put_plan(doc, plan)
    return policy_edit.put_plan(doc, {**PLATINUM, "name": "runtime-plan"})


def test_a_file_unchanged_where_the_runtime_changed_keeps_every_runtime_change() -> None:
    live = runtime_edits(DEMO)
    # the file changed elsewhere: a plan added
    file = edited(DEMO, lambda d: d["plans"].append(PLATINUM))
    result = merge(DEMO, live, file)
    doc = result.document
    assert result.overrides == ()
    assert {p.name for p in doc.plans} == {p.name for p in live.plans} | {"platinum"}
    cpaas, mvno = tenant(doc, "cpaas-demo"), tenant(doc, "mvno-demo")
    assert [(k.name, k.suspended) for k in cpaas.keys] == [("k-stolen", "fraud")]
    assert cpaas.failure_policy.mode == "allow"
    assert {s.name: (s.plan, s.suspended) for s in mvno.slices} == {
        "1-000001": ("slice-embb", "unpaid"),
        "1-000002": ("slice-embb", None),
    }
    starter = next(p for p in doc.plans if p.name == "cpaas-starter")
    assert starter.limits[0].rate is not None and starter.limits[0].rate.capacity == 40


def test_a_field_the_file_changes_wins_over_the_runtime_and_is_reported() -> None:
    live = policy_edit.assign(DEMO, "mvno-demo", "1-000002", "slice-embb")
    live = policy_edit.set_failure_mode(live, "cpaas-demo", "allow")

    def change(d: dict[str, Any]) -> None:
        d["tenants"][0]["slices"][1]["plan"] = "mvno-base-free"
        d["plans"].append({**PLATINUM, "name": "mvno-base-free", "limits": []})

    file = edited(DEMO, change)
    result = merge(DEMO, live, file)
    mvno = tenant(result.document, "mvno-demo")
    assert mvno.slices[1].plan == "mvno-base-free"
    # the failure policy the file did not touch keeps its runtime value
    assert tenant(result.document, "cpaas-demo").failure_policy.mode == "allow"
    assert [str(o) for o in result.overrides] == [
        "tenants.mvno-demo.slices.1-000002.plan: the file's 'mvno-base-free' replaces the "
        "runtime 'slice-embb'"
    ]


def test_a_runtime_change_equal_to_the_file_change_is_no_override() -> None:
    live = policy_edit.set_failure_mode(DEMO, "cpaas-demo", "allow")
    file = edited(DEMO, lambda d: d["tenants"][1].update(failure_policy={"mode": "allow"}))
    result = merge(DEMO, live, file)
    assert result.overrides == ()
    assert tenant(result.document, "cpaas-demo").failure_policy.mode == "allow"


def test_a_file_that_removes_a_tenant_changed_at_runtime_wins_and_says_so() -> None:
    live = policy_edit.set_suspension(DEMO, Subject("mvno-demo", "", ""), "unpaid")
    file = edited(DEMO, lambda d: d["tenants"].pop(0))
    result = merge(DEMO, live, file)
    assert [t.name for t in result.document.tenants] == ["cpaas-demo"]
    assert [o.path for o in result.overrides] == [("tenants", "mvno-demo")]
    assert result.overrides[0].file is ABSENT


def test_items_added_on_either_side_are_both_kept() -> None:
    live = policy_edit.assign(DEMO, "new-runtime-tenant", "", "cpaas-starter")
    file = edited(
        DEMO, lambda d: d["tenants"].append({"name": "new-file-tenant", "plan": "mvno-base"})
    )
    names = [t.name for t in merge(DEMO, live, file).document.tenants]
    assert names == ["mvno-demo", "cpaas-demo", "new-runtime-tenant", "new-file-tenant"]


def test_keys_of_the_same_name_in_two_slices_are_two_items() -> None:
    live = policy_edit.set_suspension(DEMO, Subject("mvno-demo", "1-000001", "imsi-1"), "a")
    live = policy_edit.set_suspension(live, Subject("mvno-demo", "1-000002", "imsi-1"), "b")
    # the file suspends the same key name in a third scope (any slice)
    file = edited(
        DEMO, lambda d: d["tenants"][0].update(keys=[{"name": "imsi-1", "suspended": "c"}])
    )
    result = merge(DEMO, live, file)
    keys = {(k.slice, k.name): k.suspended for k in tenant(result.document, "mvno-demo").keys}
    assert keys == {("1-000001", "imsi-1"): "a", ("1-000002", "imsi-1"): "b", ("", "imsi-1"): "c"}
    assert result.overrides == ()


def test_a_resume_at_runtime_survives_a_file_that_still_suspends_as_before() -> None:
    base = edited(DEMO, lambda d: d["tenants"][1].update(keys=[{"name": "k", "suspended": "x"}]))
    live = policy_edit.set_suspension(base, Subject("cpaas-demo", "", "k"), None)
    file = edited(base, lambda d: d["plans"].append(PLATINUM))
    assert tenant(merge(base, live, file).document, "cpaas-demo").keys == []


def test_without_a_record_what_the_file_sets_wins_and_its_defaults_keep_the_live_value() -> None:
    live = policy_edit.set_suspension(DEMO, Subject("cpaas-demo", "", "k1"), "fraud")
    live = policy_edit.assign(live, "mvno-demo", "1-000002", "slice-embb")
    result = merge(None, live, DEMO)
    cpaas, mvno = tenant(result.document, "cpaas-demo"), tenant(result.document, "mvno-demo")
    assert [(k.name, k.suspended) for k in cpaas.keys] == [("k1", "fraud")]
    assert mvno.slices[1].plan == "slice-urllc"  # the file sets it
    assert [o.path for o in result.overrides] == [
        ("tenants", "mvno-demo", "slices", "1-000002", "plan")
    ]


def test_a_merge_that_does_not_validate_is_refused_with_a_hint() -> None:
    base = policy_edit.put_plan(DEMO, {**PLATINUM, "name": "legacy"})
    # the runtime assigns the plan that the new file removes
    live = policy_edit.assign(base, "cpaas-demo", "", "legacy")
    with pytest.raises(PolicyError) as err:
        merge(base, live, DEMO, source="plans.yaml")
    assert err.value.errors == [
        "plans.yaml: tenants.1.plan: unknown plan 'legacy': not in 'plans'",
        "plans.yaml: (document): the file merged with the changes made through the admin API "
        "does not validate; change the file, or start once with --plans-mode replace to make "
        "the file win",
    ]


def test_the_diff_names_each_field_and_summarises_per_list() -> None:
    new = policy_edit.set_suspension(DEMO, Subject("cpaas-demo", "", "k1"), "fraud")
    new = policy_edit.set_failure_mode(new, "cpaas-demo", "allow")
    new = policy_edit.put_plan(new, PLATINUM)
    new = policy_edit.set_suspension(new, Subject("mvno-demo", "", ""), "unpaid")
    lines = [str(c) for c in diff(DEMO, new)]
    assert lines == [
        "+ plans.platinum 1 limits, ledger={'mode': 'entries', 'interval_s': 60}",
        "~ tenants.mvno-demo.suspended: None -> 'unpaid'",
        "~ tenants.cpaas-demo.failure_policy.mode: 'deny' -> 'allow'",
        "+ tenants.cpaas-demo.keys.k1 suspended='fraud'",
    ]
    assert summary(diff(DEMO, new)) == "plans +platinum; tenants ~mvno-demo ~cpaas-demo"
    assert summary(diff(new, DEMO)).startswith("plans -platinum;")
    assert summary([]) == "no change"
    removed = FieldChange(("tenants", "x"), {"name": "x"}, ABSENT)
    assert (removed.sign, str(removed)) == ("-", "- tenants.x")


def test_the_diff_ignores_the_order_of_named_lists() -> None:
    reordered = edited(DEMO, lambda d: d["plans"].reverse())
    assert diff(DEMO, reordered) == []


# -- plan_start: what a start does -------------------------------------------------------


def applied(doc: PolicyDocument, version: int) -> AppliedPlanFile:
    return AppliedPlanFile(version, doc.digest(), doc)


def test_a_first_start_publishes_the_file() -> None:
    plan = plan_start(DEMO, None, None)
    assert (plan.outcome, plan.document) == ("first", DEMO)


def test_a_start_with_the_file_last_applied_publishes_nothing_and_reports_the_drift() -> None:
    live = runtime_edits(DEMO)
    plan = plan_start(DEMO, PublishedPolicy(9, live), applied(DEMO, 3))
    assert (plan.outcome, plan.document, plan.runtime_changes) == ("unchanged", None, 6)
    assert "~ tenants.cpaas-demo.failure_policy.mode: 'deny' -> 'allow'" in map(str, plan.drift)
    assert "+ tenants.cpaas-demo.keys.k-stolen suspended='fraud'" in map(str, plan.drift)


def test_a_start_with_a_changed_file_merges_and_lists_the_file_changes() -> None:
    live = runtime_edits(DEMO)
    file = edited(DEMO, lambda d: d["plans"].append(PLATINUM))
    plan = plan_start(file, PublishedPolicy(9, live), applied(DEMO, 3))
    assert plan.outcome == "merged" and plan.document is not None
    assert [str(c) for c in plan.file_changes] == [
        "+ plans.platinum 1 limits, ledger={'mode': 'entries', 'interval_s': 60}"
    ]
    assert tenant(plan.document, "cpaas-demo").keys[0].suspended == "fraud"
    # what still differs from the file afterwards is exactly the runtime state
    assert diff(file, plan.document) == plan.drift and plan.drift


def test_replace_makes_the_file_win_and_lists_what_it_drops() -> None:
    live = runtime_edits(DEMO)
    plan = plan_start(DEMO, PublishedPolicy(9, live), applied(DEMO, 3), "replace")
    assert (plan.outcome, plan.document) == ("replaced", DEMO)
    assert "- tenants.cpaas-demo.keys.k-stolen" in map(str, plan.dropped)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="plans mode 'overwrite'"):
        plan_start(DEMO, None, None, "overwrite")  # type: ignore[arg-type]
