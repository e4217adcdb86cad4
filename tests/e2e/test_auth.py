"""Authentication and per-tenant isolation on a live gateway (``chargepath serve``, auth on as it
ships): every credential against every RPC of every service it serves, cross-tenant attempts
that must count nothing, a revocation seen by two gateway processes, and ``--auth none``.

The role matrix is driven by the permission table (chargepath.core.auth.PERMISSIONS) and the
service descriptors: every method of every served service needs an entry in the table and a
request in :data:`REQUESTS`, so a new RPC without a case fails here.

Failed attempts are limited per peer address: the bad-credential cases run last in this module
(once they have emptied the bucket of 127.0.0.1, a key not yet cached would be refused).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as rl
from envoy.service.rate_limit_quota.v3 import rlqs_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from chargepath.core.auth import PERMISSIONS, Principal, Role, authorize
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import keys_pb2_grpc as kpb_grpc
from chargepath_protos.v1 import lease_pb2 as lpb
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

TENANT = "cpaas-demo"  # the tenant of the meter and viewer keys
OTHER = "mvno-demo"  # another tenant of the demo plans
NO_SUCH_KEY = "aaaaaaaaaaaa"
#: Chargepath's own services (and health and reflection).
LISTED: tuple[ServiceDescriptor, ...] = (
    pb.DESCRIPTOR.services_by_name["MeteringService"],
    lpb.DESCRIPTOR.services_by_name["LeaseService"],
    apb.DESCRIPTOR.services_by_name["AdminService"],
    kpb.DESCRIPTOR.services_by_name["KeyService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
#: Served for Envoy, under Envoy's own package (reflection lists them too).
ENVOY: tuple[ServiceDescriptor, ...] = (
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"],
    rlqs_pb2.DESCRIPTOR.services_by_name["RateLimitQuotaService"],
)
SERVICES = LISTED + ENVOY


def admit(tenant: str = TENANT, **kw: Any) -> pb.Usage:
    fields: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "subject": pb.Subject(tenant=tenant, key="auth-test"),
        "metric": "api.sms.send",
        "amount": 1,
        "mode": pb.MODE_ADMIT,
    }
    fields.update(kw)
    return pb.Usage(**fields)


def report(tenant: str = OTHER) -> pb.Usage:
    return pb.Usage(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant=tenant, slice="1-000001"),
        metric="slice.bytes",
        amount=100,
        mode=pb.MODE_REPORT,
    )


def lease_ask(tenant: str = TENANT) -> lpb.LeaseAsk:
    return lpb.LeaseAsk(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant=tenant, key="auth-test"),
        metric="api.sms.send",
        requested=1,
    )


def rlqs_usage_report() -> rlqs_pb2.RateLimitQuotaUsageReports:
    """Envoy's first report of a bucket of TENANT (the demo plans' cpaas-edge mapping)."""
    msg = rlqs_pb2.RateLimitQuotaUsageReports(domain="cpaas-edge")
    usage = msg.bucket_quota_usages.add(num_requests_allowed=0)
    usage.bucket_id.bucket.update({"tenant": TENANT, "route": "sms-send"})
    return msg


# One request per RPC, for TENANT where the RPC names a tenant, and harmless when allowed: the
# changes are refused as invalid or not found (an empty subject, an unknown plan or key), and
# the policy is applied as a dry run.
REQUESTS: dict[str, Callable[[], Message]] = {
    "/chargepath.v1.MeteringService/Check": lambda: pb.CheckRequest(usage=admit()),
    "/chargepath.v1.MeteringService/StreamUsage": lambda: pb.StreamUsageRequest(usages=[admit()]),
    # the demo plans give no limit lease settings: answered DENY NO_ENTITLEMENT, nothing taken
    "/chargepath.v1.LeaseService/Lease": lambda: lpb.LeaseRequest(ask=lease_ask()),
    "/chargepath.v1.LeaseService/LeaseStream": lambda: lpb.LeaseStreamRequest(asks=[lease_ask()]),
    "/chargepath.v1.AdminService/GetState": lambda: apb.GetStateRequest(
        subject=pb.Subject(tenant=TENANT)
    ),
    "/chargepath.v1.AdminService/ExplainDecision": lambda: apb.ExplainDecisionRequest(
        tenant=TENANT, decision_id="0" * 32
    ),
    "/chargepath.v1.AdminService/WatchDecisions": lambda: apb.WatchDecisionsRequest(tenant=TENANT),
    "/chargepath.v1.AdminService/GetPolicy": apb.GetPolicyRequest,
    "/chargepath.v1.AdminService/ListAuditEvents": lambda: apb.ListAuditEventsRequest(
        tenant=TENANT
    ),
    "/chargepath.v1.AdminService/GetPlan": lambda: apb.GetPlanRequest(name="cpaas-starter"),
    "/chargepath.v1.AdminService/ListPlans": apb.ListPlansRequest,
    "/chargepath.v1.AdminService/ApplyPolicy": lambda: apb.ApplyPolicyRequest(
        document="plans: []", dry_run=True
    ),
    "/chargepath.v1.AdminService/PutPlan": apb.PutPlanRequest,
    "/chargepath.v1.AdminService/DeletePlan": lambda: apb.DeletePlanRequest(name="no-such-plan"),
    "/chargepath.v1.AdminService/AssignPlan": apb.AssignPlanRequest,
    "/chargepath.v1.AdminService/Grant": apb.GrantRequest,
    "/chargepath.v1.AdminService/Suspend": apb.SuspendRequest,
    "/chargepath.v1.AdminService/Resume": apb.ResumeRequest,
    "/chargepath.v1.AdminService/SetFailurePolicy": apb.SetFailurePolicyRequest,
    "/chargepath.v1.KeyService/CreateKey": kpb.CreateKeyRequest,
    "/chargepath.v1.KeyService/ListKeys": lambda: kpb.ListKeysRequest(tenant=TENANT),
    "/chargepath.v1.KeyService/RotateKey": lambda: kpb.RotateKeyRequest(key_id=NO_SUCH_KEY),
    "/chargepath.v1.KeyService/RevokeKey": lambda: kpb.RevokeKeyRequest(key_id=NO_SUCH_KEY),
    # the demo plans' Envoy mapping (domain cpaas-edge): one unit of TENANT's api.sms.send
    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit": lambda: (
        rls_pb2.RateLimitRequest(
            domain="cpaas-edge",
            descriptors=[
                rl.RateLimitDescriptor(
                    entries=[
                        rl.RateLimitDescriptor.Entry(key="tenant", value=TENANT),
                        rl.RateLimitDescriptor.Entry(key="route", value="sms-send"),
                    ]
                )
            ],
        )
    ),
    "/envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas": (
        rlqs_usage_report
    ),
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest,
    "/grpc.health.v1.Health/Watch": health_pb2.HealthCheckRequest,
    "/grpc.health.v1.Health/List": health_pb2.HealthListRequest,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": lambda: (
        reflection_pb2.ServerReflectionRequest(list_services="")
    ),
}

REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
#: In the proto, not in grpcio-health-checking's servicer: UNIMPLEMENTED once let through.
UNIMPLEMENTED_UPSTREAM = frozenset({"/grpc.health.v1.Health/List"})


def methods() -> list[tuple[str, MethodDescriptor]]:
    return [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]


@dataclass(frozen=True)
class Keys:
    operator: str
    meter: str
    viewer: str
    revoked: str
    wrong: str  # the meter key's id with another secret


@pytest.fixture(scope="module")
def keys(gateway: GatewayProcess) -> Keys:
    with gateway.channel() as ch:
        stub = kpb_grpc.KeyServiceStub(ch)

        def create(role: int) -> str:
            request = kpb.CreateKeyRequest(tenant=TENANT, role=role, description="test_auth")
            return str(stub.CreateKey(request, timeout=5).secret_key)

        meter, viewer, revoked = (
            create(kpb.ROLE_METER),
            create(kpb.ROLE_VIEWER),
            create(kpb.ROLE_METER),
        )
        stub.RevokeKey(kpb.RevokeKeyRequest(key_id=revoked[4:16]), timeout=5)
    wrong = meter[:17] + ("A" if meter[17] != "A" else "B") + meter[18:]
    return Keys(gateway.operator_key, meter, viewer, revoked, wrong)


def call(channel: grpc.Channel, path: str, method: MethodDescriptor, request: Message) -> Any:
    """Make the call; its status code (OK if it answered). A stream counts as answered at its
    first message; a stream that stays open without one ends at the deadline."""
    body = request.SerializeToString()

    def raw(b: bytes) -> bytes:
        return b

    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(path, request_serializer=raw, response_deserializer=raw)(
                body, timeout=5
            )
            return grpc.StatusCode.OK
        if method.client_streaming:
            stream = channel.stream_stream(path, request_serializer=raw, response_deserializer=raw)(
                iter([body]), timeout=2
            )
        else:
            stream = channel.unary_stream(path, request_serializer=raw, response_deserializer=raw)(
                body, timeout=1
            )
        for _ in stream:
            stream.cancel()
            break
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()  # type: ignore[attr-defined]


def test_every_served_rpc_has_a_permission_and_a_case(gateway: GatewayProcess) -> None:
    with gateway.channel() as ch:
        stream = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        served = {s.name for r in stream for s in r.list_services_response.service}
    assert served == {s.full_name for s in SERVICES}
    paths = [path for path, _ in methods()]
    assert sorted(p for p in paths if p not in PERMISSIONS) == []
    assert sorted(p for p in paths if p not in REQUESTS) == [], "add a case to REQUESTS"


def test_cross_tenant_attempts_are_refused_and_count_nothing(
    gateway: GatewayProcess, keys: Keys
) -> None:
    # A real decision of the other tenant (the operator acts for every tenant), to explain.
    with gateway.channel() as ch:
        theirs = pb_grpc.MeteringServiceStub(ch).Check(
            pb.CheckRequest(usage=report(OTHER)), timeout=5
        )
    their_id = theirs.verdict.decision_id
    assert theirs.verdict.recorded
    before = tenant_snapshot(gateway.redis_url, OTHER)

    with gateway.channel(keys.meter) as ch:
        meter = pb_grpc.MeteringServiceStub(ch)
        with pytest.raises(grpc.RpcError) as denied:
            meter.Check(pb.CheckRequest(usage=report(OTHER)), timeout=5)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "usage.subject.tenant" in denied.value.details()  # type: ignore[attr-defined]
        # On a stream, only the other tenant's items are refused, and the stream goes on.
        batches = [
            pb.StreamUsageRequest(usages=[admit(), report(OTHER), admit()]),
            pb.StreamUsageRequest(usages=[report(OTHER)]),
            pb.StreamUsageRequest(usages=[admit()]),
        ]
        answers = list(meter.StreamUsage(iter(batches), timeout=10))
    verdicts = [[(v.decision, v.reason, v.recorded) for v in a.verdicts] for a in answers]
    mine = (pb.DECISION_ALLOW, pb.REASON_OK, True)
    refused = (pb.DECISION_DENY, pb.REASON_PERMISSION_DENIED, False)
    assert verdicts == [[mine, refused, mine], [refused], [mine]]
    assert "subject.tenant" in answers[1].verdicts[0].message

    with gateway.channel(keys.viewer) as ch:
        admin = apb.DESCRIPTOR.services_by_name["AdminService"]
        codes = {
            "GetState": call(
                ch,
                "/chargepath.v1.AdminService/GetState",
                admin.methods_by_name["GetState"],
                apb.GetStateRequest(subject=pb.Subject(tenant=OTHER)),
            ),
            "WatchDecisions": call(
                ch,
                "/chargepath.v1.AdminService/WatchDecisions",
                admin.methods_by_name["WatchDecisions"],
                apb.WatchDecisionsRequest(tenant=OTHER),
            ),
        }
        assert codes == {
            "GetState": grpc.StatusCode.PERMISSION_DENIED,
            "WatchDecisions": grpc.StatusCode.PERMISSION_DENIED,
        }
        # Explaining another tenant's decision says nothing about whether it exists.
        explain = apb_explain(ch)
        real, made_up = explain(OTHER, their_id), explain(OTHER, uuid.uuid4().hex)
        assert real == made_up
        assert real[0] is grpc.StatusCode.PERMISSION_DENIED and "tenant" in real[1]
        in_mine, made_up_mine = explain(TENANT, their_id), explain(TENANT, "f" * 32)
        assert in_mine[0] is made_up_mine[0] is grpc.StatusCode.NOT_FOUND
        assert in_mine[1].replace(their_id, "f" * 32) == made_up_mine[1]
        # by the id alone (no tenant), another tenant's decision is as one that never was
        by_id, made_up_by_id = explain("", their_id), explain("", "f" * 32)
        assert by_id[0] is made_up_by_id[0] is grpc.StatusCode.NOT_FOUND
        assert by_id[1].replace(their_id, "f" * 32) == made_up_by_id[1]

    assert tenant_snapshot(gateway.redis_url, OTHER) == before, "a refused attempt changed Redis"


def apb_explain(channel: grpc.Channel) -> Callable[[str, str], tuple[grpc.StatusCode, str]]:
    stub = apb_grpc.AdminServiceStub(channel)

    def explain(tenant: str, decision_id: str) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            stub.ExplainDecision(
                apb.ExplainDecisionRequest(tenant=tenant, decision_id=decision_id), timeout=5
            )
        return err.value.code(), err.value.details()  # type: ignore[attr-defined]

    return explain


def tenant_snapshot(redis_url: str, tenant: str) -> dict[bytes, bytes]:
    """Every Redis key of the tenant (its hash tag) with its serialized value: its buckets,
    quotas, dedup records, sessions, ledger and recent decisions."""
    with redis.Redis.from_url(redis_url) as client:
        names = sorted(client.scan_iter(match=f"*{{{tenant}}}*", count=1000))
        assert names, f"no key of {tenant} in Redis: the snapshot would prove nothing"
        return {name: client.dump(name) for name in names}


CREDENTIALS = ("operator", "meter", "viewer", "none", "wrong", "revoked")  # bad ones last


@pytest.mark.parametrize("credential", CREDENTIALS)
def test_every_role_against_every_rpc(gateway: GatewayProcess, keys: Keys, credential: str) -> None:
    key = getattr(keys, credential, None)
    principal = {
        "operator": Principal("op", Role.OPERATOR, None),
        "meter": Principal("m", Role.METER, TENANT),
        "viewer": Principal("v", Role.VIEWER, TENANT),
    }.get(credential)
    got: dict[str, str] = {}
    want: dict[str, str] = {}
    channel = gateway.raw_channel() if key is None else gateway.channel(key)
    with channel:
        for path, method in methods():
            code = call(channel, path, method, REQUESTS[path]())
            got[path] = code.name if code in REFUSALS else "allowed"
            if code is grpc.StatusCode.UNIMPLEMENTED and path not in UNIMPLEMENTED_UPSTREAM:
                got[path] = code.name  # past the interceptor, but not served
            if not PERMISSIONS[path].credential:
                want[path] = "allowed"
            elif principal is None:
                want[path] = "UNAUTHENTICATED"
            else:
                want[path] = (
                    "allowed" if authorize(principal, path) is None else "PERMISSION_DENIED"
                )
    assert got == want


def test_a_revocation_reaches_two_gateway_processes_within_a_second(tmp_path: Path) -> None:
    a = start_gateway(tmp_path / "a")
    b = start_gateway(tmp_path / "b", plans=None, redis_url=a.redis_url)
    try:
        with a.channel() as ch:
            stub = kpb_grpc.KeyServiceStub(ch)
            created = stub.CreateKey(
                kpb.CreateKeyRequest(tenant=TENANT, role=kpb.ROLE_METER), timeout=5
            )
            key = created.secret_key
            channels = [gw.channel(key) for gw in (a, b)]
            meters = [pb_grpc.MeteringServiceStub(c) for c in channels]
            for meter in meters:  # each process verifies the key once, and caches it
                assert meter.Check(pb.CheckRequest(usage=admit()), timeout=5).verdict.recorded
            stub.RevokeKey(kpb.RevokeKeyRequest(key_id=created.key.key_id), timeout=5)
        revoked_at = time.monotonic()
        seen_after: list[float] = []
        for meter in meters:
            while True:
                try:
                    meter.Check(pb.CheckRequest(usage=admit()), timeout=5)
                except grpc.RpcError as err:
                    assert err.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
                    seen_after.append(time.monotonic() - revoked_at)
                    break
                assert time.monotonic() - revoked_at < 5, "the revoked key still works"
                time.sleep(0.01)
        for c in channels:
            c.close()
        assert max(seen_after) < 1.0, seen_after
    finally:
        for gw in (b, a):
            assert gw.stop() == 0, gw.log()
        assert a.redis is not None
        a.redis.stop()


def serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chargepath", "serve", "--workers", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_auth_none_is_refused_on_a_non_loopback_address(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = serve(
        "--auth", "none", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(data), cwd=tmp_path
    )
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith("chargepath: --auth none: refused on the non-loopback address")
    assert "--insecure-allow-no-auth" in line
    assert not data.exists(), "something started before the configuration was refused"


def test_auth_none_forced_serves_without_a_credential(tmp_path: Path) -> None:
    gw = start_gateway(
        tmp_path, extra_args=("--host", "0.0.0.0", "--auth", "none", "--insecure-allow-no-auth")
    )
    try:
        with gw.raw_channel() as ch:
            v = pb_grpc.MeteringServiceStub(ch).Check(pb.CheckRequest(usage=admit()), timeout=5)
        assert v.verdict.decision == pb.DECISION_ALLOW and v.verdict.recorded
        assert not (gw.data_dir / "operator.key").exists()
        assert "--auth none: every caller may meter, read and change every tenant" in gw.log()
    finally:
        assert gw.stop() == 0, gw.log()
        assert gw.redis is not None
        gw.redis.stop()
