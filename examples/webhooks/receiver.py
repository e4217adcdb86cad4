"""A webhook receiver for Chargepath, standard library only: verify, deduplicate, acknowledge.

Run it, then point a webhook of the plan file at it:

    CHARGEPATH_WEBHOOK_SECRET=s3cret python examples/webhooks/receiver.py --port 8080

    webhooks:
      - name: ops
        url: http://127.0.0.1:8080/chargepath
        events: [quota.80, quota.100, suspension, degraded]
        secret_env: CHARGEPATH_WEBHOOK_SECRET   # the same secret, in the gateway's environment

Every delivery is a POST of a JSON event with the header

    Chargepath-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + raw body>

keyed with the shared secret. :func:`verify` checks it as Stripe's libraries do: over the raw
bytes (before any JSON parsing), in constant time, and refusing a timestamp more than
``tolerance_s`` away from this machine's clock, so that a captured delivery cannot be
replayed later. Delivery is at least once: the same event may arrive again (a retry, or
another gateway process taking over), always with the same ``id``; act on each id once.
Answer 2xx quickly (do slow work afterwards): anything else, or no answer within the
gateway's timeout, is retried with exponential backoff.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

SIGNATURE_HEADER = "Chargepath-Signature"
#: How far a delivery's timestamp may be from this machine's clock (seconds).
DEFAULT_TOLERANCE_S = 300


class SignatureError(ValueError):
    """A delivery whose signature does not verify: refuse it (HTTP 400)."""


def verify(
    secret: bytes,
    header: str | None,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check a ``Chargepath-Signature`` header against the raw ``body``; the delivery's
    timestamp (unix seconds) if it verifies, else :class:`SignatureError`. Any of several
    ``v1`` values may match (a secret being rotated)."""
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError(f"bad timestamp {value!r}") from None
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError("the header needs t=<unix seconds> and v1=<hex>")
    signed = str(timestamp).encode() + b"." + body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureError("signature does not match (wrong secret, or a modified body)")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureError(
            f"timestamp {timestamp} is {current - timestamp:+.0f} s from now "
            f"(tolerance {tolerance_s:g} s): a replayed delivery?"
        )
    return timestamp


class Receiver(BaseHTTPRequestHandler):
    """Verifies, deduplicates by event id (in memory: use a database with a unique key in
    production), prints each new event as a JSON line, answers 204."""

    secret: ClassVar[bytes] = b""
    seen: ClassVar[set[str]] = set()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            verify(self.secret, self.headers.get(SIGNATURE_HEADER), body)
        except SignatureError as exc:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(str(exc).encode())
            return
        event = json.loads(body)
        if event["id"] not in self.seen:
            self.seen.add(event["id"])
            print(json.dumps(event), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--secret-env",
        default="CHARGEPATH_WEBHOOK_SECRET",
        help="environment variable holding the shared secret",
    )
    args = parser.parse_args()
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        print(f"set {args.secret_env} to the webhook's secret", file=sys.stderr)
        return 2
    Receiver.secret = secret.encode()
    server = ThreadingHTTPServer((args.host, args.port), Receiver)
    print(f"listening on http://{args.host}:{server.server_port}/", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
