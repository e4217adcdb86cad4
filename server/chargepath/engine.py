"""The engine: turns usages into verdicts with a store, a versioned policy, and the tenant's
failure policy when the store cannot answer.

It knows nothing of gRPC or Redis: it speaks core types, the store contract
(:class:`~chargepath.store.base.MeteringStore`) and, for the usages it answers while the store
is away, the spool (:class:`~chargepath.store.spool.Spool`, a local file).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from chargepath.core.allowance import LocalAllowance
from chargepath.core.breaker import BreakerState, CircuitBreaker
from chargepath.core.model import (
    Decision,
    FieldViolation,
    InvalidUsageError,
    Mode,
    Reason,
    Usage,
    Verdict,
)
from chargepath.core.overlimit import OverLimitCache
from chargepath.core.policy import Policy
from chargepath.core.validation import MAX_BATCH, validate_usage
from chargepath.deadline import StoreDeadline
from chargepath.store.base import (
    DecideItem,
    MeteringStore,
    Reversal,
    StalePolicyError,
    StoreDeadlineError,
    StoreUnavailableError,
    StoreUnreplicatedError,
)
from chargepath.store.spool import Spool, SpoolClosedError, SpooledUsage
from chargepath.telemetry import Telemetry

log = logging.getLogger("chargepath.engine")

STALE_RETRIES = 3
#: A store call that timed out goes on in the background, this long at most (then it is
#: cancelled), so that its late reply is reconciled with the verdicts already given.
LATE_REPLY_WAIT_S = 10.0
#: Store calls followed in the background at once, at most; past it one is cancelled unread
#: (counted as ``abandoned``).
MAX_LATE_CALLS = 256
#: Pauses between the attempts at writing the reversals of one late reply (each attempt 2 s at
#: most): about 30 s in all, so that a reversal outlasts a Sentinel failover (about 11 s here)
#: or a Redis restart. A reversal is conditional and idempotent (``reverse.lua``), so trying
#: again is always safe.
REVERSE_PAUSES_S = (0.2, 0.8, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)
REVERSE_ATTEMPTS = len(REVERSE_PAUSES_S) + 1
REVERSE_TIMEOUT_S = 2.0
#: How long a usage spooled while its store call is still in flight is held from the replay
#: (ms): the late reply settles it first (:meth:`Engine._reconcile`); if this process dies
#: meanwhile the hold lapses and the replay finds the store's records (docs/design.md).
SPOOL_HOLD_MS = int(LATE_REPLY_WAIT_S * 1000) + 5_000

#: A Check waiting for its tenant's next store call: the usage, its trace id, its verdict.
_Pending = tuple[Usage, str, "asyncio.Future[Verdict]"]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """``store_timeout_s`` bounds every store call for one usage (plus
    ``store_timeout_per_usage_s`` per further usage of a batch), from the moment the call may
    use a connection: past it the failure policy decides.

    ``store_max_in_flight`` bounds the store calls a process has in flight (admission): a call
    beyond it waits for one to finish, at most ``store_queue_timeout_s``, before its store
    timeout starts, so that the timeout measures the store and not this process's own backlog
    (it stays below the store's connection pool, 64, so an admitted call never waits for a
    connection). A call still not admitted after ``store_queue_timeout_s`` is decided by the
    failure policy (counted with cause ``queue``): the gateway, not the store, was too slow.

    The breaker opens on evidence only (:mod:`chargepath.core.breaker`): ``breaker_failures``
    consecutive connection errors, or a failed probe (a PING bounded by
    ``store_probe_timeout_s``) after a store timeout. While it is open the store is probed every
    ``breaker_cooldown_s``; the first probe that succeeds closes it.

    ``spool_timeout_s`` bounds the spool write a degraded verdict waits for (past it, the usage
    counts as not spooled)."""

    store_timeout_s: float = 0.05
    store_timeout_per_usage_s: float = 0.0005
    store_max_in_flight: int = 48
    store_queue_timeout_s: float = 0.05
    store_probe_timeout_s: float = 0.2
    breaker_failures: int = 5
    breaker_cooldown_s: float = 0.25
    spool_timeout_s: float = 0.5


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def new_decision_id() -> str:
    """32 hex characters: 48 bits of milliseconds (sortable) and 80 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def tenant_tag(tenant: str) -> str:
    """4 hex characters from the tenant's name: characters 12-15 of the ids of its decided
    batches, so that a decision id alone leads to its tenant (ExplainDecision without one)."""
    return hashlib.blake2b(tenant.encode(), digest_size=2).hexdigest()


def decision_time_ms(decision_id: str) -> int | None:
    """The milliseconds a decision id was made at (its first 12 hex characters), or None."""
    try:
        return int(decision_id[:12], 16)
    except ValueError:
        return None


def new_decision_ids(n: int, tenant: str) -> list[str]:
    """``n`` decision ids for a batch of ``tenant``, made with one random draw: 48 bits of
    milliseconds (sortable), 16 bits of :func:`tenant_tag`, 48 random bits shared by the batch,
    and 16 bits numbering the usages of the batch (at most 65,536)."""
    base = f"{time.time_ns() // 1_000_000:012x}{tenant_tag(tenant)}{os.urandom(6).hex()}"
    return [f"{base}{i:04x}" for i in range(n)]


def fingerprint(u: Usage) -> str:
    """What must match for a resend to be the same usage (the tenant is in the key)."""
    raw = f"{u.subject.slice}\x1f{u.subject.key}\x1f{u.metric}\x1f{u.amount}\x1f{int(u.mode)}"
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


def session_fingerprint(u: Usage) -> str:
    """What must match for a session usage to be a resend of the one its sequence was decided
    for: its request id and its content (16 hex characters, what a session slot keeps,
    ``SESSION_FP_CHARS``). Another one is a reused sequence, refused."""
    raw = (
        f"{u.request_id}\x1f{u.subject.slice}\x1f{u.subject.key}\x1f{u.metric}\x1f{u.amount}"
        f"\x1f{int(u.mode)}"
    )
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


class LocalLeases(Protocol):
    """Admits answered from leases this process holds (``chargepath.gateway_leases``)."""

    def answer(
        self, usage: Usage, policy_version: int, *, retried: bool = False
    ) -> Verdict | None: ...


class Engine:
    """Decides usages. One instance per process; safe for concurrent use from one loop."""

    def __init__(
        self,
        store: MeteringStore,
        settings: EngineSettings,
        telemetry: Telemetry,
        *,
        spool: Spool | None = None,
        clock_ms: Callable[[], int] = monotonic_ms,
        overlimit: OverLimitCache | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.telemetry = telemetry
        #: Where the usages answered while the store is away go (None: nowhere; their
        #: verdicts then say neither recorded nor spooled). Opened and closed by its owner.
        self.spool = spool
        #: Refused admits remembered until something can fit (``serve --overlimit-cache``;
        #: None: off). Its owner (``chargepath.room_watch``) turns it on once subscribed to
        #: the store's room events.
        self.overlimit = overlimit
        #: Leases this process holds on hot subjects (limits with ``lease: {gateway:
        #: true}``); set by ``chargepath.app`` once built (None: every admit to the store).
        self.leased: LocalLeases | None = None
        self.policy = Policy.empty()
        self.breaker = CircuitBreaker(
            clock_ms,
            failures=settings.breaker_failures,
            cooldown_ms=int(settings.breaker_cooldown_s * 1000),
        )
        self.allowance = LocalAllowance(clock_ms)
        #: store calls in flight (admission: see EngineSettings.store_max_in_flight)
        self._admission = asyncio.Semaphore(settings.store_max_in_flight)
        self._probe_task: asyncio.Future[None] | None = None
        self._closing = False  # close() was called: no new probe, a running one ends
        #: set when a store call that timed out got its reply: wakes a waiting probe
        self._store_answered = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._degraded_logged_at = 0.0
        self._degraded_since_log = 0
        self._pending: dict[str, list[_Pending]] = {}
        self._flushing: set[asyncio.Future[None]] = set()
        #: store calls that timed out, followed until their late reply is reconciled
        self._late: set[asyncio.Future[None]] = set()
        #: spool holds being ended (Spool.settle_held), awaited on drain
        self._unholding: set[asyncio.Future[None]] = set()
        self._late_logged_at = 0.0
        self._late_since_log: dict[str, int] = {}
        self._late_ids: list[str] = []
        self._late_log_due = False

    # -- policy -------------------------------------------------------------------------

    async def reload_policy(self, min_version: int = 0) -> Policy:
        """Load the live policy from the store if it is newer than the one in use."""
        async with self._reload_lock:
            if min_version and self.policy.version >= min_version:
                return self.policy
            published = await self.store.load_policy()
            if published is not None and published.version > self.policy.version:
                self.policy = Policy(published.document, published.version)
                log.info("policy version %d loaded", published.version)
            return self.policy

    # -- deciding -----------------------------------------------------------------------

    def violations(self, usage: Usage, policy: Policy, *, on_stream: bool) -> list[FieldViolation]:
        out = validate_usage(usage, on_stream=on_stream)
        if (
            usage.metric not in policy.metrics
            and usage.metric
            and not any(v.field == "metric" for v in out)
        ):
            out.append(
                FieldViolation(
                    "metric", f"unknown metric {usage.metric!r}: not in the policy's catalog"
                )
            )
        return out

    async def _catch_up(self, usages: list[Usage]) -> None:
        """A metric unknown to this process's policy may be known to a newer one: check the
        live version (one store round trip) before calling the usage invalid."""
        if all(u.metric in self.policy.metrics for u in usages):
            return
        try:
            version = await asyncio.wait_for(
                self.store.policy_version(), self.settings.store_timeout_s
            )
            if version > self.policy.version:
                await asyncio.wait_for(
                    self.reload_policy(version), self.settings.store_timeout_s * 4
                )
        except (StoreUnavailableError, TimeoutError):
            pass  # decide with what we have; the store refuses a stale version anyway

    async def check(self, usage: Usage, *, retried: bool = False) -> Verdict:
        """Decide one usage; raise :class:`InvalidUsageError` if it is invalid. ``retried``:
        the caller marked it as a retry (never answered by the over-limit cache)."""
        if usage.metric not in self.policy.metrics:  # else no coroutine: nothing to catch up
            await self._catch_up([usage])
        bad = self.violations(usage, self.policy, on_stream=False)
        if bad:
            raise InvalidUsageError(bad)
        cache = self.overlimit
        with self.telemetry.decision_spans([usage]) as spans:
            leased = self.leased
            if leased is not None and usage.mode is Mode.ADMIT:
                local = leased.answer(usage, self.policy.version, retried=retried)
                if local is not None:
                    if cache is not None:
                        cache.note_allowed(usage)
                    spans.mark_leased()
                    return spans.finish([local._replace(trace_id=spans.trace_ids[0])])[0]
            if cache is None or usage.mode is not Mode.ADMIT:
                verdict = await self._coalesce(usage, spans.trace_ids[0])
            else:
                cached = cache.answer(usage, self.policy.version, retried=retried)
                if cached is not None:
                    spans.mark_cached()
                    return spans.finish([cached._replace(trace_id=spans.trace_ids[0])])[0]
                ticket = cache.ticket()
                verdict = await self._coalesce(usage, spans.trace_ids[0])
                cache.learn(usage, verdict, ticket)
            v = spans.finish([verdict])[0]
        if v.reason is Reason.INVALID_USAGE:
            raise InvalidUsageError(list(v.violations))
        return v

    def _coalesce(self, usage: Usage, trace_id: str) -> asyncio.Future[Verdict]:
        """The verdict of one Check, decided together with the other Checks of its tenant that
        arrive before the event loop's next turn: one store call (one script, one round trip)
        for all of them, in arrival order. Under load many Checks wait at once, and each store
        call costs Redis and redis-py about as much for one usage as for ten; an idle gateway
        sends batches of one, a turn of the loop later (microseconds)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Verdict] = loop.create_future()
        tenant = usage.subject.tenant
        pending = self._pending.get(tenant)
        if pending is not None and len(pending) >= MAX_BATCH:
            # a burst: the full batch goes now, so one script call stays bounded
            self._start(tenant, self._pending.pop(tenant))
            pending = None
        if pending is None:
            pending = self._pending[tenant] = []
            loop.call_soon(self._flush, tenant)
        pending.append((usage, trace_id, future))
        return future

    def _flush(self, tenant: str) -> None:
        batch = self._pending.pop(tenant, None)
        if batch:  # none when a burst already sent it
            self._start(tenant, batch)

    def _start(self, tenant: str, batch: list[_Pending]) -> None:
        # its own task: a caller that goes away (a cancelled RPC) cancels only its own wait
        task = asyncio.ensure_future(self._decide_pending(tenant, batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _decide_pending(self, tenant: str, batch: list[_Pending]) -> None:
        try:
            verdicts = await self._decide_tenant(
                tenant, [u for u, _, _ in batch], [t for _, t, _ in batch]
            )
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # a bug: every caller of the batch gets it (INTERNAL)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), verdict in zip(batch, verdicts, strict=True):
            if not future.done():
                future.set_result(verdict)

    async def decide_batch(self, usages: list[Usage], *, ok_limits: bool = True) -> list[Verdict]:
        """Decide a stream batch: invalid usages get an INVALID_USAGE verdict, the others are
        decided in order, one atomic store call per tenant. ``ok_limits=False`` (the caller's
        basic view): a verdict with reason OK carries no limit states."""
        await self._catch_up(usages)
        policy = self.policy
        out: list[Verdict | None] = [None] * len(usages)
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(usages):
            bad = self.violations(u, policy, on_stream=True)
            if bad:
                out[i] = Verdict(
                    request_id=u.request_id[:128],
                    decision=Decision.DENY,
                    reason=Reason.INVALID_USAGE,
                    decision_id=new_decision_id(),
                    policy_version=policy.version,
                    message="; ".join(str(v) for v in bad),
                    violations=tuple(bad),
                )
                self.telemetry.count_invalid()
            else:
                groups.setdefault(u.subject.tenant, []).append(i)
        valid = [usages[i] for idxs in groups.values() for i in idxs]
        with self.telemetry.decision_spans(valid) as spans:
            traces = iter(spans.trace_ids)
            results = await asyncio.gather(
                *(
                    self._decide_tenant(
                        t,
                        [usages[i] for i in idxs],
                        [next(traces) for _ in idxs],
                        ok_limits=ok_limits,
                    )
                    for t, idxs in groups.items()
                )
            )
            flat = spans.finish([v for vs in results for v in vs])
        cache = self.overlimit
        if cache is not None:  # a retry of an allowed admit must never get a cached refusal
            for u, v in zip(valid, flat, strict=True):
                if v.decision is Decision.ALLOW and u.mode is Mode.ADMIT and v.recorded:
                    cache.note_allowed(u)
        pos = 0
        for idxs in groups.values():
            for i in idxs:
                out[i] = flat[pos]
                pos += 1
        return [v for v in out if v is not None]

    async def _decide_tenant(
        self, tenant: str, usages: list[Usage], trace_ids: list[str], *, ok_limits: bool = True
    ) -> list[Verdict]:
        policy = self.policy
        ids = new_decision_ids(len(usages), tenant)
        for _ in range(STALE_RETRIES):
            items = [
                DecideItem(
                    u,
                    policy.resolve(u.subject, u.metric),
                    did,
                    session_fingerprint(u) if u.session_id else fingerprint(u),
                    trace_id,
                    policy.suspension(u.subject) is not None,
                )
                for u, did, trace_id in zip(usages, ids, trace_ids, strict=True)
            ]
            if not self.breaker.allow():
                self.telemetry.store_failure("breaker_open")
                return await self._spool(self._degraded(policy, items, "circuit breaker open"))
            if not await self._admit():
                self.telemetry.store_failure("queue")
                return await self._spool(
                    self._degraded(policy, items, "gateway busy: store calls queued too long")
                )
            call: asyncio.Future[list[Verdict]] | None = None
            delay = self.settings.store_timeout_s + self.settings.store_timeout_per_usage_s * (
                len(items) - 1
            )
            try:
                started = time.perf_counter()
                with self.telemetry.store_span(tenant, len(items)):
                    deadline = StoreDeadline(delay)
                    try:
                        async with deadline:
                            # its own task, shielded: past the deadline the call goes on, so
                            # that a late reply is still read and reconciled (_follow_late)
                            call = asyncio.ensure_future(
                                self._send(
                                    tenant, policy.version, items, ok_limits, deadline, delay
                                )
                            )
                            # the admission slot is held until the call ends, late or not
                            call.add_done_callback(self._release)
                            verdicts = await asyncio.shield(call)
                    finally:
                        if deadline.extended:
                            self.telemetry.loop_late()
            except asyncio.CancelledError:
                if call is not None:
                    call.cancel()
                raise
            except StalePolicyError as exc:
                self.breaker.success()
                try:
                    policy = await self.reload_policy(exc.stamped_version)
                except StoreUnavailableError:
                    return await self._spool(self._degraded(policy, items, "policy reload failed"))
                continue
            except StoreUnreplicatedError as exc:
                # committed on the master, not durable: answered as if the store were away
                # (spooled; the replay's dedup finds the master's write if it survives), and
                # a refused admit that the master recorded is reversed
                self.breaker.failure()
                self.telemetry.store_error()
                answered = await self._spool(self._degraded(policy, items, str(exc)))
                self._follow_late(
                    tenant, policy.version, items, answered, _done(exc), durable=False, held=False
                )
                return answered
            except (StoreUnavailableError, TimeoutError) as exc:
                self.store_failed(exc)
                reason = str(exc) or "store timeout"
                # the deadline passed: the call may yet commit, its spooled usages are held
                in_flight = call is not None and not isinstance(exc, StoreUnavailableError)
                answered = await self._spool(self._degraded(policy, items, reason), hold=in_flight)
                if call is not None and in_flight:
                    call.add_done_callback(self._answered_late)
                    self._follow_late(tenant, policy.version, items, answered, call)
                return answered
            finally:
                if call is None:  # admitted, but no call was made: give the slot back
                    self._admission.release()
            self.telemetry.store_latency(time.perf_counter() - started)
            self.breaker.success()
            return verdicts
        log.error("tenant %s: policy still stale after %d reloads", tenant, STALE_RETRIES)
        return await self._spool(self._degraded(policy, items, "policy reload did not converge"))

    async def _send(
        self,
        tenant: str,
        version: int,
        items: list[DecideItem],
        ok_limits: bool,
        deadline: StoreDeadline,
        delay: float,
    ) -> list[Verdict]:
        """The store call, timed from its first step: the store writes the batch in this same
        step (an admitted call has a connection waiting, :meth:`_admit`), so the deadline, and
        the one the store enforces on its own clock, count from the write. ``delay`` is the
        call's timeout: a batch that runs later than half of it is in doubt (its reply may be
        read too late, see docs/design.md, "Late commits and the spool")."""
        deadline.restart()
        return await self.store.decide(
            tenant,
            version,
            items,
            ok_limits=ok_limits,
            deadline=deadline.latest,
            doubt=deadline.when - delay / 2,
        )

    # -- admission and the breaker's probe ------------------------------------------------

    async def close(self) -> None:
        """Stop the breaker's probe, if one runs (before the store is closed). A PING in
        flight is let finish (it is bounded by the probe timeout) rather than cancelled: a
        second cancellation of a store call already cancelled by its deadline can interrupt
        redis-py while it gives the connection back, and the pool, which holds busy
        connections weakly, then loses the socket unclosed."""
        self._closing = True
        task, self._probe_task = self._probe_task, None
        if task is None or task.done():
            return
        self._store_answered.set()  # out of the cooldown's wait at once
        bound = 2 * self.settings.store_probe_timeout_s + 1.0  # a PING and one extension
        _, pending = await asyncio.wait({task}, timeout=bound)
        if pending:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _admit(self) -> bool:
        """Take an admission slot (a store call in flight), waiting at most
        ``store_queue_timeout_s``; False if none came free in time."""
        admission = self._admission
        if not admission.locked():
            await admission.acquire()
            return True
        try:
            async with StoreDeadline(self.settings.store_queue_timeout_s):
                await admission.acquire()
        except TimeoutError:
            return False
        return True

    def _release(self, _call: asyncio.Future[list[Verdict]]) -> None:
        self._admission.release()

    def _answered_late(self, call: asyncio.Future[list[Verdict]]) -> None:
        """A store call that timed out has ended: if the store answered it (even to refuse
        it as late, or stale), the store is alive, and a running probe tries again now."""
        if call.cancelled():
            return
        exc = call.exception()
        if exc is None or isinstance(exc, StoreDeadlineError | StalePolicyError):
            self._store_answered.set()

    def store_failed(self, exc: StoreUnavailableError | TimeoutError) -> None:
        """A store call (a decision's or a lease ask's) failed: a connection error counts
        against the store at once, a timeout only starts a probe (:meth:`_suspect`)."""
        if isinstance(exc, StoreUnavailableError):
            self.breaker.failure()
            self.telemetry.store_failure("unavailable")
        else:
            self.telemetry.store_failure("timeout")
        self._suspect()
        self.telemetry.store_error()

    def _suspect(self) -> None:
        """A store call failed or timed out: unless a probe runs already, start one, which
        opens the breaker only if the store does not answer a PING of its own in time."""
        if not self._closing and self.breaker.suspect():
            self._probe_task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        """PING the store within ``store_probe_timeout_s`` (a loop stall extends it once, as
        for any store call); each failure opens the breaker and the next PING follows
        ``breaker_cooldown_s`` later; the first success closes it."""
        try:
            while True:
                try:
                    async with StoreDeadline(self.settings.store_probe_timeout_s):
                        await self.store.ping()
                except (StoreUnavailableError, TimeoutError) as exc:
                    was_closed = self.breaker.state is BreakerState.CLOSED
                    self.breaker.probe_failed()
                    if was_closed:
                        self.telemetry.breaker_opened()
                        log.warning(
                            "circuit breaker open: the store did not answer a probe within "
                            "%.0f ms (%s)",
                            self.settings.store_probe_timeout_s * 1000,
                            str(exc) or "timeout",
                        )
                    if self._closing:
                        return
                    # the next probe: after the cooldown, or as soon as a store call that
                    # timed out gets its reply (the store answers again)
                    self._store_answered.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._store_answered.wait(), self.settings.breaker_cooldown_s
                        )
                    if self._closing:
                        return
                    continue
                if self.breaker.state is not BreakerState.CLOSED:
                    log.warning("circuit breaker closed: the store answers a probe again")
                self.breaker.success()
                return
        finally:
            self.breaker.probe_running = False

    # -- late replies ---------------------------------------------------------------------

    def _follow_late(
        self,
        tenant: str,
        version: int,
        items: list[DecideItem],
        answered: list[Verdict],
        call: asyncio.Future[list[Verdict]],
        *,
        durable: bool = True,
        held: bool = True,
    ) -> None:
        """Read the reply of a store call whose caller was answered by the failure policy
        (``answered``) in the background, and reconcile it (:meth:`_reconcile`). ``held``:
        its spooled usages are held in the spool until then."""
        if len(self._late) >= MAX_LATE_CALLS:
            call.cancel()
            self._note_late("abandoned", items)
            if held:  # unread: the replay decides its spooled usages by the store's records
                self._unhold(_spooled_ids(items, answered), recorded=False)
            return
        task = asyncio.ensure_future(
            self._reconcile(tenant, version, items, answered, call, durable=durable, held=held)
        )
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def late_replies_settled(self) -> None:
        """Wait until every store call followed in the background is reconciled (at most
        :data:`LATE_REPLY_WAIT_S` plus the reversals' attempts). Called on drain, bounded
        by the caller: what is left unread then is settled from the spool's holds lapsing and
        the store's records."""
        while self._late or self._unholding:
            # asyncio.wait: a caller that stops waiting (a bounded drain) cancels only its
            # own wait, never the reconciliations
            await asyncio.wait(self._late | self._unholding)

    def _unhold(self, decision_ids: list[str], *, recorded: bool) -> None:
        """End the spool holds of ``decision_ids`` in the background (:meth:`Spool.
        settle_held`); a failure leaves them to lapse (``SPOOL_HOLD_MS``)."""
        if not decision_ids or self.spool is None:
            return
        task = asyncio.ensure_future(self._settle_held(self.spool, decision_ids, recorded))
        self._unholding.add(task)
        task.add_done_callback(self._unholding.discard)

    async def _settle_held(self, spool: Spool, decision_ids: list[str], recorded: bool) -> None:
        try:
            await spool.settle_held(decision_ids, recorded=recorded)
        except Exception as exc:  # a closed spool, a disk error: the holds lapse by themselves
            log.warning("spool holds of %d usage(s) not ended: %s", len(decision_ids), exc)

    async def _reconcile(
        self,
        tenant: str,
        version: int,
        items: list[DecideItem],
        answered: list[Verdict],
        call: asyncio.Future[list[Verdict]],
        *,
        durable: bool = True,
        held: bool = True,
    ) -> None:
        """Make the ledger agree with verdicts already given, once the store call behind them
        answers late (or, ``durable=False``, answered in time but unreplicated: its writes may
        yet be lost). Per usage the store recorded by this call (not replayed from an earlier
        record):

        * an admit the caller was refused (DENY or THROTTLE by the failure policy): reversed
          (:meth:`~chargepath.store.base.DecisionStore.reverse`): billing nets it to 0, its
          limits get back the units it took (in the same step), and a resend is decided
          anew;
        * a usage answered ``spooled`` and recorded (by this call or an earlier record): it
          leaves the spool as already recorded (:meth:`Spool.settle_held`), before the replay
          can pick it up (it is held until then); a spooled usage not recorded is released to
          the replay (also one the store refused: a fail-open ALLOW the caller acted on, which
          the replay records over that refusal, see ``decide.lua``). Unreplicated
          (``durable=False``): released, never settled: the replay's dedup finds the master's
          write if it survives;
        * any other (answered neither recorded nor spooled: an allowed admit, a report): kept;
          the client's resend with the same ids is answered from the record, counted once.

        A call refused as too late (:class:`StoreDeadlineError`) or stale wrote nothing."""
        spooled = _spooled_ids(items, answered) if held else []
        try:
            stored = await asyncio.wait_for(call, LATE_REPLY_WAIT_S)
        except StoreUnreplicatedError as exc:  # a late reply, not durable either
            stored, durable = exc.verdicts, False
        except (StoreDeadlineError, StalePolicyError):
            self._note_late("nothing_written", items)
            self._unhold(spooled, recorded=False)
            return
        except (StoreUnavailableError, TimeoutError):
            # unknown: a resend or the spool's replay is answered from the record if any
            self._note_late("unknown", items)
            self._unhold(spooled, recorded=False)
            return
        refused: list[Reversal] = []
        settled: list[str] = []
        for item, given, got in zip(items, answered, stored, strict=True):
            if not got.recorded:
                self._note_late("not_recorded", [item])
            elif given.spooled and durable:
                settled.append(item.decision_id)
                self._note_late("spooled", [item])
            elif got.replayed:
                self._note_late("replayed", [item])
            elif given.spooled:
                self._note_late("unreplicated_spooled", [item])
            elif item.usage.mode is Mode.ADMIT and given.decision is not Decision.ALLOW:
                refused.append(Reversal(item, given, version, got.decided_at_ms))
            else:
                self._note_late("resend", [item])
        if spooled:
            # settled first: only then may the replayer see the others
            self._unhold(settled, recorded=True)
            done = set(settled)
            self._unhold([d for d in spooled if d not in done], recorded=False)
        if refused:
            await self._reverse(tenant, refused)

    async def _reverse(self, tenant: str, reversals: list[Reversal]) -> None:
        todo, why = reversals, ""
        for attempt in range(REVERSE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(REVERSE_PAUSES_S[attempt - 1])
            try:
                written = await asyncio.wait_for(
                    self.store.reverse(tenant, todo), REVERSE_TIMEOUT_S
                )
            except (StoreUnavailableError, TimeoutError) as exc:
                why = str(exc) or "store timeout"
                continue
            for r, ok in zip(todo, written, strict=True):
                self._note_late("reversed" if ok else "already_reversed", [r.item])
            return
        self._note_late("reverse_failed", [r.item for r in todo])
        log.warning(
            "tenant %s: %d refused admit(s) recorded late could not be reversed (%s); they stay "
            "billed: request ids %s",
            tenant,
            len(todo),
            why,
            ", ".join(r.item.usage.request_id for r in todo),
        )

    def _note_late(self, outcome: str, items: Sequence[DecideItem]) -> None:
        """Count a late reply's usages by outcome; log at most one line a second, with the
        request ids of the reversed ones."""
        self.telemetry.late_replies(outcome, len(items))
        counts = self._late_since_log
        counts[outcome] = counts.get(outcome, 0) + len(items)
        if outcome == "reversed" and len(self._late_ids) < 20:
            self._late_ids += [i.usage.request_id for i in items][: 20 - len(self._late_ids)]
        wait = self._late_logged_at + 1.0 - time.monotonic()
        if wait <= 0:
            self._log_late()
        elif not self._late_log_due:
            self._late_log_due = True
            asyncio.get_running_loop().call_later(wait, self._log_late)

    def _log_late(self) -> None:
        self._late_log_due = False
        if not self._late_since_log:
            return
        log.info(
            "late store replies since the last report (usages by outcome): %s%s",
            ", ".join(f"{k} {n}" for k, n in sorted(self._late_since_log.items())),
            f"; reversed request ids: {', '.join(self._late_ids)}" if self._late_ids else "",
        )
        self._late_logged_at = time.monotonic()
        self._late_since_log, self._late_ids = {}, []

    def _degraded(
        self, policy: Policy, items: list[DecideItem], why: str
    ) -> tuple[list[DecideItem], list[Verdict]]:
        """Verdicts by the tenant's failure policy, with their items (for :meth:`_spool`);
        nothing is recorded."""
        self._degraded_since_log += len(items)
        now = time.monotonic()
        if now - self._degraded_logged_at >= 1.0:  # at most one line a second in an outage
            log.warning(
                "store unavailable (%s): %d decision(s) by failure policy since the last report",
                why,
                self._degraded_since_log,
            )
            self._degraded_logged_at, self._degraded_since_log = now, 0
        out = []
        for item in items:
            u, res = item.usage, item.resolution
            decision, reason, retry = Decision.DENY, Reason.STORE_UNAVAILABLE, 0
            if not res.entitled:
                reason = Reason.NO_ENTITLEMENT
            elif item.suspended:
                reason = Reason.SUSPENDED
            elif res.failure_mode == "allow":
                if u.mode is Mode.REPORT:
                    decision = Decision.ALLOW
                else:
                    wait = self.allowance.take(u.subject, res.limits, u.amount)
                    if wait == 0:
                        decision = Decision.ALLOW
                    elif wait > 0:
                        decision, retry = Decision.THROTTLE, wait
                    else:
                        reason = Reason.AMOUNT_EXCEEDS_CAPACITY
            out.append(
                Verdict(
                    request_id=u.request_id,
                    decision=decision,
                    reason=reason,
                    decision_id=item.decision_id,
                    policy_version=policy.version,
                    retry_after_ms=retry,
                    recorded=False,
                    degraded=True,
                    trace_id=item.trace_id,
                    message=_degraded_message(res.failure_mode, spooled=False),
                )
            )
        return items, out

    async def _spool(
        self, degraded: tuple[list[DecideItem], list[Verdict]], *, hold: bool = False
    ) -> list[Verdict]:
        """Write to the spool every usage of a degraded batch that the client may act on: a
        report of an entitled subject (the usage happened whatever the failure policy said),
        and an admit the failure policy allowed (the work goes ahead). A verdict says
        ``spooled`` only once its usage is on disk; a usage refused (spool full, a disk
        error, no spool, or a write slower than ``spool_timeout_s``) keeps a verdict that
        says neither recorded nor spooled, so the client keeps the obligation to resend.
        ``hold``: the batch's store call is still in flight: its spooled usages are held from
        the replay until its late reply is reconciled (:data:`SPOOL_HOLD_MS` at most)."""
        items, verdicts = degraded
        if self.spool is None:
            return verdicts
        picked = [
            i for i, (item, v) in enumerate(zip(items, verdicts, strict=True)) if spoolable(item, v)
        ]
        if not picked:
            return verdicts
        entries = [
            SpooledUsage(
                items[i].usage,
                # the replay is keyed on the request id, also for a stream usage, with the
                # fingerprint its first attempt had: a stream usage's session fingerprint,
                # which the request-id record of a batch run in doubt holds (ARG_DOUBT)
                items[i].fingerprint,
                items[i].decision_id,
                items[i].trace_id,
            )
            for i in picked
        ]
        accepted = await self._append(self.spool, entries, hold_ms=SPOOL_HOLD_MS if hold else 0)
        out = list(verdicts)
        for i, ok in zip(picked, accepted, strict=True):
            v = verdicts[i]
            mode = items[i].resolution.failure_mode
            out[i] = v._replace(
                spooled=ok,
                message=_degraded_message(mode, spooled=True)
                if ok
                else _degraded_message(mode, spooled=False, refused=True),
            )
        return out

    async def _append(
        self, spool: Spool, entries: Sequence[SpooledUsage], *, hold_ms: int = 0
    ) -> list[bool]:
        """``spool.append_all`` bounded by ``spool_timeout_s`` (the wait for the spool's write
        lock: past it the usages are withdrawn, never written); all False on an error."""
        try:
            accepted = await spool.append_all(
                entries, timeout_s=self.settings.spool_timeout_s, hold_ms=hold_ms
            )
        except SpoolClosedError:
            log.error("spool closed: %d usage(s) answered as not spooled", len(entries))
            return [False] * len(entries)
        return accepted


def _done(exc: StoreUnreplicatedError) -> asyncio.Future[list[Verdict]]:
    """A store call already answered with ``exc``, for :meth:`Engine._reconcile`."""
    future: asyncio.Future[list[Verdict]] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _spooled_ids(items: Sequence[DecideItem], answered: Sequence[Verdict]) -> list[str]:
    return [i.decision_id for i, v in zip(items, answered, strict=True) if v.spooled]


def spoolable(item: DecideItem, verdict: Verdict) -> bool:
    """Whether a degraded verdict's usage goes to the spool: a report the store would record
    (an entitled subject's, suspended or not), or an admit the failure policy allowed."""
    if item.usage.mode is Mode.REPORT:
        return item.resolution.entitled
    return verdict.decision is Decision.ALLOW


def _degraded_message(failure_mode: str, *, spooled: bool, refused: bool = False) -> str:
    head = f"store unavailable: decided by the tenant's failure policy ({failure_mode}); "
    if spooled:
        return head + (
            "spooled: recorded once the store is back, under the same ids (no resend needed)"
        )
    if refused:
        return head + (
            "not spooled (spool full or unavailable): nothing recorded, resend it with the same ids"
        )
    return head + "nothing recorded, resend reports with the same ids"
