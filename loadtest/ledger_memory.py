"""Peak memory of ``chargepath ledger export`` and ``summary`` as the ledger grows.

Fills a fresh embedded redis-server with 20,000 then 200,000 ledger entries (reports of one
tenant, in the packed format decide.lua writes), runs ``ledger export`` in every format and
``ledger summary`` against each, and prints each run's time and peak RSS (``wait4``): an export
that reads in pages keeps the same peak whatever the ledger's length.

    .venv/bin/python -m loadtest.ledger_memory
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.protocol import US, ledger_key

TENANT = "mvno-demo"
SIZES = (20_000, 200_000)


def fill(client: redis.Redis, start: int, end: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(start, end):
        packed = US.join(
            [f"req-{i}", f"{i:032x}", "1-000001", f"ue-{i % 100}", "slice.bytes", str(1000 + i),
             "report", "1", "1", "1", str(1_796_000_000_000 + i), "0", '{"cell":"A1"}']
        )  # fmt: skip
        pipe.xadd(ledger_key(TENANT), {"x": packed})
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()


def measure(url: str, folder: Path, what: str) -> str:
    out = folder / f"out.{what}"
    cmd = (
        ["summary", "--json"] if what == "summary" else ["export", "--format", what, "-o", str(out)]
    )
    argv = [
        sys.executable,
        "-m",
        "chargepath",
        "ledger",
        *cmd,
        "--tenant",
        TENANT,
        "--redis-url",
        url,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    size = out.stat().st_size / 1e6 if out.exists() else 0.0
    return (
        f"{what:8} exit {proc.returncode}  {time.monotonic() - started:5.1f} s  "
        f"peak RSS {usage.ru_maxrss / 1024:6.1f} MB  output {size:6.1f} MB"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = EmbeddedRedis(folder / "redis")
        server.start()
        try:
            with redis.Redis.from_url(server.url) as client:
                filled = 0
                for n in SIZES:
                    fill(client, filled, n)
                    filled = n
                    for what in ("jsonl", "csv", "parquet", "summary"):
                        print(f"{n:>7} entries  {measure(server.url, folder, what)}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
