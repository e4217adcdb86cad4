"""The rls scenario's requests and the alternate command's order and summary (pure: no
gateway; the plan files are read from the repository)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chargepath.core.policy import Policy
from chargepath.policy_files import load_policy_file
from loadtest.alternate import Turn, summary, turns
from loadtest.runner import Measurement
from loadtest.stats import FlowSummary, PhaseSummary, Tally
from loadtest.workload import RlsRequests, WorkloadError, load_workload, require_rls_route

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PLAN_FILES = [ROOT / "loadtest/bench-plans.yaml", ROOT / "examples/plans.yaml"]


@pytest.mark.parametrize("plans", PLAN_FILES, ids=lambda p: p.name)
def test_each_rls_request_is_the_admit_of_the_same_check(plans: Path) -> None:
    """Call n asks, through the plan file's envoy mapping, for the subject and metric of the
    n-th admit of the check scenario: the same buckets, so their costs compare."""
    workload = load_workload(plans, spread="many", keys=3)
    require_rls_route(workload)
    policy = Policy(load_policy_file(plans), 1)
    requests = RlsRequests(workload)
    for n in range(4):
        req = requests.next()
        assert req.domain == "cpaas-edge" and req.hits_addend == 0  # Envoy's default: 1
        (descriptor,) = req.descriptors
        entries = [(e.key, e.value) for e in descriptor.entries]
        assert [k for k, _ in entries] == ["tenant", "api_key", "route"]
        route = policy.route_descriptor(req.domain, entries)
        assert route.matched and not route.shadow
        subject = (route.subject.tenant, route.subject.slice, route.subject.key)
        assert subject == workload.check_subject(n) == ("cpaas-demo", "", f"key-{n % 3:05d}")
        assert route.metric == workload.check_metric == "api.sms.send"


def test_an_amount_above_one_is_the_hits_addend() -> None:
    workload = load_workload(PLAN_FILES[0], spread="hot", check_amount=5)
    req = RlsRequests(workload).next()
    assert req.hits_addend == 5
    assert [e.value for e in req.descriptors[0].entries] == ["cpaas-demo", "key-hot", "sms-send"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"rls_route": "no-such-route"}, "no descriptor matches it"),
        ({"rls_domain": "no-such-domain"}, "no descriptor matches it"),
        ({"check_metric": "api.voice.minutes"}, "it maps it to"),
    ],
)
def test_a_descriptor_the_plans_do_not_map_to_the_admit_is_refused(
    change: dict[str, str], says: str
) -> None:
    workload = dataclasses.replace(load_workload(PLAN_FILES[0], spread="many"), **change)
    with pytest.raises(WorkloadError, match=says):
        require_rls_route(workload)


def test_even_rounds_run_in_reverse_order() -> None:
    assert turns(["check", "rls"], 3) == [
        Turn(1, "check"), Turn(1, "rls"),
        Turn(2, "rls"), Turn(2, "check"),
        Turn(3, "check"), Turn(3, "rls"),
    ]  # fmt: skip


def _measured(flow: str, usages: int, cpu_s: float | None) -> Measurement:
    latency: dict[str, float | None] = {"p50": 2.0, "p90": 3.0, "p99": 4.0, "p99.9": 5.0}
    tally = Tally(ok_usages=usages, window_usages=usages)
    phase = PhaseSummary(
        "run", 100.0, 10.0, [FlowSummary(flow, 1, 100.0, 100.0, latency, tally, [])], cpu_s
    )
    return Measurement(flow, "127.0.0.1:1", (), phases=[phase])


def test_the_summary_pairs_each_scenario_with_the_baseline_of_its_round() -> None:
    played = [
        (Turn(1, "check"), _measured("check", 1000, 1.2)),
        (Turn(1, "rls"), _measured("rls", 1000, 1.5)),
        (Turn(2, "rls"), _measured("rls", 1000, 1.2)),
        (Turn(2, "check"), _measured("check", 1000, 1.0)),
        (Turn(3, "check"), _measured("check", 1000, None)),  # no --target-pid
    ]
    doc = summary(played, ["check", "rls"])
    assert doc["baseline"] == "check" and doc["rounds"] == 3
    assert doc["scenarios"]["check"]["cpu_us_per_usage"] == [1200.0, 1000.0, None]
    assert doc["scenarios"]["rls"]["cpu_us_per_usage"] == [1500.0, 1200.0, None]
    assert doc["scenarios"]["rls"]["p99_ms"] == [4.0, 4.0, None]
    assert doc["cpu_ratio_to_baseline"] == {"rls": [1.25, 1.2, None]}
