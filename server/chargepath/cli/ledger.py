"""``chargepath ledger``: read a tenant's billing ledger.

Which command trims what:

* ``ledger export`` READS: run twice, it prints the same rows. It trims nothing unless given
  ``--ack``: then each page is written, flushed (and fsync'd when the output is a file) before
  it is marked exported, and only marked entries are trimmed (with ``--format parquet``, once
  the whole file is written and closed). When the ledger has a consumer group, the group's
  acknowledgements decide what is trimmed, whatever ``--ack`` marks.
* ``ledger consume`` reads through a consumer group and acknowledges each batch only after it
  was written and flushed (and fsync'd when stdout is a file): a consumer killed at any point
  and restarted under the same ``--consumer`` name neither loses an entry nor prints an
  acknowledged entry twice; the entries it printed but had not acknowledged yet are printed
  again (at-least-once; deduplicate by ``id``). A consumer restarted under another name takes
  over the entries the old one left pending once they were idle for ``--claim-idle-s``.
  Acknowledged entries are trimmed once every group has acknowledged them.
* ``ledger summary`` READS: totals per tenant, subject, metric and period.

Every row (export and consume) has the columns, in this order: id, tenant, slice, key,
metric, unit, amount, billed_amount, count, mode, decision, reason, overage, reversal,
aggregate, request_id, decision_id, policy_version, occurred_at, decided_at, interval_start,
interval_end, labels, overage_units, lease_id. Decisions and reasons are names (ALLOW,
RATE_LIMITED), times ISO 8601 UTC (empty/null when unset), integers are numbers.

The commands first move the ledger aggregates whose interval has ended into the ledger (plans
with ``ledger: {mode: aggregate}``; the gateway does the same every second).

The commands read Redis directly, with the credential in the Redis URL: ``--redis-url``, else
``CHARGEPATH_REDIS_URL``, else the file ``<data-dir>/redis/url`` (mode 0600, with the password
of the embedded Redis) that ``chargepath serve`` writes. A URL without the right password (or an
ACL user without the rights) is refused by Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import signal
import socket
import stat
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chargepath.store.connect import RedisTarget
    from chargepath.store.ledger import Ledger, SummaryLine

DEFAULT_DATA_DIR = ".chargepath"
FORMATS = ("jsonl", "csv", "parquet")


class LedgerCliError(Exception):
    """A usage error of ``chargepath ledger``: printed as one line, exit status 2."""


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time_ms(raw: str, *, now: datetime | None = None) -> int:
    """Milliseconds since the epoch: an ISO 8601 time (UTC when it has no offset), a number of
    milliseconds, or a duration back from now (``90s``, ``30m``, ``12h``, ``7d``)."""
    text = raw.strip()
    if text.isdigit():
        return int(text)
    m = _DURATION.fullmatch(text)
    if m:
        back = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        return int(((now or datetime.now(UTC)) - back).timestamp() * 1000)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{raw!r}: expected an ISO 8601 time (e.g. 2026-01-31T00:00:00Z), milliseconds "
            "since the epoch, or a duration back from now (90s, 30m, 12h, 7d)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _range(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since",
        type=parse_time_ms,
        help="from this time (inclusive): ISO 8601, epoch ms, or back from now (30m, 7d)",
    )
    p.add_argument(
        "--until",
        type=parse_time_ms,
        help="to this time (exclusive): ISO 8601, epoch ms, or back from now",
    )


def add_redis_options(p: argparse.ArgumentParser) -> None:
    """Where a command that reads Redis directly finds it (see :func:`resolve_redis_target`)."""
    g = p.add_argument_group(
        "Redis",
        "The ledger is read from Redis directly; the Redis URL carries the credential (the "
        "embedded Redis's password is in <data-dir>/redis/url, mode 0600).",
    )
    g.add_argument(
        "--redis-url", help="Redis URL (default: CHARGEPATH_REDIS_URL, else <data-dir>/redis/url)"
    )
    g.add_argument("--redis-cluster", action="store_true", default=None, help="a cluster node")
    g.add_argument("--redis-sentinel", help="Redis Sentinel instead: host:port,host:port,...")
    g.add_argument("--redis-master", help="with --redis-sentinel: the monitored master's name")
    g.add_argument(
        "--data-dir",
        help="folder of the embedded Redis whose URL to use "
        f"(default: CHARGEPATH_DATA_DIR, else {DEFAULT_DATA_DIR})",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``ledger export``, ``consume`` and ``summary`` on the ``chargepath``
    subparsers."""
    ledger = subparsers.add_parser(
        "ledger",
        help="read a tenant's billing ledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ledger.add_subparsers(
        dest="ledger_command", required=True, parser_class=type(ledger)
    )  # the CLI's one-line errors

    exp = sub.add_parser(
        "export",
        help="print ledger entries of a time range (reads only; --ack trims what it printed)",
        description="Print the ledger entries written in [--since, --until) (by the time they "
        "were written, Redis clock), oldest first, one row each, read in pages of 1,000 "
        "(bounded memory). READS ONLY: run twice, it prints the same rows. With --ack, each "
        "page is marked exported once it is written and flushed (fsync'd to a file; parquet: "
        "once the file is closed), and exported entries are trimmed from Redis when the "
        "ledger has no consumer group.",
    )
    exp.add_argument("--tenant", required=True, help="tenant whose ledger to read")
    exp.add_argument(
        "--format", choices=FORMATS, default="jsonl", help="jsonl (default), csv or parquet"
    )
    exp.add_argument("-o", "--output", help="write to this file (default: stdout)")
    _range(exp)
    exp.add_argument(
        "--ack",
        action="store_true",
        help="mark what was written as exported, which lets Redis trim it (no consumer group)",
    )
    # Before --ack existed, export marked by default and --no-mark turned that off; reading
    # only is the default now, and --no-mark is accepted so that old scripts keep working.
    exp.add_argument("--no-mark", action="store_true", help=argparse.SUPPRESS)
    add_redis_options(exp)

    con = sub.add_parser(
        "consume",
        help="read the ledger through a consumer group, acknowledging what was printed",
        description="Print the ledger entries delivered to --consumer of --group, one row "
        "each, acknowledging each batch only once it is written and flushed to stdout "
        "(and fsync'd when stdout is a file). Acknowledged entries are trimmed once every "
        "group has acknowledged them. Runs until --max entries, --idle-exit-s without a new "
        "entry, SIGINT or SIGTERM.",
    )
    con.add_argument("--tenant", required=True, help="tenant whose ledger to read")
    con.add_argument(
        "--format", choices=FORMATS[:2], default="jsonl", help="jsonl (default) or csv"
    )
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
    add_redis_options(con)

    summ = sub.add_parser(
        "summary",
        help="totals per tenant, subject, metric and period (reads only)",
        description="Totals of the ledger entries written in [--since, --until), per tenant, "
        "subject (slice, key), metric (with its unit) and UTC period of the usage (its "
        "occurred_at, else the aggregate's interval start, else when it was decided): units "
        "recorded with reversals netted out, units recorded past a limit (overage), entries, "
        "usages, reversals. READS ONLY.",
    )
    summ.add_argument("--tenant", help="one tenant (default: every tenant of the policy)")
    _range(summ)
    summ.add_argument(
        "--period", choices=("hour", "day", "month"), default="day", help="default day"
    )
    summ.add_argument("--json", action="store_true", help="JSON instead of a table")
    add_redis_options(summ)


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


def _durable(stream: IO[Any]) -> None:
    """Flush ``stream``, and fsync it when it is a regular file (a pipe or a terminal has
    nothing to sync: the reader has it)."""
    stream.flush()
    try:
        fd = stream.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fsync(fd)
    except (OSError, ValueError):  # no file descriptor (e.g. a test's StringIO)
        pass


class _RowWriter:
    """Ledger rows to a stream as JSON lines, CSV (header first) or Parquet (one row group per
    page: bounded memory). :meth:`end_page` makes what was written durable (text) or writes the
    page's row group (Parquet, durable only at :meth:`close`)."""

    def __init__(self, out: IO[Any], fmt: str) -> None:
        from chargepath.store.ledger import ROW_COLUMNS

        self.out = out
        self.fmt = fmt
        self._rows: list[dict[str, Any]] = []
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(ROW_COLUMNS)
        self._parquet: Any = None
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetWriter(out, parquet_schema())

    def write(self, row: dict[str, Any]) -> None:
        from chargepath.store.ledger import LedgerEntry

        if self._parquet is not None:
            self._rows.append(row)
        elif self._csv is not None:
            self._csv.writerow(LedgerEntry.csv_cells(row))
        else:
            self.out.write(json.dumps(row, separators=(",", ":")) + "\n")

    def end_page(self) -> None:
        if self._parquet is not None:
            if self._rows:
                self._parquet.write_table(parquet_table(self._rows))
                self._rows = []
            return
        _durable(self.out)

    def close(self) -> None:
        self.end_page()
        if self._parquet is not None:
            self._parquet.close()
            _durable(self.out)


def parquet_schema() -> Any:
    """The Parquet schema of a ledger row: the columns of ``ROW_COLUMNS`` with their types."""
    import pyarrow as pa

    from chargepath.store.ledger import ROW_COLUMNS

    ts = pa.timestamp("ms", tz="UTC")
    types: dict[str, Any] = {
        "amount": pa.int64(),
        "billed_amount": pa.int64(),
        "count": pa.int64(),
        "policy_version": pa.int64(),
        "overage_units": pa.int64(),
        "overage": pa.bool_(),
        "reversal": pa.bool_(),
        "aggregate": pa.bool_(),
        "occurred_at": ts,
        "decided_at": ts,
        "interval_start": ts,
        "interval_end": ts,
        "labels": pa.map_(pa.string(), pa.string()),
    }
    nullable = {"occurred_at", "interval_start", "interval_end"}
    return pa.schema(
        [
            pa.field(name, types.get(name, pa.string()), nullable=name in nullable)
            for name in ROW_COLUMNS
        ]
    )


def parquet_table(rows: list[dict[str, Any]]) -> Any:
    """Rows of ``LedgerEntry.to_row`` as a pyarrow table of :func:`parquet_schema`."""
    import pyarrow as pa

    from chargepath.store.ledger import ROW_COLUMNS, parse_iso_ms

    schema = parquet_schema()
    columns: dict[str, list[Any]] = {name: [] for name in ROW_COLUMNS}
    for row in rows:
        for name in ROW_COLUMNS:
            v = row[name]
            if pa.types.is_timestamp(schema.field(name).type):
                v = None if v is None else parse_iso_ms(v)
            elif name == "labels":
                v = list(v.items())
            columns[name].append(v)
    return pa.table(columns, schema=schema)


def run(args: argparse.Namespace) -> int:
    """Run ``chargepath ledger <export|consume|summary>``; returns the exit status."""
    # Start-up time: redis-py and the store (about half a second of imports) load only when a
    # ledger command runs, not for check and the admin commands.
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    from chargepath.store.ledger import Ledger

    try:
        if args.ledger_command == "consume":
            if args.max is not None and args.max <= 0:
                return 0
            if args.batch <= 0:
                raise LedgerCliError("--batch: must be positive")
        target = resolve_redis_target(args)
        if args.ledger_command == "export":
            return _run_export(Ledger.connect(target), args)
        if args.ledger_command == "consume":
            return asyncio.run(_consume(Ledger.connect(target), sys.stdout, args))
        if args.ledger_command == "summary":
            return asyncio.run(_summary(Ledger.connect(target), args))
        raise LedgerCliError(f"unknown ledger command {args.ledger_command!r}")
    except LedgerCliError as exc:
        print(f"chargepath ledger {args.ledger_command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away: nothing after the last flush was acknowledged or marked.
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except (AuthenticationError, ResponseError) as exc:
        text = str(exc)
        if isinstance(exc, AuthenticationError) or text.startswith(
            ("NOAUTH", "WRONGPASS", "NOPERM")
        ):
            print(
                f"chargepath ledger {args.ledger_command}: Redis refused the credential of the "
                f"Redis URL ({text.splitlines()[0] if text else type(exc).__name__})",
                file=sys.stderr,
            )
        else:
            print(f"chargepath ledger {args.ledger_command}: Redis: {text}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(
            f"chargepath ledger {args.ledger_command}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1


async def _catalog(ledger: Ledger, tenant: str | None) -> tuple[dict[str, str], list[str]]:
    """The units of the policy's metrics, and the tenants to read: ``tenant`` (a usage error
    if neither the policy nor Redis knows it), else every tenant of the policy."""
    policy = await ledger.policy()
    units = {} if policy is None else {m.name: m.unit for m in policy.metrics}
    known = [] if policy is None else [t.name for t in policy.tenants]
    if tenant is None:
        return units, known
    if tenant not in known and not await ledger.has_ledger(tenant):
        raise LedgerCliError(
            f"--tenant: unknown tenant {tenant!r}: not in the policy and no ledger in Redis"
        )
    return units, [tenant]


def _run_export(ledger: Ledger, args: argparse.Namespace) -> int:
    if args.format == "parquet" and args.output is None and sys.stdout.isatty():
        raise LedgerCliError("--format: parquet is binary: pass --output FILE or redirect stdout")
    if args.output is None:
        out: IO[Any] = sys.stdout.buffer if args.format == "parquet" else sys.stdout
        return asyncio.run(_export(ledger, out, args))
    mode = "wb" if args.format == "parquet" else "w"
    try:
        f = open(args.output, mode, newline="" if mode == "w" else None)  # noqa: SIM115
    except OSError as exc:
        raise LedgerCliError(f"--output: cannot write {args.output}: {exc.strerror}") from None
    with f:
        return asyncio.run(_export(ledger, f, args))


async def _export(ledger: Ledger, out: IO[Any], args: argparse.Namespace) -> int:
    """Write the rows of the range, page by page; with ``--ack``, mark each page exported once
    it is durable (Parquet: the whole range, once the file is closed). Closes ``ledger``."""
    since: int | None = args.since
    first = "-" if not since or since <= 0 else f"{since}-0"
    try:
        units, _ = await _catalog(ledger, args.tenant)
        writer = _RowWriter(out, args.format)
        await ledger.flush_aggregates(args.tenant)
        # Parquet is whole only once closed: it is marked then, in one go; text page by page.
        mark_pages = args.ack and args.format != "parquet"
        last = ""
        in_page = 0
        async for entry in ledger.export(args.tenant, since, args.until, mark=False):
            writer.write(entry.to_row(args.tenant, units.get(entry.metric, "")))
            last = entry.id
            in_page += 1
            if in_page >= ledger.page_size:
                writer.end_page()
                if mark_pages:
                    await ledger.mark_exported(args.tenant, last, start_id=first)
                in_page = 0
        writer.close()
        if args.ack and last and (in_page or not mark_pages):
            await ledger.mark_exported(args.tenant, last, start_id=first)
    finally:
        await ledger.close()
    return 0


async def _consume(ledger: Ledger, out: IO[str], args: argparse.Namespace) -> int:
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
    block_ms = 1000
    if args.idle_exit_s is not None:
        block_ms = max(10, min(block_ms, int(args.idle_exit_s * 1000)))
    try:
        units, _ = await _catalog(ledger, args.tenant)
        writer = _RowWriter(out, args.format)
        writer.end_page()
        last_entry = last_flush = last_catalog = time.monotonic()
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
                        writer.write(entry.to_row(args.tenant, units.get(entry.metric, "")))
                    writer.end_page()  # written out and flushed first: only then acknowledged
                    await ledger.ack(args.tenant, args.group, [i for i, _ in batch])
                    last_entry = now
                elif args.idle_exit_s is not None and now - last_entry >= args.idle_exit_s:
                    break
                if now - last_flush >= 1.0:
                    await ledger.flush_aggregates(args.tenant)
                    last_flush = now
                if now - last_catalog >= 10.0:  # units of metrics added to the policy since
                    units, _ = await _catalog(ledger, None)
                    last_catalog = now
                if stop.is_set():
                    break
        finally:
            await batches.aclose()
    finally:
        await ledger.close()
    return 0


async def _summary(ledger: Ledger, args: argparse.Namespace) -> int:
    """Sum the entries of the range per tenant, subject, metric and period, then print the
    totals as a table or JSON. Closes ``ledger``."""
    from chargepath.store.ledger import LedgerSummary

    summary = LedgerSummary(args.period)
    try:
        units, tenants = await _catalog(ledger, args.tenant)
        for tenant in tenants:
            await ledger.flush_aggregates(tenant)
            async for entry in ledger.export(tenant, args.since, args.until, mark=False):
                summary.add(tenant, entry, units.get(entry.metric, ""))
    finally:
        await ledger.close()
    lines = summary.lines()
    if args.json:
        doc = {
            "period": args.period,
            "since": _iso_or_none(args.since),
            "until": _iso_or_none(args.until),
            "totals": [line.to_json_dict() for line in lines],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _print_table(lines, args)
    return 0


def _iso_or_none(ms: int | None) -> str | None:
    from chargepath.store.ledger import iso_ms

    return None if ms is None else iso_ms(ms)


def _period_label(line: SummaryLine) -> str:
    from chargepath.store.ledger import iso_ms

    text = iso_ms(line.period_start_ms)
    return {"hour": text[:13] + ":00Z", "day": text[:10], "month": text[:7]}[line.period]


def _print_table(lines: list[SummaryLine], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "tenant",
        "period",
        "slice",
        "key",
        "metric",
        "unit",
        "units",
        "overage",
        "entries",
        "usages",
        "reversals",
        title=f"ledger totals per {args.period} (UTC)",
    )
    for name in ("units", "overage", "entries", "usages", "reversals"):
        col = next(c for c in table.columns if c.header == name)
        col.justify = "right"
    for c in table.columns:
        c.no_wrap = True
    for x in lines:
        table.add_row(
            x.tenant,
            _period_label(x),
            x.slice or "-",
            x.key or "-",
            x.metric,
            x.unit or "-",
            f"{x.units:,}",
            f"{x.overage:,}",
            f"{x.entries:,}",
            f"{x.usages:,}",
            f"{x.reversals:,}" + (f" (-{x.reversed_units:,})" if x.reversals else ""),
        )
    # as wide as the table needs when piped: numbers are never cut
    Console(width=None if sys.stdout.isatty() else 1000).print(table)
    if not lines:
        print("no ledger entries in the range")
