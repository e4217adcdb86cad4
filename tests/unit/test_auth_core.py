"""The pure auth core: the permission table against the generated descriptors, principals and
roles, the API key format, and the per-peer limit of failed attempts (fake clock)."""

from __future__ import annotations

import base64

import pytest
from envoy.service.rate_limit_quota.v3 import rlqs_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from chargepath.core.auth import (
    KEY_LENGTH,
    OPEN,
    PERMISSIONS,
    FailedAttempts,
    KeyFormatError,
    KeyRecord,
    Principal,
    RefusalKind,
    Role,
    authorize,
    hash_secret,
    may_act_for,
    needs_credential,
    new_key,
    parse_key,
    secret_matches,
)
from chargepath_protos.v1 import admin_pb2, keys_pb2, lease_pb2, metering_pb2

pytestmark = pytest.mark.unit

# Every service a gateway serves (or will serve, once wired): each RPC of each must have an
# entry, so a new RPC without one fails here instead of being refused in production.
SERVICES: list[ServiceDescriptor] = [
    metering_pb2.DESCRIPTOR.services_by_name["MeteringService"],
    lease_pb2.DESCRIPTOR.services_by_name["LeaseService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    keys_pb2.DESCRIPTOR.services_by_name["KeyService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"],
    rlqs_pb2.DESCRIPTOR.services_by_name["RateLimitQuotaService"],
]
# grpcio-reflection registers v1alpha; the table also covers v1 for when it registers both.
try:
    from grpc_reflection.v1 import reflection_pb2 as reflection_v1_pb2  # type: ignore[import-not-found]

    SERVICES.append(reflection_v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
except ImportError:
    pass
ALL_METHODS = [f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods]

METER = Principal("meteraaaaaaa", Role.METER, "tenant-a")
VIEWER = Principal("vieweraaaaaa", Role.VIEWER, "tenant-a")
OPERATOR = Principal("operatoraaaa", Role.OPERATOR, None)


def test_every_rpc_of_every_service_has_an_entry() -> None:
    missing = [m for m in ALL_METHODS if m not in PERMISSIONS]
    assert missing == []
    assert len(ALL_METHODS) >= 2 + 15 + 4 + 3 + 1 + 2


def test_every_entry_names_a_real_rpc() -> None:
    known = set(ALL_METHODS) | {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"}
    assert sorted(set(PERMISSIONS) - known) == []


def _field_path_exists(message: Descriptor, path: str) -> bool:
    for part in path.split("."):
        name = part.removesuffix("[]")
        field = message.fields_by_name.get(name)
        if field is None:
            return False
        repeated = field.is_repeated
        if repeated != part.endswith("[]"):
            return False
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            message = field.message_type
        elif field.type != FieldDescriptor.TYPE_STRING:
            return False
    return True


def test_tenant_fields_exist_in_the_request_messages() -> None:
    checked = 0
    for service in SERVICES:
        for method in service.methods:
            access = PERMISSIONS[f"/{service.full_name}/{method.name}"]
            if access.tenant_field is not None:
                assert _field_path_exists(method.input_type, access.tenant_field), method.name
                checked += 1
    assert checked == 9


def test_only_operators_call_what_is_not_about_one_tenant() -> None:
    for method, access in PERMISSIONS.items():
        if access.credential and access.tenant_field is None and access.roles != frozenset(Role):
            assert access.roles == {Role.OPERATOR}, method


@pytest.mark.parametrize(
    ("method", "allowed"),
    [
        ("/chargepath.v1.MeteringService/Check", {Role.METER, Role.OPERATOR}),
        ("/chargepath.v1.MeteringService/StreamUsage", {Role.METER, Role.OPERATOR}),
        ("/chargepath.v1.LeaseService/Lease", {Role.METER, Role.OPERATOR}),
        ("/chargepath.v1.LeaseService/LeaseStream", {Role.METER, Role.OPERATOR}),
        (
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            {Role.METER, Role.OPERATOR},
        ),
        (
            "/envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas",
            {Role.METER, Role.OPERATOR},
        ),
        ("/chargepath.v1.AdminService/GetState", {Role.VIEWER, Role.OPERATOR}),
        ("/chargepath.v1.AdminService/ExplainDecision", {Role.VIEWER, Role.OPERATOR}),
        ("/chargepath.v1.AdminService/WatchDecisions", {Role.VIEWER, Role.OPERATOR}),
        ("/chargepath.v1.AdminService/ApplyPolicy", {Role.OPERATOR}),
        ("/chargepath.v1.AdminService/GetPolicy", {Role.OPERATOR}),
        ("/chargepath.v1.AdminService/Suspend", {Role.OPERATOR}),
        ("/chargepath.v1.AdminService/ListAuditEvents", {Role.OPERATOR}),
        ("/chargepath.v1.KeyService/CreateKey", {Role.OPERATOR}),
        ("/chargepath.v1.KeyService/ListKeys", {Role.OPERATOR}),
        ("/chargepath.v1.KeyService/RotateKey", {Role.OPERATOR}),
        ("/chargepath.v1.KeyService/RevokeKey", {Role.OPERATOR}),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", set(Role)),
        ("/grpc.health.v1.Health/List", set(Role)),
    ],
)
def test_roles_against_methods(method: str, allowed: set[Role]) -> None:
    for principal in (METER, VIEWER, OPERATOR):
        refusal = authorize(principal, method)
        if principal.role in allowed:
            assert refusal is None
        else:
            assert refusal is not None and refusal.kind is RefusalKind.PERMISSION_DENIED
            assert principal.role.value in refusal.message and method in refusal.message
    refusal = authorize(None, method)
    assert refusal is not None and refusal.kind is RefusalKind.UNAUTHENTICATED
    assert "authorization: Bearer" in refusal.message


def test_health_check_and_watch_are_open_by_an_explicit_entry() -> None:
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"):
        assert PERMISSIONS[method] is OPEN
        assert not needs_credential(method)
        assert authorize(None, method) is None
    assert needs_credential("/grpc.health.v1.Health/List")


def test_unknown_methods_are_denied_to_every_role() -> None:
    method = "/chargepath.v1.AdminService/DropEverything"
    assert needs_credential(method)
    for principal in (METER, VIEWER, OPERATOR):
        refusal = authorize(principal, method)
        assert refusal is not None and refusal.kind is RefusalKind.PERMISSION_DENIED
    refusal = authorize(None, method)
    assert refusal is not None and refusal.kind is RefusalKind.UNAUTHENTICATED


def test_may_act_for() -> None:
    assert may_act_for(METER, "tenant-a")
    assert not may_act_for(METER, "tenant-b")
    assert not may_act_for(VIEWER, "tenant-b")
    assert not may_act_for(METER, "")
    assert may_act_for(OPERATOR, "tenant-a") and may_act_for(OPERATOR, "tenant-b")


def test_principal_tenant_matches_its_role() -> None:
    with pytest.raises(ValueError, match="operator"):
        Principal("x", Role.OPERATOR, "tenant-a")
    with pytest.raises(ValueError, match="needs a tenant"):
        Principal("x", Role.METER, None)
    with pytest.raises(ValueError, match="needs a tenant"):
        Principal("x", Role.VIEWER, "")


def test_new_keys_parse_back_and_are_distinct() -> None:
    keys = [new_key() for _ in range(200)]
    for key in keys:
        text = key.plaintext
        assert len(text) == KEY_LENGTH == 60
        assert text.startswith(f"cpk_{key.key_id}_")
        assert parse_key(text) == key
        assert len(base64.urlsafe_b64decode(key.secret + "=")) == 32
    assert len({k.key_id for k in keys}) == len({k.secret for k in keys}) == 200
    assert key.secret not in repr(key)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "must start with 'cpk_'"),
        ("Bearer cpk_", "must start with 'cpk_'"),
        ("cpk_short", "must be 60 characters, got 9"),
        ("cpk_ABCDEFGHIJKL_" + "A" * 43, "key id must be 12 characters"),
        ("cpk_abcdefgh1jkl_" + "A" * 43, "key id must be 12 characters"),
        ("cpk_abcdefghijkl-" + "A" * 43, "expected '_' after the key id"),
        ("cpk_abcdefghijkl_" + "A" * 42 + "=", "secret must be 32 bytes"),
        ("cpk_abcdefghijkl_" + "A" * 42 + "B", "secret must be 32 bytes"),  # not canonical
    ],
)
def test_parse_key_errors_say_what_is_wrong_without_the_text(text: str, error: str) -> None:
    with pytest.raises(KeyFormatError, match=error) as info:
        parse_key(text)
    if len(text) == KEY_LENGTH:
        assert text[4:16] not in str(info.value) and text[17:] not in str(info.value)


def test_secret_hash_and_constant_time_match() -> None:
    key = new_key()
    digest = hash_secret(key.secret)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert key.secret not in digest
    assert secret_matches(key.secret, digest)
    assert not secret_matches(new_key().secret, digest)
    assert not secret_matches(key.secret, "")
    assert not secret_matches(key.secret, "é" * 64)  # a tampered non-ASCII hash: no crash


def test_record_validity_honours_expiry_and_scheduled_revocation() -> None:
    record = KeyRecord("abcdefghijkl", Role.METER, "t", "h", created_ms=0, expires_ms=2000)
    assert record.refusal_at(1999) is None
    assert record.refusal_at(2000) == "expired"
    rotated = KeyRecord("abcdefghijkl", Role.METER, "t", "h", created_ms=0, revoked_ms=1000)
    assert rotated.refusal_at(999) is None
    assert rotated.refusal_at(1000) == "revoked"
    assert rotated.principal() == Principal("abcdefghijkl", Role.METER, "t")
    assert "'h'" not in repr(record)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def test_failed_attempts_allow_a_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    attempts = FailedAttempts(clock, burst=3, interval_ms=1000)
    for _ in range(3):
        assert attempts.retry_after_ms("ipv4:10.0.0.1") == 0
        attempts.record("ipv4:10.0.0.1")
    assert attempts.retry_after_ms("ipv4:10.0.0.1") == 1000
    assert attempts.retry_after_ms("ipv4:10.0.0.2") == 0  # per peer
    for _ in range(100):  # hammering while empty does not dig a deeper hole
        attempts.record("ipv4:10.0.0.1")
    assert attempts.retry_after_ms("ipv4:10.0.0.1") == 1000
    clock.now += 999
    assert attempts.retry_after_ms("ipv4:10.0.0.1") == 1
    clock.now += 1
    assert attempts.retry_after_ms("ipv4:10.0.0.1") == 0
    attempts.record("ipv4:10.0.0.1")
    assert attempts.retry_after_ms("ipv4:10.0.0.1") == 1000  # one refilled, one used
    clock.now += 3000
    assert attempts.retry_after_ms("ipv4:10.0.0.1") == 0
    assert len(attempts) == 0  # a full bucket is forgotten


def test_failed_attempts_table_is_bounded() -> None:
    clock = FakeClock()
    attempts = FailedAttempts(clock, burst=1, interval_ms=60_000, max_peers=100)
    for i in range(10_000):
        attempts.record(f"ipv4:10.0.{i // 256}.{i % 256}")
    assert len(attempts) == 100
    assert attempts.retry_after_ms("ipv4:10.0.39.15") > 0  # the most recent are kept
    assert attempts.retry_after_ms("ipv4:10.0.0.0") == 0  # the oldest went first
