"""``chargepath ledger``: read a tenant's billing ledger.

``ledger export`` prints the entries of a time range and (unless ``--no-mark``) records them
as exported, which lets Redis trim them when the ledger has no consumer group.
``ledger consume`` reads through a consumer group and acknowledges each batch only after it
was written and flushed to stdout: a consumer killed at any point and restarted under the same
``--consumer`` name neither loses an entry nor prints an acknowledged entry twice; the entries
it printed but had not acknowledged yet are printed again (at-least-once; deduplicate by
``id``). A consumer restarted under another name takes over the entries the old one left
pending once they were idle for ``--claim-idle-s``.

Both commands first flush the ledger aggregates whose interval has ended (plans with
``ledger: {mode: aggregate}``), and ``consume`` keeps doing so every second.

The Redis URL is ``--redis-url``, else ``CHARGEPATH_REDIS_URL``, else the file
``<data-dir>/redis/url`` that the embedded Redis of ``chargepath serve`` writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from chargepath.store.connect import RedisTarget
    from chargepath.store.ledger import Ledger, LedgerEntry

DEFAULT_DATA_DIR = ".chargepath"


class LedgerCliError(Exception):
    """A usage error of ``chargepath ledger``: printed, exit status 2."""


def parse_time_ms(raw: str) -> int:
    """Milliseconds since the epoch, or an ISO 8601 time (UTC when it has no offset)."""
    text = raw.strip()
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{raw!r}: expected milliseconds since the epoch or an ISO 8601 time "
            "(e.g. 2026-01-31T00:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", required=True, help="tenant whose ledger to read")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="default jsonl")
    add_redis_options(p)


def add_redis_options(p: argparse.ArgumentParser) -> None:
    """Where a command that reads Redis directly finds it (see :func:`resolve_redis_target`)."""
    p.add_argument(
        "--redis-url", help="Redis URL (default: CHARGEPATH_REDIS_URL, else <data-dir>/redis/url)"
    )
    p.add_argument("--redis-cluster", action="store_true", default=None, help="a cluster node")
    p.add_argument("--redis-sentinel", help="Redis Sentinel instead: host:port,host:port,...")
    p.add_argument("--redis-master", help="with --redis-sentinel: the monitored master's name")
    p.add_argument(
        "--data-dir",
        help="folder of the embedded Redis whose URL to use "
        f"(default: CHARGEPATH_DATA_DIR, else {DEFAULT_DATA_DIR})",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``ledger export`` and ``ledger consume`` on the ``chargepath`` subparsers."""
    ledger = subparsers.add_parser(
        "ledger",
        help="read a tenant's billing ledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ledger.add_subparsers(dest="ledger_command", required=True)

    exp = sub.add_parser(
        "export",
        help="print ledger entries of a time range",
        description="Print the ledger entries written in [--since, --until) (stream id time, "
        "Redis clock), oldest first. Unless --no-mark, record them as exported: without a "
        "consumer group, exported entries are trimmed from Redis.",
    )
    _common(exp)
    exp.add_argument("--since", type=parse_time_ms, help="ISO 8601 time or epoch ms (inclusive)")
    exp.add_argument("--until", type=parse_time_ms, help="ISO 8601 time or epoch ms (exclusive)")
    exp.add_argument(
        "--no-mark",
        dest="mark",
        action="store_false",
        help="do not record the entries as exported (nothing is trimmed)",
    )

    con = sub.add_parser(
        "consume",
        help="read the ledger through a consumer group, acknowledging what was printed",
        description="Print the ledger entries delivered to --consumer of --group, "
        "acknowledging each batch once it is written and flushed to stdout. Runs until "
        "--max entries, --idle-exit-s without a new entry, SIGINT or SIGTERM.",
    )
    _common(con)
    con.add_argument("--group", required=True, help="consumer group, e.g. billing")
    con.add_argument("--consumer", default=None, help="consumer name (default: <hostname>-<pid>)")
    con.add_argument("--max", type=int, default=None, help="stop after N entries")
    con.add_argument(
        "--idle-exit-s", type=float, default=None, help="stop after S seconds without an entry"
    )
    con.add_argument("--batch", type=int, default=100, help="entries per read (default 100)")
    con.add_argument(
        "--claim-idle-s",
        type=float,
        default=60.0,
        help="take over entries pending on other consumers for this long (default 60; 0: never)",
    )
    con.add_argument(
        "--redis-wait-replicas",
        type=int,
        default=0,
        help="hand a batch on only once N replicas hold it (WAIT; 0: do not wait)",
    )
    con.add_argument(
        "--redis-wait-timeout-ms",
        type=int,
        default=200,
        help="how long one WAIT waits for the replicas (default 200)",
    )


def resolve_redis_url(args: argparse.Namespace, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if getattr(args, "redis_url", None):
        return str(args.redis_url)
    if env.get("CHARGEPATH_REDIS_URL"):
        return env["CHARGEPATH_REDIS_URL"]
    data_dir = getattr(args, "data_dir", None) or env.get("CHARGEPATH_DATA_DIR") or DEFAULT_DATA_DIR
    path = Path(data_dir) / "redis" / "url"
    try:
        url = path.read_text(encoding="utf-8").strip()
    except OSError:
        url = ""
    if not url:
        raise LedgerCliError(
            f"no Redis URL: pass --redis-url, set CHARGEPATH_REDIS_URL, or run `chargepath serve` "
            f"with its embedded Redis so that {path} exists (or point --data-dir at its folder)"
        )
    return url


def resolve_redis_target(
    args: argparse.Namespace, env: dict[str, str] | None = None
) -> RedisTarget:
    """The sentinels if given (flags or ``CHARGEPATH_*``), else :func:`resolve_redis_url`."""
    from chargepath.settings import Settings

    env = dict(os.environ) if env is None else env
    try:
        if getattr(args, "redis_sentinel", None) or env.get("CHARGEPATH_REDIS_SENTINEL"):
            return Settings.from_env(
                env,
                redis_sentinel=getattr(args, "redis_sentinel", None),
                redis_master=getattr(args, "redis_master", None),
                redis_url="",
            ).redis_target()
        return Settings.from_env(
            env,
            redis_url=resolve_redis_url(args, env),
            redis_cluster=getattr(args, "redis_cluster", None),
        ).redis_target()
    except ValueError as exc:
        raise LedgerCliError(str(exc)) from None


class _Writer:
    """Entries to a text stream as JSON lines or CSV (header first)."""

    def __init__(self, out: TextIO, fmt: str, csv_header: list[str]) -> None:
        self.out = out
        self.fmt = fmt
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(csv_header)

    def write(self, entry: LedgerEntry) -> None:
        if self._csv is not None:
            self._csv.writerow(entry.to_csv_row())
        else:
            self.out.write(json.dumps(entry.to_json_dict(), separators=(",", ":")) + "\n")

    def flush(self) -> None:
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    """Run ``chargepath ledger <export|consume>``; returns the exit status."""
    # Start-up time: redis-py and the store (about half a second of imports) load only when a
    # ledger command runs, not for check and the admin commands.
    from redis.exceptions import RedisError

    from chargepath.store.ledger import Ledger, LedgerEntry

    try:
        target = resolve_redis_target(args)
        header = LedgerEntry.csv_header()
        if args.ledger_command == "export":
            return asyncio.run(
                _export(Ledger.connect(target), _Writer(sys.stdout, args.format, header), args)
            )
        if args.ledger_command == "consume":
            if args.max is not None and args.max <= 0:
                return 0
            if args.batch <= 0:
                raise LedgerCliError("--batch must be positive")
            if args.redis_wait_replicas < 0 or args.redis_wait_timeout_ms <= 0:
                raise LedgerCliError(
                    "--redis-wait-replicas must be 0 or more, --redis-wait-timeout-ms positive"
                )
            wait = (
                (args.redis_wait_replicas, args.redis_wait_timeout_ms)
                if args.redis_wait_replicas
                else None
            )
            return asyncio.run(
                _consume(
                    Ledger.connect(target, replica_wait=wait),
                    _Writer(sys.stdout, args.format, header),
                    args,
                )
            )
        raise LedgerCliError(f"unknown ledger command {args.ledger_command!r}")
    except LedgerCliError as exc:
        print(f"chargepath ledger: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away: nothing after the last flush was acknowledged or marked.
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except (RedisError, OSError) as exc:
        print(f"chargepath ledger: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _export(ledger: Ledger, out: _Writer, args: argparse.Namespace) -> int:
    """Print the entries of the range, then (unless ``--no-mark``) mark each page exported once
    it is flushed to stdout; closes ``ledger``."""
    since: int | None = args.since
    first = "-" if not since or since <= 0 else f"{since}-0"
    try:
        await ledger.flush_aggregates(args.tenant)
        last = ""
        pending = 0
        async for entry in ledger.export(args.tenant, since, args.until, mark=False):
            out.write(entry)
            last = entry.id
            pending += 1
            if pending >= ledger.page_size:
                out.flush()
                if args.mark:
                    await ledger.mark_exported(args.tenant, last, start_id=first)
                pending = 0
        out.flush()
        if args.mark and pending:
            await ledger.mark_exported(args.tenant, last, start_id=first)
    finally:
        await ledger.close()
    return 0


async def _consume(ledger: Ledger, out: _Writer, args: argparse.Namespace) -> int:
    """Print and acknowledge batches until ``--max``, ``--idle-exit-s`` or a signal; closes
    ``ledger``."""
    consumer = args.consumer or default_consumer_name()
    claim_ms = (
        int(args.claim_idle_s * 1000) if args.claim_idle_s and args.claim_idle_s > 0 else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out.flush()
    consuming = asyncio.ensure_future(_consume_until(ledger, out, args, consumer, claim_ms, stop))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({consuming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not consuming.done():
            # a signal: the batch in hand is finished and acknowledged, within a bound (a store
            # call stuck in a failover must not keep the process); past it, what was handed on
            # and not acknowledged is delivered again to the next consumer (at least once)
            done, _ = await asyncio.wait({consuming}, timeout=STOP_GRACE_S)
            if not done:
                print(
                    f"chargepath ledger: stopped after {STOP_GRACE_S:.0f} s without finishing "
                    "the batch in hand; it is delivered again",
                    file=sys.stderr,
                )
                consuming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consuming  # its own cleanup closes the ledger
                return 0
        return consuming.result()
    finally:
        stopping.cancel()


#: How long ``ledger consume`` takes to stop on SIGTERM or SIGINT at most.
STOP_GRACE_S = 10.0


async def _consume_until(
    ledger: Ledger,
    out: _Writer,
    args: argparse.Namespace,
    consumer: str,
    claim_ms: int | None,
    stop: asyncio.Event,
) -> int:
    block_ms = 1000
    if args.idle_exit_s is not None:
        block_ms = max(10, min(block_ms, int(args.idle_exit_s * 1000)))
    last_entry = last_flush = time.monotonic()
    try:
        await ledger.flush_aggregates(args.tenant)
        batches = ledger.consume_batches(
            args.tenant,
            args.group,
            consumer,
            count=args.batch,
            block_ms=block_ms,
            claim_idle_ms=claim_ms,
            limit=args.max,
        )
        try:
            async for batch in batches:
                now = time.monotonic()
                if batch:
                    for _, entry in batch:
                        out.write(entry)
                    out.flush()  # written out first: only then acknowledged
                    await ledger.ack(args.tenant, args.group, [i for i, _ in batch])
                    last_entry = now
                elif args.idle_exit_s is not None and now - last_entry >= args.idle_exit_s:
                    break
                if now - last_flush >= 1.0:
                    await ledger.flush_aggregates(args.tenant)
                    last_flush = now
                if stop.is_set():
                    break
        finally:
            await batches.aclose()
    finally:
        await ledger.close()
    return 0
