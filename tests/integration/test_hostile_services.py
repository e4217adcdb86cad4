"""KeyService registered with :func:`chargepath.transport.services.add_service` on a real
grpc.aio server (port 0), keys in a real Redis: raw bytes on every RPC get only the expected
codes, and behind the AuthInterceptor a caller is authenticated before its bytes are judged.

(The gateway does not serve KeyService yet; tests/e2e/test_fuzz.py fuzzes the two services it
does serve, with the same RawFuzz.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import redis
from google.protobuf import duration_pb2

from chargepath.core.auth import FailedAttempts, Role
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import RedisKeyStore
from chargepath.transport import services
from chargepath.transport.auth import Authenticator, AuthInterceptor
from chargepath.transport.keys import KeyServicer
from chargepath_protos.v1 import keys_pb2
from tests.fuzzing import RawFuzz

pytestmark = pytest.mark.integration

SEEDS = {
    "CreateKey": [
        keys_pb2.CreateKeyRequest(tenant="fuzz-a", role=keys_pb2.ROLE_METER, description="f"),
        keys_pb2.CreateKeyRequest(role=keys_pb2.ROLE_OPERATOR),
    ],
    "ListKeys": [keys_pb2.ListKeysRequest(tenant="fuzz-a", include_revoked=True)],
    "RotateKey": [
        keys_pb2.RotateKeyRequest(
            key_id="abcdefghijkl", grace_period=duration_pb2.Duration(seconds=60)
        )
    ],
    "RevokeKey": [keys_pb2.RevokeKeyRequest(key_id="abcdefghijkl")],
}


@pytest_asyncio.fixture
async def keys(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> AsyncIterator[RedisKeyStore]:
    store = RedisKeyStore.from_url(redis_server.url)
    yield store
    await store.close()


async def serve(keys: RedisKeyStore, *interceptors: object) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=interceptors)
    services.add_service(server, KeyServicer(keys), services.KEYS)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_raw_bytes_on_every_keyservice_rpc_get_only_the_expected_codes(
    keys: RedisKeyStore,
) -> None:
    server, address = await serve(keys)
    try:
        fuzz = RawFuzz(address)
        await asyncio.to_thread(fuzz.run, services.KEYS, SEEDS)  # type: ignore[arg-type]
    finally:
        await server.stop(None)
    print("\n" + fuzz.report())
    assert not fuzz.leaks, fuzz.leaks[:5]
    for rpc, counts in fuzz.codes.items():
        assert set(counts) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}, (
            rpc,
            counts,
        )
        assert counts["INVALID_ARGUMENT"] > 0, rpc
    assert fuzz.total() >= len(services.KEYS.methods) * 500
    # what decoded was served: mutated CreateKey requests made keys
    assert fuzz.codes["KeyService/CreateKey"]["OK"] > 0
    assert await keys.list("fuzz-a")


async def test_behind_authentication_bytes_are_judged_only_for_an_authenticated_caller(
    keys: RedisKeyStore,
) -> None:
    authenticator = Authenticator(
        keys, attempts=FailedAttempts(lambda: time.monotonic_ns() // 1_000_000, burst=100)
    )
    await authenticator.start()
    _, operator = await keys.create(None, Role.OPERATOR, None, "test operator")
    server, address = await serve(keys, AuthInterceptor(authenticator))
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            call = ch.unary_unary("/chargepath.v1.KeyService/ListKeys")
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await call(b"\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as operator_call:
                await call(
                    b"\xff\xff\xff", metadata=(("authorization", f"Bearer {operator.plaintext}"),)
                )
            listed = await call(b"", metadata=(("authorization", f"Bearer {operator.plaintext}"),))
    finally:
        await server.stop(None)
        await authenticator.close()
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert operator_call.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert operator_call.value.details() == (
        "request: not a valid chargepath.v1.ListKeysRequest (protobuf decode failed)"
    )
    assert keys_pb2.ListKeysResponse.FromString(listed).keys  # the operator's own key
