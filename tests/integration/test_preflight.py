"""What ``chargepath serve`` claims before it starts (chargepath.preflight), against the real
kernel, real gRPC servers and the session's real Redis: the assumptions the port and data-dir
exclusivity rest on."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import grpc
import pytest

from chargepath.preflight import (
    DATA_DIR_LOCK,
    Holder,
    ServerLock,
    StartupError,
    check_port_free,
    claim_data_dir,
    wait_for_redis,
)
from chargepath.settings import Settings
from chargepath.store.connect import RedisTarget
from chargepath.store.embedded import EmbeddedRedis, free_port
from chargepath.supervisor import supervise

WORKER_OPTIONS = [("grpc.so_reuseport", 1)]  # as app.build makes every worker's server


async def test_workers_share_a_port_that_the_check_then_refuses() -> None:
    port = free_port()
    check_port_free("127.0.0.1", port)  # nothing there yet
    servers = [grpc.aio.server(options=WORKER_OPTIONS) for _ in range(2)]
    try:
        # the check let the port go: both workers bind it, side by side (SO_REUSEPORT)
        assert [s.add_insecure_port(f"127.0.0.1:{port}") for s in servers] == [port, port]
        for s in servers:
            await s.start()
        # a bind without SO_REUSEPORT fails next to them: the second gateway's check
        with pytest.raises(StartupError, match=f"^--port {port}: address already in use"):
            check_port_free("127.0.0.1", port)
    finally:
        for s in servers:
            await s.stop(None)


def test_the_check_refuses_a_port_any_program_listens_on() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(StartupError) as e:
            check_port_free("127.0.0.1", port)
        # the wildcard address covers 127.0.0.1 too
        with pytest.raises(StartupError):
            check_port_free("0.0.0.0", port)
    assert "another program listens there" in str(e.value) and e.value.status == 1


def test_the_check_ignores_connections_of_an_earlier_server_in_time_wait() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    check_port_free("127.0.0.1", port)


def test_a_lock_is_exclusive_names_its_holder_and_is_released(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first = ServerLock(path, Holder(os.getpid(), "127.0.0.1", 50051, "2030-01-01T00:00:00Z"))
    assert first.acquire() is None
    # another open file description: what another process gets
    second = ServerLock(path, Holder(1, "h", 1, "later"))
    assert second.acquire() == first.holder
    assert json.loads(path.read_text())["pid"] == os.getpid()  # the refused one wrote nothing
    first.release()
    assert not path.exists()
    assert second.acquire() is None
    assert json.loads(path.read_text()) == {
        "pid": 1,
        "host": "h",
        "port": 1,
        "started_at": "later",
    }
    second.release()


def test_the_data_dir_lock_refuses_a_second_server_and_says_which_holds_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "new" / "data"
    settings = Settings(data_dir=str(data), port=50123)
    lock = claim_data_dir(settings)
    try:
        assert oct(data.stat().st_mode & 0o777) == "0o700"
        with pytest.raises(StartupError) as e:
            claim_data_dir(Settings(data_dir=str(data), port=50124))
        message = str(e.value)
        assert message.startswith(f"--data-dir {data}: in use by the chargepath server pid ")
        assert f"pid {os.getpid()} on 127.0.0.1:50123, started 20" in message
    finally:
        lock.release()
    again = claim_data_dir(Settings(data_dir=str(data)))
    assert (data / DATA_DIR_LOCK).exists()
    again.release()
    assert not (data / DATA_DIR_LOCK).exists()  # a clean stop leaves no stale holder


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StartupError, match=f"^--data-dir {blocker}/data: cannot use it: "):
        claim_data_dir(Settings(data_dir=str(blocker / "data")))


async def test_a_redis_that_answers_passes_at_once(redis_server: EmbeddedRedis) -> None:
    started = time.monotonic()
    await wait_for_redis(RedisTarget(url=redis_server.url), 5.0)
    assert time.monotonic() - started < 1.0


async def test_wrong_credentials_are_refused_without_waiting(
    redis_server: EmbeddedRedis,
) -> None:
    url = f"redis://:wrong-password@127.0.0.1:{redis_server.port}/0"
    started = time.monotonic()
    with pytest.raises(StartupError) as e:
        await wait_for_redis(RedisTarget(url=url), 5.0)
    assert time.monotonic() - started < 2.0
    assert str(e.value).startswith(f"--redis-url: redis://***@127.0.0.1:{redis_server.port}/0")
    assert "wrong-password" not in str(e.value)


async def test_an_unreachable_redis_is_given_up_after_the_bound() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StartupError) as e:
        await wait_for_redis(RedisTarget(url=f"redis://127.0.0.1:{port}/0"), 1.0)
    assert 1.0 <= time.monotonic() - started < 3.0
    assert str(e.value).startswith(f"--redis-url: no answer from redis://127.0.0.1:{port}/0 ")


def test_workers_that_cannot_listen_stop_the_supervisor_at_once(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    # The race the check cannot close: another program takes the port after it. Called
    # without the check, the supervisor sees its workers fail to bind and stops with status
    # 1, restarting none (it used to restart them 10 times, then exit 0).
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        settings = Settings(
            port=port,
            workers=2,
            redis_url=redis_server.url,
            data_dir=str(tmp_path),
            log_format="text",
            drain_grace_s=1,
        )
        started = time.monotonic()
        try:
            assert supervise(settings) == 1
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    assert time.monotonic() - started < 30
