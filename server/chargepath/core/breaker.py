"""A circuit breaker around the store, so that a dead store costs no time per decision.

Closed: calls go through; ``failures`` consecutive failures open it. Open: calls are refused
at once for ``cooldown_ms``. Then half-open: one call at a time probes the store; a success
closes the breaker, a failure opens it again. The clock is injected (milliseconds).
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, clock_ms: Callable[[], int], *, failures: int = 5, cooldown_ms: int = 1000):
        self._clock_ms = clock_ms
        self._threshold = failures
        self._cooldown_ms = cooldown_ms
        self._failures = 0
        self._opened_at = 0
        self._probing = False
        self.state = BreakerState.CLOSED

    def allow(self) -> bool:
        """Whether a call may go to the store now."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock_ms() - self._opened_at < self._cooldown_ms:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self.state = BreakerState.CLOSED

    def failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            self.state = BreakerState.OPEN
            self._opened_at = self._clock_ms()
