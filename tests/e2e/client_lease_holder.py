"""A lease holder process for tests/e2e/test_client_lease.py, on the Python client's
`Client.lease` (tests/e2e/lease_holder.py is the server's, on raw stubs): one subject
(`--leases N`: N leases, one thread each, on one client), spending as fast as it can for a
while, then closing its leases.

    python -m tests.e2e.client_lease_holder --target HOST:PORT --api-key KEY --tenant T \
        --metric M --units N --seconds S [--leases N] [--progress]

Prints one JSON line at the end: what `try_acquire` allowed (`spent`, and per lease), the
calls it refused, the gateway answers, and the wall-clock times (time.time()) just before the
first lease was opened and just after the last was closed. With `--progress`, also a line
`{"spent": n, "reported": r}` every 0.1 s while spending (a lower bound of what was spent by
then, and what was sent in reports), for a test that kills the process.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from chargepath_client import Client, Lease


def spend(lease: Lease, seconds: float, refused: list[int], i: int) -> None:
    acquire = lease.try_acquire
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        for _ in range(1000):
            if not acquire():
                count += 1
    refused[i] = count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--metric", required=True)
    parser.add_argument("--units", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--holder", default="")
    parser.add_argument("--leases", type=int, default=1)
    parser.add_argument("--report-every", type=float, default=1.0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    with Client(args.target, api_key=args.api_key) as client:
        leases = [
            client.lease(
                args.tenant,
                args.metric,
                units=args.units,
                holder=f"{args.holder}-{i}" if args.holder else "",
                report_every=args.report_every,
            )
            for i in range(args.leases)
        ]
        started = time.time()
        for lease in leases:
            lease.open()
        refused = [0] * len(leases)
        threads = [
            threading.Thread(target=spend, args=(lease, args.seconds, refused, i))
            for i, lease in enumerate(leases)
        ]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            if args.progress:
                spent = sum(lease.spent for lease in leases)
                unreported = sum(lease.unreported for lease in leases)
                print(json.dumps({"spent": spent, "reported": spent - unreported}), flush=True)
            for thread in threads:
                thread.join(0.1)
        for lease in leases:
            lease.close()
        ended = time.time()
        print(
            json.dumps(
                {
                    "spent": sum(lease.spent for lease in leases),
                    "per_lease": [lease.spent for lease in leases],
                    "refused": sum(refused),
                    "answers": [lease.answers for lease in leases],
                    "unreported": sum(lease.unreported for lease in leases),
                    "started": started,
                    "ended": ended,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
