"""The Redis side of gateway-held leases: recording the Check admits a gateway answered from a
lease it holds (``scripts/gateway_report.lua``), each under its own request id."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import msgpack
from redis.exceptions import RedisError

from chargepath.core.model import Usage
from chargepath.store.base import StoreUnavailableError
from chargepath.store.protocol import (
    GATEWAY_REPORTED,
    US,
    lease_key,
    ledger_key,
    read_script,
    tenant_prefix,
)
from chargepath.store.redis_store import RedisStore


class LeasedAdmit(NamedTuple):
    """An admit answered from a lease: the usage, its fingerprint (as a dedup record holds
    it: :func:`chargepath.engine.fingerprint`) and its decision id."""

    usage: Usage
    fingerprint: str
    decision_id: str


class GatewayReport(NamedTuple):
    """What a report did: ``recorded`` units now in the ledger (spent from the lease),
    ``credited`` units of admits already recorded elsewhere (left on the lease), and the
    lease's available units after it; ``gone``: the lease is closed or expired (or cannot
    cover them) and nothing was written."""

    gone: bool
    recorded: int = 0
    credited: int = 0
    available: int = 0


class RedisGatewayReports:
    """Reports of gateway-held leases on the Redis of ``store`` (its client, dedup window and
    clock offset)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._report = store.client.register_script(read_script("gateway_report.lua"))

    async def report(
        self, tenant: str, lease_id: str, policy_version: int, admits: Sequence[LeasedAdmit]
    ) -> GatewayReport:
        """Record ``admits`` (all of ``tenant``, answered from lease ``lease_id``) in one
        atomic step. Raises :class:`StoreUnavailableError`."""
        prefix = tenant_prefix(tenant)
        keys = [ledger_key(tenant), lease_key(tenant, lease_id)]
        payload = []
        for a in admits:
            u = a.usage
            keys.append(f"{prefix}d:{u.request_id}")
            text = (
                f"{u.request_id}{US}{a.decision_id}{US}{u.subject.slice}{US}{u.subject.key}"
                f"{US}{u.metric}{US}{u.amount}{US}admit"
            )
            tail = ""
            if u.labels or u.occurred_at_ms:
                labels = json.dumps(dict(u.labels), separators=(",", ":")) if u.labels else ""
                tail = f"{US}{u.occurred_at_ms}{US}{labels}"
            payload.append((a.fingerprint, a.decision_id, u.amount, text, tail))
        try:
            reply = await self._report(
                keys=keys,
                args=[
                    self.store.clock_offset_ms,
                    self.store.dedup_window_ms,
                    policy_version,
                    msgpack.packb(payload),
                ],
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if int(reply[0]) != GATEWAY_REPORTED:
            return GatewayReport(gone=True)
        return GatewayReport(False, int(reply[2]), int(reply[3]), int(reply[4]))
