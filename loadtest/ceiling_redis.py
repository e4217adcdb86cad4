"""The Redis ceiling: the gateway's own decision script, run straight against Redis.

One operation here is what the gateway's store does for one Check (a batch of one usage) or for
one stream message (a batch of ``--batch`` usages of one tenant): one EVALSHA of
``decide.lua`` through :class:`chargepath.store.redis_store.RedisStore` (same keys, arguments
and reply parsing as in the gateway), with the inputs the engine would give it (resolved limits,
decision ids, fingerprints), and nothing of gRPC, validation or telemetry around it. Many
batches are in flight at once, over a pool of connections.

:class:`BatchDecision` is the seam between the load generator and the store: the generator
calls it and knows nothing else of the store. :func:`prepare` returns the one that uses the
gateway's store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import redis.asyncio

from chargepath.core.model import Mode as UsageMode
from chargepath.core.model import Subject, Usage
from chargepath.core.policy import Policy
from chargepath.engine import fingerprint, new_decision_id
from chargepath.policy_files import load_policy_file
from chargepath.store.base import DecideItem
from chargepath.store.redis_store import RedisStore
from chargepath_protos.v1 import metering_pb2 as pb
from loadtest.workload import Workload

Mode = Literal["admit", "report"]


class BatchDecision(Protocol):
    """Decides one batch of ``batch_size`` usages of one tenant in Redis through ``client``.

    Returns one decision per usage, as ``chargepath.v1.Decision`` numbers (1 ALLOW, 2
    THROTTLE, 3 DENY). Any exception counts as a failed operation (by its type name). Must be
    safe to call concurrently from one event loop.
    """

    async def __call__(self, client: redis.asyncio.Redis, batch_size: int) -> Sequence[int]: ...


async def prepare(
    client: redis.asyncio.Redis, workload: Workload, mode: Mode, id_prefix: str
) -> BatchDecision:
    """Publish the workload's plan file to this Redis (as the gateway does at start; publishing
    the same document again keeps its version) and return the store's batch decision."""
    store = RedisStore(client)
    published = await store.publish_policy(load_policy_file(workload.plans))
    policy = Policy(published.document, published.version)
    return StoreBatchDecision(policy, workload, mode, id_prefix)


class StoreBatchDecision:
    """:class:`BatchDecision` through the gateway's :class:`RedisStore`.

    Admits (``check``) carry unique request ids, deduplicated like Check calls. Reports
    (``stream``) carry a session id and increasing sequences, like StreamUsage: a session is
    used by one batch at a time (as a stream is by the gateway), so sequences reach Redis in
    order; a batch that finds every session busy opens a new one.
    """

    def __init__(self, policy: Policy, workload: Workload, mode: Mode, id_prefix: str) -> None:
        self._policy = policy
        self._workload = workload
        self._mode = mode
        self._prefix = id_prefix
        self._store: RedisStore | None = None
        self._n = 0
        self._idle_sessions: list[tuple[str, int]] = []
        self._sessions = 0

    async def __call__(self, client: redis.asyncio.Redis, batch_size: int) -> list[int]:
        store = self._store
        if store is None or store.client is not client:
            store = self._store = RedisStore(client)
        w = self._workload
        if self._mode == "admit":
            tenant = w.check_tenant
            usages = [self._admit() for _ in range(batch_size)]
            session = None
        else:
            tenant = w.stream_tenant
            session = self._take_session()
            usages, session = self._reports(session, batch_size)
        policy = self._policy
        items = [
            DecideItem(u, policy.resolve(u.subject, u.metric), new_decision_id(), fingerprint(u))
            for u in usages
        ]
        try:
            verdicts = await store.decide(
                tenant, policy.version, items, ok_limits=w.view != pb.VERDICT_VIEW_BASIC
            )
        finally:
            if session is not None:
                self._idle_sessions.append(session)
        return [int(v.decision) for v in verdicts]

    def _admit(self) -> Usage:
        n = self._n
        self._n = n + 1
        w = self._workload
        return Usage(
            request_id=f"{self._prefix}-{n}",
            subject=Subject(*w.check_subject(n)),
            metric=w.check_metric,
            amount=w.check_amount,
            mode=UsageMode.ADMIT,
        )

    def _take_session(self) -> tuple[str, int]:
        if self._idle_sessions:
            return self._idle_sessions.pop()
        self._sessions += 1
        return (f"{self._prefix}-s{self._sessions}", 0)

    def _reports(self, session: tuple[str, int], n: int) -> tuple[list[Usage], tuple[str, int]]:
        session_id, sequence = session
        w = self._workload
        usages = []
        for seq in range(sequence + 1, sequence + n + 1):
            usages.append(
                Usage(
                    request_id=f"{session_id}-{seq}",
                    subject=Subject(*w.stream_subject(seq)),
                    metric=w.stream_metric,
                    amount=w.stream_amount,
                    mode=UsageMode.REPORT,
                    session_id=session_id,
                    sequence=seq,
                )
            )
        return usages, (session_id, sequence + n)
