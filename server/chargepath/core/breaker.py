"""A circuit breaker around the store, so that a dead store costs no time per decision.

It opens only on evidence that the store is unhealthy, never on a timeout alone:

* ``failures`` consecutive store calls that failed with a connection error (the store refused
  or dropped the connection: :meth:`failure`);
* a failed probe (:meth:`probe_failed`): after a store call timed out, its owner pings the
  store on its own, within a bound of its own, and reports the outcome. A store call's timeout
  alone proves nothing: the gateway's event loop may have been late (CPU starvation, a
  garbage collection, its own backlog) while Redis answered in time. :meth:`suspect` says
  whether such a probe should start (none is running).

Open: calls are refused at once. A successful probe closes it (:meth:`success`); so does a
call that goes through and succeeds after ``cooldown_ms`` (half-open: one call at a time).
The clock is injected (milliseconds); the breaker itself does no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, clock_ms: Callable[[], int], *, failures: int = 5, cooldown_ms: int = 250):
        self._clock_ms = clock_ms
        self._threshold = failures
        self._cooldown_ms = cooldown_ms
        self._failures = 0
        self._opened_at = 0
        self._probing = False
        #: whether a store probe (the owner's ping) is running
        self.probe_running = False
        #: times the breaker went from closed (or half-open) to open
        self.openings = 0
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
        """A store call or a probe succeeded: the store answers."""
        self._failures = 0
        self._probing = False
        self.state = BreakerState.CLOSED

    def failure(self) -> None:
        """A store call failed with a connection error (evidence against the store)."""
        self._probing = False
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            self._open()

    def suspect(self) -> bool:
        """A store call timed out: not evidence by itself. True if the owner should start a
        probe now (none is running); it then reports :meth:`probe_failed` or
        :meth:`success`, and sets :attr:`probe_running` back to False when it stops."""
        if self.probe_running:
            return False
        self.probe_running = True
        return True

    def probe_failed(self) -> None:
        """The store did not answer a probe within its bound: open (again) now."""
        self._probing = False
        self._open()

    def _open(self) -> None:
        if self.state is not BreakerState.OPEN:
            self.openings += 1
        self.state = BreakerState.OPEN
        self._opened_at = self._clock_ms()
