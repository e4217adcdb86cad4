"""The store timeout is sized from Redis' own word on its writes (issue #13, item 3): with
``appendfsync always`` every decision waits for a disk flush, whose tail is not a failure, so a
gateway without ``--store-timeout-ms`` waits 200 ms there and 50 ms elsewhere; an explicit
value always wins; a Redis that refuses CONFIG GET gets the 50 ms default."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from chargepath.app import Gateway
from chargepath.settings import (
    STORE_TIMEOUT_FSYNC_ALWAYS_MS,
    STORE_TIMEOUT_MS,
    Settings,
    store_timeout_ms_for,
)
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
USER = "chargepath-no-config"


@pytest.fixture(scope="module")
def always_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("always"), fsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def no_config_url(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> Iterator[str]:
    """A user that may do everything but CONFIG (as managed services and least-privilege ACL
    users are)."""
    password = secrets.token_urlsafe(24)
    raw_redis.execute_command(
        "ACL", "SETUSER", USER, "reset", "on", f">{password}", "~*", "&*", "+@all", "-config"
    )
    yield f"redis://{USER}:{password}@127.0.0.1:{redis_server.port}/0"
    raw_redis.execute_command("ACL", "DELUSER", USER)


@pytest_asyncio.fixture
async def always_store(always_redis: EmbeddedRedis) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(always_redis.url, connect_timeout=1.0)
    yield store
    await store.close()


async def test_the_store_says_whether_it_fsyncs_every_write(
    always_store: RedisStore, store: RedisStore, no_config_url: str
) -> None:
    assert await always_store.fsyncs_every_write() is True
    assert await store.fsyncs_every_write() is False  # the session's Redis: everysec
    refused = RedisStore.from_url(no_config_url, connect_timeout=1.0)
    try:
        await refused.ping()  # the user works...
        assert await refused.fsyncs_every_write() is None  # ...but CONFIG is not its to read
    finally:
        await refused.close()


async def test_appendonly_off_is_not_fsync_always(
    always_redis: EmbeddedRedis, always_store: RedisStore
) -> None:
    client = redis.Redis.from_url(always_redis.url, decode_responses=True)
    try:
        client.config_set("appendonly", "no")
        assert await always_store.fsyncs_every_write() is False
    finally:
        client.config_set("appendonly", "yes")
        client.close()


def test_an_explicit_timeout_wins_and_unknown_means_the_default() -> None:
    assert store_timeout_ms_for(0, True) == STORE_TIMEOUT_FSYNC_ALWAYS_MS == 200
    assert store_timeout_ms_for(0, False) == STORE_TIMEOUT_MS == 50
    assert store_timeout_ms_for(0, None) == STORE_TIMEOUT_MS
    assert store_timeout_ms_for(75, True) == 75
    with pytest.raises(ValueError, match="--store-timeout-ms: -1 is negative"):
        Settings.from_env({"CHARGEPATH_STORE_TIMEOUT_MS": "-1"})


@pytest.mark.parametrize(
    ("fsync", "configured", "expected_ms", "why"),
    [
        ("always", 0, 200, "Redis fsyncs every write (appendfsync always)"),
        ("everysec", 0, 50, "Redis does not fsync every write"),
        ("always", 80, 80, "--store-timeout-ms"),
    ],
)
async def test_a_gateway_sizes_its_store_timeout_at_start(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fsync: str,
    configured: int,
    expected_ms: int,
    why: str,
) -> None:
    settings = Settings(
        port=0,
        data_dir=str(tmp_path / "gateway"),
        redis_fsync=fsync,
        store_timeout_ms=configured,
        plans=str(ROOT / "examples" / "plans.yaml"),
    )
    caplog.set_level("INFO", logger="chargepath")
    gateway = Gateway(settings)
    await gateway.start()
    try:
        assert gateway.parts is not None
        engine = gateway.parts.engine
        assert engine.settings.store_timeout_s == expected_ms / 1000
        assert engine.settings.store_probe_timeout_s >= expected_ms / 1000
        assert f"store timeout {expected_ms} ms ({why})" in caplog.text
    finally:
        await gateway.stop()


async def test_a_redis_that_refuses_config_gets_the_default(
    no_config_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(port=0, redis_url=no_config_url, data_dir=str(tmp_path / "gateway"))
    caplog.set_level("INFO", logger="chargepath")
    gateway = Gateway(settings)
    await gateway.start()
    try:
        assert gateway.parts is not None
        assert gateway.parts.engine.settings.store_timeout_s == STORE_TIMEOUT_MS / 1000
        assert "store timeout 50 ms (Redis refused CONFIG GET" in caplog.text
    finally:
        await gateway.stop()
