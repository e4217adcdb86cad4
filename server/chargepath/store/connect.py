"""Where Redis is, and the ``redis.asyncio`` client that reaches it.

Every part of Chargepath that talks to Redis (decisions, policy, admin and state, the ledger's
export and consumer groups, API keys) builds its client here, from a :class:`RedisTarget`:

* one URL: a single Redis or Valkey (``redis://``, ``rediss://``, ``unix://``);
* one URL with ``cluster``: a seed node of a Redis Cluster;
* Redis Sentinel: the sentinels' addresses and the master's name. The client asks the
  sentinels for the master's address on every new connection (redis-py's
  ``Sentinel.master_for``), and on top of that watches the sentinels every
  ``SENTINEL_CHECK_S``: once they name another master, idle connections are dropped and busy
  ones are dropped when released, so writes stop going to a demoted master within that
  period, not only when Sentinel finally reconfigures it (seconds later: until then an old
  master keeps accepting writes that the new one will never see). A connection released
  while connected to any node but the master the pool knows is dropped too: one that was
  being opened (to the old master) while the watch switched is not left in the pool for
  those seconds.

:class:`ReplicaWait` is the optional ``WAIT numreplicas timeout`` after each decision batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger("chargepath.store")

RedisClient = aioredis.Redis | RedisCluster

#: How often a Sentinel client asks the sentinels which node is the master.
SENTINEL_CHECK_S = 0.25


class RedisSettingsError(ValueError):
    """A Redis option is wrong; the message is one line and names the option."""


def parse_sentinels(text: str, option: str = "--redis-sentinel") -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` as (host, port) pairs; an IPv6 host is written in brackets
    (``[::1]:26379``). Raises :class:`RedisSettingsError` naming ``option``."""
    out: list[tuple[str, int]] = []
    for item in (p.strip() for p in text.split(",")):
        host, sep, port_text = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not item or not sep or not host or not port_text.isdigit():
            raise RedisSettingsError(
                f"{option}: {item!r} is not host:port (expected host:port,host:port,...)"
            )
        port = int(port_text)
        if not 0 < port < 65536:
            raise RedisSettingsError(f"{option}: port {port} of {item!r} is not in 1..65535")
        out.append((host, port))
    return tuple(out)


URL_FORMS = "redis://[user:password@]host[:port][/db], rediss://... or unix:///path/to/socket"


def redacted(url: str) -> str:
    """``url`` without the credentials it may carry, even when it is malformed."""
    if "@" not in url:
        return url
    scheme, sep, _ = url.partition("://")
    tail = url.rsplit("@", 1)[1]
    return f"{scheme}://***@{tail}" if sep else f"***@{tail}"


def check_url(url: str, option: str = "--redis-url") -> None:
    """Refuse, with a :class:`RedisSettingsError` naming ``option``, a URL that redis-py would
    read as something else: ``redis:/typo`` has no host, and redis-py silently connects to
    localhost:6379 instead; a database path that is not a number is silently ignored; a bad
    port fails only at the first connection. Never echoes a password."""
    shown = redacted(url)
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise RedisSettingsError(
                f"{option}: {shown!r} names no socket path (expected unix:///path/to/socket)"
            )
    elif parts.scheme not in ("redis", "rediss") or not url.startswith(f"{parts.scheme}://"):
        raise RedisSettingsError(f"{option}: {shown!r} is not a Redis URL (expected {URL_FORMS})")
    else:
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname:
            raise RedisSettingsError(f"{option}: {shown!r} names no host (expected {URL_FORMS})")
        if port is not None and not 0 < port < 65536:
            raise RedisSettingsError(f"{option}: {shown!r}: the port is not a number in 1..65535")
        if parts.path not in ("", "/") and not parts.path[1:].isdigit():
            raise RedisSettingsError(
                f"{option}: {shown!r}: the database {parts.path!r} is not a number (expected "
                "/0, /1, ...)"
            )
    try:
        parse_url(url)  # the query's options (?ssl_ca_certs=..., ?db=...)
    except ValueError as exc:
        raise RedisSettingsError(f"{option}: {shown!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: ``url`` (one node, or a cluster seed with ``cluster``), or
    ``sentinels`` and ``master``. ``username``/``password`` authenticate to the master a
    sentinel names (with a URL, credentials are in the URL); ``sentinel_username`` and
    ``sentinel_password`` to the sentinels themselves (when they have ``requirepass`` or an
    ACL user). No URL and no sentinels: the embedded Redis."""

    url: str = ""
    cluster: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    username: str = ""
    password: str = ""
    sentinel_username: str = ""
    sentinel_password: str = ""

    @property
    def embedded(self) -> bool:
        return not self.url and not self.sentinels

    def validate(self) -> RedisTarget:
        """Self, or a :class:`RedisSettingsError` naming the option at fault."""
        if self.sentinels:
            if not self.master:
                raise RedisSettingsError(
                    "--redis-master: the master's name is required with --redis-sentinel"
                )
            if self.url:
                raise RedisSettingsError(
                    "--redis-url: give either --redis-url or --redis-sentinel, not both"
                )
            if self.cluster:
                raise RedisSettingsError(
                    "--redis-cluster: Redis Cluster has no sentinels; drop --redis-sentinel"
                )
        elif self.master:
            raise RedisSettingsError("--redis-master: needs --redis-sentinel host:port,...")
        elif self.cluster and not self.url:
            raise RedisSettingsError("--redis-cluster: needs --redis-url of a cluster node")
        if self.url:
            check_url(self.url)
        return self

    def describe(self) -> str:
        """Where Redis is, for a log line: never a password."""
        if self.sentinels:
            nodes = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"master {self.master!r} of the sentinels {nodes}"
        url = redacted(self.url)
        return f"Redis Cluster at {url}" if self.cluster else url


def connect(
    target: RedisTarget, *, connect_timeout: float = 1.0, pool_size: int | None = None
) -> RedisClient:
    """A client for ``target`` that decodes responses (``str`` replies).

    ``pool_size``: a blocking pool of that many connections (a burst beyond it waits for a
    connection instead of failing with "Too many connections"); None: redis-py's default pool.
    A cluster client keeps its own pool per node either way.
    """
    target.validate()
    if target.cluster:
        return RedisCluster.from_url(
            target.url, decode_responses=True, socket_connect_timeout=connect_timeout
        )
    if target.sentinels:
        return _sentinel_master(target, connect_timeout, pool_size)
    if pool_size is None:
        return aioredis.Redis.from_url(
            target.url, decode_responses=True, socket_connect_timeout=connect_timeout
        )
    tcp = {} if target.url.startswith("unix:") else {"socket_keepalive": True}
    pool = BlockingConnectionPool.from_url(
        target.url,
        decode_responses=True,
        socket_connect_timeout=connect_timeout,
        max_connections=pool_size,
        timeout=None,
        **tcp,
    )
    pool.connection_class = prompt_writes(pool.connection_class)
    return aioredis.Redis.from_pool(pool)  # closes the pool with the client


_PROMPT_CLASSES: dict[type[Any], type[Any]] = {}


def prompt_writes(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` writing each command in its caller's step.

    redis-py bounds a write by ``socket_timeout`` (5 s by default since redis-py 8) with
    ``asyncio.wait_for``, which on Python 3.11 runs the write in a task of its own: the command
    leaves one turn of the event loop after it was issued. Under load a turn is every other
    ready callback of the process (hundreds of stream messages), and a store timeout, and the
    deadline the script enforces on Redis' clock, both computed before the call, counted that
    turn against the store. Here the write goes out at once (a buffered ``writelines``;
    ``drain`` waits only when the socket's buffer is full, and then within the caller's own
    store timeout); reads keep ``socket_timeout``."""
    prompt = _PROMPT_CLASSES.get(connection_class)
    if prompt is None:

        async def send_packed_command(
            self: Any, command: bytes | str | Sequence[bytes], check_health: bool = True
        ) -> None:
            timeout, self.socket_timeout = self.socket_timeout, None
            try:
                await connection_class.send_packed_command(self, command, check_health)
            finally:
                self.socket_timeout = timeout

        prompt = type(
            f"Prompt{connection_class.__name__}",
            (connection_class,),
            {"send_packed_command": send_packed_command, "__module__": __name__},
        )
        _PROMPT_CLASSES[connection_class] = prompt
    return prompt


class SentinelMasterPool(SentinelConnectionPool):
    """redis-py's Sentinel pool plus a watch of the sentinels (see the module docstring)."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._watch: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_master(), name="sentinel-watch")
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def _watch_master(self) -> None:
        while True:
            await asyncio.sleep(SENTINEL_CHECK_S)
            known = self.master_address
            if known is None:
                continue  # no connection made yet: the next one asks the sentinels anyway
            try:
                address = await self.sentinel_manager.discover_master(self.service_name)
            except (RedisError, OSError):
                continue  # no sentinel answers, or none names a master now (mid-failover)
            if address != known:
                log.warning(
                    "Redis master %r moved from %s:%s to %s:%s",
                    self.service_name,
                    *known,
                    *address,
                )
                # Drops the idle connections and marks the busy ones, which are dropped
                # when released; every new connection asks the sentinels again.
                await self.get_master_address()  # type: ignore[no-untyped-call]
                await self.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]

    async def release(self, connection: Any) -> None:
        # a connection to a node that is no longer the master (opened while the watch
        # switched, or before a switch it was busy through): dropped, it reconnects to the
        # master the sentinels name on its next use
        master = self.master_address
        if (
            master is not None
            and connection.is_connected
            and (connection.host, connection.port) != tuple(master)
        ):
            connection.mark_for_reconnect()
        await super().release(connection)

    async def stop_watch(self) -> None:
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class BlockingSentinelMasterPool(SentinelMasterPool, BlockingConnectionPool):
    """:class:`SentinelMasterPool` whose callers wait for a free connection (as
    :class:`BlockingConnectionPool`) instead of failing past ``max_connections``."""


class SerialSentinel(Sentinel):
    """redis-py's :class:`Sentinel`, asking the sentinels for the master one discovery at a
    time. Its ``discover_master`` moves the sentinel that answered to the front of its list,
    with indices taken before an ``await``: two discoveries at once (every connection being
    reopened after a failover asks) can write one sentinel over another, which then drops out
    of the list (never asked again, its connections left unclosed). One at a time they
    cannot; each takes a round trip or a refused connection, and a failover is rare."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._discovery = asyncio.Lock()

    async def discover_master(self, service_name: str) -> Any:
        async with self._discovery:
            return await super().discover_master(service_name)


class SentinelRedis(aioredis.Redis):
    """The master's client; :meth:`aclose` also closes the sentinels' connections and the
    watch (redis-py leaves both to the caller)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        if isinstance(pool, SentinelMasterPool):
            await pool.stop_watch()
        await super().aclose(close_connection_pool)
        if isinstance(pool, SentinelMasterPool):
            await pool.sentinel_manager.aclose()


def _sentinel_master(
    target: RedisTarget, connect_timeout: float, pool_size: int | None
) -> SentinelRedis:
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": connect_timeout}
    if target.sentinel_username:
        sentinel_kwargs["username"] = target.sentinel_username
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    master_kwargs: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
    }
    if target.username:
        master_kwargs["username"] = target.username
    if target.password:
        master_kwargs["password"] = target.password
    sentinel = SerialSentinel(
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **master_kwargs
    )
    if pool_size is None:
        pool_class: type[SentinelConnectionPool] = SentinelMasterPool
        sized: dict[str, Any] = {}
    else:
        pool_class = BlockingSentinelMasterPool
        sized = {"max_connections": pool_size, "timeout": None}
    client: SentinelRedis = sentinel.master_for(
        target.master, redis_class=SentinelRedis, connection_pool_class=pool_class, **sized
    )
    pool = client.connection_pool
    pool.connection_class = prompt_writes(pool.connection_class)
    return client


class ReplicaWait:
    """``WAIT numreplicas timeout_ms`` after each decision batch, on the connection that ran
    it, so that a verdict is returned only once ``numreplicas`` replicas hold what the batch
    wrote (its debits, dedup records and ledger entries) or ``timeout_ms`` has passed.

    Contract when WAIT answers fewer than ``numreplicas`` within ``timeout_ms``: the batch IS
    committed on the master (a script runs whole or not at all), but a failover in the next
    moments could lose it, so it is never answered as recorded:
    :meth:`~chargepath.store.redis_store.RedisStore.decide` raises
    :class:`~chargepath.store.base.StoreUnreplicatedError` with the store's verdicts, and the
    engine answers by the tenant's failure policy, spooling what the client may act on (a
    report, an admit allowed), and reverses a refused admit that the master recorded. The
    spool's replay is exactly once whether the master's write survives (its dedup record is
    found: every session usage also keeps a request-id record while a replica wait is on) or
    is lost (the replay records it). Such a batch is counted as unreplicated
    (:attr:`unreplicated_batches`, :attr:`unreplicated_usages`, the
    ``chargepath.store.unreplicated`` counter) and logged. WAIT is not consensus either:
    Sentinel promotes the replica with the highest offset it knows of, so ``numreplicas``
    equal to the number of replicas is what makes an acknowledged usage survive the loss of
    the master for certain.

    ``timeout_ms`` must be positive (``WAIT n 0`` blocks for ever) and stay below the store
    timeout, or the caller's timeout answers first. Not for Redis Cluster: the cluster client
    may send the two commands on different connections.
    """

    def __init__(self, numreplicas: int, timeout_ms: int, *, meter: Any = None) -> None:
        if numreplicas < 1 or timeout_ms < 1:
            raise ValueError("numreplicas and timeout_ms must be positive")
        self.numreplicas = numreplicas
        self.timeout_ms = timeout_ms
        self.unreplicated_batches = 0
        self.unreplicated_usages = 0
        self._last_log = float("-inf")
        self._counter: Any = None
        if meter is not None:
            self._counter = meter.create_counter(
                "chargepath.store.unreplicated",
                unit="{usage}",
                description="Decisions returned before WAIT saw them on the required number "
                "of replicas (committed on the master; a failover could lose them)",
            )

    async def run(
        self, client: RedisClient, script: AsyncScript, keys: Sequence[str], args: Sequence[Any],
        usages: int,
    ) -> tuple[Any, int]:  # fmt: skip
        """``script`` (EVALSHA, loaded again on NOSCRIPT: a promoted replica has not seen it),
        then WAIT on the same connection; the script's reply and the number of replicas that
        acknowledged it. ``usages``: how many usages the batch decided, counted as unreplicated
        if too few replicas acknowledged it (0: another write, e.g. a reversal: not counted)."""
        if isinstance(client, RedisCluster):
            raise TypeError("WAIT after a decision is not supported on Redis Cluster")
        for attempt in (1, 2):
            async with client.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.numreplicas, self.timeout_ms)
                reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 1:
                # nothing ran: load the script on this master and run the batch again
                await client.script_load(script.script)
                continue
            if isinstance(reply, Exception):
                raise reply
            break
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.numreplicas and usages:
            self._unreplicated(int(acked), usages)
        return reply, int(acked)

    def _unreplicated(self, acked: int, usages: int) -> None:
        self.unreplicated_batches += 1
        self.unreplicated_usages += usages
        if self._counter is not None:
            self._counter.add(usages)
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.warning(
                "WAIT %d %d: %d replica(s) acknowledged a decision batch; its %d usage(s) are "
                "committed on the master but not replicated yet, answered by the failure "
                "policy and spooled (%d unreplicated so far)",
                self.numreplicas,
                self.timeout_ms,
                acked,
                usages,
                self.unreplicated_usages,
            )
