"""The store contracts, split by use.

* :class:`DecisionStore`: deciding usages (the engine's hot path).
* :class:`PolicyStore`: publishing and loading the versioned policy document.
* :class:`MeteringStore`: both, plus liveness; what the engine takes.
* :class:`StateStore`: grants and live state for the admin API (counters, the recent-decisions
  trail, watching it).
* :class:`LedgerStore`: how billing and the gateway read, acknowledge and trim the ledger.
* :class:`AuditLog`: the append-only trail of admin calls.
* :class:`LeaseStore`: quota leases (grant ahead of use, report, refund, expire).

This module imports no redis (the engine depends on it); :mod:`chargepath.store.redis_store`,
:mod:`chargepath.store.admin` and :mod:`chargepath.store.ledger` implement the contracts on
Redis. The common rules:

* :meth:`DecisionStore.decide` decides a batch of usages of ONE tenant in one atomic step: for
  each usage, in order, the dedup check, the limit checks and debits (all or nothing for admit,
  always for report), the dedup record and the ledger entry are written together or not at all.
  No other decision interleaves with the batch.
* Time is the store's clock (Redis ``TIME``), in milliseconds; amounts are whole units of the
  metric, kept exactly (integers, sub-units for fractional refill rates).
* Any failure to reach the store, or to get an answer in time, raises
  :class:`StoreUnavailableError`. Whether the batch was applied is then unknown; the usages'
  ids make a resend safe.
* A batch decided with a policy version older than the one stamped on the tenant raises
  :class:`StalePolicyError` and writes nothing.
* A batch given a ``deadline`` that comes to run, on the store's clock, after it raises
  :class:`StoreDeadlineError` and writes nothing: a caller answered by the failure policy
  once its deadline passed is not recorded behind its back (unless the batch had started
  before; :meth:`DecisionStore.reverse` is for those).

Implementations must be safe to call concurrently from one event loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from chargepath.core.audit import AuditEvent
from chargepath.core.auth import ApiKey, KeyRecord, Role
from chargepath.core.leases import LeaseAnswer, LeaseAsk, LeaseRecord, LeaseView
from chargepath.core.model import DecisionRecord, Subject, ThresholdEvent, Usage, Verdict
from chargepath.core.plans import PolicyDocument
from chargepath.core.policy import Limit, Resolution

if TYPE_CHECKING:  # the ledger's entry type; no redis import at run time
    from chargepath.store.ledger import LedgerEntry


class StoreUnavailableError(Exception):
    """The store could not be reached, or did not answer within the store timeout."""


class StoreDeadlineError(StoreUnavailableError):
    """The batch came to run after its deadline on the store's clock: nothing was written."""

    def __init__(self, store_now_ms: int) -> None:
        self.store_now_ms = store_now_ms
        super().__init__("store deadline passed before the batch ran: nothing written")


class StoreUnreplicatedError(StoreUnavailableError):
    """The batch was decided and committed on the master, but fewer replicas than required
    acknowledged it within the replica wait (``WAIT``): a failover now could lose it. The
    store's verdicts are in :attr:`verdicts`; a caller must not answer them as recorded
    (the engine answers by the failure policy and spools, and the replay's dedup makes it
    exactly once whether the master's write survives or not)."""

    def __init__(self, verdicts: list[Verdict], acked: int, required: int) -> None:
        self.verdicts = verdicts
        super().__init__(
            f"WAIT: {acked} of {required} replica(s) acknowledged the batch: not durable yet"
        )


class StalePolicyError(Exception):
    """The tenant has been stamped with a newer policy version than the one used."""

    def __init__(self, stamped_version: int) -> None:
        self.stamped_version = stamped_version
        super().__init__(f"policy version {stamped_version} is live")


class PolicyConflictError(Exception):
    """A policy change was computed from a version that is no longer live."""

    def __init__(self, live_version: int) -> None:
        self.live_version = live_version
        super().__init__(f"policy version {live_version} is live")


class DecideItem(NamedTuple):
    """One usage to decide, with the limits the policy resolved for it."""

    usage: Usage
    resolution: Resolution
    decision_id: str
    fingerprint: str
    trace_id: str = ""
    suspended: bool = False


class Reversal(NamedTuple):
    """A usage the store recorded (``decide`` committed it) after its caller had been answered
    by the failure policy and refused (an admit answered DENY or THROTTLE): the reversal cancels
    its ledger entry and gives back what it took from each limit of ``item``'s resolution (a
    bucket never above its capacity, a quota only in the period the late decision debited).
    ``verdict``: what the caller was answered; ``policy_version``: the version the late
    decision used; ``decided_at_ms``: when the late decision was taken, on the store's clock
    (its verdict's ``decided_at_ms``; 0: unknown, and no quota is credited)."""

    item: DecideItem
    verdict: Verdict
    policy_version: int
    decided_at_ms: int = 0


#: How far back Redis' worst recorded AOF flush counts (:class:`StorePersistence`; Redis keeps
#: the last 160 samples of each latency event).
FSYNC_HISTORY_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class StorePersistence:
    """How Redis persists, as it says (``CONFIG GET`` of ``appendonly``, ``appendfsync`` and
    ``save``; ``INFO stats``; ``LATENCY HISTORY``), for sizing the store timeout. On a
    cluster: any node.

    ``fsyncs_every_write``: AOF with ``appendfsync always`` (every write waits for the disk).
    ``forks``: AOF on or RDB ``save`` rules, so Redis forks now and then (an AOF rewrite, a
    snapshot) and the fork stops its main thread. Both None when CONFIG is refused (ACL users
    without ``+config``, managed services that rename it). ``latest_fork_ms``: how long
    Redis' latest fork stopped it (``latest_fork_usec``, rounded up; 0: none yet, or INFO
    refused). ``worst_fsync_ms``: with ``fsyncs_every_write``, the longest flush Redis'
    latency monitor recorded in the last day (``LATENCY HISTORY aof-fsync-always``; 0: none,
    the monitor is off (``latency-monitor-threshold 0``, its default), or LATENCY refused)."""

    fsyncs_every_write: bool | None
    forks: bool | None
    latest_fork_ms: int = 0
    worst_fsync_ms: int = 0


@dataclass(frozen=True, slots=True)
class StoreMemory:
    """The store's memory as its server reports it (Redis INFO memory): bytes used, the
    limit (0: none) and what happens past it (``noeviction``: writes are refused)."""

    used_bytes: int
    limit_bytes: int
    policy: str

    @property
    def utilization(self) -> float | None:
        """used / limit, or None without a limit."""
        return self.used_bytes / self.limit_bytes if self.limit_bytes else None


@dataclass(frozen=True, slots=True)
class PublishedPolicy:
    """A policy document as the store holds it."""

    version: int
    document: PolicyDocument
    changed: bool = False


@dataclass(frozen=True, slots=True)
class AppliedPlanFile:
    """The plan file last applied at a gateway's start, as the store remembers it: the base
    the next start compares a plan file with (see :mod:`chargepath.policy_sync`)."""

    #: The live policy version once the file was applied.
    version: int
    #: SHA-256 of the file's canonical JSON (comments and layout do not count).
    sha: str
    document: PolicyDocument


@dataclass(frozen=True, slots=True)
class LimitReading:
    """A limit's live counter: in whole units and milliseconds, on the store's clock."""

    limit: Limit
    remaining: int
    capacity: int
    used: int
    granted: int
    reset_after_ms: int


@dataclass(frozen=True, slots=True)
class GrantReading:
    """A live grant of quota ``limit``: ``amount`` units until ``expires_at_ms`` (0: the end
    of the period)."""

    grant_id: str
    limit: str
    amount: int
    expires_at_ms: int
    note: str


class DecisionStore(Protocol):
    """Decides usages. ``decide`` is one atomic step per call (see the module docstring):
    dedup, limit checks and debits, dedup record and ledger entry, for every usage of the
    batch, with nothing else interleaved. It raises :class:`StoreUnavailableError` when the
    store cannot answer (the batch may or may not be applied; a resend with the same ids is
    safe) and :class:`StalePolicyError` (nothing written) when the tenant is stamped with a
    newer policy version."""

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
        """Decide ``items`` (all of ``tenant``) atomically; verdicts in the same order.
        ``ok_limits=False``: a verdict with reason OK carries no limit states (the caller's
        basic view; the store keeps them for explain all the same). ``deadline``: the
        event-loop time (``loop.time()``, seconds) at which the caller stops waiting; a batch
        that comes to run later on the store's clock raises :class:`StoreDeadlineError`
        (nothing written). A store that cannot yet tell its clock from the loop's runs the
        batch whenever it comes. ``doubt``: the event-loop time past which the caller may have
        stopped waiting for the reply: a session usage of a batch that runs later (or, the
        store unable to tell, any batch) also keeps a request-id dedup record, which a replay
        of the spooled usage finds (and it finds the replay's). ``replay``: the batch replays
        spooled usages, already acknowledged: no tenant cap refuses them. With a replica
        wait, a batch that too few replicas acknowledged raises
        :class:`StoreUnreplicatedError` (committed on the master, not durable)."""
        ...

    async def reverse(self, tenant: str, reversals: list[Reversal]) -> list[bool]:
        """Cancel usages of ``tenant`` recorded for callers that had been refused (see
        :class:`Reversal`), each in one atomic step: a ledger entry of kind reversal (the
        usage's request id, decision id and amount) is written and the usage's dedup record
        (request id, or session slot) is forgotten, so a resend is decided anew, only while
        that record still holds the reversed decision as recorded. Per reversal, whether it
        was written (False: the record no longer says so, e.g. reversed already). In the same
        step the units the usage took from its limits are given back (a written reversal
        only: a reversal applied twice credits once). Raises
        :class:`StoreUnavailableError` when the store cannot answer."""
        ...


class PolicyStore(Protocol):
    """Holds the live policy document under an increasing version. Publishing is atomic: a
    reader sees the old document or the new one, never a mix. Every call raises
    :class:`StoreUnavailableError` when the store cannot answer."""

    async def publish_policy(
        self,
        document: PolicyDocument,
        *,
        force: bool = False,
        expected_version: int | None = None,
        audit: AuditEvent | None = None,
    ) -> PublishedPolicy:
        """Make ``document`` live under the next version and stamp every tenant it names or
        named. Returns only once every stamp is written (read-your-writes). With
        ``expected_version``, raise :class:`PolicyConflictError` unless it is the live one.
        With ``audit``, append that event to the audit trail in the same atomic step as the
        version change (also when the document is unchanged; not on a conflict), with the
        versions before and after as the store saw them."""
        ...

    async def load_policy(self) -> PublishedPolicy | None:
        """The live policy, or None if none was ever published."""
        ...

    async def policy_version(self) -> int:
        """The live policy version (0 if none); cheap, for polling."""
        ...


class PlanFileStore(PolicyStore, Protocol):
    """A policy store that also remembers the plan file last applied at a start, written in
    the same atomic step as the document computed from it."""

    async def publish_policy(
        self,
        document: PolicyDocument,
        *,
        force: bool = False,
        expected_version: int | None = None,
        audit: AuditEvent | None = None,
        plan_file: PolicyDocument | None = None,
    ) -> PublishedPolicy:
        """As :meth:`PolicyStore.publish_policy`; with ``plan_file``, also record it as the
        file applied (even when ``document`` is the live one already)."""
        ...

    async def load_plan_file(self) -> AppliedPlanFile | None:
        """The plan file last applied at a start, or None if none was recorded."""
        ...


class MeteringStore(DecisionStore, PolicyStore, Protocol):
    """What the engine decides with: decisions and the policy, plus liveness."""

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the store answers."""
        ...

    async def close(self) -> None: ...


class StateStore(Protocol):
    """Grants and live state for the admin API. Amounts are whole units of the limit's
    metric, times are milliseconds on the store's clock (Redis ``TIME``). Every call raises
    :class:`StoreUnavailableError` when the store cannot answer. Reads change nothing."""

    #: How many decisions the trail keeps per tenant beyond the explain window (explain finds
    #: every decision of the window, and these).
    @property
    def recent_length(self) -> int: ...

    #: How long the trail keeps every decision, ms (the explain window: at most the dedup
    #: window).
    @property
    def explain_window_ms(self) -> int: ...

    async def grant(
        self, subject: Subject, limit: Limit, amount: int, expires_at_ms: int, note: str
    ) -> tuple[str, int, int] | None:
        """Add ``amount`` units to quota ``limit`` of ``subject`` until ``expires_at_ms`` (0:
        the end of the period), atomically with the counter it tops up; (grant id, capacity,
        remaining) after it, or None (nothing written) if the expiry is already past."""
        ...

    async def read_limits(
        self, subject: Subject, limits: tuple[Limit, ...]
    ) -> tuple[int, list[LimitReading], list[GrantReading]]:
        """Every limit's live counter for ``subject``, read in one atomic snapshot with the
        store's clock: (now_ms, a reading per limit in the given order, live grants)."""
        ...

    async def recent(
        self, tenant: str, *, subject: Subject | None = None, count: int = 10
    ) -> list[DecisionRecord]:
        """The tenant's newest decisions (narrowed to the subject's slice/key if given),
        newest first, at most ``count``."""
        ...

    async def find_decision(self, tenant: str, decision_id: str) -> DecisionRecord | None:
        """The decision with this id, if the tenant's trail still has it: every decision of the
        explain window, and the tenant's :attr:`recent_length` most recent ones."""
        ...

    def watch(self, tenant: str) -> AsyncIterator[DecisionRecord | ThresholdEvent | None]:
        """New decisions and quota threshold crossings of the tenant as they are written;
        None now and then when there is none (so a caller can notice it went away). Runs
        until closed."""
        ...


class LedgerStore(Protocol):
    """The tenant's billing ledger as billing (``chargepath ledger``) and the gateway read it:
    an append-only log of recorded usages in the order written, each entry with a stream id
    (``<ms>-<n>`` on the store's clock). The full contract (exactly once in the ledger, at
    least once to a consumer group, what is trimmed when) is in :mod:`chargepath.store.ledger`.

    Unlike the decision path, these calls do not translate the backend's errors: a store that
    cannot be reached raises its client's error (for Redis, ``redis.exceptions.RedisError``
    or ``OSError``); the callers are background jobs and a CLI that retry or exit."""

    #: Entries per read of an export.
    page_size: int

    def export(
        self,
        tenant: str,
        since_ms: int | None,
        until_ms: int | None = None,
        *,
        mark: bool = True,
    ) -> AsyncIterator[LedgerEntry]:
        """The entries written in ``[since_ms, until_ms)``, oldest first; with ``mark``,
        marked exported page by page as the caller takes them."""
        ...

    async def mark_exported(self, tenant: str, last_id: str, *, start_id: str = "-") -> int:
        """Record that the entries from ``start_id`` to ``last_id`` were exported (the mark
        only moves forward over a contiguous export), then trim; the number trimmed."""
        ...

    def consume_batches(
        self,
        tenant: str,
        group: str,
        consumer: str,
        *,
        count: int = 100,
        block_ms: int = 1000,
        claim_idle_ms: int | None = None,
        limit: int | None = None,
    ) -> AsyncGenerator[list[tuple[str, LedgerEntry]], None]:
        """Batches of (entry id, entry) delivered to ``consumer`` of ``group`` (created if
        missing): its own pending entries first, then abandoned ones (``claim_idle_ms``),
        then new ones. An entry stays pending until :meth:`ack`."""
        ...

    async def ack(self, tenant: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge ``ids`` for ``group``, then trim; the number acknowledged."""
        ...

    async def groups(self, tenant: str) -> list[str]:
        """The names of the consumer groups of the tenant's ledger; raises if the tenant has
        no ledger yet."""
        ...

    async def lag(self, tenant: str, group: str) -> int:
        """Entries of the ledger not yet acknowledged by ``group`` (LookupError: no such
        ledger or group)."""
        ...

    async def flush_aggregates(self, tenant: str, clock_offset_ms: int = 0) -> int:
        """Move every ended per-interval aggregate into the ledger, atomically (one entry
        each); the number written. Safe to call from any number of processes."""
        ...

    async def close(self) -> None: ...


class AuditLog(Protocol):
    """The trail of admin calls, oldest first. Entries are appended, never edited; the only
    removal is a length cap on the oldest (documented by the implementation). Times are the
    store's clock. Every call raises :class:`StoreUnavailableError` when the store cannot
    answer."""

    async def append(self, event: AuditEvent) -> str:
        """Append ``event`` (its ``at_ms`` and ``event_id`` are ignored); the new event id."""
        ...

    async def read(
        self, *, after: str = "", since_ms: int = 0, tenant: str = "", limit: int = 100
    ) -> tuple[list[AuditEvent], str]:
        """Up to ``limit`` events after the cursor ``after`` (else from ``since_ms``), only
        those affecting ``tenant`` if given; (events, the cursor to read on from)."""
        ...


class KeyNotFoundError(LookupError):
    """No API key has this id."""


class KeyNotRotatableError(Exception):
    """The key is revoked (or already rotated) or expired: make a new one instead."""


class KeyStore(Protocol):
    """API keys, stored hashed (SHA-256 of the secret; never the secret itself).

    Every change (create, rotate, revoke) is one atomic step on the store's clock that also
    moves the change counter (:meth:`epoch`) and announces the key id to :meth:`changes`
    listeners, so that every gateway process can drop a cached key within a second. Any failure
    to reach the store raises :class:`StoreUnavailableError`.
    """

    async def create(
        self,
        tenant: str | None,
        role: Role,
        expires_ms: int | None = None,
        description: str = "",
    ) -> tuple[KeyRecord, ApiKey]:
        """A new key; the returned :class:`ApiKey` holds the plaintext, shown once."""
        ...

    async def get(self, key_id: str) -> KeyRecord | None: ...

    async def list(self, tenant: str | None = None) -> list[KeyRecord]: ...

    async def rotate(self, key_id: str, grace_s: float = 0.0) -> tuple[KeyRecord, ApiKey]:
        """A new key with the same tenant, role, expiry and description; the old one is revoked
        after ``grace_s``. Raises :class:`KeyNotFoundError` or :class:`KeyNotRotatableError`."""
        ...

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke now (never later than an earlier scheduled revocation). Raises
        :class:`KeyNotFoundError`."""
        ...

    async def epoch(self) -> int:
        """The change counter: it moves on every change. Cheap, for polling."""
        ...

    def changes(self) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """A subscription to changes: ``async with store.changes() as ids`` yields the id of
        each key changed from the moment the context is entered. A broken subscription raises
        :class:`StoreUnavailableError` from the iterator; changes made while not subscribed are
        not replayed (poll :meth:`epoch` for those)."""
        ...


class LeaseItem(NamedTuple):
    """One lease ask to apply, with the limits the policy resolved for its subject and metric
    (every one has lease terms: the caller refuses the ask otherwise), the holder's name as
    shown in state (the ask's, else the caller's identity), and its decision id and the
    fingerprint of its content (a retry with the same request id but other content is a
    conflict, as for a usage)."""

    ask: LeaseAsk
    resolution: Resolution
    decision_id: str
    fingerprint: str
    holder: str
    trace_id: str = ""
    suspended: bool = False


class LeaseStore(Protocol):
    """Quota leases, kept in the store so that a gateway restart loses nothing.

    :meth:`ask` applies a batch of asks of ONE tenant in one atomic step (one script), in
    order, on the store's clock; per ask, together or not at all:

    * the dedup record of its request id (a retry within the dedup window returns the first
      answer, ``replayed``, and changes nothing);
    * ``used``: one ledger entry carrying the lease id, units within what the lease still has
      as recorded, beyond it as overage, which is debited to the limits (they may go into
      debt, as for a report). On a lease expired or released before, the whole ``used`` is
      overage and the answer is REASON_LEASE_EXPIRED;
    * ``requested``: a grant sized by :func:`chargepath.core.leases.grant_size`, taken from
      every limit of the item's resolution, all or nothing (none: THROTTLE or DENY with
      ``retry_after``, as an admit of one unit would be);
    * ``release``: every unit granted and not reported goes back: a bucket's level up (never
      above its capacity), a quota's counter down only while in the period the units came
      from.

    A lease lives until ``valid_for``: expiry gives back what is left like a release, by
    :meth:`sweep` or lazily when the lease is next touched. Amounts are whole units, times
    milliseconds on the store's clock (Redis ``TIME``). :class:`StoreUnavailableError`,
    :class:`StalePolicyError` and :class:`StoreDeadlineError` mean what they mean for
    :meth:`DecisionStore.decide`. Implementations must be safe to call concurrently from one
    event loop."""

    async def ask(
        self,
        tenant: str,
        policy_version: int,
        items: list[LeaseItem],
        *,
        deadline: float | None = None,
    ) -> list[LeaseAnswer]:
        """Apply ``items`` (all of ``tenant``) atomically; answers in the same order."""
        ...

    async def sweep(self, tenant: str, *, limit: int = 1000) -> int:
        """Expire up to ``limit`` leases of ``tenant`` whose validity has passed on the
        store's clock, each refunded as on release, atomically; the number expired."""
        ...

    async def leases(
        self, subject: Subject, *, metric: str = "", limit: int = 1000
    ) -> tuple[int, list[LeaseView]]:
        """(now_ms, the open leases of exactly ``subject``, narrowed to ``metric`` if given),
        soonest expiry first, at most ``limit``; one consistent read."""
        ...

    async def find_decision(self, tenant: str, decision_id: str) -> LeaseRecord | None:
        """The answered lease ask with this decision id, if it is among the tenant's most
        recent ones (about as many as the decisions trail keeps)."""
        ...


class RoomEvents(Protocol):
    """Announcements that a tenant may have more room than before: a grant, a new policy
    version reaching it. Each is published in the same atomic step as the change, after it
    (``store/room.py``). The over-limit cache drops the tenant's entries on one."""

    def events(self) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """``async with events() as tenants``: once entered, the subscription is live and
        yields the tenant of each announcement made from then on. A broken or silent
        subscription raises :class:`StoreUnavailableError` (from the enter or the iterator);
        announcements made while not subscribed are not replayed."""
        ...
