"""Session-wide fixtures: a real redis-server on a free port, started and stopped by the tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis

from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.ledger import LedgerEntry
from chargepath.store.redis_store import RedisStore, ledger_key
from chargepath.telemetry import Telemetry


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def raw_redis(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A sync client on the session's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest_asyncio.fixture
async def store(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
    yield s
    await s.close()


async def make_engine(
    store: RedisStore, policy_yaml: str, *, store_timeout_s: float = 2.0
) -> Engine:
    """Publish ``policy_yaml`` and return an engine that decides with it."""
    await store.publish_policy(load_policy_text(policy_yaml))
    engine = Engine(store, EngineSettings(store_timeout_s=store_timeout_s), Telemetry())
    await engine.reload_policy()
    return engine


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ledger_entries(client: redis.Redis, tenant: str) -> list[LedgerEntry]:
    """The tenant's ledger as the billing side reads it, oldest first, straight from Redis
    (with or without decoded responses)."""
    entries: Any = client.xrange(ledger_key(tenant))
    return [
        LedgerEntry.from_fields(_text(i), {_text(k): _text(v) for k, v in fields.items()})
        for i, fields in entries
    ]
