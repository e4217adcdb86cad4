"""Gateway processes. :func:`run_gateway` serves in this process until SIGTERM/SIGINT.

:func:`supervise` (``chargepath serve --workers N``) runs N gateway processes on one port
(SO_REUSEPORT), so that a multi-core machine is used; the kernel spreads connections across them.
The port and the data dir are this server's alone: ``chargepath serve`` claims them
(:mod:`chargepath.preflight`) and holds the claims, for all the workers, until it exits.

The supervisor owns what is shared: the embedded Redis (if no Redis URL is given) and the plan
file, applied once as a single gateway applies it (:mod:`chargepath.policy_sync`); workers,
restarted ones included, never apply it again. Each worker is a full, stateless gateway; all
state is in Redis, so workers need no coordination. A worker that dies is restarted; SIGTERM
drains every worker, then stops the embedded Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess
from typing import Any

import uvloop

from chargepath import app, telemetry
from chargepath.logs import configure_logging
from chargepath.settings import Settings

log = logging.getLogger("chargepath.supervisor")


def run_gateway(settings: Settings, worker: int = 0) -> None:
    """Serve one gateway in this process until SIGTERM/SIGINT, with this process's telemetry
    (flushed on return). Worker ``worker`` of a supervisor serves its Prometheus metrics on
    ``metrics_port + worker`` (:func:`chargepath.telemetry.for_gateway`)."""
    otel = telemetry.for_gateway(settings, worker)
    try:
        if settings.event_loop == "uvloop":
            uvloop.install()
        asyncio.run(_serve(settings, otel.telemetry, worker))
    finally:
        otel.shutdown()


async def _serve(settings: Settings, otel: telemetry.Telemetry, worker: int = 0) -> None:
    gateway = app.Gateway(settings, otel, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
        await stop.wait()
    finally:
        await gateway.stop()


#: A worker's exit status when its server cannot listen on the port: another program took it
#: (between ``chargepath serve``'s check and the bind), so a restart would fail the same way.
CANNOT_LISTEN = 3


def _worker(settings: dict[str, Any], index: int) -> None:
    s = Settings(**settings)
    configure_logging(s.log_format, s.log_level, worker=index)
    try:
        run_gateway(s, worker=index)
    except app.ListenError as exc:
        log.error("%s", exc)
        raise SystemExit(CANNOT_LISTEN) from None


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` gateway processes on ``settings.port`` (fixed) until
    SIGTERM/SIGINT; the exit code. ``chargepath serve`` checked the settings and the plan
    file, and claimed the port and the data dir, before calling it
    (:mod:`chargepath.preflight`)."""
    shared = dataclasses.replace(settings)
    embedded = app.embedded_redis(shared)
    if embedded is not None:
        embedded.start()
        log.info(
            "embedded redis-server started on %s (binary %s); data and AOF in %s",
            embedded.redacted_url,
            embedded.binary,
            embedded.data_dir,
        )
        shared.redis_url = embedded.url
    try:
        if shared.plans:
            asyncio.run(app.apply_plans(shared))
            shared.plans = ""
        return _run_workers(shared)
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded redis-server stopped")


def _run_workers(settings: Settings) -> int:
    ctx = multiprocessing.get_context("spawn")
    config = dataclasses.asdict(settings)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(i: int) -> BaseProcess:
        p = ctx.Process(target=_worker, args=(config, i), name=f"chargepath-worker-{i}")
        p.start()
        return p

    workers = [start(i) for i in range(settings.workers)]
    log.info("%d workers starting on %s:%d", settings.workers, settings.host, settings.port)
    restarts: list[float] = []
    code = 0
    while not stopping:
        time.sleep(0.2)
        for i, p in enumerate(workers):
            if p.exitcode is not None and not stopping:
                if p.exitcode == CANNOT_LISTEN:
                    log.error("worker %d cannot listen on the port; stopping", i)
                    stopping, code = True, 1
                    break
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5 * settings.workers:
                    log.error("workers keep dying (%d restarts in 60 s); giving up", len(restarts))
                    stopping, code = True, 1
                    break
                log.error("worker %d exited with %s; restarting it", i, p.exitcode)
                workers[i] = start(i)
    for p in workers:
        if p.exitcode is None and p.pid is not None:
            signal_pid(p.pid)
    deadline = time.monotonic() + settings.drain_grace_s + 5
    for p in workers:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()
            code = 1
    return code


def signal_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
