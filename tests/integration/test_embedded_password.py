"""The embedded redis-server is not open to anyone who can reach 127.0.0.1: it requires the
password kept (mode 0600) in its data dir, reused across restarts, never on its command line."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore

pytestmark = pytest.mark.integration

# a refusal is the answer: no retries with backoff (redis-py retries by default)
NO_RETRY = Retry(NoBackoff(), 0)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_a_client_without_the_password_is_refused(embedded: EmbeddedRedis) -> None:
    with socket.create_connection(("127.0.0.1", embedded.port), timeout=2) as raw:
        raw.sendall(b"GET cp:policy\r\n")
        assert raw.recv(128).startswith(b"-NOAUTH")
    bare = redis.Redis(host="127.0.0.1", port=embedded.port, socket_timeout=2, retry=NO_RETRY)
    # redis-py may open with HELLO, whose refusal says the same in other words
    with pytest.raises(redis.AuthenticationError, match=r"NOAUTH|already authenticated"):
        bare.get("cp:policy")
    bare.close()
    wrong = redis.Redis(
        host="127.0.0.1", port=embedded.port, password="guess", socket_timeout=2, retry=NO_RETRY
    )
    with pytest.raises(redis.AuthenticationError, match=r"WRONGPASS|invalid username-password"):
        wrong.ping()
    wrong.close()
    right = redis.Redis.from_url(embedded.url, socket_timeout=2)
    assert right.ping() is True
    right.close()


def test_the_password_is_private_kept_and_reused_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    first = EmbeddedRedis(data)
    first.start()
    try:
        client = redis.Redis.from_url(first.url, decode_responses=True)
        client.set("kept", "yes")
        client.close()
        for name in ("password", "url"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
        assert (data / "password").read_text().strip() == first.password
        assert len(first.password) >= 43  # 256 random bits, url-safe base64
        assert (data / "url").read_text().strip() == first.url
        assert first.password in first.url and first.password not in first.redacted_url
        # never on the command line, which every local user can read
        assert first.process is not None
        cmdline = Path(f"/proc/{first.process.pid}/cmdline").read_bytes()
        assert first.password.encode() not in cmdline
        assert first.password not in " ".join(first.command())
    finally:
        first.stop()
    again = EmbeddedRedis(data)
    assert again.password == first.password
    again.start()
    try:
        client = redis.Redis.from_url(again.url, decode_responses=True)
        assert client.get("kept") == "yes"  # the AOF, reopened with the same password
        client.close()
    finally:
        again.stop()
    # another data dir: another password
    other = EmbeddedRedis(tmp_path / "other")
    assert other.password != first.password


async def test_the_store_decides_through_the_password_url(embedded: EmbeddedRedis) -> None:
    store = RedisStore.from_url(embedded.url, connect_timeout=1.0)
    try:
        await store.ping()
        assert await store.policy_version() == 0
    finally:
        await store.close()
