"""The find-max search: raise the offered rate step by step until it is no longer sustained.

A step is sustained when no verdict came back degraded (decided by the failure policy because
the store did not answer in time), its p99 latency is within the bound and the achieved rate is at
least ``min_ratio`` of the offered rate (answered usages only: errors, drops and answers that
came after the step's window do not count). The search starts at ``start_rate``, multiplies
the rate by ``factor`` after each sustained step, and stops at the first step that is not
sustained, or after ``max_steps``. The answer is the highest sustained rate.

With ``retries`` (``--step-retries``), a rate that is not sustained is measured again, up to
``retries`` more times, before the search ends there: one blip of a shared machine (another
process taking the CPU for a few hundred milliseconds lands in a 6 s step's p99) then does not
end the search, while a rate that fails every time still does. The rule is the same for the
gateway and a ceiling, so their ratio stays fair; every attempt is kept in the report.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What one step measured. Rates are usages per second; ``p99_ms`` is the worst p99 of the
    step's flows, None when nothing was answered."""

    offered_rate: float
    achieved_rate: float
    p99_ms: float | None
    degraded: int = 0


@dataclass(frozen=True, slots=True)
class Judgement:
    sustained: bool
    reason: str


def judge(step: StepOutcome, p99_bound_ms: float, min_ratio: float) -> Judgement:
    """Whether ``step`` was sustained, and why (or why not), in words for the report."""
    ratio = step.achieved_rate / step.offered_rate if step.offered_rate > 0 else 0.0
    if step.p99_ms is None:
        return Judgement(False, "no answers")
    if ratio < min_ratio:
        return Judgement(False, f"achieved {ratio:.1%} of offered (< {min_ratio:.0%})")
    if step.degraded:
        return Judgement(False, f"{step.degraded:,} degraded verdicts (store timeouts)")
    if step.p99_ms > p99_bound_ms:
        return Judgement(False, f"p99 {step.p99_ms:.2f} ms > {p99_bound_ms:g} ms")
    return Judgement(True, f"p99 {step.p99_ms:.2f} ms, achieved {ratio:.1%} of offered")


class RateSearch:
    """Drives the geometric search; the caller runs each step.

    >>> search = RateSearch(start_rate=1000, factor=1.5, p99_bound_ms=10)
    >>> rate = search.next_rate()        # 1000
    >>> # ... run a step at `rate`, then:
    >>> search.record(StepOutcome(rate, achieved_rate=999, p99_ms=2.0)).sustained
    True
    >>> search.next_rate()               # 1500.0
    1500.0
    """

    def __init__(
        self,
        start_rate: float,
        factor: float,
        p99_bound_ms: float,
        min_ratio: float = 0.95,
        max_steps: int = 20,
        retries: int = 0,
    ) -> None:
        if start_rate <= 0:
            raise ValueError("start_rate must be positive")
        if factor <= 1:
            raise ValueError("factor must be above 1")
        if not 0 < min_ratio <= 1:
            raise ValueError("min_ratio must be in (0, 1]")
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.start_rate = start_rate
        self.factor = factor
        self.p99_bound_ms = p99_bound_ms
        self.min_ratio = min_ratio
        self.max_steps = max_steps
        self.retries = retries
        self.steps: list[tuple[StepOutcome, Judgement]] = []
        self._level = 0  # the rate's index: start_rate * factor ** level
        self._failures = 0  # failed attempts at the current level

    @property
    def done(self) -> bool:
        if len(self.steps) >= self.max_steps:
            return True
        return self._failures > self.retries

    def next_rate(self) -> float | None:
        """The rate of the next step, or None when the search is over."""
        if self.done:
            return None
        return self.start_rate * self.factor**self._level

    def record(self, step: StepOutcome) -> Judgement:
        if self.done:
            raise RuntimeError("the search is over")
        judgement = judge(step, self.p99_bound_ms, self.min_ratio)
        self.steps.append((step, judgement))
        if judgement.sustained:
            self._level += 1
            self._failures = 0
        else:
            self._failures += 1
        return judgement

    @property
    def best(self) -> StepOutcome | None:
        """The highest sustained step, None if even the first one was not sustained."""
        sustained = [s for s, j in self.steps if j.sustained]
        return max(sustained, key=lambda s: s.offered_rate) if sustained else None

    @property
    def limited_by_max_steps(self) -> bool:
        """True when the search stopped because it ran out of steps, not at a failed step: the
        real maximum is higher than :attr:`best`."""
        return len(self.steps) >= self.max_steps and self.steps[-1][1].sustained
