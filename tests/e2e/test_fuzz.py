"""A property-based fuzz of a live gateway (hypothesis, derandomized: the same inputs every run).

1. Generated usages, valid and not (tenants known and unknown, metrics, amounts from 0 and
   negative to 2**63-1, labels too many and too long, occurred_at extremes, session and
   sequence combinations), batched many per StreamUsage message, and a share of them on Check.
2. Raw byte strings on every RPC of MeteringService and AdminService (KeyService gets the same
   in tests/integration/test_hostile_services.py).

Calls carry the gateway's operator key: the bytes are judged past authentication, as for any
authenticated caller.

Properties: only the expected status codes come back (OK and INVALID_ARGUMENT; NOT_FOUND,
FAILED_PRECONDITION and ABORTED where an admin RPC defines them; an open watch ends at its
deadline), an invalid usage is always refused (INVALID_ARGUMENT on Check, an INVALID_USAGE
verdict in its place on a stream) and never decided, no message leaks an exception, the gateway
still serves (health SERVING, a known-good Check ALLOWs), a control tenant that the fuzz never
names gets exactly the verdicts of its twin that ran before the fuzz, and the gateway's log
stays bounded. The counts per status code are printed (pytest -s) and add up.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargepath.core.validation import OccurredAtWindow
from chargepath.transport import services
from chargepath.transport.mapping import usage_from_pb
from chargepath.transport.metering import usage_violations, wall_ms
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway
from tests.fuzzing import LEAKS, RAW_PER_RPC, RawFuzz, fuzz_settings

pytestmark = pytest.mark.e2e

USAGES = 10_000
PER_EXAMPLE = 16
#: Usages per StreamUsage message; every CHECK_EVERY-th usage also goes to Check.
BATCH = 64
CHECK_EVERY = 8
#: What the gateway may write to its log over the whole fuzz (it writes about 60 KB).
LOG_BOUND_BYTES = 256 * 1024

PLANS = """
metrics:
  - {name: api.sms.send, unit: message}
  - {name: api.voice.minutes, unit: minute}
  - {name: slice.bytes, unit: byte}
plans:
  - name: fuzz-cpaas
    limits:
      - {name: sms-per-key, metric: api.sms.send, scope: key,
         rate: {capacity: 20, refill: 10, per: second}}
      - {name: sms-account, metric: "api.sms.*", scope: tenant,
         rate: {capacity: 200, refill: 100, per: second}}
      - {name: sms-daily, metric: api.sms.send, scope: tenant, quota: {amount: 100000, per: day}}
      - {name: voice-daily, metric: api.voice.minutes, scope: tenant,
         quota: {amount: 500, per: day}, soft: true}
  - name: fuzz-mvno
    limits:
      - {name: bytes-rate, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000000, refill: 100000, per: second}}
      - {name: bytes-monthly, metric: slice.bytes, scope: tenant,
         quota: {amount: 1000000000, per: month}}
  # Refills one unit an hour: over a run of a minute or two no bucket gains a unit back, so
  # the verdicts of a sequence of checks do not depend on when it runs.
  - name: control
    limits:
      - {name: per-key, metric: api.sms.send, scope: key,
         rate: {capacity: 30, refill: 1, per: hour}}
      - {name: daily, metric: api.sms.send, scope: tenant, quota: {amount: 100, per: day}}
  - name: probe
    limits:
      - {name: big, metric: api.sms.send, scope: tenant, quota: {amount: 1000000000, per: day}}
tenants:
  - {name: fuzz-a, plan: fuzz-cpaas}
  - {name: fuzz-b, plan: fuzz-mvno}
  - {name: control, plan: control}
  - {name: twin, plan: control}
  - {name: probe, plan: probe}
"""
CATALOG = {"api.sms.send", "api.voice.minutes", "slice.bytes"}
#: Tenants the fuzz never names.
PROTECTED = {"control", "twin", "probe"}
#: The control tenant's checks (key, amount): allows, a throttle per key, then the daily quota
#: runs out (DENY).
CONTROL = [("k1", 7)] * 5 + [("k2", 9)] * 4 + [("k3", 15)] * 3 + [("k4", 16), ("k4", 15), ("k5", 1)]


def wait_clear_of_day_end(margin_s: float = 180.0) -> None:
    """The control's quotas are daily: a run across a UTC day's end would see them reset."""
    to_boundary = 86_400 - time.time() % 86_400
    if to_boundary < margin_s:
        time.sleep(to_boundary + 1)


def control_usage(tenant: str, key: str, amount: int) -> pb.Usage:
    return pb.Usage(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant=tenant, key=key),
        metric="api.sms.send",
        amount=amount,
        mode=pb.MODE_ADMIT,
    )


def outcome(v: pb.Verdict) -> tuple[object, ...]:
    """What must not change: the decision, the reason and every limit's remaining units (not
    retry_after, which depends on when the check ran)."""
    return (
        pb.Decision.Name(v.decision),
        pb.Reason.Name(v.reason),
        tuple((lim.name, lim.remaining, lim.capacity, lim.exceeded) for lim in v.limits),
    )


@dataclass
class Control:
    """The control tenant's sequence of checks, spread over the fuzz."""

    stub: pb_grpc.MeteringServiceStub
    expected: list[tuple[object, ...]]
    got: list[tuple[object, ...]] = field(default_factory=list)

    def step(self) -> None:
        if len(self.got) < len(CONTROL):
            key, amount = CONTROL[len(self.got)]
            v = self.stub.Check(
                pb.CheckRequest(usage=control_usage("control", key, amount)), timeout=10
            ).verdict
            self.got.append(outcome(v))

    def check(self) -> None:
        assert self.got == self.expected[: len(self.got)]


@dataclass
class Fuzzed:
    gateway: GatewayProcess
    control: Control
    log_bytes_before: int
    started: float


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A gateway on the fuzz plans, and the twin's verdicts, taken before any fuzz."""
    wait_clear_of_day_end()
    workdir = tmp_path_factory.mktemp("fuzz")
    plans = workdir / "plans.yaml"
    plans.write_text(PLANS)
    # A generous store timeout: on a loaded machine a 50 ms one answers degraded now and then,
    # and this fuzz is about input, not latency (a degraded verdict here fails the test).
    gw = start_gateway(workdir, plans=plans, env={"CHARGEPATH_STORE_TIMEOUT_MS": "5000"})
    try:
        with gw.channel() as channel:
            stub = pb_grpc.MeteringServiceStub(channel)
            twin = [
                outcome(
                    stub.Check(
                        pb.CheckRequest(usage=control_usage("twin", k, n)), timeout=10
                    ).verdict
                )
                for k, n in CONTROL
            ]
            assert {o[0] for o in twin} == {
                "DECISION_ALLOW",
                "DECISION_THROTTLE",
                "DECISION_DENY",
            }
            yield Fuzzed(gw, Control(stub, twin), len(gw.log().encode()), time.monotonic())
    finally:  # the gateway stops even if the twin's checks failed
        code = gw.stop()
        if gw.redis is not None:
            gw.redis.stop()
    assert code == 0, gw.log()


# -- generated usages ------------------------------------------------------------------------

texts = st.text(max_size=24)
NOW_S = int(time.time())
TIMESTAMPS = [
    (NOW_S - 3600, 999_999_999),
    (NOW_S - 40 * 86_400, 0),  # too old
    (NOW_S + 600, 0),  # too far ahead
    (0, 0),
    (-1, 0),
    (2**63 - 1, 0),
    (-(2**63), 0),
    (NOW_S, -1),
    (NOW_S, 1_000_000_000),
    (NOW_S, 2**31 - 1),
]
#: What a usage is about, valid: (tenant, slice, key, metric). fuzz-b has no SMS entitlement.
SHAPES = [
    ("fuzz-a", "", "k1", "api.sms.send"),
    ("fuzz-a", "", "k2", "api.sms.send"),
    ("fuzz-a", "", "k1", "api.voice.minutes"),
    ("fuzz-b", "1-000001", "", "slice.bytes"),
    ("fuzz-b", "1-000002", "ue-7", "slice.bytes"),
    ("fuzz-b", "", "k1", "api.sms.send"),
]
#: Per field, values that break it (a few are valid but unusual: at a bound, unknown to the
#: catalog or the policy). A variant past the end of a list draws a random value instead.
FAULTS: dict[str, list[object]] = {
    "request_id": ["", "r" * 129, "has space", "é", "tab\there", "r" * 128],
    "tenant": ["", "t" * 65, "a{b}", "FUZZ-A", "ten ant", "fuzz-unknown", "t" * 64],
    "slice": ["s" * 129, "a b", "slice#1", "s" * 128],
    "key": ["k" * 129, "k:1", "k\n1", "k" * 128],
    "metric": ["", "API.SMS", "m" * 129, "api..sms", "api.sms.", "api.fax.send"],
    "amount": [0, -1, 10**12, 10**12 + 1, 2**63 - 1, -(2**63)],
    "mode": [pb.MODE_UNSPECIFIED, 3, -5],
    "labels": [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 257},
        {"": "v"},
        {f"k{i:02d}" + "k" * 61: "v" * 256 for i in range(16)},
    ],
    "occurred_at": TIMESTAMPS,
    "session": [
        ("", 5),
        ("s" * 129, 1),
        ("has space", 1),
        ("s-fuzz-old", 1),
        ("s-fuzz-1", 2**64 - 1),
    ],
}
RANDOM = {
    "request_id": texts,
    "tenant": texts,
    "slice": texts,
    "key": texts,
    "metric": texts,
    "amount": st.integers(-(2**63), 2**63 - 1),
    "mode": st.integers(-(2**31), 2**31 - 1),
    "labels": st.dictionaries(texts, texts, max_size=3),
    "occurred_at": st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**31), 2**31 - 1)),
    "session": st.tuples(texts, st.integers(0, 2**64 - 1)),
}
_ids = iter(range(1 << 62))


def _set(u: pb.Usage, name: str, value: object) -> None:
    if name in ("tenant", "slice", "key"):
        setattr(u.subject, name, value)
    elif name == "labels":
        u.labels.clear()
        u.labels.update(value)  # type: ignore[arg-type]
    elif name == "occurred_at":
        u.occurred_at.seconds, u.occurred_at.nanos = value  # type: ignore[misc]
    elif name == "session":
        u.session_id, u.sequence = value  # type: ignore[misc]
    else:
        setattr(u, name, value)


EXTRAS = ("", "labels", "occurred_at", "session", "all")
#: What a usage's valid base is: its shape, its mode and its optional fields, in one draw.
BASES = st.sampled_from(
    [(shape, mode, extra) for shape in SHAPES for mode in (1, 2) for extra in EXTRAS]
)
AMOUNTS = st.integers(1, 40)
FAULT_LISTS = st.lists(st.tuples(st.sampled_from(sorted(FAULTS)), st.integers(0, 9)), max_size=2)


@st.composite
def usages(draw: st.DrawFn) -> pb.Usage:
    """A valid usage of the fuzz tenants with up to two faults (about a third stay valid).
    A session's sequence is left 0 here: the test numbers it (``UsageFuzz.add``)."""
    (tenant, slice_, key, metric), mode, extra = draw(BASES)
    u = pb.Usage(
        request_id=f"fz-{next(_ids)}",
        subject=pb.Subject(tenant=tenant, slice=slice_, key=key),
        metric=metric,
        amount=draw(AMOUNTS),
        mode=mode,
    )
    if extra in ("labels", "all"):
        u.labels["cell"] = "A1"
    if extra in ("occurred_at", "all"):
        u.occurred_at.seconds = NOW_S - 60
    if extra in ("session", "all"):
        u.session_id = f"s-fuzz-{len(u.request_id) % 3}"
    for name, variant in draw(FAULT_LISTS):
        values = FAULTS[name]
        value = values[variant] if variant < len(values) else draw(RANDOM[name])
        if name == "tenant" and value in PROTECTED:
            value = "fuzz-unknown"
        _set(u, name, value)
    return u


def copy(u: pb.Usage) -> pb.Usage:
    out = pb.Usage()
    out.CopyFrom(u)
    return out


def must_be_refused(u: pb.Usage, *, on_stream: bool) -> bool:
    """Whether the gateway's own input rules refuse ``u`` (judged here with its code, on this
    machine's clock; no generated occurred_at lies within seconds of the window's edges)."""
    bad = usage_violations(
        u, usage_from_pb(u), on_stream=on_stream, now_ms=wall_ms(), window=OccurredAtWindow()
    )
    metric_named = any(v.field == "metric" for v in bad)
    return bool(bad) or (not metric_named and u.metric not in CATALOG)


class Stream:
    """One StreamUsage call kept open, a message at a time."""

    def __init__(self, stub: pb_grpc.MeteringServiceStub) -> None:
        self._requests: queue.Queue[pb.StreamUsageRequest | None] = queue.Queue()
        self._responses = stub.StreamUsage(iter(self._requests.get, None), timeout=600)

    def send(self, request: pb.StreamUsageRequest) -> pb.StreamUsageResponse:
        self._requests.put(request)
        response: pb.StreamUsageResponse = next(self._responses)
        return response

    def close(self) -> None:
        self._requests.put(None)
        assert list(self._responses) == []


@dataclass
class UsageFuzz:
    stream: Stream
    check: grpc.UnaryUnaryMultiCallable
    pending: list[pb.Usage] = field(default_factory=list)
    sent: int = 0
    checked: int = 0
    sequences: Counter[str] = field(default_factory=Counter)
    stream_reasons: Counter[str] = field(default_factory=Counter)
    check_codes: Counter[str] = field(default_factory=Counter)
    check_reasons: Counter[str] = field(default_factory=Counter)

    def add(self, u: pb.Usage) -> bool:
        """Queue ``u``; send a message when BATCH are queued. True when one was sent."""
        if u.session_id.startswith("s-fuzz-") and not u.sequence:
            self.sequences[u.session_id] += 1
            u.sequence = self.sequences[u.session_id]
        self.pending.append(u)
        if len(self.pending) < BATCH:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        self.sent += len(batch)
        response = self.stream.send(pb.StreamUsageRequest(usages=batch))
        assert len(response.verdicts) == len(batch)
        for u, v in zip(batch, response.verdicts, strict=True):
            reason = pb.Reason.Name(v.reason)
            self.stream_reasons[reason] += 1
            assert v.request_id == u.request_id[:128]
            assert not v.degraded, v  # the store kept up
            if must_be_refused(u, on_stream=True):
                assert (v.decision, v.reason) == (pb.DECISION_DENY, pb.REASON_INVALID_USAGE), u
                assert v.violations and not v.recorded
        # A share on Check, concurrently; sessions are for streams, so most go without.
        checks = [copy(u) for u in batch[::CHECK_EVERY]]
        for u in checks[: len(checks) * 2 // 3]:
            u.ClearField("session_id")
            u.ClearField("sequence")
        self.checked += len(checks)
        calls = [self.check.future(pb.CheckRequest(usage=u), timeout=10) for u in checks]
        for u, call in zip(checks, calls, strict=True):
            try:
                verdict = call.result().verdict
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                details = error.details() or ""  # type: ignore[attr-defined]
                assert not any(word in details for word in LEAKS), details
            self.check_codes[code.name] += 1
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
            if must_be_refused(u, on_stream=False):
                assert code is grpc.StatusCode.INVALID_ARGUMENT, u
            if code is grpc.StatusCode.OK:
                assert verdict.request_id == u.request_id and not verdict.degraded
                self.check_reasons[pb.Reason.Name(verdict.reason)] += 1


def test_generated_usages_get_only_the_expected_answers(fuzzed: Fuzzed) -> None:
    gw = fuzzed.gateway
    with gw.channel() as channel:
        stub = pb_grpc.MeteringServiceStub(channel)
        fuzz = UsageFuzz(
            Stream(stub),
            channel.unary_unary(
                "/chargepath.v1.MeteringService/Check",
                request_serializer=pb.CheckRequest.SerializeToString,
                response_deserializer=pb.CheckResponse.FromString,
            ),
        )
        messages = 0

        @fuzz_settings(max_examples=USAGES // PER_EXAMPLE)
        @given(drawn=st.lists(usages(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
        def one(drawn: list[pb.Usage]) -> None:
            nonlocal messages
            for u in drawn:
                if fuzz.add(u):
                    messages += 1
                    if messages % 40 == 0:
                        fuzzed.control.step()

        started = time.monotonic()
        one()
        fuzz.flush()
        fuzz.stream.close()
        elapsed = time.monotonic() - started
    print(
        f"\n{fuzz.sent} generated usages in {elapsed:.1f} s: StreamUsage verdicts by reason "
        f"{dict(sorted(fuzz.stream_reasons.items()))}; Check ({sum(fuzz.check_codes.values())}"
        f" calls) by code {dict(sorted(fuzz.check_codes.items()))}, allowed ones by reason "
        f"{dict(sorted(fuzz.check_reasons.items()))}"
    )
    assert fuzz.sent >= USAGES
    assert sum(fuzz.stream_reasons.values()) == fuzz.sent
    assert sum(fuzz.check_codes.values()) == fuzz.checked >= fuzz.sent // CHECK_EVERY
    # the generator reaches both sides of the rules
    assert fuzz.stream_reasons["REASON_INVALID_USAGE"] > 0 and fuzz.stream_reasons["REASON_OK"] > 0
    assert fuzz.check_codes["OK"] > 0 and fuzz.check_codes["INVALID_ARGUMENT"] > 0
    fuzzed.control.check()
    assert gw.health() == 1  # SERVING


# -- raw bytes -------------------------------------------------------------------------------


def seed_usage(**kw: object) -> pb.Usage:
    base: dict[str, object] = dict(
        request_id="seed-1",
        subject=pb.Subject(tenant="fuzz-a", key="k1"),
        metric="api.sms.send",
        amount=1,
        mode=pb.MODE_ADMIT,
    )
    base.update(kw)
    return pb.Usage(**base)  # type: ignore[arg-type]


METERING_SEEDS: dict[str, list[object]] = {
    "Check": [pb.CheckRequest(usage=seed_usage(labels={"a": "b"}))],
    "StreamUsage": [
        pb.StreamUsageRequest(
            usages=[seed_usage(session_id="s-raw", sequence=1), seed_usage(request_id="seed-2")],
            view=pb.VERDICT_VIEW_BASIC,
        )
    ],
}
ADMIN_SEEDS: dict[str, list[object]] = {
    "ApplyPolicy": [apb.ApplyPolicyRequest(document="metrics: []", dry_run=True)],
    "PutPlan": [
        apb.PutPlanRequest(
            plan=apb.Plan(
                name="fuzz-plan",
                limits=[
                    apb.Limit(
                        name="l",
                        metric="api.sms.send",
                        scope=pb.SCOPE_KEY,
                        rate=apb.RateLimit(capacity=5, refill=1, per="second"),
                    )
                ],
            )
        )
    ],
    "GetPlan": [apb.GetPlanRequest(name="fuzz-cpaas")],
    "DeletePlan": [apb.DeletePlanRequest(name="fuzz-plan")],
    "AssignPlan": [apb.AssignPlanRequest(tenant="fuzz-b", plan="fuzz-mvno")],
    "Grant": [apb.GrantRequest(subject=pb.Subject(tenant="fuzz-a"), limit="sms-daily", amount=5)],
    "Suspend": [apb.SuspendRequest(subject=pb.Subject(tenant="fuzz-b", key="k1"))],
    "Resume": [apb.ResumeRequest(subject=pb.Subject(tenant="fuzz-b", key="k1"))],
    "SetFailurePolicy": [apb.SetFailurePolicyRequest(tenant="fuzz-a", mode=apb.FAILURE_MODE_ALLOW)],
    "GetState": [apb.GetStateRequest(subject=pb.Subject(tenant="fuzz-a"), recent=3)],
    "ExplainDecision": [apb.ExplainDecisionRequest(tenant="fuzz-a", decision_id="0" * 32)],
    "WatchDecisions": [apb.WatchDecisionsRequest(tenant="fuzz-a")],
}
#: Besides OK and INVALID_ARGUMENT, which every RPC may answer.
ADMIN_CODES = {"NOT_FOUND", "FAILED_PRECONDITION", "ABORTED"}


def test_raw_bytes_on_every_rpc_get_only_the_expected_codes(fuzzed: Fuzzed) -> None:
    gw = fuzzed.gateway
    fuzz = RawFuzz(gw.address, api_key=gw.operator_key)
    started = time.monotonic()
    batches = 0

    def between() -> None:
        nonlocal batches
        batches += 1
        if batches % 40 == 0:
            fuzzed.control.step()

    fuzz.run(services.METERING, METERING_SEEDS, between=between)  # type: ignore[arg-type]
    fuzz.run(services.ADMIN, ADMIN_SEEDS, between=between)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    print(f"\nin {elapsed:.1f} s, " + fuzz.report())
    assert not fuzz.leaks, fuzz.leaks[:5]
    for rpc, counts in fuzz.codes.items():
        allowed = {"OK", "INVALID_ARGUMENT"}
        if rpc.startswith("AdminService/"):
            allowed |= ADMIN_CODES
        if rpc == "AdminService/WatchDecisions":
            allowed.add("DEADLINE_EXCEEDED")  # a watch that was served until its deadline
        assert set(counts) <= allowed, (rpc, counts)
        assert counts["INVALID_ARGUMENT"] > 0, rpc  # undecodable bytes reached every RPC
    methods = len(services.METERING.methods) + len(services.ADMIN.methods)
    assert sum(fuzz.by_code().values()) == fuzz.total()
    assert fuzz.total() >= max(10_000, methods * 500)
    fuzzed.control.check()
    assert gw.health() == 1  # SERVING


def test_after_the_fuzz_the_gateway_serves_and_the_control_is_unchanged(fuzzed: Fuzzed) -> None:
    gw, control = fuzzed.gateway, fuzzed.control
    while len(control.got) < len(CONTROL):
        control.step()
    assert control.got == control.expected
    assert gw.health() == 1  # SERVING
    with gw.channel() as channel:
        stub = pb_grpc.MeteringServiceStub(channel)
        v = stub.Check(pb.CheckRequest(usage=control_usage("probe", "k", 1)), timeout=10).verdict
    assert (v.decision, v.reason, v.recorded) == (pb.DECISION_ALLOW, pb.REASON_OK, True)
    log = gw.log()
    fuzz_log = log.encode()[fuzzed.log_bytes_before :].decode()
    records = [json.loads(line) for line in fuzz_log.splitlines()]
    by_logger = Counter(r["logger"] for r in records)
    print(
        f"\nthe gateway's log grew by {len(fuzz_log.encode())} bytes, {len(records)} lines, "
        f"over the fuzz: {dict(by_logger)}"
    )
    assert "Traceback" not in log and not [r for r in records if r["level"] == "ERROR"]
    # Refused input: per kind (a message type, or "oversized batch") a burst of 10 lines and
    # one saying the rest is suppressed, per minute.
    kinds = len(services.METERING.methods) + len(services.ADMIN.methods) + 1
    minutes = int(time.monotonic() - fuzzed.started) // 60 + 1
    refused = [r for r in records if r["logger"] == "chargepath.transport.input"]
    assert len(refused) <= kinds * 11 * minutes
    assert "not logging more of them" in fuzz_log
    # The rest are the admin changes that the fuzz made (each worth its line: a new policy
    # version, a grant), so the log grows with those, not with refused input.
    changes = [r for r in records if r not in refused]
    assert all(r["level"] == "INFO" for r in changes), [r for r in changes if r["level"] != "INFO"]
    assert len(fuzz_log.encode()) < LOG_BOUND_BYTES * max(1, RAW_PER_RPC // 700)
