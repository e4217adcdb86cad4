"""The Redis implementation of :class:`~chargepath.store.base.MeteringStore`.

Key layout (every key of a tenant shares the hash tag ``{tenant}``, so a decision's keys are
in one slot and the scripts run unchanged on Redis Cluster):

=============================  ==========================================================
``cp:policy``                  hash: ``v`` live version, ``sha`` digest, ``doc`` JSON; the
                               plan file last applied at a start: ``file_doc`` JSON,
                               ``file_sha`` digest, ``file_v`` version then
``cp:{cp:policy}:audit``       stream: the audit trail of admin calls (store/audit.py)
``cp:{T}:ent``                 hash: ``v`` policy version stamped on the tenant
``cp:{T}:ledger``              stream: one entry per recorded usage (billing reads it)
``cp:{T}:d:<request_id>``      string: the first verdict of a request id, for the dedup window
``cp:{T}:s:<session_id>``      string: a stream session's highest sequence + replay slots
``cp:{T}:r:<limit>:<sl>:<k>``  hash: token bucket level (sub-units) and its time; deleted
                               when full, expires when it would be full again
``cp:{T}:q:<limit>:<sl>:<k>``  hash: quota period start, used units, granted units
``cp:{T}:cap:<cap>``           sorted set: the live members of a tenant cap (request_ids,
                               sessions, slices, keys), scored with their records' expiry
                               (store/scripts/lib/caps.lua); expires with its last member
=============================  ==========================================================

Scripts are package data (``store/scripts/*.lua``, with shared libraries in
``store/scripts/lib/``), assembled with their constants by :mod:`chargepath.store.protocol`,
registered once and run with EVALSHA; redis-py reloads them on NOSCRIPT (e.g. after a Redis
restart). The quota's granted units live in a hash of their own (``cp:{T}:g:...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from redis.exceptions import RedisError, ResponseError

from chargepath.core.audit import AuditEvent
from chargepath.core.model import Verdict
from chargepath.core.plans import PUBLISHED, PolicyDocument
from chargepath.store.audit import AUDIT_KEY, event_fields
from chargepath.store.audit import MAX_ENTRIES as AUDIT_MAX_ENTRIES
from chargepath.store.base import (
    FSYNC_HISTORY_S,
    AppliedPlanFile,
    DecideItem,
    PolicyConflictError,
    PublishedPolicy,
    Reversal,
    StoreMemory,
    StorePersistence,
    StoreUnavailableError,
    StoreUnreplicatedError,
)
from chargepath.store.clock import StoreClock
from chargepath.store.connect import RedisClient, RedisTarget, ReplicaWait, connect
from chargepath.store.protocol import (
    REPLY_DECIDED,
    REPLY_LATE,
    REPLY_REFUSED,
    decode_reply,
    encode_batch,
    encode_reversal,
)

# The key layout and the script loader live in the protocol module; importers of this module
# keep finding them here.
from chargepath.store.protocol import entitlement_key as entitlement_key
from chargepath.store.protocol import grants_key as grants_key
from chargepath.store.protocol import ledger_key as ledger_key
from chargepath.store.protocol import limit_key as limit_key
from chargepath.store.protocol import read_script as read_script
from chargepath.store.protocol import scope_instance as scope_instance
from chargepath.store.protocol import tenant_prefix as tenant_prefix

POLICY_KEY = "cp:policy"
#: Connections of the store's blocking pool (the engine admits fewer store calls at once,
#: ``EngineSettings.store_max_in_flight``, so that an admitted call never waits for one).
POOL_SIZE = 64


class RedisStore:
    """Chargepath's store on Redis (or Valkey, or Redis Cluster) through redis.asyncio.

    ``dedup_window_ms``: how long a request id's first verdict is kept (168 bytes per request
    id, i.e. ~170 MB per million ids in the window). ``session_ttl_ms``: how long an
    idle stream session is remembered. ``session_window``: how many recent verdicts a session
    keeps for resends (81 bytes each). ``explain_window_ms``: how long the decision trail keeps
    every decision, so that ``explain`` finds it by id whatever the tenant's rate (about 240 to
    300 bytes per decision); None (the default): the dedup window, whatever it is set to.
    Beyond it the trail keeps about ``recent_length`` decisions per tenant. ``clock_offset_ms``
    shifts Redis' clock and exists for tests of period boundaries only.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        dedup_window_ms: int = 600_000,
        session_ttl_ms: int = 86_400_000,
        session_window: int = 128,
        recent_length: int = 1000,
        explain_window_ms: int | None = None,
        clock_offset_ms: int = 0,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        self.client = client
        #: WAIT after each decision batch (high availability; None: no WAIT).
        self.replica_wait = replica_wait
        self.dedup_window_ms = dedup_window_ms
        self.session_ttl_ms = session_ttl_ms
        self.session_window = session_window
        self.recent_length = recent_length
        self._explain_window_ms = explain_window_ms
        self.clock_offset_ms = clock_offset_ms
        #: Redis' clock as seen from this process: how a caller's deadline is sent.
        self.clock = StoreClock()
        self._decide = client.register_script(read_script("decide.lua"))
        self._reverse = client.register_script(read_script("reverse.lua"))
        self._publish = client.register_script(read_script("publish.lua"))
        self._stamp = client.register_script(read_script("stamp.lua"))

    @property
    def explain_window_ms(self) -> int:
        """How long the trail keeps every decision, ms: the one set, never more than the dedup
        window (the settings refuse more at start)."""
        if self._explain_window_ms is None:
            return self.dedup_window_ms
        return min(self._explain_window_ms, self.dedup_window_ms)

    @explain_window_ms.setter
    def explain_window_ms(self, value: int) -> None:
        self._explain_window_ms = value

    @classmethod
    def from_url(
        cls, url: str, *, cluster: bool = False, connect_timeout: float = 0.05, **kwargs: Any
    ) -> RedisStore:
        return cls.connect(RedisTarget(url=url, cluster=cluster), connect_timeout, **kwargs)

    @classmethod
    def connect(
        cls, target: RedisTarget, connect_timeout: float = 0.05, **kwargs: Any
    ) -> RedisStore:
        """A store on ``target`` (one node, a cluster, or Sentinel's master). A blocking pool:
        a burst beyond it waits for a connection (within the caller's store timeout) instead
        of failing with "Too many connections". Redis is single-threaded, so more connections
        than this would not decide faster."""
        return cls(connect(target, connect_timeout=connect_timeout, pool_size=POOL_SIZE), **kwargs)

    async def decide(
        self,
        tenant: str,
        policy_version: int,
        items: list[DecideItem],
        *,
        ok_limits: bool = True,
        deadline: float | None = None,
        doubt: float | None = None,
        replay: bool = False,
    ) -> list[Verdict]:
        loop = asyncio.get_running_loop()
        deadline_ms = 0 if deadline is None else self.clock.deadline_ms(deadline)
        doubt_ms = 0
        if doubt is not None:
            # with a replica wait any batch may come back unreplicated and be spooled: always;
            # without a clock estimate (0) too: a record too many costs memory, one too few a
            # double
            doubt_ms = 1 if self.replica_wait is not None else self.clock.deadline_ms(doubt) or 1
        keys, args = encode_batch(
            tenant,
            policy_version,
            items,
            self,
            ok_limits=ok_limits,
            deadline_ms=deadline_ms,
            doubt_ms=doubt_ms,
            replay=replay,
        )
        sent = loop.time()
        acked = -1
        try:
            if self.replica_wait is None:
                reply = await self._decide(keys=keys, args=args)
            else:  # HA: the same EVALSHA, then WAIT on its connection (connect.ReplicaWait)
                reply, acked = await self.replica_wait.run(
                    self.client, self._decide, keys, args, len(items)
                )
        except RedisError as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if reply[0] == REPLY_DECIDED:  # its now_ms: Redis' TIME plus the clock offset
            self.clock.observe(sent, loop.time(), int(reply[1]) - self.clock_offset_ms)
        elif reply[0] == REPLY_LATE:  # its time_ms: TIME
            self.clock.observe(sent, loop.time(), int(reply[1]))
        verdicts = decode_reply(reply, items, policy_version)
        if self.replica_wait is not None and acked < self.replica_wait.numreplicas:
            raise StoreUnreplicatedError(verdicts, acked, self.replica_wait.numreplicas)
        return verdicts

    async def reverse(self, tenant: str, reversals: list[Reversal]) -> list[bool]:
        out = []
        try:
            for r in reversals:
                keys, args = encode_reversal(tenant, r, self.session_window, self.clock_offset_ms)
                if self.replica_wait is None:
                    out.append(bool(int(await self._reverse(keys=keys, args=args))))
                    continue
                # HA: a reversal is done once the replicas hold it, as a decision is recorded
                # once they hold it. Its reply is trusted only then: a node that a failover
                # has replaced (no replica follows it any more) answers 0 for a decision it
                # never saw, and a reversal it writes is lost with it. Not acknowledged: the
                # engine tries again (a reversal applied twice writes once).
                wait = self.replica_wait
                reply, acked = await wait.run(self.client, self._reverse, keys, args, 0)
                if acked < wait.numreplicas:
                    raise StoreUnavailableError(
                        f"WAIT: {acked} of {wait.numreplicas} replica(s) "
                        "acknowledged a reversal: not durable yet"
                    )
                out.append(bool(int(reply)))
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return out

    async def publish_policy(
        self,
        document: PolicyDocument,
        *,
        force: bool = False,
        expected_version: int | None = None,
        audit: AuditEvent | None = None,
        plan_file: PolicyDocument | None = None,
    ) -> PublishedPolicy:
        body = document.canonical_json()
        keys = [POLICY_KEY]
        args: list[str | int] = [
            body,
            document.digest(),
            "1" if force else "0",
            "" if expected_version is None else expected_version,
            "" if plan_file is None else plan_file.canonical_json(),
            "" if plan_file is None else plan_file.digest(),
        ]
        if audit is not None:
            keys.append(AUDIT_KEY)
            args += [AUDIT_MAX_ENTRIES, *event_fields(audit, versions=False)]
        try:
            previous = await self.load_policy()
            version, changed = await self._publish(keys=keys, args=args)
            if version == REPLY_REFUSED:
                raise PolicyConflictError(int(changed))
            tenants = {t.name for t in document.tenants}
            if previous is not None:
                tenants |= {t.name for t in previous.document.tenants}
            for tenant in sorted(tenants):
                await self._stamp(keys=[entitlement_key(tenant)], args=[version, tenant])
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return PublishedPolicy(int(version), document, bool(changed))

    async def load_policy(self) -> PublishedPolicy | None:
        try:
            v, doc = await self.client.hmget(POLICY_KEY, ["v", "doc"])
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if v is None or doc is None:
            return None
        return PublishedPolicy(int(v), PolicyDocument.model_validate_json(doc, context=PUBLISHED))

    async def load_plan_file(self) -> AppliedPlanFile | None:
        try:
            v, sha, doc = await self.client.hmget(POLICY_KEY, ["file_v", "file_sha", "file_doc"])
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if v is None or sha is None or doc is None:
            return None
        return AppliedPlanFile(
            int(v), str(sha), PolicyDocument.model_validate_json(doc, context=PUBLISHED)
        )

    async def policy_version(self) -> int:
        try:
            v = await self.client.hget(POLICY_KEY, "v")
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return int(v) if v else 0

    async def memory(self) -> StoreMemory:
        """Redis' INFO memory; on a cluster, the node nearest its limit (the first to refuse
        writes)."""
        try:
            info = await self.client.info("memory")
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        nodes = (
            [info] if "used_memory" in info else [v for v in info.values() if isinstance(v, dict)]
        )
        readings = [
            StoreMemory(
                int(n.get("used_memory", 0)),
                int(n.get("maxmemory", 0)),
                str(n.get("maxmemory_policy", "")),
            )
            for n in nodes
        ]
        if not readings:
            raise StoreUnavailableError("INFO memory: no used_memory in the reply")
        return max(readings, key=lambda m: (m.utilization or 0.0, m.used_bytes))

    async def persistence(self) -> StorePersistence:
        """How Redis persists (:class:`~chargepath.store.base.StorePersistence`): ``CONFIG
        GET`` of ``append*`` and ``save`` (fields None when refused, by ACL users without
        ``+config`` or managed services that rename it) and ``INFO stats``'
        ``latest_fork_usec`` (0 when refused); with ``appendfsync always``, the worst flush of
        ``LATENCY HISTORY aof-fsync-always`` in the last :data:`FSYNC_HISTORY_S` (0 when
        refused or the latency monitor is off). On a cluster, any node (the largest fork).
        Raises :class:`StoreUnavailableError` when Redis does not answer (a refusal is an
        answer; an outage says nothing about the disk and must not change the timeout)."""
        try:
            try:
                append = _nodes(await self.client.config_get("append*"), "appendfsync")
                save = _nodes(await self.client.config_get("save"), "save")
            except ResponseError:  # CONFIG refused
                append = save = []
            try:
                info = await self.client.info("stats")
            except ResponseError:  # INFO refused
                info = {}
            every_write: bool | None = None
            forks: bool | None = None
            if append and save:
                every_write = any(
                    n.get("appendonly") == "yes" and n.get("appendfsync") == "always"
                    for n in append
                )
                forks = any(n.get("appendonly") == "yes" for n in append) or any(
                    str(n["save"]).strip() for n in save
                )
            flushes: Any = []
            if every_write:
                with contextlib.suppress(ResponseError):  # LATENCY refused
                    flushes = await self.client.execute_command(
                        "LATENCY HISTORY", "aof-fsync-always"
                    )
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        fork_ms = 0
        for n in _nodes(info, "latest_fork_usec"):
            with contextlib.suppress(TypeError, ValueError):
                fork_ms = max(fork_ms, -(-int(n["latest_fork_usec"]) // 1000))
        return StorePersistence(every_write, forks, fork_ms, worst_flush_ms(flushes, time.time()))

    async def prepare(self, connections: int = POOL_SIZE // 2) -> None:
        """Ready the store for traffic before the gateway serves: register every script
        (``SCRIPT LOAD``: the first decisions then need no NOSCRIPT round trip and no script
        upload) and open ``connections`` connections of the pool (concurrent PINGs), so that
        the first burst of decisions does not pay for TCP set-up and authentication within
        its store timeout. The connections are best effort (a TLS handshake may miss the
        connect timeout on a busy machine: that connection is made later, when a call needs
        it); StoreUnavailableError if the scripts cannot be loaded."""
        try:
            for script in (self._decide, self._reverse, self._publish, self._stamp):
                await self.client.script_load(script.script)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        await asyncio.gather(
            *(self.client.ping() for _ in range(connections)), return_exceptions=True
        )

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


def worst_flush_ms(history: Any, now_s: float) -> int:
    """The longest stall of a ``LATENCY HISTORY`` reply (``[[unix seconds, ms], ...]``) in
    the last :data:`FSYNC_HISTORY_S` before ``now_s``; 0 for none (or a reply of another
    shape)."""
    worst = 0
    if isinstance(history, list):
        for sample in history:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                if now_s - int(sample[0]) <= FSYNC_HISTORY_S:
                    worst = max(worst, int(sample[1]))
    return worst


def _nodes(reply: Any, name: str) -> list[dict[Any, Any]]:
    """The per-node parts of a CONFIG GET or INFO reply that hold ``name``: the reply itself
    from one Redis, one dict per node from a cluster (a reply by node); [] when none does."""
    if not isinstance(reply, dict):
        return []
    values: dict[Any, Any] = reply
    if name in values:
        return [values]
    return [v for v in values.values() if isinstance(v, dict) and name in v]
