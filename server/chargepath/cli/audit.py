"""``chargepath audit``: read the audit trail of admin changes.

It asks the gateway (AdminService.ListAuditEvents, operators only) rather than Redis: the
operator's machine needs the gateway's address and an operator credential (found as every
command finds it: --api-key, CHARGEPATH_API_KEY, or the data dir's operator.key), never the
Redis password, and the permission table decides who may read the trail. ``--follow`` polls every
``--interval`` seconds from the last cursor, so it neither misses nor repeats an event.

Each event: when (UTC, the store's clock), who (key id or certificate identity, and role;
"anonymous" with ``--auth none``), the RPC and a summary of its arguments, the outcome, the
policy version before and after (policy changes only) and the tenants affected.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from chargepath.cli import connection, render, values
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc

_DURATION = re.compile(r"(\d+)([smhd])")


def parse_since(text: str) -> datetime:
    """A time in the past: a duration back from now (``90s``, ``30m``, ``1h``, ``7d``) or an
    ISO 8601 time (UTC when it has no offset)."""
    m = _DURATION.fullmatch(text.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration back from now (30m, 1h, 7d) or an ISO 8601 time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="read the audit trail of admin changes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    connection.add_options(p)
    p.add_argument(
        "--timeout", type=values.seconds, default=10.0, help="deadline of each call in seconds"
    )
    p.add_argument("--tenant", default="", help="only the changes that affected this tenant")
    p.add_argument("--since", type=parse_since, help="30m, 1h, 7d, or an ISO 8601 time")
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.add_argument(
        "--interval", type=values.seconds, default=1.0, help="--follow: seconds between polls"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def line(e: apb.AuditEvent) -> str:
    """One event as a line of text."""
    at = e.at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    who = f"{e.identity}({e.role})" if e.role else e.identity
    versions = (
        f" v{e.policy_version_before}->v{e.policy_version_after}" if e.policy_version_after else ""
    )
    tenants = f" [{','.join(e.tenants)}]" if e.tenants else ""
    detail = f": {e.detail}" if e.detail else ""
    return f"{at} {who} {e.method} {e.outcome}{detail}{versions}{tenants} {e.summary}"


def run(args: argparse.Namespace) -> int:
    """Print the events (and, with ``--follow``, new ones as they come); the exit status."""
    request = apb.ListAuditEventsRequest(tenant=args.tenant, limit=1000)
    if args.since is not None:
        request.since.FromDatetime(args.since)
    out = render.console(200)
    try:
        channel = connection.open_channel(args)
    except connection.ConnectionOptionError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = apb_grpc.AdminServiceStub(channel)
        try:
            while True:
                page = stub.ListAuditEvents(request, timeout=args.timeout)
                for event in page.events:
                    if args.json:
                        data = render.plain(event)
                        print(json.dumps(data, separators=(",", ":")), flush=True)
                    else:
                        out.print(line(event), highlight=False, markup=False, soft_wrap=True)
                # the end of the trail: a page with nothing new whose cursor did not move (a
                # short page may only mean the tenant filter skipped many entries)
                at_end = not page.events and page.next_cursor == request.after
                request.after = page.next_cursor
                if at_end:
                    if not args.follow:
                        return 0
                    time.sleep(args.interval)
        except grpc.RpcError as err:
            print(f"chargepath: {connection.describe_error(err, args)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
