"""A recorded mixed run: the same scripted traffic must give the same verdicts and the same
ledger, release after release.

A real gateway (its own fresh redis-server) serves ``recorded/plans.yaml``. The script below
drives it through the raw ``chargepath.v1`` stubs: Checks that allow, throttle and deny for
every reason, replays, a request id reused for another usage, invalid usages, reports into
debt and past quotas, StreamUsage batches with sessions and sequences, a reconnect that
resends, a sequence beyond the replay window, per-interval ledger aggregates, suspensions,
labels and occurred_at, over several tenants, slices and keys. Then every tenant's ledger is
read back as billing reads it (``chargepath ledger export --format jsonl``).

Both are normalised (see :func:`normalise_verdict` and :func:`normalise_ledger`) and compared
with ``recorded/mixed-run.json``; a mismatch fails with a unified diff. Only what is
legitimately different between two runs is normalised: decision ids (a label per first
occurrence, so "a replay carries the first decision's id" and "this ledger entry is that
decision" are still checked), trace ids, times, and durations that depend on the wall clock.

``CHARGEPATH_RECORD=1 python -m pytest tests/e2e/test_recorded_run.py`` records the
expectation again. Record only when a behaviour change is intended, and review the diff.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent / "recorded"
PLANS = HERE / "plans.yaml"
EXPECTED = HERE / "mixed-run.json"
RECORD = os.environ.get("CHARGEPATH_RECORD") == "1"

TENANTS = ("shop", "mvno", "bulk", "frozen", "nobody", "ghost")
#: Tenants whose plan sums allowed admits per interval in the ledger (bulk-recorded).
AGGREGATING = ("bulk",)
AGGREGATE_INTERVAL_S = 1.0

MINUTE_MS = 60_000
#: 2026-03-01T12:00:00.250Z and 2026-03-01T12:00:07Z, as a slice controller reports them.
OCCURRED_A_MS = 1_772_366_400_250
OCCURRED_B_MS = 1_772_366_407_000

JSON = dict[str, Any]


# -- usages ------------------------------------------------------------------------------


def usage(
    rid: str,
    tenant: str,
    metric: str,
    amount: int,
    *,
    report: bool = False,
    slice_: str = "",
    key: str = "",
    labels: dict[str, str] | None = None,
    occurred_at_ms: int = 0,
    session: str = "",
    sequence: int = 0,
    mode: int | None = None,
) -> pb.Usage:
    u = pb.Usage(
        request_id=rid,
        subject=pb.Subject(tenant=tenant, slice=slice_, key=key),
        metric=metric,
        amount=amount,
        mode=(pb.MODE_REPORT if report else pb.MODE_ADMIT) if mode is None else mode,
        labels=labels or {},
        session_id=session,
        sequence=sequence,
    )
    if occurred_at_ms:
        u.occurred_at.FromMilliseconds(occurred_at_ms)
    return u


def sms(rid: str, key: str, amount: int, **kw: Any) -> pb.Usage:
    return usage(rid, "shop", "api.sms.send", amount, key=key, **kw)


def voice(rid: str, key: str, amount: int, **kw: Any) -> pb.Usage:
    return usage(rid, "shop", "api.voice.minutes", amount, key=key, **kw)


def slice_bytes(rid: str, slice_: str, amount: int, **kw: Any) -> pb.Usage:
    return usage(rid, "mvno", "slice.bytes", amount, report=True, slice_=slice_, **kw)


def sessions(rid: str, slice_: str, amount: int, **kw: Any) -> pb.Usage:
    return usage(rid, "mvno", "slice.sessions", amount, report=True, slice_=slice_, **kw)


def bulk(rid: str, key: str, amount: int, **kw: Any) -> pb.Usage:
    return usage(rid, "bulk", "api.sms.send", amount, key=key, **kw)


# -- normalisation -----------------------------------------------------------------------


@dataclass
class DecisionLabels:
    """A stable label (``D01``, ``D02``, ...) for each decision id, in order of first sight."""

    labels: dict[str, str] = field(default_factory=dict)

    def __call__(self, decision_id: str) -> str:
        if not decision_id:
            return ""
        if decision_id not in self.labels:
            self.labels[decision_id] = f"D{len(self.labels) + 1:02d}"
        return self.labels[decision_id]

    def known(self, decision_id: str) -> str:
        """The label of an id a verdict carried; a ledger entry of a decision no verdict
        announced is a finding, and shows as such."""
        return self.labels.get(decision_id, f"not in any verdict: {decision_id!r}")


def duration_ms(d: Any) -> int:
    return int(d.seconds) * 1000 + int(d.nanos) // 1_000_000


def rate_minutes(ms: int) -> int:
    """A rate limit's wait, rounded up to the minute. Every rate of the plans refills a unit in
    whole minutes, so the exact wait is a whole number of minutes less the milliseconds since
    the bucket was last written: rounded up, it is exact while the run lasts under a minute."""
    return -(-ms // MINUTE_MS)


VERDICT_FIELDS = {
    "request_id",
    "decision",
    "reason",
    "retry_after",
    "limits",
    "policy_version",
    "decision_id",
    "recorded",
    "degraded",
    "replayed",
    "trace_id",
    "message",
    "decided_at",
    "violations",
}
LIMIT_FIELDS = {
    "name",
    "kind",
    "scope",
    "remaining",
    "capacity",
    "reset_after",
    "soft",
    "exceeded",
}


def normalise_verdict(v: pb.Verdict, ids: DecisionLabels) -> JSON:
    """Every field of a verdict; what depends on the clock or on randomness is reduced to what
    is deterministic about it."""
    retry_ms = duration_ms(v.retry_after)
    if v.reason == pb.REASON_RATE_LIMITED:
        retry: object = {"minutes": rate_minutes(retry_ms)}
    else:  # a quota's wait runs to its period's end: known only to be there
        retry = {"positive": retry_ms > 0}
    limits = []
    for lim in v.limits:
        reset_ms = duration_ms(lim.reset_after)
        limits.append(
            {
                "name": lim.name,
                "kind": pb.LimitKind.Name(lim.kind),
                "scope": pb.Scope.Name(lim.scope),
                "remaining": lim.remaining,
                "capacity": lim.capacity,
                "reset_after": (
                    {"minutes": rate_minutes(reset_ms)}
                    if lim.kind == pb.LIMIT_KIND_RATE
                    else {"positive": reset_ms > 0}
                ),
                "soft": lim.soft,
                "exceeded": lim.exceeded,
            }
        )
    return {
        "request_id": v.request_id,
        "decision": pb.Decision.Name(v.decision),
        "reason": pb.Reason.Name(v.reason),
        "retry_after": retry,
        "limits": limits,
        "policy_version": v.policy_version,
        "decision_id": ids(v.decision_id),
        "recorded": v.recorded,
        "degraded": v.degraded,
        "replayed": v.replayed,
        "traced": bool(v.trace_id),
        "message": v.message,
        "decided_at": v.HasField("decided_at"),
        "violations": [[f.field, f.description] for f in v.violations],
    }


def normalise_error(err: grpc.RpcError) -> JSON:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    violations = []
    if status is not None:
        for detail in status.details:
            br = error_details_pb2.BadRequest()
            if detail.Unpack(br):
                violations += [[f.field, f.description] for f in br.field_violations]
    return {
        "error": err.code().name,  # type: ignore[attr-defined]
        "message": err.details(),  # type: ignore[attr-defined]
        "violations": violations,
    }


def normalise_ledger(lines: list[JSON], ids: DecisionLabels) -> JSON:
    """A tenant's exported ledger: its entries in order, without stream ids and decision
    times, and decision ids as the labels their verdicts got.

    Aggregate entries are summed per everything they say but their amounts and interval: how
    the admits fall into intervals, and when the gateway's background job or the export
    flushed them, depends on the clock; their sums do not."""
    entries: list[JSON] = []
    sums: dict[str, JSON] = {}
    for e in lines:
        entry = {k: v for k, v in e.items() if k not in ("id", "decided_at")}
        entry["labels"] = dict(sorted(e["labels"].items()))
        if not e["aggregate"]:
            entry["decision_id"] = ids.known(e["decision_id"])
            entries.append(entry)
            continue
        # an aggregate's request id names its interval: "agg:<start ms>:<slice>:<key>:<metric>"
        entry["request_id"] = re.sub(r"^agg:\d+:", "agg:<interval>:", e["request_id"])
        for name in ("interval_start", "interval_end", "amount", "billed_amount", "count"):
            del entry[name]
        same = json.dumps(entry, sort_keys=True)
        total = sums.setdefault(same, {**entry, "amount": 0, "billed_amount": 0, "count": 0})
        for name in ("amount", "billed_amount", "count"):
            total[name] += e[name]
    return {"entries": entries, "aggregates": [sums[k] for k in sorted(sums)]}


# -- the run -----------------------------------------------------------------------------


@dataclass
class Run:
    """Drives the gateway and writes down every reply, normalised, in order."""

    stub: pb_grpc.MeteringServiceStub
    ids: DecisionLabels = field(default_factory=DecisionLabels)
    steps: list[JSON] = field(default_factory=list)

    def check(self, step: str, u: pb.Usage, view: int = pb.VERDICT_VIEW_UNSPECIFIED) -> None:
        try:
            reply = self.stub.Check(pb.CheckRequest(usage=u, view=view), timeout=10)
            out = normalise_verdict(reply.verdict, self.ids)
        except grpc.RpcError as err:
            out = normalise_error(err)
        self.steps.append({"step": step, "rpc": "Check", "reply": out})

    def stream(
        self,
        step: str,
        batches: list[list[pb.Usage]],
        view: int = pb.VERDICT_VIEW_UNSPECIFIED,
    ) -> None:
        """One StreamUsage call: each batch is one request message, sent after the previous
        one's response came back (as a controller that waits for its verdicts does)."""
        replies: list[list[JSON]] = []
        call = self.stub.StreamUsage(iter_requests(batches, view, replies), timeout=20)
        for response in call:
            replies.append([normalise_verdict(v, self.ids) for v in response.verdicts])
        assert len(replies) == len(batches), f"{step}: {len(replies)} responses"
        self.steps.append({"step": step, "rpc": "StreamUsage", "replies": replies})


def iter_requests(
    batches: list[list[pb.Usage]], view: int, replies: list[list[JSON]]
) -> Iterator[pb.StreamUsageRequest]:
    for n, batch in enumerate(batches):
        # one message in flight: wait for the previous response before sending the next
        deadline = time.monotonic() + 10
        while len(replies) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        yield pb.StreamUsageRequest(usages=batch, view=view)


def drive(run: Run) -> None:
    """The scripted mix. Comments say what each step meets; the recording says what it got."""
    c, s = run.check, run.stream

    # -- shop: admits through per-key buckets, an account bucket, a daily quota ---------
    c("first admit of key-a", sms("c-a1", "key-a", 1))
    c("key-a empties its bucket, with labels", sms("c-a2", "key-a", 4, labels={"campaign": "x"}))
    c("key-a throttled by its bucket", sms("c-a3", "key-a", 1))
    c("retry of an allow: replayed, same decision", sms("c-a1", "key-a", 1))
    c("retry of a throttle: replayed, nothing taken", sms("c-a3", "key-a", 1))
    c("request id reused for another amount", sms("c-a1", "key-a", 2))
    c("request id reused for another key", sms("c-a1", "key-b", 1))
    c("key-b uses its whole bucket", sms("c-b1", "key-b", 5))
    c("key-c takes the last of the daily quota", sms("c-c1", "key-c", 2))
    c("daily quota exhausted, key-c's bucket still has room", sms("c-c2", "key-c", 1))
    c("retry of a quota deny: replayed", sms("c-c2", "key-c", 1))
    c("more than the per-key bucket ever holds", sms("c-c3", "key-c", 6))
    c(
        "the account bucket counts a pattern (api.sms.*)",
        usage("c-st1", "shop", "api.sms.status", 3),
    )
    c("more than the bucket ever holds (voice)", voice("c-v0", "key-a", 31))
    c("voice, key-a", voice("c-v1", "key-a", 30))
    c("voice, key-b", voice("c-v2", "key-b", 30))
    c("voice, key-c: 90 of the soft 100 per month", voice("c-v3", "key-c", 30))
    c("voice, key-d crosses the soft monthly quota", voice("c-v4", "key-d", 15))
    c("voice, key-d goes on past the soft quota", voice("c-v5", "key-d", 1))
    c(
        "basic view: an allow crossing a soft limit keeps its limits",
        voice("c-v6", "key-e", 1),
        pb.VERDICT_VIEW_BASIC,
    )
    c("basic view: a deny keeps its limits", sms("c-a4", "key-a", 1), pb.VERDICT_VIEW_BASIC)
    c("the plan has no limit for this metric", usage("c-n1", "shop", "slice.bytes", 1))
    c("no entitlement is not remembered: decided again", usage("c-n1", "shop", "slice.bytes", 1))
    c("a suspended key", sms("c-f1", "key-frozen", 1))
    c("retry of a suspended key's deny: replayed", sms("c-f1", "key-frozen", 1))

    # -- other tenants: suspended, without a plan, unknown ---------------------------------
    c("a suspended tenant", usage("f-1", "frozen", "api.sms.send", 1, key="k"))
    c(
        "a suspended tenant's report is recorded",
        usage("f-2", "frozen", "api.sms.send", 2, key="k", report=True),
    )
    c("a tenant with no plan", usage("n-1", "nobody", "api.sms.send", 1))
    c("a tenant the policy does not know", usage("g-1", "ghost", "api.sms.send", 1))

    # -- invalid Checks: INVALID_ARGUMENT naming the field ---------------------------------
    c("amount 0", sms("i-1", "key-a", 0))
    c("no tenant", usage("i-2", "", "api.sms.send", 1))
    c("a key with a space", sms("i-3", "key a", 1))
    c("no mode", sms("i-4", "key-a", 1, mode=pb.MODE_UNSPECIFIED))
    c("a metric not in the catalog", usage("i-5", "shop", "api.fax.send", 1))
    c("a session id on Check", sms("i-6", "key-a", 1, session="sess", sequence=1))
    c("a sequence without a session", sms("i-7", "key-a", 1, sequence=3))
    c("17 labels", sms("i-8", "key-a", 1, labels={f"l{i}": "v" for i in range(17)}))
    c("several fields at once", usage("", "shop", "API.SMS", -5))

    # -- mvno: reports, always recorded, into debt and past quotas -------------------------
    c(
        "a report with labels and occurred_at",
        slice_bytes(
            "m-1", "1-000002", 400, labels={"cell": "A1", "rat": "nr"}, occurred_at_ms=OCCURRED_A_MS
        ),
    )
    c("a report past the slice bucket: debt, throttle", slice_bytes("m-2", "1-000002", 300))
    c("retry of the report: replayed, debited once", slice_bytes("m-2", "1-000002", 300))
    c("a suspended slice's report is debited and recorded", slice_bytes("m-3", "1-000003", 10))
    c(
        "a suspended slice's admit takes nothing",
        usage("m-4", "mvno", "slice.bytes", 10, slice_="1-000003"),
    )
    c(
        "a report without a slice counts at tenant scope only",
        usage("m-5", "mvno", "slice.bytes", 1000, report=True),
    )

    # -- streams: a controller's session ---------------------------------------------------
    ctrl = "ctrl-1"
    b1 = [
        slice_bytes(
            "s-1",
            "1-000001",
            800,
            key="ue-1",
            session=ctrl,
            sequence=1,
            occurred_at_ms=OCCURRED_B_MS,
        ),
        slice_bytes("s-2", "1-000001", 700, key="ue-2", session=ctrl, sequence=2),
        sessions("s-3", "1-000001", 1, key="ue-1", session=ctrl, sequence=3),
        sessions("s-4", "1-000002", 2, session=ctrl, sequence=4, labels={"dnn": "internet"}),
    ]
    b2 = [
        slice_bytes("s-5", "1-000001", 600, session=ctrl, sequence=5),
        sessions("s-6", "1-000002", 2, session=ctrl, sequence=6),
        sms("s-shop-1", "key-s", 2),  # another tenant in the batch, deduplicated by request id
        slice_bytes("s-8", "1-000001", -1, session=ctrl, sequence=8),  # invalid: never decided
    ]
    b3 = [
        slice_bytes("s-9", "1-000001", 1000, session=ctrl, sequence=9),
        sessions("s-10", "1-000001", 11, key="ue-9", session=ctrl, sequence=10),
        slice_bytes("s-11", "1-000003", 5, session=ctrl, sequence=11),
    ]
    s("a session: three batches", [b1, b2, b3])
    s("reconnect: the last two batches resent", [b2, b3])
    s(
        "a jump ahead, then sequences behind it",
        [
            [slice_bytes("s-300", "1-000002", 1, session=ctrl, sequence=300)],
            [
                # 9 is more than the replay window (128) behind 300: refused
                slice_bytes("s-9", "1-000001", 1000, session=ctrl, sequence=9),
                # 250 was never sent and is within the window: decided now
                slice_bytes("s-250", "1-000002", 1, session=ctrl, sequence=250),
                slice_bytes("s-300", "1-000002", 1, session=ctrl, sequence=300),
            ],
        ],
    )
    s(
        "no session: request ids deduplicate",
        [
            [sms("s-shop-2", "key-s", 1), sms("s-shop-1", "key-s", 2)],
            [sms("s-shop-2", "key-s", 3)],  # reused for another amount
        ],
    )
    s(
        "invalid usages get a verdict; the stream goes on",
        [
            [
                slice_bytes("s-i1", "1-000001", 0, session="ctrl-2", sequence=1),
                usage("s-i2", "mvno", "slice.bytes", 1, report=True, sequence=2),
                usage("s-i3", "mvno", "slice.volume", 1, report=True),
                slice_bytes("s-i4", "1-000001", 1, session="x" * 129, sequence=1),
                slice_bytes("s-i5", "1-000001", 1, labels={"": "empty key"}),
                slice_bytes("s-ok", "1-000001", 1, session="ctrl-2", sequence=2),
            ]
        ],
    )
    s(
        "basic view: plain allows carry no limits",
        [
            [
                sessions("s-b1", "1-000001", 1, key="ue-7"),
                sessions("s-b2", "1-000001", 20, key="ue-8"),
            ]
        ],
        pb.VERDICT_VIEW_BASIC,
    )

    # -- bulk: admits summed per interval in the ledger, reports one entry each -----------
    s(
        "aggregated admits",
        [
            [
                bulk("b-1", "k1", 3),
                bulk("b-2", "k1", 3),
                bulk("b-3", "k1", 3),
                bulk("b-4", "k2", 2),
            ],
            [
                usage("b-5", "bulk", "api.sms.status", 5),
                bulk("b-6", "k1", 4, report=True, labels={"src": "batch"}),
                bulk("b-1", "k1", 3),
            ],
        ],
    )
    c("an aggregated admit on Check", bulk("b-7", "k2", 1, labels={"src": "check"}))
    c(
        "basic view: a plain allow carries no limits",
        usage("b-8", "bulk", "api.sms.status", 1),
        pb.VERDICT_VIEW_BASIC,
    )


def all_replies(steps: list[JSON]) -> list[JSON]:
    """Every reply of the run, in order: a Check's verdict or error, each stream verdict."""
    out: list[JSON] = []
    for st in steps:
        if "reply" in st:
            out.append(st["reply"])
        else:
            for batch in st["replies"]:
                out.extend(batch)
    return out


def export_ledger(gw: GatewayProcess, tenant: str, code: int = 0) -> list[JSON]:
    """The tenant's ledger as billing reads it: ``chargepath ledger export`` in JSON lines
    (which reads only: nothing is marked exported or trimmed)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chargepath",
            "ledger",
            "export",
            "--tenant",
            tenant,
            "--format",
            "jsonl",
            "--redis-url",
            gw.redis_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    if code:
        assert f"--tenant: unknown tenant {tenant!r}" in proc.stderr, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wait_clear_of_day_end(margin_s: float = 60.0) -> None:
    """Quotas reset at UTC day (and month) boundaries: a run that crossed one would see a
    fresh quota halfway. Start clear of the boundary."""
    to_boundary = 86_400 - time.time() % 86_400
    if to_boundary < margin_s:
        time.sleep(to_boundary + 1)


@pytest.fixture(scope="module")
def recorded_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway on the recorded plans and a fresh redis-server of its own."""
    # The recording's reports occurred at fixed instants (OCCURRED_A_MS, 2026-03-01), so that
    # it is the same every day: the occurred_at window is opened wide enough to take them.
    gw = start_gateway(
        tmp_path_factory.mktemp("recorded"),
        plans=PLANS,
        env={"CHARGEPATH_OCCURRED_AT_MAX_AGE_S": str(100 * 365 * 86_400)},
    )
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


def test_mixed_run_matches_the_recording(recorded_gateway: GatewayProcess) -> None:
    wait_clear_of_day_end()
    with recorded_gateway.channel() as channel:
        run = Run(pb_grpc.MeteringServiceStub(channel))
        started = time.monotonic()
        drive(run)
        elapsed = time.monotonic() - started
    # rate waits are rounded to the minute (rate_minutes): exact only for a short run
    assert elapsed < 30, f"the run took {elapsed:.1f} s; rate waits would drift"
    # every aggregate interval of the run has ended: the export flushes them all
    time.sleep(AGGREGATE_INTERVAL_S + 0.2)
    ledgers = {
        t: normalise_ledger(export_ledger(recorded_gateway, t), run.ids)
        for t in TENANTS
        if t != "ghost"
    }
    # a tenant the policy does not know has no ledger: exporting it is a usage error
    assert export_ledger(recorded_gateway, "ghost", code=2) == []
    replies = all_replies(run.steps)
    got = {
        "about": "tests/e2e/test_recorded_run.py: verdicts and ledgers of the recorded mixed "
        "run, normalised. Record again with CHARGEPATH_RECORD=1 only for an intended change.",
        "counts": {
            "verdicts": sum("decision" in r for r in replies),
            "errors": sum("error" in r for r in replies),
            "ledger_entries": {t: len(v["entries"]) for t, v in ledgers.items()},
            "aggregated_admits": {
                t: sum(a["count"] for a in v["aggregates"]) for t, v in ledgers.items()
            },
        },
        "steps": run.steps,
        "ledgers": ledgers,
    }
    text = json.dumps(got, indent=1, ensure_ascii=False) + "\n"
    if RECORD:
        EXPECTED.write_text(text, encoding="utf-8")
        return
    assert EXPECTED.is_file(), f"no recording at {EXPECTED}: run with CHARGEPATH_RECORD=1"
    expected = EXPECTED.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                "recorded",
                "this run",
                n=6,
            )
        )
        pytest.fail(
            f"the mixed run differs from {EXPECTED.name} in: {', '.join(differing(got, expected))}"
            f"\n{diff}",
            pytrace=False,
        )


def differing(got: JSON, expected_text: str) -> list[str]:
    """The names of the steps and ledgers that differ, to read before the diff."""
    expected = json.loads(expected_text)
    steps = {st["step"]: st for st in expected.get("steps", [])}
    out = [st["step"] for st in got["steps"] if steps.pop(st["step"], None) != st]
    out += [f"{name} (missing)" for name in steps]
    ledgers = expected.get("ledgers", {})
    out += [f"ledger of {t}" for t in got["ledgers"] if ledgers.get(t) != got["ledgers"][t]]
    if expected.get("counts") != got["counts"]:
        out.append("counts")
    return out


def test_the_recording_covers_the_mix() -> None:
    """The recording itself holds every kind of outcome the run is meant to pin down, so a
    careless re-recording that lost some is caught."""
    data = json.loads(EXPECTED.read_text(encoding="utf-8"))
    verdicts = all_replies(data["steps"])
    outcomes = {(v.get("decision"), v.get("reason")) for v in verdicts if "decision" in v}
    assert {
        ("DECISION_ALLOW", "REASON_OK"),
        ("DECISION_ALLOW", "REASON_SOFT_LIMIT_EXCEEDED"),
        ("DECISION_THROTTLE", "REASON_RATE_LIMITED"),
        ("DECISION_DENY", "REASON_QUOTA_EXHAUSTED"),
        ("DECISION_DENY", "REASON_AMOUNT_EXCEEDS_CAPACITY"),
        ("DECISION_DENY", "REASON_NO_ENTITLEMENT"),
        ("DECISION_DENY", "REASON_SUSPENDED"),
        ("DECISION_DENY", "REASON_INVALID_USAGE"),
    } <= outcomes
    assert any(v.get("replayed") for v in verdicts)
    assert any(v.get("error") == "INVALID_ARGUMENT" for v in verdicts)
    assert any(v.get("recorded") and v.get("decision") == "DECISION_THROTTLE" for v in verdicts)
    assert data["ledgers"]["bulk"]["aggregates"], "no per-interval aggregate in the ledger"
    assert all(data["ledgers"][t]["entries"] for t in ("shop", "mvno", "bulk", "frozen"))
