"""Where counters, dedup records and the ledger live: the store contract and its Redis
implementation."""

from chargepath.store.base import (
    DecideItem,
    MeteringStore,
    PolicyConflictError,
    PublishedPolicy,
    StalePolicyError,
    StoreUnavailableError,
)

__all__ = [
    "DecideItem",
    "MeteringStore",
    "PolicyConflictError",
    "PublishedPolicy",
    "StalePolicyError",
    "StoreUnavailableError",
]
