"""The store contract.

A :class:`MeteringStore` keeps every bucket, quota, dedup record and ledger entry. Its contract:

* :meth:`MeteringStore.decide` decides a batch of usages of ONE tenant in one atomic step: for
  each usage, in order, the dedup check, the limit checks and debits (all or nothing for admit,
  always for report), the dedup record and the ledger entry are written together or not at all.
  No other decision interleaves with the batch.
* Time is the store's clock (Redis ``TIME``), in milliseconds; amounts are whole units of the
  metric, kept exactly (integers, sub-units for fractional refill rates).
* Any failure to reach the store, or to get an answer in time, raises
  :class:`StoreUnavailableError`. Whether the batch was applied is then unknown; the usages'
  ids make a resend safe.
* A batch decided with a policy version older than the one stamped on the tenant raises
  :class:`StalePolicyError` and writes nothing.

Implementations must be safe to call concurrently from one event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from chargepath.core.model import Usage, Verdict
from chargepath.core.plans import PolicyDocument
from chargepath.core.policy import Resolution


class StoreUnavailableError(Exception):
    """The store could not be reached, or did not answer within the store timeout."""


class StalePolicyError(Exception):
    """The tenant has been stamped with a newer policy version than the one used."""

    def __init__(self, stamped_version: int) -> None:
        self.stamped_version = stamped_version
        super().__init__(f"policy version {stamped_version} is live")


class PolicyConflictError(Exception):
    """A policy change was computed from a version that is no longer live."""

    def __init__(self, live_version: int) -> None:
        self.live_version = live_version
        super().__init__(f"policy version {live_version} is live")


class DecideItem(NamedTuple):
    """One usage to decide, with the limits the policy resolved for it."""

    usage: Usage
    resolution: Resolution
    decision_id: str
    fingerprint: str
    trace_id: str = ""
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class PublishedPolicy:
    """A policy document as the store holds it."""

    version: int
    document: PolicyDocument
    changed: bool = False


class MeteringStore(Protocol):
    async def decide(
        self,
        tenant: str,
        policy_version: int,
        items: list[DecideItem],
        *,
        ok_limits: bool = True,
    ) -> list[Verdict]:
        """Decide ``items`` (all of ``tenant``) atomically; verdicts in the same order.
        ``ok_limits=False``: a verdict with reason OK carries no limit states (the caller's
        basic view; the store keeps them for explain all the same)."""
        ...

    async def publish_policy(
        self,
        document: PolicyDocument,
        *,
        force: bool = False,
        expected_version: int | None = None,
    ) -> PublishedPolicy:
        """Make ``document`` live under the next version and stamp every tenant it names or
        named. Returns only once every stamp is written (read-your-writes). With
        ``expected_version``, raise :class:`PolicyConflictError` unless it is the live one."""
        ...

    async def load_policy(self) -> PublishedPolicy | None:
        """The live policy, or None if none was ever published."""
        ...

    async def policy_version(self) -> int:
        """The live policy version (0 if none); cheap, for polling."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the store answers."""
        ...

    async def close(self) -> None: ...
