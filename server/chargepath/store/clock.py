"""Redis' clock as one gateway process sees it: how a deadline on the event loop's clock is
written on Redis' clock, so that ``decide.lua`` can refuse a batch that comes to run after the
gateway stopped waiting for it (see ``ARG_DEADLINE`` in :mod:`chargepath.store.protocol`).

The offset between the two clocks is measured on every store reply that carries Redis' time:
a reply read at loop time ``received`` to a call sent at ``sent``, stamped ``now_ms`` by the
script, bounds it: ``now_ms - received <= offset <= now_ms - sent`` (+1 ms: ``TIME`` is read
to the millisecond, rounded down). The estimate is the largest lower bound seen, so a
deadline written with it is never later on Redis' clock than the gateway's own (conservative:
at worst a batch is refused a little early, and answered degraded, never recorded late). It
is kept honest three ways:

* **Drift.** The loop's clock (monotonic) and Redis' (``gettimeofday``, which NTP slews at most
  :data:`DRIFT` ms per ms) drift apart: an estimate is lowered by :data:`DRIFT` per ms of age.
* **Age.** An estimate older than :data:`MAX_AGE_MS` is not used (no deadline is sent, the
  residue path of the engine reconciles), so the drift allowance stays below
  ``DRIFT * MAX_AGE_MS`` (2.5 ms) and an idle gateway is never refused for being idle.
* **Steps.** A reply whose upper bound is below the estimate (Redis' clock stepped back, or a
  failover moved the data to a host whose clock is behind) replaces it.

One estimate per process: on Redis Cluster the nodes' clocks differ by their synchronisation
error, and the estimate follows the fastest node; a batch on a slower node may then commit
that much past the gateway's deadline, which the engine reconciles as a late reply.
"""

from __future__ import annotations

import math

#: How fast, at most, the two clocks drift apart (ms per ms): NTP's maximum slew, 500 ppm.
DRIFT = 0.0005
#: An estimate older than this (loop ms) is not used.
MAX_AGE_MS = 5_000.0


class StoreClock:
    """The offset of Redis' clock (ms) to the event loop's (``loop.time()``, seconds), as a
    lower bound. Not thread-safe: one per store, used from its event loop."""

    __slots__ = ("_at_ms", "_lower_ms")

    def __init__(self) -> None:
        self._lower_ms: float | None = None
        self._at_ms = 0.0

    def offset_ms(self, at_s: float) -> float | None:
        """The estimate at loop time ``at_s``: a lower bound of ``redis_ms - loop_ms``, or None
        when no reply was seen within :data:`MAX_AGE_MS`."""
        if self._lower_ms is None:
            return None
        age = at_s * 1000 - self._at_ms
        if age > MAX_AGE_MS:
            return None
        return self._lower_ms - DRIFT * max(0.0, age)

    def observe(self, sent_s: float, received_s: float, store_now_ms: int) -> None:
        """A reply stamped ``store_now_ms`` by Redis, to a call sent at loop time ``sent_s``
        and read at ``received_s``."""
        lower = store_now_ms - received_s * 1000
        upper = store_now_ms + 1 - sent_s * 1000
        current = self.offset_ms(received_s)
        if current is None or lower >= current or upper < current:
            self._lower_ms, self._at_ms = lower, received_s * 1000

    def deadline_ms(self, deadline_s: float) -> int:
        """Loop time ``deadline_s`` on Redis' clock, in ms: rounded down, and 1 ms earlier
        (``decide.lua`` compares it with ``TIME`` read to the ms, rounded down); 0 (no
        deadline) while there is no estimate."""
        offset = self.offset_ms(deadline_s)
        if offset is None:
            return 0
        return max(1, math.floor(deadline_s * 1000 + offset) - 1)
