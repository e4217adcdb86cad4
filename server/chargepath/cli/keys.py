"""``chargepath keys``: create, list, rotate and revoke API keys over the gateway's KeyService
(operators only). A new key is printed once, by ``create`` and ``rotate``, and never again: the
gateway keeps only its hash."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table

from chargepath.cli import connection, render, values
from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import keys_pb2_grpc as kpb_grpc

ROLES = {"meter": kpb.ROLE_METER, "viewer": kpb.ROLE_VIEWER, "operator": kpb.ROLE_OPERATOR}
ROLE_NAMES = {code: name for name, code in ROLES.items()}
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


class KeysCliError(Exception):
    """A usage error: one line naming the option, exit status 2."""


def parse_duration_s(text: str, option: str) -> int:
    """Seconds of ``30s``, ``15m``, ``2h`` or ``30d``."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise KeysCliError(f"{option}: expected a duration such as 30m, 2h or 30d, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_expiry(text: str) -> Timestamp:
    """A duration from now (``30d``) or an ISO 8601 time (UTC when it has no offset)."""
    if _DURATION.fullmatch(text.strip()):
        when = datetime.now(UTC) + timedelta(seconds=parse_duration_s(text, "--expires"))
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise KeysCliError(
                f"--expires: expected a duration (30m, 2h, 30d) or an ISO 8601 time, got {text!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def add_parser(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, list, rotate or revoke API keys (operators)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ksub.add_parser(name, help=help_text, description=help_text)
        connection.add_options(p)
        p.add_argument("--timeout", type=values.seconds, default=10.0, help="deadline in seconds")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        return p

    p = command("create", "create a key and print it (the only time it is shown)")
    p.add_argument("--role", required=True, choices=list(ROLES))
    p.add_argument("--tenant", default="", help="the tenant a meter or viewer key acts for")
    p.add_argument("--expires", help="a duration from now (30d) or an ISO 8601 time; default never")
    p.add_argument("--description", default="", help="what the key is for (at most 256 chars)")

    p = command("list", "list the keys (never their secrets)")
    p.add_argument("--tenant", default="", help="only this tenant's keys")
    p.add_argument("--all", action="store_true", help="include revoked keys")

    p = command("rotate", "replace a key by a new one with the same tenant, role and expiry")
    p.add_argument("key_id")
    p.add_argument(
        "--grace",
        default="0s",
        help="how long the old key keeps working, e.g. 1h (default 0s: revoked at once)",
    )

    p = command("revoke", "revoke a key now")
    p.add_argument("key_id")


def run(args: argparse.Namespace) -> int:
    try:
        request = _request(args)
        with connection.open_channel(args) as channel:
            stub = kpb_grpc.KeyServiceStub(channel)
            method = getattr(stub, type(request).__name__.removesuffix("Request"))
            response = method(request, timeout=args.timeout)
    except (KeysCliError, connection.ConnectionOptionError) as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"chargepath: {connection.describe_error(err, args)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(render.plain(response), indent=2))
        return 0
    _show(args.keys_command, response)
    return 0


def _request(args: argparse.Namespace) -> Any:
    cmd = args.keys_command
    if cmd == "create":
        if args.role == "operator" and args.tenant:
            raise KeysCliError("--tenant: an operator key acts for every tenant; leave it out")
        if args.role != "operator" and not args.tenant:
            raise KeysCliError(f"--tenant: required for a {args.role} key")
        request = kpb.CreateKeyRequest(
            tenant=args.tenant, role=ROLES[args.role], description=args.description
        )
        if args.expires:
            request.expires_at.CopyFrom(parse_expiry(args.expires))
        return request
    if cmd == "list":
        return kpb.ListKeysRequest(tenant=args.tenant, include_revoked=args.all)
    if cmd == "rotate":
        grace = Duration(seconds=parse_duration_s(args.grace, "--grace"))
        return kpb.RotateKeyRequest(key_id=args.key_id, grace_period=grace)
    return kpb.RevokeKeyRequest(key_id=args.key_id)


def _when(ts: Timestamp | None) -> str:
    if ts is None:
        return "never"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _summary(key: kpb.ApiKey) -> str:
    who = ROLE_NAMES.get(key.role, "?") + (f" of tenant {key.tenant}" if key.tenant else "")
    expires = _when(key.expires_at if key.HasField("expires_at") else None)
    return f"{key.key_id} ({who}, expires {expires})"


def _show(cmd: str, response: Any) -> None:
    out = render.console(140)
    if cmd == "list":
        table = Table("key id", "role", "tenant", "created", "expires", "revoked", "description")
        for k in response.keys:
            table.add_row(
                k.key_id,
                ROLE_NAMES.get(k.role, "?"),
                k.tenant or "(all)",
                _when(k.created_at),
                _when(k.expires_at if k.HasField("expires_at") else None),
                _when(k.revoked_at) if k.HasField("revoked_at") else "",
                k.description,
            )
        out.print(table)
        return
    if cmd == "revoke":
        print(f"revoked {_summary(response.key)}")
        return
    if cmd == "rotate" and response.HasField("previous"):
        prev = response.previous
        ends = _when(prev.revoked_at) if prev.HasField("revoked_at") else "now"
        print(f"rotated {prev.key_id}: it stops working at {ends}")
    print(f"created {_summary(response.key)}")
    # The key alone on the last line, for scripts: KEY=$(chargepath keys create ... | tail -1)
    print(response.secret_key)
    print("this is the only time the key is shown: store it now", file=sys.stderr)
