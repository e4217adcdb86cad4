"""The open-loop arrival schedule: when each operation is meant to be sent.

The schedule is a pure function of the start time, the rate and the index of the arrival, never
of when earlier answers came back. A slow answer therefore delays nothing that follows it, and
latency is measured from these intended times: a stall of the server shows up as the latency of
every operation that should have been sent during the stall (no coordinated omission).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Rounding slack for ``duration * rate`` products that should be whole numbers.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Schedule:
    """The arrivals of one flow that one worker owns.

    The flow's arrivals, all workers together, are numbered k = 0, 1, 2, ... and are due at
    ``start + k / rate`` seconds (on ``time.monotonic()``), for every k with ``k / rate <
    duration``. Worker ``worker`` of ``workers`` owns the arrivals with ``k % workers == worker``:
    the workers together send exactly ``rate`` operations per second, evenly interleaved. The
    worker's own arrivals are numbered i = 0, 1, 2, ... (i.e. ``k = i * workers + worker``).
    """

    start: float
    rate: float
    duration: float
    worker: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.duration < 0:
            raise ValueError(f"duration must not be negative, got {self.duration}")
        if self.workers < 1 or not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} is not one of {self.workers} workers")

    @property
    def flow_total(self) -> int:
        """Arrivals of the flow in ``[start, start + duration)``, all workers together."""
        return max(0, math.ceil(self.duration * self.rate - _EPSILON))

    @property
    def total(self) -> int:
        """Arrivals this worker owns."""
        return self._owned(self.flow_total)

    def time_of(self, i: int) -> float:
        """Intended send time of this worker's arrival number ``i``."""
        return self.start + (i * self.workers + self.worker) / self.rate

    def due(self, now: float) -> int:
        """How many of this worker's arrivals are due at ``now``: those with an intended time at
        or before ``now``, at most :attr:`total`."""
        if now < self.start:
            return 0
        flow_due = math.floor((now - self.start) * self.rate + _EPSILON) + 1
        return min(self._owned(flow_due), self.total)

    def _owned(self, flow_count: int) -> int:
        # Arrivals k in [0, flow_count) with k % workers == worker.
        if flow_count <= self.worker:
            return 0
        return (flow_count - self.worker + self.workers - 1) // self.workers
