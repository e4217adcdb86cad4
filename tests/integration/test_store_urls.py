"""The store connects over a Unix socket as well as TCP (a Redis on the gateway's host)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chargepath.core.model import Decision, Mode, Subject, Usage
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from tests.conftest import make_engine
from tests.integration.policies import OPEN


@pytest.fixture
def unix_redis(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Path]:
    """A redis-server listening on a Unix socket only."""
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [redis_server.binary, "--port", "0", "--unixsocket", str(sock), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(5)


async def test_a_unix_socket_url_decides(unix_redis: Path) -> None:
    store = RedisStore.from_url(f"unix://{unix_redis}", connect_timeout=1.0)
    try:
        e = await make_engine(store, OPEN)
        v = await e.check(Usage("u1", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT))
        assert v.decision is Decision.ALLOW and v.recorded
    finally:
        await store.close()
