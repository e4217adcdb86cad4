"""API keys in a real Redis: create, list, rotate, revoke, expiry, hashing, change events, the
operator key bootstrap; and the same on a real Redis Cluster."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from chargepath.core.auth import Role, parse_key, secret_matches
from chargepath.store.base import StoreUnavailableError
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import (
    EPOCH_KEY,
    INDEX_KEY,
    KeyNotFoundError,
    KeyNotRotatableError,
    RedisKeyStore,
    bootstrap_operator_key,
    record_key,
)
from tests.integration.test_redis_cluster import cluster  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def keys(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> AsyncIterator[RedisKeyStore]:
    store = RedisKeyStore.from_url(redis_server.url)
    yield store
    await store.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_create_stores_only_the_hash(keys: RedisKeyStore, raw_redis: redis.Redis) -> None:
    record, key = await keys.create("tenant-a", Role.METER, None, "sms gateway")
    assert parse_key(key.plaintext) == key and key.key_id == record.key_id
    assert (record.role, record.tenant, record.description) == (
        Role.METER,
        "tenant-a",
        "sms gateway",
    )
    assert abs(record.created_ms - now_ms()) < 5000
    stored = raw_redis.hgetall(record_key(key.key_id))
    assert stored["hash"] == hashlib.sha256(key.secret.encode()).hexdigest()
    assert stored["tenant"] == "tenant-a" and stored["role"] == "meter"
    assert stored["expires_ms"] == stored["revoked_ms"] == ""
    dump = repr(raw_redis.hgetall(record_key(key.key_id))) + repr(raw_redis.keys("*"))
    assert key.secret not in dump and key.plaintext not in dump
    assert raw_redis.smembers(INDEX_KEY) == {key.key_id}
    assert await keys.get(key.key_id) == record
    assert await keys.get("zzzzzzzzzzzz") is None
    assert await keys.get("not a key id") is None


async def test_an_operator_key_has_no_tenant_and_others_need_one(keys: RedisKeyStore) -> None:
    record, key = await keys.create(None, Role.OPERATOR)
    assert record.tenant is None and (await keys.get(key.key_id)) == record
    with pytest.raises(ValueError):
        await keys.create("tenant-a", Role.OPERATOR)
    with pytest.raises(ValueError):
        await keys.create(None, Role.VIEWER)


async def test_list_all_or_by_tenant_oldest_first(keys: RedisKeyStore) -> None:
    made = [
        (await keys.create("tenant-a", Role.METER))[0],
        (await keys.create("tenant-b", Role.VIEWER))[0],
        (await keys.create(None, Role.OPERATOR))[0],
        (await keys.create("tenant-a", Role.VIEWER))[0],
    ]
    listed = await keys.list()
    assert {r.key_id for r in listed} == {r.key_id for r in made}
    assert [r.created_ms for r in listed] == sorted(r.created_ms for r in listed)
    assert [r.key_id for r in await keys.list("tenant-a")] == [
        r.key_id for r in listed if r.tenant == "tenant-a"
    ]
    assert len(await keys.list("tenant-a")) == 2
    assert await keys.list("nobody") == []


async def test_every_change_bumps_the_epoch_and_is_published(
    keys: RedisKeyStore, raw_redis: redis.Redis
) -> None:
    async with keys.changes() as changed:
        await _events_then_epoch(keys, raw_redis, changed)


async def _events_then_epoch(
    keys: RedisKeyStore, raw_redis: redis.Redis, changed: AsyncIterator[str]
) -> None:
    async def next_event() -> str:
        return await asyncio.wait_for(anext(changed), 1.0)

    assert await keys.epoch() == 0
    _, key = await keys.create("tenant-a", Role.METER)
    assert await next_event() == key.key_id
    assert await keys.epoch() == 1
    _, new_key = await keys.rotate(key.key_id, grace_s=60)
    assert {await next_event(), await next_event()} == {key.key_id, new_key.key_id}
    assert await keys.epoch() == 2
    await keys.revoke(new_key.key_id)
    assert await next_event() == new_key.key_id
    assert int(raw_redis.get(EPOCH_KEY) or 0) == 3
    await keys.revoke(new_key.key_id)  # already revoked: no change, no event
    assert await keys.epoch() == 3
    with pytest.raises(TimeoutError):
        await next_event()


async def test_rotate_copies_the_key_and_revokes_the_old_one(keys: RedisKeyStore) -> None:
    expires = now_ms() + 3_600_000
    old, old_key = await keys.create("tenant-a", Role.VIEWER, expires, "dashboards")
    new, new_key = await keys.rotate(old.key_id)
    assert new.key_id != old.key_id and new_key.secret != old_key.secret
    assert (new.tenant, new.role, new.expires_ms, new.description) == (
        "tenant-a",
        Role.VIEWER,
        expires,
        "dashboards",
    )
    assert secret_matches(new_key.secret, new.secret_hash)
    revoked = await keys.get(old.key_id)
    assert revoked is not None and revoked.revoked_ms is not None
    assert revoked.refusal_at(revoked.revoked_ms) == "revoked"
    assert abs(revoked.revoked_ms - new.created_ms) <= 1
    with pytest.raises(KeyNotRotatableError):
        await keys.rotate(old.key_id)
    with pytest.raises(KeyNotFoundError):
        await keys.rotate("zzzzzzzzzzzz")


async def test_rotate_with_a_grace_period_then_revoke_cuts_it_short(keys: RedisKeyStore) -> None:
    old, _ = await keys.create("tenant-a", Role.METER)
    new, _ = await keys.rotate(old.key_id, grace_s=600)
    pending = await keys.get(old.key_id)
    assert pending is not None and pending.revoked_ms == new.created_ms + 600_000
    assert pending.refusal_at(new.created_ms + 599_999) is None
    with pytest.raises(KeyNotRotatableError):  # already rotated
        await keys.rotate(old.key_id)
    cut = await keys.revoke(old.key_id)
    assert cut.revoked_ms is not None and cut.revoked_ms < new.created_ms + 600_000
    again = await keys.revoke(old.key_id)
    assert again.revoked_ms == cut.revoked_ms  # a revocation never moves later
    with pytest.raises(KeyNotFoundError):
        await keys.revoke("zzzzzzzzzzzz")


async def test_an_expired_key_cannot_be_rotated(keys: RedisKeyStore) -> None:
    record, _ = await keys.create("tenant-a", Role.METER, now_ms() + 100)
    await asyncio.sleep(0.15)
    assert record.refusal_at(now_ms()) == "expired"
    with pytest.raises(KeyNotRotatableError, match="expired"):
        await keys.rotate(record.key_id)


async def test_redis_errors_are_store_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = RedisKeyStore.from_url(f"redis://127.0.0.1:{port}", connect_timeout=0.2)
    try:
        with pytest.raises(StoreUnavailableError):
            await keys.get("abcdefghijkl")
        with pytest.raises(StoreUnavailableError):
            await keys.create("tenant-a", Role.METER)
        with pytest.raises(StoreUnavailableError):
            await keys.list()
        with pytest.raises(StoreUnavailableError):
            await keys.revoke("abcdefghijkl")
        with pytest.raises(StoreUnavailableError):
            await keys.epoch()
    finally:
        await keys.close()


async def test_bootstrap_creates_an_operator_key_file_once(
    keys: RedisKeyStore, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    path = await bootstrap_operator_key(keys, data_dir)
    assert path == data_dir / "operator.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = parse_key(path.read_text().strip())
    record = await keys.get(key.key_id)
    assert record is not None and record.role is Role.OPERATOR and record.tenant is None
    assert secret_matches(key.secret, record.secret_hash)

    text = path.read_text()
    path.chmod(0o644)
    assert await bootstrap_operator_key(keys, data_dir) == path
    assert path.read_text() == text  # a valid key is never overwritten
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(await keys.list()) == 1

    await keys.revoke(key.key_id)
    await bootstrap_operator_key(keys, data_dir)
    replaced = parse_key(path.read_text().strip())
    assert replaced.key_id != key.key_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    path.write_text("not a key\n")
    await bootstrap_operator_key(keys, data_dir)
    assert parse_key(path.read_text().strip()).key_id not in (key.key_id, replaced.key_id)
    assert [p.name for p in data_dir.iterdir() if p.name.endswith(".tmp")] == []


async def test_concurrent_bootstraps_make_one_key(keys: RedisKeyStore, tmp_path: Path) -> None:
    stores = [RedisKeyStore(keys.client) for _ in range(4)]
    paths = await asyncio.gather(*(bootstrap_operator_key(s, tmp_path) for s in stores))
    assert len(set(paths)) == 1
    assert len(await keys.list()) == 1
    assert set(os.listdir(tmp_path)) == {"operator.key", "operator.key.lock"}


async def test_keys_on_a_redis_cluster(cluster: list[int]) -> None:  # noqa: F811
    keys = RedisKeyStore.from_url(f"redis://127.0.0.1:{cluster[0]}", cluster=True)
    try:
        async with keys.changes() as changed:
            record, key = await keys.create("tenant-a", Role.METER, None, "on a cluster")
            assert await keys.get(key.key_id) == record
            new, _ = await keys.rotate(key.key_id, grace_s=5)
            revoked = await keys.revoke(key.key_id)
            assert revoked.revoked_ms is not None
            assert {r.key_id for r in await keys.list("tenant-a")} == {key.key_id, new.key_id}
            assert await keys.epoch() == 3
            heard = [await asyncio.wait_for(anext(changed), 10.0) for _ in range(4)]
        assert heard == [key.key_id, key.key_id, new.key_id, key.key_id]
    finally:
        await keys.close()
