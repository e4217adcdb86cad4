"""``chargepath webhooks log``: the delivery log of the policy's webhooks.

One line per delivery attempt, oldest first, of the newest ``--limit``: when (UTC), the
outcome (``delivered``; ``retry``, with the wait before the next attempt; ``failed``, given
up), the HTTP status or the error, the attempt number, the event type, tenant and id, the
endpoint and the time the attempt took. ``--failed`` shows only the attempts that did not
deliver; ``--tenant`` only one tenant's events (degraded-mode events have no tenant).

It reads the log from Redis, as ``ledger export`` does, not through a gateway: the log
matters most when gateways are in trouble (a degraded-mode event, an endpoint down), and it is
an operator's view of the deployment's Redis. The Redis URL is ``--redis-url``, else
``CHARGEPATH_REDIS_URL``, else the embedded Redis's ``<data-dir>/redis/url``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from chargepath.cli.ledger import LedgerCliError, add_redis_options, resolve_redis_target

if TYPE_CHECKING:
    from chargepath.store.webhooks import DeliveryRecord


def add_parser(subparsers: Any) -> None:
    """Register ``webhooks log`` on the ``chargepath`` subparsers."""
    hooks = subparsers.add_parser(
        "webhooks",
        help="the webhooks' delivery log",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    p = sub.add_parser(
        "log",
        help="print the delivery attempts, oldest first",
        description="Print the newest delivery attempts (at most --limit), oldest first.",
    )
    p.add_argument("--tenant", default="", help="only this tenant's events")
    p.add_argument("--failed", action="store_true", help="only attempts that did not deliver")
    p.add_argument("--limit", type=int, default=50, help="at most this many attempts (50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_redis_options(p)


def line(r: DeliveryRecord) -> str:
    """One attempt as a line of text."""
    at = datetime.fromtimestamp(r.at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    result = str(r.status) if r.status and not r.error else (r.error or "-")
    if r.status and r.error and not r.error.startswith("HTTP"):
        result = f"{r.status} {r.error}"
    outcome = r.outcome
    if r.outcome == "retry":
        outcome = f"retry in {r.retry_in_ms / 1000:.1f}s"
    return (
        f"{at} {outcome} [{result}] attempt {r.attempt} {r.type} "
        f"{r.tenant or '-'} {r.event_id} -> {r.endpoint} ({r.duration_ms} ms)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``chargepath webhooks log``; returns the exit status."""
    from redis.exceptions import RedisError

    from chargepath.store.base import StoreUnavailableError

    try:
        if args.limit <= 0:
            raise LedgerCliError("--limit must be positive")
        records = asyncio.run(_read(args))
    except LedgerCliError as exc:
        print(f"chargepath webhooks: {exc}", file=sys.stderr)
        return 2
    except (StoreUnavailableError, RedisError, OSError) as exc:
        print(f"chargepath webhooks: {exc}", file=sys.stderr)
        return 1
    for r in records:
        if args.json:
            print(json.dumps(asdict(r), separators=(",", ":")))
        else:
            print(line(r))
    return 0


async def _read(args: argparse.Namespace) -> list[DeliveryRecord]:
    from chargepath.store.connect import connect
    from chargepath.store.webhooks import WebhookStore

    client = connect(resolve_redis_target(args))
    try:
        return await WebhookStore(client).read_log(
            tenant=args.tenant, failed=args.failed, limit=args.limit
        )
    finally:
        await client.aclose()
