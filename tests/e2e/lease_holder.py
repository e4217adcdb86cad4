"""A lease holder process for tests/e2e/test_client_lease.py: `Client.lease` on one subject,
spending as fast as it can for a while, then closing the lease.

    python -m tests.e2e.lease_holder --target HOST:PORT --api-key KEY --tenant T \
        --metric M --units N --seconds S

Prints one JSON line: what `try_acquire` allowed (`spent`), the calls it refused, the
gateway answers, and the wall-clock times (time.time()) just before the lease was opened
and just after it was closed.
"""

from __future__ import annotations

import argparse
import json
import time

from chargepath_client import Client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--metric", required=True)
    parser.add_argument("--units", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--holder", default="")
    args = parser.parse_args()

    with Client(args.target, api_key=args.api_key) as client:
        lease = client.lease(args.tenant, args.metric, units=args.units, holder=args.holder)
        started = time.time()
        with lease:
            acquire = lease.try_acquire
            refused = 0
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                for _ in range(1000):
                    if not acquire():
                        refused += 1
        ended = time.time()
        print(
            json.dumps(
                {
                    "spent": lease.spent,
                    "refused": refused,
                    "answers": lease.answers,
                    "unreported": lease.unreported,
                    "started": started,
                    "ended": ended,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
