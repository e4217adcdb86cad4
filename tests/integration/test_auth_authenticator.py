"""The Authenticator against a real Redis: cached keys cost no Redis command, a revocation
reaches another process (another connection) within a second by pub/sub or by the epoch poll
alone, expiry and grace periods are honoured from the cache, failed attempts per peer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis

from chargepath.core.auth import (
    KEY_ID_ALPHABET,
    FailedAttempts,
    KeyRecord,
    Principal,
    Refusal,
    RefusalKind,
    Role,
)
from chargepath.store.base import StoreUnavailableError
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import RedisKeyStore
from chargepath.transport.auth import Authenticator, bearer_token, peer_address

pytestmark = pytest.mark.integration

PEER = "ipv4:127.0.0.1"


@pytest_asyncio.fixture
async def keys(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> AsyncIterator[RedisKeyStore]:
    store = RedisKeyStore.from_url(redis_server.url)
    yield store
    await store.close()


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started, without the INFO used to read them."""
    stats: Any = client.info("commandstats")
    return {k: v["calls"] for k, v in stats.items() if k != "cmdstat_info"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_cached_key_costs_no_redis_command(
    keys: RedisKeyStore, raw_redis: redis.Redis
) -> None:
    _, key = await keys.create("tenant-a", Role.METER)
    auth = Authenticator(keys)  # not started: no poll, no subscriber in the figures
    first = await auth.authenticate(key.plaintext, PEER)
    assert first == Principal(key.key_id, Role.METER, "tenant-a")
    assert (auth.cache_hits, auth.cache_misses) == (0, 1)
    before = command_calls(raw_redis)
    for _ in range(500):
        assert await auth.authenticate(key.plaintext, PEER) == first
    assert command_calls(raw_redis) == before
    assert (auth.cache_hits, auth.cache_misses) == (500, 1)


async def wait_for_refusal(auth: Authenticator, plaintext: str, limit_s: float) -> float:
    """Seconds until ``auth`` refuses ``plaintext``, polling every 5 ms, at most ``limit_s``."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if isinstance(await auth.authenticate(plaintext, PEER), Refusal):
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    return float("inf")


@pytest.mark.parametrize("subscribe", [True, False], ids=["pubsub", "epoch-poll-only"])
async def test_a_revocation_reaches_another_process_within_a_second(
    redis_server: EmbeddedRedis, keys: RedisKeyStore, subscribe: bool
) -> None:
    # Two gateway processes: each its own connections to Redis, its own cache.
    other_keys = RedisKeyStore.from_url(redis_server.url)
    here = Authenticator(keys)
    there = Authenticator(other_keys, subscribe=subscribe)
    await here.start()
    await there.start()
    try:
        _, key = await keys.create("tenant-a", Role.METER)
        # The creation is a change too: once heard, a lookup racing it is no longer held back
        # from the cache.
        await asyncio.sleep(0.1)
        for auth in (here, there):
            assert isinstance(await auth.authenticate(key.plaintext, PEER), Principal)
            assert isinstance(await auth.authenticate(key.plaintext, PEER), Principal)
            assert auth.cache_hits == 1
        await keys.revoke(key.key_id)
        elapsed = await wait_for_refusal(there, key.plaintext, 2.0)
        assert elapsed < 1.0
        assert await there.authenticate(key.plaintext, PEER) == Refusal(
            RefusalKind.UNAUTHENTICATED, "API key revoked"
        )
        assert await wait_for_refusal(here, key.plaintext, 2.0) < 1.0
        if subscribe:
            assert elapsed < 0.25  # by the message, not the poll
    finally:
        await here.close()
        await there.close()
        await other_keys.close()


async def test_expiry_and_a_rotation_grace_are_honoured_from_the_cache(
    keys: RedisKeyStore,
) -> None:
    auth = Authenticator(keys)
    _, expiring = await keys.create("tenant-a", Role.VIEWER, now_ms() + 300)
    rotated, old = await keys.create("tenant-a", Role.METER)
    await keys.rotate(rotated.key_id, grace_s=0.3)
    # A rotation with grace is a change too; a process that cached the old key before it would
    # have been told to evict it. Here both keys are first seen after the change.
    for key in (expiring, old):
        assert isinstance(await auth.authenticate(key.plaintext, PEER), Principal)
    misses = auth.cache_misses
    await asyncio.sleep(0.35)
    assert await auth.authenticate(expiring.plaintext, PEER) == Refusal(
        RefusalKind.UNAUTHENTICATED, "API key expired"
    )
    assert await auth.authenticate(old.plaintext, PEER) == Refusal(
        RefusalKind.UNAUTHENTICATED, "API key revoked"
    )
    assert auth.cache_misses == misses  # decided from the cached records
    assert len(auth) == 0  # and dropped from the cache


async def test_failed_attempts_per_peer_stop_lookups_but_not_cached_keys(
    keys: RedisKeyStore, raw_redis: redis.Redis
) -> None:
    clock = [0]
    auth = Authenticator(keys, attempts=FailedAttempts(lambda: clock[0], burst=5))
    _, good = await keys.create("tenant-a", Role.METER)
    _, uncached = await keys.create("tenant-b", Role.METER)
    assert isinstance(await auth.authenticate(good.plaintext, PEER), Principal)
    lookups = command_calls(raw_redis).get("cmdstat_hgetall", 0)
    refusals = []
    for i in range(50):
        unknown = f"cpk_zzzzzzzzzz{KEY_ID_ALPHABET[i % 32]}{KEY_ID_ALPHABET[i // 32]}_{good.secret}"
        result = await auth.authenticate(unknown, PEER)
        assert isinstance(result, Refusal)
        refusals.append(result.message)
    assert refusals[:5] == ["invalid API key"] * 5
    assert all(m.startswith("too many failed authentication attempts") for m in refusals[5:])
    assert good.secret not in "".join(refusals)
    assert command_calls(raw_redis).get("cmdstat_hgetall", 0) - lookups == 5
    # The good key, cached, still works from the same address; an uncached one waits; another
    # address is not affected.
    assert isinstance(await auth.authenticate(good.plaintext, PEER), Principal)
    assert isinstance(await auth.authenticate(uncached.plaintext, PEER), Refusal)
    assert isinstance(await auth.authenticate(uncached.plaintext, "ipv4:10.9.8.7"), Principal)
    clock[0] += 1000
    assert isinstance(await auth.authenticate(uncached.plaintext, PEER), Principal)


async def test_a_lookup_that_raced_an_eviction_is_not_cached(keys: RedisKeyStore) -> None:
    _, key = await keys.create("tenant-a", Role.METER)
    auth = Authenticator(keys)
    real_get = keys.get
    gate = asyncio.Event()

    async def slow_get(key_id: str) -> KeyRecord | None:
        record = await real_get(key_id)  # read before the change...
        await gate.wait()
        return record

    keys.get = slow_get  # type: ignore[method-assign]
    pending = asyncio.create_task(auth.authenticate(key.plaintext, PEER))
    await asyncio.sleep(0.05)
    auth.evict(key.key_id)  # ...a change message arrives while the read is in flight
    gate.set()
    assert isinstance(await pending, Principal)  # answered from what it read
    assert len(auth) == 0  # but not cached: the next call looks again


async def test_an_uncached_key_while_the_store_is_down_is_store_unavailable() -> None:
    keys = RedisKeyStore.from_url("redis://127.0.0.1:1", connect_timeout=0.2)
    auth = Authenticator(keys)
    try:
        with pytest.raises(StoreUnavailableError):
            await auth.authenticate("cpk_abcdefghijkl_" + "A" * 43, PEER)
    finally:
        await keys.close()


def test_peer_address_and_bearer_token() -> None:
    assert peer_address("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_address("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"
    assert bearer_token([("authorization", "Bearer cpk_x")]) == "cpk_x"
    assert bearer_token([("Authorization", "bearer  cpk_x ")]) == "cpk_x"
    assert bearer_token([("x-other", "v")]) is None
    assert bearer_token(None) is None
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("authorization", "Bearer a"), ("authorization", "Bearer b")]) == ""


async def test_the_cached_path_answers_only_a_valid_cached_key(keys: RedisKeyStore) -> None:
    """``cached`` (what the interceptor tries first, without the peer's address) gives the
    principal of a cached key with its secret while it is valid, and None for anything else,
    which ``authenticate`` then decides (refusals included)."""
    clock = [now_ms()]
    _, key = await keys.create("tenant-a", Role.METER, clock[0] + 60_000)
    auth = Authenticator(keys, wall_ms=lambda: clock[0])
    assert auth.cached(key.plaintext) is None  # not looked up yet
    principal = await auth.authenticate(key.plaintext, PEER)
    assert auth.cached(key.plaintext) == principal == Principal(key.key_id, Role.METER, "tenant-a")
    wrong = key.plaintext[:-1] + ("a" if key.plaintext[-1] != "a" else "b")
    assert auth.cached(wrong) is None
    refused = await auth.authenticate(wrong, PEER)
    assert isinstance(refused, Refusal) and refused.kind is RefusalKind.UNAUTHENTICATED
    assert auth.cached("") is None
    assert auth.cached("Bearer") is None
    clock[0] += 60_000  # the key's expiry
    assert auth.cached(key.plaintext) is None
    assert await auth.authenticate(key.plaintext, PEER) == Refusal(
        RefusalKind.UNAUTHENTICATED, "API key expired"
    )
