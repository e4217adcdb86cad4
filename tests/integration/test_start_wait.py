"""A gateway starting against a Redis that accepts connections but does not answer (here
SIGSTOPped) never hangs in silence: each PING of the start-up wait is bounded, logged, and
the wait ends with a clear error once its attempts are spent."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from chargepath.app import START_PING_S, _wait_for_store
from chargepath.store.base import StoreUnavailableError
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore

pytestmark = pytest.mark.integration


async def test_a_store_that_does_not_answer_is_logged_and_then_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    store = RedisStore.from_url(server.url, connect_timeout=1.0)
    assert server.process is not None
    try:
        await _wait_for_store(store)  # answers: returns at once
        os.kill(server.process.pid, signal.SIGSTOP)
        caplog.set_level("WARNING", logger="chargepath")
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="no answer to PING within 2 s"):
            await _wait_for_store(store, attempts=2)
        assert time.monotonic() - started < 2 * START_PING_S + 2
        assert "waiting for the store: PING not answered" in caplog.text
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        await store.close()
        server.stop()
