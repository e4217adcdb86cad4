"""The bounded local allowance used when the store is unreachable and a tenant fails open.

Each gateway process keeps, in memory, a token bucket per (rate limit, scope instance) with the
plan's own capacity and refill, so that during an outage a tenant can spend at most what its
plan would allow on this process. The bucket follows the store's rules (:mod:`chargepath.core.
counters`): refill, clamp to capacity, and conversion of the level when a plan change changes
the limit's scale. Quotas are not enforced locally (their counters live in the store). Nothing
here is recorded: degraded verdicts always say ``recorded = false``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chargepath.core.counters import converted_level, fill_wait_ms, refilled_level
from chargepath.core.model import LimitKind, Subject
from chargepath.core.policy import Limit


@dataclass(slots=True)
class _Bucket:
    level: int  # sub-units of ``scale`` (see Limit)
    at_ms: int
    scale: int


class LocalAllowance:
    """Token buckets in process memory. Not thread-safe: call from one event loop.

    ``clock_ms`` returns a monotonic time in milliseconds (injected so tests need no sleeps).
    At most ``max_buckets`` buckets are kept; when full, the whole table is dropped, which can
    only grant a fresh burst, never block a tenant forever.
    """

    def __init__(self, clock_ms: Callable[[], int], max_buckets: int = 100_000) -> None:
        self._clock_ms = clock_ms
        self._max = max_buckets
        self._buckets: dict[tuple[str, str, str, str], _Bucket] = {}

    def take(self, subject: Subject, limits: tuple[Limit, ...], amount: int) -> int:
        """Take ``amount`` from every rate limit, all or nothing.

        Returns 0 when taken, else the milliseconds until it would fit (-1 if it never can).
        """
        now = self._clock_ms()
        rates = [lim for lim in limits if lim.kind is LimitKind.RATE and not lim.soft]
        wait = 0
        states: list[tuple[_Bucket, int]] = []
        for lim in rates:
            need = amount * lim.scale
            if need > lim.capacity_sub:
                return -1
            b = self._bucket(subject, lim, now)
            wait = max(wait, fill_wait_ms(need, b.level, lim.refill_per_ms))
            states.append((b, need))
        if wait:
            return wait
        for b, need in states:
            b.level -= need
        return 0

    def level(self, subject: Subject, lim: Limit) -> int:
        """The level now, in sub-units, of the bucket of ``lim`` for ``subject``."""
        return self._bucket(subject, lim, self._clock_ms()).level

    def _bucket(self, subject: Subject, lim: Limit, now: int) -> _Bucket:
        key = (subject.tenant, lim.name, subject.slice, subject.key)
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self._max:
                self._buckets.clear()
            b = self._buckets[key] = _Bucket(lim.capacity_sub, now, lim.scale)
        level = converted_level(b.level, b.scale, lim.scale)
        b.level = refilled_level(level, b.at_ms, now, lim.capacity_sub, lim.refill_per_ms)
        b.at_ms = now
        b.scale = lim.scale
        return b
