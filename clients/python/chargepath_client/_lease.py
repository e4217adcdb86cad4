"""Quota leases on the client: units taken ahead of use, spent locally, reported in the background.

`BaseLease` is everything `Lease` (blocking, a background thread) and `AsyncLease` (asyncio, a
background task) share that is not I/O: the local counters that `try_acquire` decides on, and
the state machine that tells the background what to ask the gateway next (`plan`) and takes
in each answer (`applied`). The subclasses only send the asks and sleep.

Counting. Everything is counted in one cumulative level of units: `_spent` is every unit
`try_acquire` has allowed since the lease object was made, `_limit` the level it may reach
(the start of the current grant's range plus what the gateway says is `available`). A unit
is allowed only below `_limit`, and `_limit` only ever covers units the gateway granted and
has not taken back, so the holder never spends what the limits did not give it. Each lease
the object holds in turn (a new one after an expiry or a rotation) reports the units of its
own range of levels; the sum of every report is `_spent`.

The hot path (`try_acquire`) is an integer addition and two comparisons: the background is
woken by a flag (`_renew_at`, the level at which `available` falls to the renewal threshold),
not asked on every call.

Asks go one at a time, each with a fresh request id, and a failed one is sent again with the
same id (the gateway answers a repeat from its record), so a report is never counted twice.
Units spent and not yet reported when the process dies are lost to the ledger: at most one
grant (less with `report_every`). Their units come back to the limits when the lease expires.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import grpc

from chargepath_client import _wire
from chargepath_client._errors import ChargepathError, InvalidUsage, from_rpc_error, public_field
from chargepath_client._retry import RetryPolicy
from chargepath_client._validation import validate_holder, validate_usage
from chargepath_client._verdict import (
    _DECISIONS,
    _REASONS,
    Decision,
    LimitStatus,
    Reason,
    _seconds,
)
from chargepath_protos.v1 import lease_pb2

logger = logging.getLogger("chargepath_client")

#: A level no spending reaches: the renewal flag when the background needs no wake.
_NEVER: Final = 1 << 62
#: A lease is rotated (a new one opened, the old one released) once this share of its
#: validity has passed since its last grant (a renewal pushes its expiry further; a report
#: does not); it is closed locally at its expiry minus `_freeze_margin`, before the gateway
#: takes its units back.
ROTATE_AT: Final = 0.6
#: Longest wait before asking again after a refusal (a DENY until a monthly reset would
#: otherwise wait for days and miss a grant that tops the quota up).
MAX_PAUSE: Final = 30.0
#: Wait after a refusal that gives no `retry_after`.
MIN_PAUSE: Final = 0.5


def _freeze_margin(valid_for: float) -> float:
    return min(valid_for * 0.1, 1.0)


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    """The gateway's answer to one lease ask (`chargepath.v1.LeaseAnswer`), in seconds and
    client enums. `allowed` for ALLOW. `closed`: the lease is over (released, or expired
    before the ask: reason LEASE_EXPIRED, its `used` then recorded as overage).
    `decision_id` is what `chargepath explain` finds the ask by. `raw` is the protobuf
    message."""

    request_id: str
    lease_id: str
    decision: Decision
    reason: Reason
    granted: int
    available: int
    valid_for: float
    renew_below: int
    final_units: bool
    retry_after: float
    recorded: int
    overage: int
    refunded: int
    limits: tuple[LimitStatus, ...]
    policy_version: int
    replayed: bool
    message: str
    decided_at: datetime | None
    closed: bool
    decision_id: str
    raw: lease_pb2.LeaseAnswer = field(repr=False, compare=False, hash=False)

    @property
    def allowed(self) -> bool:
        return self.decision is Decision.ALLOW

    @classmethod
    def from_pb(cls, answer: lease_pb2.LeaseAnswer) -> LeaseAnswer:
        decided_at = (
            answer.decided_at.ToDatetime(tzinfo=UTC) if answer.HasField("decided_at") else None
        )
        return cls(
            request_id=answer.request_id,
            lease_id=answer.lease_id,
            decision=_DECISIONS.get(answer.decision, Decision.UNSPECIFIED),
            reason=_REASONS.get(answer.reason, Reason.UNSPECIFIED),
            granted=answer.granted,
            available=answer.available,
            valid_for=_seconds(answer.valid_for),
            renew_below=answer.renew_below,
            final_units=answer.final_units,
            retry_after=_seconds(answer.retry_after),
            recorded=answer.recorded,
            overage=answer.overage,
            refunded=answer.refunded,
            limits=tuple(LimitStatus.from_pb(limit) for limit in answer.limits),
            policy_version=answer.policy_version,
            replayed=answer.replayed,
            message=answer.message,
            decided_at=decided_at,
            closed=answer.closed,
            decision_id=answer.decision_id,
            raw=answer,
        )


#: The fields of a LeaseAsk under the names of the `lease(...)` arguments.
_ARGUMENTS: Final = {"requested": "units"}


def _lease_argument(path: str) -> str:
    """ "ask.subject.tenant" -> "tenant", "ask.requested" -> "units", "ask.holder" -> "holder"."""
    field = public_field(path.removeprefix("ask."))
    return _ARGUMENTS.get(field, field)


def _lease_fields(error: InvalidUsage) -> InvalidUsage:
    """The gateway's INVALID_ARGUMENT on a lease ask, naming the `lease(...)` arguments."""
    violations = tuple((_lease_argument(f), reason) for f, reason in error.violations)
    field, reason = violations[0]
    return InvalidUsage(field, reason, request_id=error.request_id, violations=violations)


class AskKind(enum.Enum):
    """What an ask is for."""

    OPEN = "open"  # a new lease (first, after an expiry, or a rotation)
    RENEW = "renew"  # report what was used and ask for more
    REPORT = "report"  # report only (report_every)
    RELEASE = "release"  # report the rest of a lease that is over and end it


@dataclass(slots=True)
class HeldLease:
    """One lease this object holds or held. `reported`: the level its reports have reached
    (its range starts at the level where it was opened); `end`: where its range stops once
    it is over (rotated, expired, closed); `expired`: the gateway said it is gone."""

    lease_id: str
    reported: int
    end: int | None = None
    expired: bool = False


@dataclass(frozen=True, slots=True)
class PlannedAsk:
    """An ask to send, and what it stands for: `level` is the cumulative level its `used`
    brings its lease's reports to. Every attempt sends `request` unchanged (same id)."""

    kind: AskKind
    request: lease_pb2.LeaseAsk
    lease: HeldLease | None
    level: int


class _Done:
    """`plan`'s answer once the lease is closed and nothing is left to report."""


DONE: Final = _Done()


class BaseLease:
    """A lease on the limits of one subject and metric (what `Lease` and `AsyncLease` share).

    Spend with `try_acquire(n)`: True if `n` units fit in what the gateway granted, decided
    here without a round trip. `available` is what is left locally, `final` the gateway's
    final-unit indication (the limits allow no further grant now). In the background the
    lease is renewed when `available` falls to the gateway's renewal threshold, what was
    spent is reported (at each renewal and every `report_every` seconds), an expiring lease
    is replaced by a new one, and closing the lease reports the rest and releases it, so the
    units not spent go back to the limits.
    """

    # try_acquire touches only _spent, _limit, _renew_at (and the lock of Lease).
    __slots__ = (
        "__weakref__",
        "_answers",
        "_attempt_timeout",
        "_clock",
        "_closing",
        "_current",
        "_failure",
        "_final",
        "_freeze_at",
        "_give_up_at",
        "_labels",
        "_last_answer",
        "_limit",
        "_lock",
        "_next_report_at",
        "_not_before",
        "_renew_at",
        "_renew_below",
        "_retired",
        "_retries",
        "_retry",
        "_rotate_at",
        "_spent",
        "_starved",
        "_threshold",
        "_validity",
        "holder",
        "key",
        "metric",
        "report_every",
        "slice",
        "tenant",
        "units",
    )

    def __init__(
        self,
        tenant: str,
        metric: str,
        *,
        units: int,
        slice: str = "",
        key: str = "",
        holder: str = "",
        labels: Mapping[str, str] | None = None,
        report_every: float | None = 1.0,
        validate: bool = True,
        retry: RetryPolicy,
        attempt_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        if validate:
            # The usage rules (tenant, slice, key, metric, labels), with `units` as the
            # amount; then the holder's own.
            try:
                validate_usage(
                    tenant=tenant, metric=metric, amount=units, slice=slice, key=key, labels=labels
                )
            except InvalidUsage as error:
                if error.field != "amount":
                    raise
                raise InvalidUsage("units", error.reason) from None
            validate_holder(holder)
        if report_every is not None and not report_every > 0:
            raise ValueError("report_every must be positive (or None: report only at renewals)")
        self._spent = 0
        self._limit = 0
        self._renew_at = _NEVER
        self._lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        self.tenant = tenant
        self.slice = slice
        self.key = key
        self.metric = metric
        self.units = units
        self.holder = holder
        self.report_every = report_every
        self._labels = dict(labels) if labels else None
        self._clock = clock
        self._current: HeldLease | None = None
        self._retired: list[HeldLease] = []
        self._renew_below = 0
        self._threshold = _NEVER
        self._starved = False
        self._not_before = 0.0
        self._rotate_at = math.inf
        self._freeze_at = math.inf
        self._validity = 0.0
        self._next_report_at = math.inf
        self._closing = False
        self._final = False
        self._failure: ChargepathError | None = None
        self._last_answer: LeaseAnswer | None = None
        self._answers = 0
        self._retry = retry
        self._attempt_timeout = attempt_timeout
        # While opening or closing, asks are retried until then; otherwise for as long as
        # the lease lives (a report must get through: its units are spent).
        self._give_up_at = math.inf
        self._retries = 0

    # -- the local decisions ------------------------------------------------------------

    def try_acquire(self, n: int = 1) -> bool:
        """Take `n` units (default 1) from the lease if they fit: True if allowed, decided
        locally (no I/O). False when the lease has less than `n` available; the background
        is then asking for more (or waiting for the limits to allow it)."""
        spent = self._spent + n
        if spent > self._limit or type(n) is not int or n < 1:
            return self._refused(n)
        self._spent = spent
        if spent >= self._renew_at:
            self._renew_at = _NEVER
            self._wake()
        return True

    def _refused(self, n: object) -> bool:
        if type(n) is not int:
            raise InvalidUsage("n", f"must be an integer, not {type(n).__name__}")
        if n < 1:
            raise InvalidUsage("n", f"must be at least 1, got {n}")
        if not self._starved:
            # More than what is left: make sure the background asks for more, even when
            # the renewal threshold was not reached.
            self._starved = True
            self._renew_at = _NEVER
            self._wake()
        return False

    def _wake(self) -> None:
        """Tell the background that it has something to do (set by the subclass)."""

    @property
    def available(self) -> int:
        """Units `try_acquire` may still allow under the current grant."""
        return max(0, self._limit - self._spent)

    @property
    def spent(self) -> int:
        """Units `try_acquire` allowed since the lease was opened (every grant together)."""
        return self._spent

    @property
    def unreported(self) -> int:
        """Units of `spent` not yet sent to the gateway in a report: the ledger's lag behind
        this holder (and what would be lost if the process died now)."""
        with self._lock:
            level = self._spent
            current = self._current
            pending = level - current.reported if current is not None else 0
        for held in list(self._retired):
            assert held.end is not None
            pending += held.end - held.reported
        return pending

    @property
    def final(self) -> bool:
        """The gateway's final-unit indication on the last grant: the limits allow no further
        grant now; once `available` is spent, expect `try_acquire` to refuse."""
        return self._final

    @property
    def lease_id(self) -> str:
        """The id of the lease held now ("" while none is: before the first grant, between
        an expiry and the next grant, after closing)."""
        return self._current.lease_id if self._current else ""

    @property
    def last_answer(self) -> LeaseAnswer | None:
        """The gateway's latest answer (e.g. why the lease holds nothing: a THROTTLE, or a
        DENY naming a limit that grants no lease)."""
        return self._last_answer

    @property
    def answers(self) -> int:
        """How many answers the gateway has given this lease (opens, renewals, reports)."""
        return self._answers

    @property
    def closed(self) -> bool:
        """True once `close` has begun: nothing more is spent or asked for."""
        return self._closing

    # -- the state machine the background runs ----------------------------------------

    def _ask(
        self,
        kind: AskKind,
        lease: HeldLease | None,
        level: int,
        *,
        requested: int = 0,
        release: bool = False,
    ) -> PlannedAsk:
        used = level - lease.reported if lease is not None else 0
        request = _wire.lease_ask(
            tenant=self.tenant,
            slice=self.slice,
            key=self.key,
            metric=self.metric,
            lease_id=lease.lease_id if lease is not None else "",
            requested=requested,
            used=used,
            release=release,
            labels=self._labels,
            holder=self.holder,
        )
        return PlannedAsk(kind, request, lease, level)

    def _freeze(self) -> int:
        """Stop local spending at the level reached; returns that level."""
        with self._lock:
            level = self._spent
            self._limit = level
            self._renew_at = _NEVER
        return level

    def _retire_current(self, *, expired: bool = False) -> None:
        current = self._current
        if current is None:
            return
        current.end = self._freeze()
        current.expired = expired
        self._retired.append(current)
        self._current = None
        self._rotate_at = self._freeze_at = self._next_report_at = math.inf

    def plan(self, now: float) -> PlannedAsk | float | _Done | None:
        """What the background does next: an ask to send, a number of seconds to wait (or
        until woken), None to wait until woken, or DONE (closed, everything reported)."""
        if self._failure is not None:
            return DONE
        while self._retired:
            held = self._retired[0]
            assert held.end is not None
            if held.expired and held.end == held.reported:
                self._retired.pop(0)  # gone, and nothing of it left to report
                continue
            return self._ask(AskKind.RELEASE, held, held.end, release=not held.expired)
        if self._closing:
            if self._current is not None:
                self._retire_current()
                return self.plan(now)
            return DONE
        current = self._current
        if current is None:
            if now < self._not_before:
                return self._not_before - now
            self._starved = False
            return self._ask(AskKind.OPEN, None, self._spent, requested=self.units)
        if now >= self._freeze_at:
            logger.warning(
                "lease %s of %s/%s: expiring before it could be renewed; opening another",
                current.lease_id,
                self.tenant,
                self.metric,
            )
            self._retire_current()
            return self.plan(now)
        ready = now >= self._not_before
        if ready and now >= self._rotate_at:
            return self._ask(AskKind.OPEN, None, self._spent, requested=self.units)
        level = self._spent
        if ready and (level >= self._threshold or self._starved):
            self._starved = False
            return self._ask(AskKind.RENEW, current, level, requested=self.units)
        if level > current.reported and now >= self._next_report_at:
            return self._ask(AskKind.REPORT, current, level)
        wake_at = min(self._freeze_at, max(self._rotate_at, self._not_before))
        if level > current.reported:
            wake_at = min(wake_at, self._next_report_at)
        if level >= self._threshold or self._starved:
            wake_at = min(wake_at, self._not_before)
        return None if wake_at == math.inf else max(0.0, wake_at - now)

    def applied(self, ask: PlannedAsk, answer: LeaseAnswer, sent_at: float, now: float) -> None:
        """Take in the gateway's answer to `ask`, first sent at `sent_at` (monotonic s)."""
        self._retries = 0
        if self._failure is not None:
            return
        self._last_answer = answer
        self._answers += 1
        if ask.kind is AskKind.RELEASE:
            assert ask.lease is not None
            ask.lease.reported = ask.level
            self._retired.remove(ask.lease)
            return
        if ask.kind is AskKind.OPEN:
            if answer.allowed and answer.lease_id and not answer.closed:
                with self._lock:
                    level = self._spent
                    if self._current is not None:  # a rotation: the old one ends here
                        self._current.end = level
                        self._retired.append(self._current)
                    self._current = HeldLease(answer.lease_id, reported=level)
                    self._granted(level, answer, sent_at)
            else:
                self._refusal(answer, now)
            return
        lease = ask.lease
        assert lease is not None
        lease.reported = ask.level
        if answer.closed:
            logger.warning(
                "lease %s of %s/%s is over (%s): opening another",
                lease.lease_id,
                self.tenant,
                self.metric,
                answer.reason.value,
            )
            self._retire_current(expired=True)
            return
        with self._lock:
            self._granted(ask.level, answer, sent_at)
        if ask.kind is AskKind.RENEW and answer.granted == 0:
            self._refusal(answer, now)

    def _granted(self, level: int, answer: LeaseAnswer, sent_at: float) -> None:
        """A lease's state after an answer: `available` units above `level` (under the
        lock)."""
        limit = level + answer.available
        self._limit = limit
        if answer.renew_below > 0 or answer.granted > 0:
            self._renew_below = answer.renew_below
        self._threshold = limit - self._renew_below
        self._renew_at = self._threshold
        if answer.granted > 0:
            self._final = answer.final_units
        if answer.valid_for > 0:
            if answer.granted > 0 or self._validity == 0:
                self._validity = answer.valid_for  # a grant's answer: the whole validity
            # The gateway decided at or after sent_at, so its expiry is no earlier than this.
            expiry = sent_at + answer.valid_for
            self._rotate_at = expiry - self._validity * (1 - ROTATE_AT)
            self._freeze_at = expiry - _freeze_margin(self._validity)
        if self.report_every is not None:
            self._next_report_at = sent_at + self.report_every

    def _refusal(self, answer: LeaseAnswer, now: float) -> None:
        pause = answer.retry_after if answer.retry_after > 0 else MIN_PAUSE
        self._not_before = now + min(pause, MAX_PAUSE)
        if answer.decision is not Decision.ALLOW:
            self._final = True
        logger.info(
            "lease ask for %s/%s: %s %s, asking again in %.3fs%s",
            self.tenant,
            self.metric,
            answer.decision.value,
            answer.reason.value,
            min(pause, MAX_PAUSE),
            f" ({answer.message})" if answer.message else "",
        )

    def attempt_timeout(self, now: float) -> float:
        """The timeout of the next attempt: short enough to close the lease locally in time
        (and to stop retrying when opening or closing has a deadline)."""
        timeout = self._attempt_timeout
        for until in (self._freeze_at, self._give_up_at):
            if until > now:
                timeout = min(timeout, max(until - now, 0.05))
        return timeout

    def pause_after(self, ask: PlannedAsk, error: grpc.RpcError, now: float) -> float | None:
        """After a failed attempt at `ask`: seconds to wait before sending it again (same
        request id), or None when it is final (the lease has then `failed`)."""
        code = error.code()
        failure = from_rpc_error(error, request_id=ask.request.request_id)
        if isinstance(failure, InvalidUsage):
            failure = _lease_fields(failure)
        transient = code == grpc.StatusCode.DEADLINE_EXCEEDED or self._retry.is_transient(
            code, error.details()
        )
        if not transient or now >= self._give_up_at:
            self.failed(failure)
            return None
        if now >= self._freeze_at:
            # The gateway may have taken the units back by now: spend no more of them.
            self._freeze()
        self._retries += 1
        pause = self._retry.backoff(self._retries)
        logger.info(
            "lease ask %s (%s): %s, retrying in %.3fs",
            ask.request.request_id,
            ask.kind.value,
            code.name,
            pause,
        )
        for until in (self._freeze_at, self._give_up_at):
            if until > now:
                pause = min(pause, until - now)
        return pause

    def resend_after(self, ask: PlannedAsk, answer: LeaseAnswer, now: float) -> float | None:
        """Seconds to wait before sending `ask` again (same request id) when `answer` says
        nothing was done (the gateway's store was unavailable: nothing granted, recorded or
        released); None when the answer is to be `applied`. An open is not resent: it is a
        refusal like any other (nothing was held)."""
        if answer.reason is not Reason.STORE_UNAVAILABLE or ask.kind is AskKind.OPEN:
            return None
        if now >= self._give_up_at:
            self.failed(
                ChargepathError(
                    f"store unavailable: {answer.message}", request_id=ask.request.request_id
                )
            )
            return None
        if now >= self._freeze_at:
            self._freeze()
        pause = min(answer.retry_after if answer.retry_after > 0 else MIN_PAUSE, MAX_PAUSE)
        logger.info(
            "lease ask %s (%s): the gateway's store is unavailable, resending in %.3fs",
            ask.request.request_id,
            ask.kind.value,
            pause,
        )
        for until in (self._freeze_at, self._give_up_at):
            if until > now:
                pause = min(pause, until - now)
        return pause

    def failed(self, error: ChargepathError) -> None:
        """A final failure of an ask (not transient: refused credentials, invalid input):
        the lease spends nothing more and the background stops."""
        self._failure = error
        self._freeze()

    @property
    def failure(self) -> ChargepathError | None:
        """The error that stopped the lease's background, if one did."""
        return self._failure

    def _start_closing(self, timeout: float) -> None:
        self._closing = True
        self._give_up_at = self._clock() + timeout
        self._freeze()

    def _close_error(self) -> ChargepathError | None:
        """What `close` raises: the failure that left units unreported, if one did."""
        failure = self._failure
        unreported = self.unreported
        if failure is None and unreported == 0:
            return None
        detail = f"{failure.details}; " if failure is not None else ""
        error = ChargepathError(
            f"lease of {self.tenant}/{self.metric}: {detail}{unreported} units spent and not "
            "reported (the gateway takes the lease's units back at its expiry)",
            code=failure.code if failure is not None else None,
        )
        return error

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.tenant}/{self.metric} lease_id={self.lease_id!r} "
            f"available={self.available} spent={self.spent} final={self.final}>"
        )
