"""The AuthInterceptor on a real grpc.aio server (port 0) with the health service, KeyService,
reflection and a stand-in Check that answers with the caller's identity; keys in a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from chargepath.core.auth import FailedAttempts, Principal, Role
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import RedisKeyStore
from chargepath.transport.auth import Authenticator, AuthInterceptor, current_principal
from chargepath.transport.keys import KeyServicer
from chargepath_protos.v1 import keys_pb2, keys_pb2_grpc

pytestmark = pytest.mark.integration

CHECK = "/chargepath.v1.MeteringService/Check"
UNLISTED = "/chargepath.v1.Experimental/Do"  # served, but in no entry of the table


async def whoami(request: bytes, context: Any) -> bytes:
    """A stand-in Check: the principal the interceptor set for this call, as text."""
    await asyncio.sleep(float(request or b"0"))  # lets concurrent calls overlap
    p = current_principal()
    return b"-" if p is None else f"{p.identity}|{p.role}|{p.tenant}".encode()


async def watch_whoami(request: bytes, context: Any) -> None:
    """A stand-in WatchDecisions, in the writer style (a coroutine calling context.write)."""
    await context.write(await whoami(b"", context))


async def stream_whoami(requests: Any, context: Any) -> AsyncIterator[bytes]:
    """A stand-in StreamUsage, in the async generator style: one answer per request."""
    async for request in requests:
        yield await whoami(request, context)


@dataclass
class Gateway:
    port: int
    keys: RedisKeyStore
    authenticator: Authenticator
    operator: str
    seen_auth_contexts: list[Mapping[str, Sequence[bytes]]]

    async def call(self, method: str, key: str | None, request: bytes = b"") -> bytes:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            answer: bytes = await ch.unary_unary(method)(request, metadata=bearer(key))
            return answer

    async def list_keys(self, key: str | None, **fields: Any) -> keys_pb2.ListKeysResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = keys_pb2_grpc.KeyServiceStub(ch)
            return await stub.ListKeys(keys_pb2.ListKeysRequest(**fields), metadata=bearer(key))


def bearer(key: str | None) -> tuple[tuple[str, str], ...]:
    return () if key is None else (("authorization", f"Bearer {key}"),)


async def start_gateway(
    url: str, identity: Principal | None = None, burst: int = 5
) -> tuple[grpc.aio.Server, Gateway]:
    keys = RedisKeyStore.from_url(url)
    authenticator = Authenticator(
        keys, attempts=FailedAttempts(lambda: time.monotonic_ns() // 1_000_000, burst=burst)
    )
    await authenticator.start()
    seen: list[Mapping[str, Sequence[bytes]]] = []

    def identity_principal(auth_context: Mapping[str, Sequence[bytes]]) -> Principal | None:
        seen.append(auth_context)
        return identity

    server = grpc.aio.server(interceptors=[AuthInterceptor(authenticator, identity_principal)])
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(keys), server)
    reflection.enable_server_reflection(
        ("chargepath.v1.KeyService", "grpc.health.v1.Health", reflection.SERVICE_NAME), server
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "chargepath.v1.MeteringService",
                {
                    "Check": grpc.unary_unary_rpc_method_handler(whoami),
                    "StreamUsage": grpc.stream_stream_rpc_method_handler(stream_whoami),
                },
            ),
            grpc.method_handlers_generic_handler(
                "chargepath.v1.AdminService",
                {"WatchDecisions": grpc.unary_stream_rpc_method_handler(watch_whoami)},
            ),
            grpc.method_handlers_generic_handler(
                "chargepath.v1.Experimental",
                {"Do": grpc.unary_unary_rpc_method_handler(whoami)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _, operator = await keys.create(None, Role.OPERATOR, None, "test operator")
    await asyncio.sleep(0.05)  # the creation's change message, heard before the first call
    return server, Gateway(port, keys, authenticator, operator.plaintext, seen)


@pytest_asyncio.fixture
async def gateway(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> AsyncIterator[Gateway]:
    server, gw = await start_gateway(redis_server.url)
    yield gw
    await server.stop(None)
    await gw.authenticator.close()
    await gw.keys.close()


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_health_check_is_open_without_a_credential(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = await stub.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        # List names every service: a credential is needed.
        err = await refused(stub.List(health_pb2.HealthListRequest()))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        # With a key, the call passes to the servicer (grpcio's async one lacks List).
        err = await refused(
            stub.List(health_pb2.HealthListRequest(), metadata=bearer(gateway.operator))
        )
        assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert gateway.authenticator.cache_misses == 1  # only List looked a key up


async def test_refusals_without_a_valid_credential(gateway: Gateway) -> None:
    keys = gateway.keys
    _, revoked = await keys.create("tenant-a", Role.METER)
    await keys.revoke(revoked.key_id)
    _, expired = await keys.create(None, Role.OPERATOR, time.time_ns() // 1_000_000 + 200)
    await asyncio.sleep(0.25)
    wrong_secret = (
        gateway.operator[:17]
        + ("A" if gateway.operator[17] != "A" else "B")
        + (gateway.operator[18:])
    )
    cases = {
        None: "a credential is required: send the metadata 'authorization: Bearer <api key>'",
        "nope": "invalid credential: not a Chargepath API key: it must start with 'cpk_'",
        wrong_secret: "invalid API key",
        "cpk_zzzzzzzzzzzz_" + gateway.operator[17:]: "invalid API key",
        revoked.plaintext: "API key revoked",
        expired.plaintext: "API key expired",
    }
    for key, message in cases.items():
        err = await refused(gateway.list_keys(key))
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        if key and len(key) == 60:
            assert key not in (err.details() or "") and key[17:] not in (err.details() or "")
    err = await refused(gateway.call(CHECK, None))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        err = await refused(
            ch.unary_unary(CHECK)(b"", metadata=(("authorization", f"Basic {gateway.operator}"),))
        )
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert gateway.operator not in (err.details() or "")


async def test_roles_against_rpcs(gateway: Gateway) -> None:
    _, meter = await gateway.keys.create("tenant-a", Role.METER)
    _, viewer = await gateway.keys.create("tenant-a", Role.VIEWER)
    # A meter key may Check; the handler sees its principal.
    assert await gateway.call(CHECK, meter.plaintext) == f"{meter.key_id}|meter|tenant-a".encode()
    assert (await gateway.call(CHECK, gateway.operator)).endswith(b"|operator|None")
    err = await refused(gateway.call(CHECK, viewer.plaintext))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == (
        "the viewer role may not call /chargepath.v1.MeteringService/Check "
        "(allowed: meter, operator)"
    )
    # Streams, in both handler styles, are guarded the same way.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        watch = ch.unary_stream("/chargepath.v1.AdminService/WatchDecisions")
        got = [m async for m in watch(b"", metadata=bearer(viewer.plaintext))]
        assert got == [f"{viewer.key_id}|viewer|tenant-a".encode()]
        err = await refused(watch(b"", metadata=bearer(meter.plaintext)).read())
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        stream = ch.stream_stream("/chargepath.v1.MeteringService/StreamUsage")
        got = [m async for m in stream(iter([b"0", b"0"]), metadata=bearer(meter.plaintext))]
        assert got == [f"{meter.key_id}|meter|tenant-a".encode()] * 2
        err = await refused(stream(iter([b"0"]), metadata=bearer(viewer.plaintext)).read())
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        err = await refused(stream(iter([b"0"])).read())
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    # KeyService is for operators only.
    for key in (meter, viewer):
        err = await refused(gateway.list_keys(key.plaintext))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    listed = await gateway.list_keys(gateway.operator)
    assert {k.key_id for k in listed.keys} >= {meter.key_id, viewer.key_id}
    # A served method missing from the table: denied to every role, operators too.
    for key in (meter.plaintext, gateway.operator):
        err = await refused(gateway.call(UNLISTED, key))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "deny by default" in (err.details() or "")


async def test_reflection_needs_any_valid_key(gateway: Gateway) -> None:
    _, meter = await gateway.keys.create("tenant-a", Role.METER)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = [
            a
            async for a in stub.ServerReflectionInfo(
                iter([request]), metadata=bearer(meter.plaintext)
            )
        ]
        names = {s.name for s in answers[0].list_services_response.service}
        assert "chargepath.v1.KeyService" in names
        call = stub.ServerReflectionInfo(iter([request]))
        err = await refused(call.read())
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_concurrent_calls_each_see_their_own_principal(gateway: Gateway) -> None:
    made = [await gateway.keys.create(f"tenant-{i}", Role.METER) for i in range(8)]
    answers = await asyncio.gather(*(gateway.call(CHECK, k.plaintext, b"0.05") for _, k in made))
    assert answers == [f"{k.key_id}|meter|tenant-{i}".encode() for i, (_, k) in enumerate(made)]


async def test_a_flood_of_bad_keys_is_limited_and_a_good_key_still_works(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    _, meter = await gateway.keys.create("tenant-a", Role.METER)
    await asyncio.sleep(0.05)
    assert (await gateway.call(CHECK, meter.plaintext)).startswith(meter.key_id.encode())
    lookups: Any = raw_redis.info("commandstats").get("cmdstat_hgetall", {"calls": 0})["calls"]
    messages = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        check = ch.unary_unary(CHECK)
        for i in range(40):
            guess = f"cpk_zzzzzzzzzz{'abcdefgh'[i % 8]}{'abcde'[i // 8]}_{meter.secret}"
            err = await refused(check(b"", metadata=bearer(guess)))
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED
            messages.append(err.details())
        # The same process, the same address: the good key, cached, is still served.
        assert await check(b"", metadata=bearer(meter.plaintext)) == (
            f"{meter.key_id}|meter|tenant-a".encode()
        )
    assert messages[:5] == ["invalid API key"] * 5
    assert all(
        m.startswith("too many failed authentication attempts from this address")
        for m in messages[5:]
    )
    after: Any = raw_redis.info("commandstats")["cmdstat_hgetall"]["calls"]
    assert after - lookups == 5  # refused without a lookup once the bucket was empty


async def test_key_service_create_rotate_revoke(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        stub = keys_pb2_grpc.KeyServiceStub(ch)
        op = bearer(gateway.operator)
        expires = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
        created = await stub.CreateKey(
            keys_pb2.CreateKeyRequest(
                tenant="tenant-a", role=keys_pb2.ROLE_METER, expires_at=expires, description="d"
            ),
            metadata=op,
        )
        assert created.secret_key.startswith(f"cpk_{created.key.key_id}_")
        assert created.key.tenant == "tenant-a" and created.key.role == keys_pb2.ROLE_METER
        assert created.key.expires_at == expires and not created.key.HasField("revoked_at")
        assert await gateway.call(CHECK, created.secret_key)
        listed = await stub.ListKeys(keys_pb2.ListKeysRequest(tenant="tenant-a"), metadata=op)
        assert [k.key_id for k in listed.keys] == [created.key.key_id]
        assert created.secret_key[17:] not in str(listed)
        assert "hash" not in str(listed)

        rotated = await stub.RotateKey(
            keys_pb2.RotateKeyRequest(
                key_id=created.key.key_id, grace_period=duration_pb2.Duration(seconds=60)
            ),
            metadata=op,
        )
        assert rotated.key.key_id != created.key.key_id
        assert rotated.previous.revoked_at.seconds >= int(time.time()) + 58
        assert await gateway.call(CHECK, rotated.secret_key)
        assert await gateway.call(CHECK, created.secret_key)  # within its grace period

        revoked = await stub.RevokeKey(
            keys_pb2.RevokeKeyRequest(key_id=created.key.key_id), metadata=op
        )
        assert revoked.key.revoked_at.seconds <= int(time.time())
        await asyncio.sleep(0.1)  # this gateway hears its own change like any other
        err = await refused(gateway.call(CHECK, created.secret_key))
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "API key revoked")
        live = await stub.ListKeys(keys_pb2.ListKeysRequest(tenant="tenant-a"), metadata=op)
        assert [k.key_id for k in live.keys] == [rotated.key.key_id]
        every = await stub.ListKeys(
            keys_pb2.ListKeysRequest(tenant="tenant-a", include_revoked=True), metadata=op
        )
        assert len(every.keys) == 2

        err = await refused(
            stub.RotateKey(keys_pb2.RotateKeyRequest(key_id=created.key.key_id), metadata=op)
        )
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        err = await refused(
            stub.RevokeKey(keys_pb2.RevokeKeyRequest(key_id="zzzzzzzzzzzz"), metadata=op)
        )
        assert err.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"tenant": "tenant-a"}, "role: must be ROLE_METER, ROLE_VIEWER or ROLE_OPERATOR"),
        ({"role": keys_pb2.ROLE_METER}, "tenant: is required"),
        ({"role": keys_pb2.ROLE_OPERATOR, "tenant": "t"}, "tenant: must be empty for an operator"),
        ({"role": keys_pb2.ROLE_VIEWER, "tenant": "bad tenant!"}, "tenant: must be 1 to 64"),
        (
            {"role": keys_pb2.ROLE_METER, "tenant": "t", "expires_at": {"seconds": 1}},
            "expires_at: must be in the future",
        ),
        ({"role": keys_pb2.ROLE_METER, "tenant": "t", "description": "x" * 257}, "description"),
    ],
)
async def test_create_key_input_is_validated(
    gateway: Gateway, request_fields: dict[str, Any], message: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        stub = keys_pb2_grpc.KeyServiceStub(ch)
        err = await refused(
            stub.CreateKey(
                keys_pb2.CreateKeyRequest(**request_fields), metadata=bearer(gateway.operator)
            )
        )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.details() or "")
    assert len(await gateway.keys.list()) == 1  # only the test's operator key


async def test_an_identity_from_the_tls_hook_is_used_without_a_bearer_key(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    cert = Principal("CN=slice-controller", Role.METER, "tenant-a")
    server, gw = await start_gateway(redis_server.url, identity=cert)
    try:
        assert await gw.call(CHECK, None) == b"CN=slice-controller|meter|tenant-a"
        assert gw.seen_auth_contexts  # the hook was given the call's auth context
        err = await refused(gw.list_keys(None))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED  # a meter identity
        # A bearer key, when sent, is the credential used.
        assert (await gw.call(CHECK, gw.operator)).endswith(b"|operator|None")
        assert len((await gw.list_keys(gw.operator)).keys) == 1
    finally:
        await server.stop(None)
        await gw.authenticator.close()
        await gw.keys.close()
