"""Retry policy: which failures are retried, how long to wait, and when to give up.

Retrying is safe because every attempt of a usage carries the same request id (and, on a
stream, the same session id and sequence): the gateway answers a repeat from its record
(`replayed=True`) and counts nothing twice. So the question is only whether the failure is
transient. UNAVAILABLE (connection refused or dropped, gateway draining) and
RESOURCE_EXHAUSTED (server overload) are; so is DEADLINE_EXCEEDED when it is the
per-attempt timeout that ran out and the call's overall deadline leaves room for another
attempt. Anything else (INVALID_ARGUMENT, UNAUTHENTICATED, INTERNAL...) is raised at once.

Backoff is exponential with "full jitter" (a uniform draw in [0, backoff]), as gRPC's own
retry design (gRFC A6) does, so that many clients cut off together do not come back together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# grpc's asyncio layer reports a send that failed because the connection broke under it as
# INTERNAL with this message, set client-side (grpc/grpc#34148, #36066): a transport failure
# like UNAVAILABLE, not a server error.
_LOCAL_TRANSPORT_FAILURE = "Internal error from Core"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a call (or a stream reconnect) is retried.

    - `max_attempts`: attempts in all, the first included (1 disables retries). On a stream,
      consecutive connections that fail without receiving a single verdict.
    - `initial_backoff`, `max_backoff` (seconds), `backoff_multiplier`: the n-th retry waits
      a uniform random time in [0, min(max_backoff, initial_backoff * multiplier**(n-1))].
    - `per_attempt_timeout` (seconds): a cap on one attempt, so that a request lost on a
      dead connection is retried before the overall deadline; None gives each attempt all
      the time left.
    - `retryable_codes`: status codes treated as transient (DEADLINE_EXCEEDED of a
      per-attempt timeout always is).
    """

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    backoff_multiplier: float = 2.0
    per_attempt_timeout: float | None = None
    retryable_codes: frozenset[grpc.StatusCode] = field(default=_TRANSIENT)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be at least 1")
        if self.per_attempt_timeout is not None and self.per_attempt_timeout <= 0:
            raise ValueError("per_attempt_timeout must be positive")

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def is_transient(self, code: grpc.StatusCode, details: str | None = "") -> bool:
        """Whether a failure with this status is worth another attempt (the per-attempt
        DEADLINE_EXCEEDED case aside, which `Attempts` judges)."""
        if code == grpc.StatusCode.INTERNAL and details == _LOCAL_TRANSPORT_FAILURE:
            code = grpc.StatusCode.UNAVAILABLE
        return code in self.retryable_codes

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the `retry`-th retry (1 for the first)."""
        # The exponent is capped so that a long-running stream's retry count cannot overflow.
        exponent = min(max(retry - 1, 0), 32)
        ceiling = min(self.max_backoff, self.initial_backoff * self.backoff_multiplier**exponent)
        return rand() * ceiling


class Attempts:
    """The retry state of one unary call: its overall deadline and the attempts made so far.

    Use: `timeout = attempts.start()` before each attempt (None: the deadline is gone), then
    on failure `pause = attempts.retry_after(code)` (None: give up and raise).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        deadline: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.made = 0
        self._clock = clock
        self._rand = rand
        self._end = clock() + deadline
        self._timeout = 0.0
        self._remaining_at_start = 0.0

    def remaining(self) -> float:
        return self._end - self._clock()

    def start(self) -> float | None:
        """Count an attempt and return its timeout in seconds, or None if none is left."""
        remaining = self.remaining()
        if remaining <= 0:
            return None
        self.made += 1
        timeout = remaining
        if self.policy.per_attempt_timeout is not None:
            timeout = min(timeout, self.policy.per_attempt_timeout)
        self._timeout = timeout
        self._remaining_at_start = remaining
        return timeout

    def retry_after(self, code: grpc.StatusCode, details: str | None = "") -> float | None:
        """After a failed attempt: seconds to wait before the next one, or None to give up."""
        if self.made >= self.policy.max_attempts:
            return None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Only the per-attempt timeout is worth retrying; the overall one is final.
            if self._timeout >= self._remaining_at_start:
                return None
        elif not self.policy.is_transient(code, details):
            return None
        pause = self.policy.backoff(self.made, self._rand)
        if pause >= self.remaining():
            return None
        return pause
