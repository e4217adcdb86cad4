"""What ``chargepath serve`` checks and claims before anything starts (issue #14).

:func:`claim` runs in the process that runs ``serve`` (the supervisor with ``--workers`` > 1),
after the settings and the TLS files were checked and before logging is set up, in this order:

1. the plan file parses and validates;
2. with the embedded Redis, a redis-server binary exists;
3. the port: no other chargepath server holds its lock, and nothing listens on it;
4. with an external Redis, it answers within :data:`STORE_WAIT_S`;
5. the data dir is a folder this process can use, and no other server holds its lock.

Any failure is a :class:`StartupError`, one line naming the option at fault. Steps 1, 2 and 4
write nothing, so a configuration error leaves no trace; only 3 and 5 write, their lock files.

Why a port lock as well as the port check: the workers of one gateway share the port with
SO_REUSEPORT, and Linux lets any process of the same user join such a group, so the kernel
does not keep a second gateway out once the first one's workers listen. The check (a bind
without SO_REUSEPORT, which fails next to any listener, ours included) refuses a port something
listens on; the lock (keyed by ``--host`` as written, and ``--port``), held from before the
check until the process exits, refuses a second chargepath started while the first one's
workers are not listening yet. Both refuse with
"address already in use", the kernel's own words. A program that binds the port between the
check and the workers' bind makes the workers fail; the supervisor then stops with one line too.

Locks are ``flock`` on an open file that names its holder (:class:`Holder`): the kernel drops
the lock when the holder exits, however it exits, so a dead server never blocks the next one.
Workers do not inherit them (Python opens files non-inheritable); the supervisor holds them
for all its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from redis.exceptions import AuthenticationError, RedisClusterException, RedisError

from chargepath.core.plans import PolicyError
from chargepath.policy_files import load_policy_file, refusal_lines
from chargepath.settings import Settings
from chargepath.store.connect import RedisTarget, connect
from chargepath.store.embedded import find_redis_server

#: How long a start waits for an external Redis to answer before it gives up.
STORE_WAIT_S = 10.0
#: The data dir's lock file.
DATA_DIR_LOCK = "serve.lock"

#: Exit statuses: the command line or a file it names is wrong ...
CONFIGURATION = 2
#: ... or the machine's state keeps the server from starting (busy, unreachable, missing).
UNAVAILABLE = 1


class StartupError(Exception):
    """A start that cannot go on. ``str()`` is one line that names the option at fault;
    ``status`` is the exit status (:data:`CONFIGURATION` or :data:`UNAVAILABLE`)."""

    def __init__(self, message: str, status: int = UNAVAILABLE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Holder:
    """The server that holds a lock, as written in its lock file (JSON)."""

    pid: int
    host: str
    port: int
    #: ISO-8601 UTC, to the second.
    started_at: str

    @classmethod
    def of(cls, settings: Settings) -> Holder:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls(os.getpid(), settings.host, settings.port, now)

    def __str__(self) -> str:
        where = f"{self.host}:{self.port}" if self.port else f"{self.host} (a port picked at start)"
        return f"the chargepath server pid {self.pid} on {where}, started {self.started_at}"


class ServerLock:
    """An exclusive ``flock`` on ``path``, whose file names the :class:`Holder`; released by
    :meth:`release` (which removes the file) or when the process exits (which leaves it, for
    the next holder to take over)."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> Holder | None:
        """Take the lock and write :attr:`holder` into the file: None. If another open file
        (another process) holds it: the holder its file names, and the lock is not taken.
        Raises OSError when the file cannot be opened."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with os.fdopen(fd, "r", encoding="utf-8") as held:
                    return _holder_of(held.read())
            except BaseException:
                os.close(fd)
                raise
            if self._still_at_path(fd):
                break
            # the holder released (removed) it between our open and our flock: a new file
            # may be at the path now, and the lock is on that one
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(self.holder)) + "\n").encode(), 0)
        self._fd = fd
        return None

    def _still_at_path(self, fd: int) -> bool:
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)

    def release(self) -> None:
        """Remove the file, then drop the lock (closing the descriptor drops the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(fd)


def _holder_of(text: str) -> Holder:
    try:
        record = json.loads(text)
        return Holder(
            int(record["pid"]), str(record["host"]), int(record["port"]), str(record["started_at"])
        )
    except (ValueError, KeyError, TypeError):
        # locked but not written yet: a server that is starting this very moment
        return Holder(0, "?", 0, "just now")


class Claims:
    """The locks :func:`claim` took, held until :meth:`release` (or the process's exit)."""

    def __init__(self) -> None:
        self.locks: list[ServerLock] = []

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def claim(settings: Settings) -> Claims:
    """Check and claim what ``settings`` need, in the order of the module docstring; the
    locks taken. Raises :class:`StartupError` (having released whatever it took)."""
    check_plan_file(settings)
    target = settings.redis_target()
    if target.embedded:
        try:
            find_redis_server()
        except FileNotFoundError as exc:
            raise StartupError(str(exc)) from None
    claims = Claims()
    try:
        if settings.port != 0:
            claims.locks.append(claim_port(settings))
        if not target.embedded:
            asyncio.run(wait_for_redis(target, STORE_WAIT_S))
        claims.locks.append(claim_data_dir(settings))
    except BaseException:
        claims.release()
        raise
    return claims


def check_plan_file(settings: Settings) -> None:
    """The plan file parses and validates, or StartupError naming every issue: one line for
    one issue, else a line that counts them and then one line each (``file:line: field:
    reason``)."""
    if not settings.plans:
        return
    try:
        load_policy_file(settings.plans)
    except PolicyError as exc:
        raise StartupError("\n".join(refusal_lines(exc, "--plans")), CONFIGURATION) from None


def check_workers(settings: Settings) -> None:
    """Several workers share one port, so it must be a fixed one."""
    if settings.workers > 1 and settings.port == 0:
        raise StartupError(
            "--workers: more than one worker needs a fixed --port (they share it)",
            CONFIGURATION,
        )


# -- the port ------------------------------------------------------------------------------


def runtime_dir() -> Path:
    """This user's folder for port locks: ``$XDG_RUNTIME_DIR/chargepath``, else
    ``<tmp>/chargepath-<uid>``; created with mode 0700, refused unless this user owns it (a
    folder another user made there could hand out our locks)."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    path = (
        Path(base) / "chargepath"
        if base and Path(base).is_dir()
        else Path(tempfile.gettempdir()) / f"chargepath-{os.getuid()}"
    )
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        owner = path.lstat()
    except OSError as exc:
        raise StartupError(f"--port: cannot use the lock folder {path}: {exc.strerror}") from None
    if owner.st_uid != os.getuid() or not path.is_dir() or path.is_symlink():
        raise StartupError(f"--port: the lock folder {path} is not a folder of this user")
    return path


def claim_port(settings: Settings) -> ServerLock:
    """Lock ``host:port`` against other chargepath servers, then check that nothing listens
    on it; the lock, or StartupError "address already in use"."""
    host, port = settings.host, settings.port
    name = re.sub(r"[^A-Za-z0-9.-]", "_", host) or "any"
    lock = ServerLock(runtime_dir() / f"port-{name}-{port}.lock", Holder.of(settings))
    try:
        holder = lock.acquire()
    except OSError as exc:
        raise StartupError(f"--port {port}: cannot lock {lock.path}: {exc.strerror}") from None
    if holder is not None:
        raise StartupError(f"--port {port}: address already in use on {host} by {holder}")
    try:
        check_port_free(host, port)
    except BaseException:
        lock.release()
        raise
    return lock


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` without SO_REUSEPORT and let it go: that fails next to any listener,
    SO_REUSEPORT or not. SO_REUSEADDR (as gRPC sets it) so that connections of an earlier
    server still in TIME_WAIT do not count."""
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(
            f"--host {host}: cannot resolve it: {exc.strerror}", CONFIGURATION
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"--port {port}: address already in use on {host} (another program "
                        "listens there)"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise StartupError(
                        f"--host {host}: not an address of this machine", CONFIGURATION
                    ) from None
                raise StartupError(
                    f"--port {port}: cannot listen on {host}: {exc.strerror}"
                ) from None


# -- Redis ---------------------------------------------------------------------------------


async def wait_for_redis(target: RedisTarget, within_s: float) -> None:
    """Return once ``target`` answers PING; StartupError, naming where it tried, when it has
    not within ``within_s`` seconds or refuses the credentials."""
    option = "--redis-sentinel" if target.sentinels else "--redis-url"
    client = connect(target, connect_timeout=min(1.0, within_s))
    deadline = time.monotonic() + within_s
    last = "no attempt"
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(client.ping(), timeout=max(left, 0.1))
                return
            except AuthenticationError as exc:
                raise StartupError(f"{option}: {target.describe()} refused: {exc}") from None
            except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
                last = str(exc) or type(exc).__name__
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"{option}: no answer from {target.describe()} within {within_s:g} s ({last})"
                )
            await asyncio.sleep(0.2)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()


# -- the data dir --------------------------------------------------------------------------


def claim_data_dir(settings: Settings) -> ServerLock:
    """Create the data dir (mode 0700) if need be and lock it; StartupError if it is not a
    folder this process can write, or another server holds it."""
    path = Path(settings.data_dir).resolve()
    option = f"--data-dir {path}"
    if path.exists() and not path.is_dir():
        raise StartupError(f"{option}: not a folder")
    lock = ServerLock(path / DATA_DIR_LOCK, Holder.of(settings))
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        holder = lock.acquire()
    except OSError as exc:
        raise StartupError(f"{option}: cannot use it: {exc.strerror or exc}") from None
    if holder is not None:
        raise StartupError(f"{option}: in use by {holder}")
    return lock
