"""The over-limit cache: Check admits answered in the gateway while nothing can fit.

Once the store answered an admit of ``amount`` for a (tenant, slice, key, metric) with THROTTLE
RATE_LIMITED or DENY QUOTA_EXHAUSTED and a ``retry_after``, no admit of that subject and metric
for an amount at least as large can be allowed before ``retry_after`` has passed, unless
something adds room: a grant, a policy change (a resume, a larger capacity), a lease's refund.
Until then the answer is known without the store, and :meth:`OverLimitCache.answer` gives it.

What keeps it exact (DESIGN property 1; tested against a gateway without the cache in
``tests/integration/test_overlimit_cache.py``):

* **Time.** An entry ends at ``sent + retry_after - 1`` on the gateway's monotonic clock, where
  ``sent`` is when the store call was *sent* (before Redis read its ``TIME``), so the entry
  ends at least the store call's duration before the store would have room: it errs early,
  never late. The 1 ms covers both clocks' rounding to milliseconds.
* **Amounts.** A hit needs ``amount <= ceiling``, the smallest capacity of the verdict's hard
  limits: above it the store says AMOUNT_EXCEEDS_CAPACITY, another answer.
* **Reasons.** A quota refusal (DENY QUOTA_EXHAUSTED) stays one for larger amounts whatever
  else happens. A rate refusal (THROTTLE RATE_LIMITED) is learned only when the usage's limits
  hold no hard quota: other usage could exhaust one meanwhile, and the store would then say
  DENY, not THROTTLE.
* **Room.** :meth:`invalidate` drops a tenant's entries (``None``: every tenant's), on the
  events every process publishes when it adds room (``store/room.py``); an entry also needs
  the policy version it was made with. A store reply that was already on its way when an
  event came is not cached (:class:`Ticket`: the epoch of events at the call's start).
* **Subscription.** The cache answers only while :attr:`live` (its owner is subscribed to the
  events); :meth:`close` turns it off and empties it.
* **Retries.** An admit marked as a retry never gets a cached answer (it goes to the store,
  which answers a retried request id from its dedup record); nor does one whose request id
  this gateway saw allowed within the dedup window (:class:`SeenIds`, bounded memory, false
  positives only send a Check to the store). A request id answered from the cache gets the
  same answer again (``replayed``) while its record is kept here.

Reports never use it: they are always recorded. Not thread-safe: one event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from chargepath.core.model import Decision, LimitKind, Mode, Reason, Usage, Verdict

#: The verdicts that say "nothing of this amount or more fits before retry_after".
CACHEABLE = frozenset(
    {(Decision.THROTTLE, Reason.RATE_LIMITED), (Decision.DENY, Reason.QUOTA_EXHAUSTED)}
)

#: What a cached verdict's message says (explain cannot find its decision id).
CACHED_MESSAGE = (
    "answered by this gateway's over-limit cache (nothing can fit before retry_after); "
    "not in the store's trail, so explain does not find this decision id"
)

_Key = tuple[str, str, str, str]  # tenant, slice, key, metric


class Ticket(NamedTuple):
    """Taken before a store call (:meth:`OverLimitCache.ticket`), handed to
    :meth:`OverLimitCache.learn` with the call's verdict."""

    epoch: int
    sent_ms: int


@dataclass(slots=True)
class _Entry:
    amount: int  # the smallest amount the store refused
    ceiling: int  # the largest amount a hit may answer (the smallest hard capacity)
    until_ms: int  # on the cache's clock: no hit from then on
    sent_ms: int  # when the store call that made it was sent
    version: int
    verdict: Verdict  # the store's


@dataclass(slots=True)
class _Answered:
    usage: tuple[str, str, str, int]  # slice, key, metric, amount
    verdict: Verdict


class SeenIds:
    """The request ids this gateway saw allowed within ``window_ms``, in bounded memory.

    A ring of ``generations`` Bloom filters, each taking the ids of ``window_ms / (generations
    - 1)`` ms: together they cover at least the window. Membership may be a false positive
    (about 0.5 % when ``capacity`` ids arrive per window; more past it), never a false negative
    within the window. ``bytes`` is fixed: ``capacity * bits_per_id * generations /
    (generations - 1) / 8``. Python's ``hash`` (salted per process, stable within it) makes
    the bit positions.
    """

    HASHES = 7

    def __init__(
        self,
        clock_ms: Callable[[], int],
        window_ms: int,
        capacity: int = 1_000_000,
        *,
        generations: int = 5,
        bits_per_id: int = 14,
    ) -> None:
        self._clock_ms = clock_ms
        self._span_ms = max(1, -(-window_ms // (generations - 1)))
        self._bits = max(64, capacity * bits_per_id // (generations - 1))
        self._filters = [bytearray(self._bits // 8 + 1) for _ in range(generations)]
        self._started_ms = clock_ms()

    @property
    def bytes(self) -> int:
        return sum(len(f) for f in self._filters)

    def _rotate(self) -> None:
        now = self._clock_ms()
        steps = (now - self._started_ms) // self._span_ms
        if steps <= 0:
            return
        n = len(self._filters)
        for _ in range(min(steps, n)):
            self._filters.pop()
            self._filters.insert(0, bytearray(self._bits // 8 + 1))
        self._started_ms += steps * self._span_ms

    def _positions(self, tenant: str, request_id: str) -> list[int]:
        h1 = hash((tenant, request_id))
        h2 = hash((request_id, tenant, 0x9E3779B9)) | 1
        bits = self._bits
        return [(h1 + i * h2) % bits for i in range(self.HASHES)]

    def add(self, tenant: str, request_id: str) -> None:
        self._rotate()
        current = self._filters[0]
        for p in self._positions(tenant, request_id):
            current[p >> 3] |= 1 << (p & 7)

    def __contains__(self, item: tuple[str, str]) -> bool:
        self._rotate()
        positions = self._positions(*item)
        for f in self._filters:  # loops, not generators: this runs on every cached answer
            for p in positions:
                if not f[p >> 3] & (1 << (p & 7)):
                    break
            else:
                return True
        return False


@dataclass(slots=True)
class OverLimitStats:
    """What the cache did, for the metrics (``chargepath.overlimit.*``)."""

    hits: int = 0
    replays: int = 0
    learned: int = 0
    invalidations: int = 0
    bypassed_retries: int = 0
    bypassed_seen: int = 0
    entries: int = 0
    live: bool = False


class OverLimitCache:
    """Refused admits, remembered until something can fit (module docstring).

    ``clock_ms``: a monotonic clock in ms (injected: tests move it). ``wall_ms``: the time a
    cached verdict says it was decided at. ``new_decision_id``: a fresh id per cached verdict.
    At most ``max_entries`` (subject, metric) entries and as many answered request ids are kept,
    least recently used first out; ``dedup_window_ms`` and ``seen_capacity`` size
    :class:`SeenIds`."""

    def __init__(
        self,
        clock_ms: Callable[[], int],
        wall_ms: Callable[[], int],
        new_decision_id: Callable[[], str],
        *,
        max_entries: int = 100_000,
        dedup_window_ms: int = 600_000,
        seen_capacity: int = 1_000_000,
    ) -> None:
        self._clock_ms = clock_ms
        self._wall_ms = wall_ms
        self._new_id = new_decision_id
        self.max_entries = max_entries
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._answered: OrderedDict[tuple[str, str], _Answered] = OrderedDict()
        self.seen = SeenIds(clock_ms, dedup_window_ms, seen_capacity)
        self._epoch = 0
        self._live = False
        self.stats = OverLimitStats()

    # -- the events ---------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self._live

    def open(self) -> None:
        """The owner is subscribed to the room events: answering may start."""
        self._epoch += 1
        self._live = True

    def close(self) -> None:
        """The subscription is gone (or never was): answer nothing, forget every entry."""
        self._live = False
        self._epoch += 1
        self._entries.clear()

    def invalidate(self, tenant: str | None) -> None:
        """Something may have added room for ``tenant`` (``None``: for any tenant)."""
        self._epoch += 1
        self.stats.invalidations += 1
        if tenant is None:
            self._entries.clear()
            return
        for k in [k for k in self._entries if k[0] == tenant]:
            del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> OverLimitStats:
        self.stats.entries = len(self._entries)
        self.stats.live = self._live
        return self.stats

    # -- the hot path ---------------------------------------------------------------------

    def ticket(self) -> Ticket | None:
        """Take before sending a store call whose verdict may be learned; None: not live."""
        if not self._live:
            return None
        return Ticket(self._epoch, self._clock_ms())

    def answer(self, usage: Usage, policy_version: int, *, retried: bool = False) -> Verdict | None:
        """The verdict of the admit ``usage`` (valid, decided with ``policy_version``) without
        the store, or None: ask the store."""
        if not self._live or usage.mode is not Mode.ADMIT:
            return None
        s = usage.subject
        done = self._answered.get((s.tenant, usage.request_id))
        if done is not None:
            if done.usage == (s.slice, s.key, usage.metric, usage.amount):
                self.stats.replays += 1
                return done.verdict._replace(replayed=True)
            return None  # the same id for another usage: the store says what that is
        if retried:
            self.stats.bypassed_retries += 1
            return None
        key = (s.tenant, s.slice, s.key, usage.metric)
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock_ms()
        if now >= entry.until_ms or entry.version != policy_version:
            del self._entries[key]
            return None
        if not entry.amount <= usage.amount <= entry.ceiling:
            return None
        if (s.tenant, usage.request_id) in self.seen:
            self.stats.bypassed_seen += 1
            return None
        self._entries.move_to_end(key)
        elapsed = now - entry.sent_ms
        v = entry.verdict
        verdict = v._replace(
            request_id=usage.request_id,
            decision_id=self._new_id(),
            retry_after_ms=entry.until_ms - now,
            limits=tuple(
                lim._replace(reset_after_ms=max(0, lim.reset_after_ms - elapsed))
                for lim in v.limits
            ),
            recorded=False,
            replayed=False,
            trace_id="",
            message=CACHED_MESSAGE,
            decided_at_ms=self._wall_ms(),
        )
        answered = self._answered
        answered[(s.tenant, usage.request_id)] = _Answered(
            (s.slice, s.key, usage.metric, usage.amount), verdict
        )
        if len(answered) > self.max_entries:
            answered.popitem(last=False)
        self.stats.hits += 1
        return verdict

    def learn(self, usage: Usage, verdict: Verdict, ticket: Ticket | None) -> None:
        """Take in the store's verdict of ``usage`` (a store call started with ``ticket``)."""
        if usage.mode is not Mode.ADMIT or verdict.degraded:
            return
        s = usage.subject
        if verdict.decision is Decision.ALLOW:
            if verdict.recorded or verdict.replayed:
                self.seen.add(s.tenant, usage.request_id)
            key = (s.tenant, s.slice, s.key, usage.metric)
            entry = self._entries.get(key)
            if entry is not None and usage.amount >= entry.amount and not verdict.replayed:
                # room the entry said there was none of: something this cache did not hear of
                del self._entries[key]
            return
        if (
            ticket is None
            or ticket.epoch != self._epoch
            or verdict.replayed  # its retry_after is from its first decision
            or (verdict.decision, verdict.reason) not in CACHEABLE
            or verdict.retry_after_ms <= 1
        ):
            return
        hard = [lim for lim in verdict.limits if not lim.soft]
        if not hard:
            return
        if verdict.decision is Decision.THROTTLE and any(
            lim.kind is LimitKind.QUOTA for lim in hard
        ):
            # other usage may exhaust the quota meanwhile: the store would then say DENY
            # QUOTA_EXHAUSTED, not THROTTLE (a quota refusal wins over a rate's)
            return
        key = (s.tenant, s.slice, s.key, usage.metric)
        entries = self._entries
        old = entries.get(key)
        if (
            old is not None
            and old.amount < usage.amount
            and self._clock_ms() < old.until_ms
            and old.version == verdict.policy_version
        ):
            return  # the entry in place answers for this amount too, and for smaller ones
        entries[key] = _Entry(
            usage.amount,
            min(lim.capacity for lim in hard),
            ticket.sent_ms + verdict.retry_after_ms - 1,
            ticket.sent_ms,
            verdict.policy_version,
            verdict,
        )
        entries.move_to_end(key)
        self.stats.learned += 1
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def note_allowed(self, usage: Usage) -> None:
        """An admit of ``usage`` allowed by another path than :meth:`learn` (a stream batch,
        a lease): a retry of its request id must never get a cached refusal."""
        self.seen.add(usage.subject.tenant, usage.request_id)
