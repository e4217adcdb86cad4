"""Signed webhook deliveries: the job that relays, delivers, retries and logs them.

Each gateway process runs one :class:`WebhookDispatcher` (a job, see :mod:`chargepath.jobs`)
when the live policy names webhooks. A round, every ``poll_s``:

1. relays new events into the outboxes, each exactly once whichever processes run it
   (:mod:`chargepath.store.webhooks`): quota thresholds from the trail of every tenant some
   endpoint wants them for; suspensions from the policy version, once per new version;
2. takes undelivered events from the outboxes through their consumer group (each event goes to
   one process), and those another process left pending past the lease (it died);
3. acknowledges (and deletes) the events delivered or given up, and writes the attempts to the
   delivery log.

Each event is POSTed to every endpoint that wants it, signed (:mod:`chargepath.core.webhooks`),
with retries on a failure (no answer, or not 2xx) after an exponential backoff with jitter, up
to ``max_attempts``. At most ``queue`` events are held in memory: past it nothing more is read
and the outboxes hold the rest. The process renews the lease of the events it holds; one that
stops (crash, SIGKILL) leaves them pending, and another process claims and sends them again,
with the same ids: delivery is at least once, and receivers deduplicate by
``Chargepath-Event-Id``.

Degraded-mode events are the process's own (its store is unreachable, so they cannot go
through Redis): they are sent from memory, with the same retries, when the health status flips
(:class:`~chargepath.core.webhooks.DegradedNotice` rate-limits them), and are lost if the
process stops first. Their attempts reach the delivery log once Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from chargepath import __version__
from chargepath.core.policy import Policy
from chargepath.core.webhooks import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    QUOTA_80,
    QUOTA_100,
    SIGNATURE_HEADER,
    SUSPENSION,
    DegradedNotice,
    Endpoint,
    RetrySchedule,
    WebhookEvent,
    signature_header,
    suspension_event,
    threshold_event,
)
from chargepath.store.base import StoreUnavailableError
from chargepath.store.webhooks import (
    SUSPENSION_OUTBOX,
    DeliveryRecord,
    OutboxEntry,
    WebhookStore,
    outbox_key,
)

if TYPE_CHECKING:
    from chargepath.settings import Settings

log = logging.getLogger("chargepath")

#: The most bytes of a receiver's answer read (its status line and headers); the rest is
#: ignored, the connection closed.
MAX_ANSWER_HEAD = 16 * 1024


class DeliveryError(Exception):
    """A POST that got no HTTP answer: refused, reset, timed out, TLS failure, malformed."""


class SecretUnavailableError(Exception):
    """An endpoint's signing secret cannot be read (variable unset, file unreadable)."""


Post = Callable[[str, bytes, dict[str, str], float], Awaitable[int]]


async def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST ``body`` to ``url`` (HTTP/1.1, one connection per request, TLS for https with the
    system's CAs); the answer's status code. Raises :class:`DeliveryError` when no answer
    comes within ``timeout_s``, the whole exchange included."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=ssl.create_default_context() if https else None,
                limit=MAX_ANSWER_HEAD,
            )
            writer.write(request)
            await writer.drain()
            while True:
                status_line = await reader.readline()
                fields = status_line.split(None, 2)
                if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
                    raise DeliveryError(f"not an HTTP answer: {status_line[:80]!r}")
                status = int(fields[1])
                if status >= 200:
                    return status
                while (await reader.readline()).strip():  # an interim answer's headers
                    pass
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout_s:g} s") from None
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """How one process delivers. ``timeout_s``: per attempt. ``poll_s``: the round's period
    (an event is relayed and taken within about one round). ``lease_s``: how long an event
    held by a silent process stays with it before another claims it. ``queue``: events held
    in memory at once. ``concurrency``: POSTs at once. ``degraded_interval_s``: at most one
    degraded-mode event per process per interval."""

    timeout_s: float = 5.0
    retry: RetrySchedule = field(default_factory=RetrySchedule)
    poll_s: float = 0.5
    lease_s: float = 30.0
    queue: int = 1000
    concurrency: int = 16
    degraded_interval_s: float = 60.0

    @classmethod
    def of(cls, s: Settings) -> WebhookSettings:
        return cls(
            timeout_s=s.webhook_timeout_ms / 1000,
            retry=RetrySchedule(
                s.webhook_retry_base_ms / 1000,
                s.webhook_retry_max_ms / 1000,
                s.webhook_max_attempts,
            ),
            lease_s=s.webhook_lease_ms / 1000,
            degraded_interval_s=s.webhook_degraded_interval_s,
        )


def process_identity() -> str:
    """``host:pid:start-ms``: names this process in degraded-mode events and their ids."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time() * 1000)}"


@dataclass(slots=True)
class _Held:
    """An event being delivered: its outbox entry (None for a degraded-mode event) and how
    many endpoints have not finished with it."""

    event: WebhookEvent
    entry: OutboxEntry | None
    remaining: int


class WebhookDispatcher:
    """The webhook job of one gateway process (see the module docstring). ``policy`` returns
    the live policy (the engine's); ``consumer`` names this process in the consumer groups;
    ``environ`` is where ``secret_env`` secrets are read (default ``os.environ``)."""

    name = "webhooks"

    def __init__(
        self,
        store: WebhookStore,
        policy: Callable[[], Policy],
        settings: WebhookSettings,
        *,
        consumer: str,
        environ: Mapping[str, str] | None = None,
        post: Post = post,
        rand: Callable[[], float] = random.random,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.store = store
        self.policy = policy
        self.settings = settings
        self.consumer = consumer
        self.environ = os.environ if environ is None else environ
        self._post = post
        self._rand = rand
        self._wall_ms = wall_ms
        self.notice = DegradedNotice(consumer, settings.degraded_interval_s)
        self._held: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: dict[str, list[str]] = {}
        self._log: deque[DeliveryRecord] = deque(maxlen=10_000)
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._endpoints: tuple[int, tuple[Endpoint, ...]] = (-1, ())
        self._suspensions_version = -1
        self._unread: set[str] = set()
        self._seen_outboxes: set[str] = set()
        self._last_claim = -1e9
        self._last_renew = time.monotonic()
        self._gap_warned: dict[str, float] = {}
        self._running = False
        self._store_ok = True

    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints of the live policy (compiled once per version)."""
        policy = self.policy()
        if self._endpoints[0] != policy.version:
            compiled = tuple(Endpoint.of(w) for w in policy.document.webhooks)
            self._endpoints = (policy.version, compiled)
        return self._endpoints[1]

    @property
    def held(self) -> int:
        """Events held in memory now (being delivered or waiting for a retry)."""
        return len(self._held)

    def on_serving(self, serving: bool) -> None:
        """The health status changed (:class:`chargepath.app.ServingStatus`): send a
        degraded-mode event if the notice says so. Called on the event loop."""
        event = self.notice.flip(serving, time.monotonic(), self._wall_ms())
        if event is None or not self._running:
            return
        if len(self._held) >= self.settings.queue:
            log.warning("webhooks: queue full, degraded-mode event %s not sent", event.id)
            return
        self._start(event, None)

    async def run(self, draining: asyncio.Event) -> None:
        self._running = True
        try:
            while not draining.is_set():
                try:
                    await asyncio.wait_for(self.round(), max(5.0, self.settings.poll_s))
                    if not self._store_ok:
                        log.info("webhooks: the store answers again")
                    self._store_ok = True
                except (StoreUnavailableError, TimeoutError) as exc:
                    if self._store_ok:
                        log.warning("webhooks: store unavailable, retrying each round: %s", exc)
                    self._store_ok = False
                await asyncio.sleep(self.settings.poll_s)
        finally:
            self._running = False
            # What is held stays pending in its outbox: another process (or this one,
            # restarted) claims it after the lease.
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(StoreUnavailableError, TimeoutError):
                await asyncio.wait_for(self._flush(), 1.0)

    async def round(self) -> None:
        """One round: relay, renew, claim and read, then acknowledge and log."""
        await self._flush()
        endpoints = self.endpoints()
        if not endpoints:
            return
        policy = self.policy()
        outboxes: dict[str, str] = {}
        if any(SUSPENSION in e.events for e in endpoints):
            if policy.version > self._suspensions_version:
                if await self.store.relay_suspensions(policy.version, policy.suspensions):
                    self._unread.add(SUSPENSION_OUTBOX)
                self._suspensions_version = policy.version
            outboxes[SUSPENSION_OUTBOX] = ""
        for tenant in sorted(policy.entitlements):
            if not any(e.wants_tenant(tenant, (QUOTA_80, QUOTA_100)) for e in endpoints):
                continue
            outbox = outbox_key(tenant)
            if self._first_look(outbox):
                self._unread.add(outbox)
            outboxes[outbox] = tenant
            copied, gap = await self.store.relay_thresholds(tenant)
            if copied:
                self._unread.add(outbox)
            if gap:
                self._warn_gap(tenant)
        await self._renew()
        now = time.monotonic()
        claim = now - self._last_claim >= self.settings.lease_s / 2
        if claim:
            self._last_claim = now
        lease_ms = int(self.settings.lease_s * 1000)
        for outbox, tenant in outboxes.items():
            room = self.settings.queue - len(self._held)
            if room <= 0:
                break
            entries: list[OutboxEntry] = []
            if claim:
                entries += await self.store.claim(outbox, self.consumer, lease_ms, room)
            if outbox in self._unread and len(entries) < room:
                new = await self.store.read_new(outbox, self.consumer, room - len(entries))
                if len(new) < room - len(entries):
                    self._unread.discard(outbox)
                entries += new
            for entry in entries:
                self._accept(entry, tenant, endpoints)
        await self._flush()

    def _first_look(self, outbox: str) -> bool:
        """Whether this process looks at ``outbox`` for the first time (it may hold events
        relayed before this process started)."""
        if outbox in self._seen_outboxes:
            return False
        self._seen_outboxes.add(outbox)
        return True

    def _warn_gap(self, tenant: str) -> None:
        now = time.monotonic()
        if now - self._gap_warned.get(tenant, -1e9) >= 60:
            self._gap_warned[tenant] = now
            log.warning(
                "webhooks: the decision trail of %s was trimmed past the relay: quota "
                "threshold events may have been missed (raise CHARGEPATH_RECENT_DECISIONS)",
                tenant,
            )

    def _accept(self, entry: OutboxEntry, tenant: str, endpoints: tuple[Endpoint, ...]) -> None:
        """Start delivering an outbox entry to every endpoint that wants it."""
        key = f"{entry.outbox}\x1f{entry.entry_id}"
        if key in self._held:
            return  # ours already (a claim after a lapsed lease)
        try:
            if entry.outbox == SUSPENSION_OUTBOX:
                event = suspension_event(entry.entry_id, entry.fields)
            else:
                event = threshold_event(tenant, entry.fields["src"], entry.fields)
        except (KeyError, ValueError) as exc:
            log.error(
                "webhooks: unreadable entry %s of %s dropped: %r", entry.entry_id, entry.outbox, exc
            )
            self._done.setdefault(entry.outbox, []).append(entry.entry_id)
            return
        targets = [e for e in endpoints if e.wants(event)]
        if not targets:
            self._done.setdefault(entry.outbox, []).append(entry.entry_id)
            return
        self._start(event, entry, targets)

    def _start(
        self,
        event: WebhookEvent,
        entry: OutboxEntry | None,
        targets: list[Endpoint] | None = None,
    ) -> None:
        if targets is None:
            targets = [e for e in self.endpoints() if e.wants(event)]
            if not targets:
                return
        key = f"{entry.outbox}\x1f{entry.entry_id}" if entry is not None else event.id
        self._held[key] = _Held(event, entry, len(targets))
        for endpoint in targets:
            task = asyncio.create_task(self._deliver(key, event, endpoint), name="webhook")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _secret(self, endpoint: Endpoint) -> bytes:
        if endpoint.secret_env is not None:
            value = self.environ.get(endpoint.secret_env, "")
            if not value:
                raise SecretUnavailableError(
                    f"secret_env {endpoint.secret_env} is not set in the gateway's environment"
                )
            return value.encode()
        path = Path(endpoint.secret_file or "")
        try:
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SecretUnavailableError(f"secret_file {path}: {exc.strerror}") from None
        if not value:
            raise SecretUnavailableError(f"secret_file {path} is empty")
        return value.encode()

    async def _deliver(self, key: str, event: WebhookEvent, endpoint: Endpoint) -> None:
        """POST ``event`` to ``endpoint`` until a 2xx answer or the last attempt."""
        body = event.body()
        schedule = self.settings.retry
        attempt = 0
        try:
            while True:
                attempt += 1
                status, error = 0, ""
                async with self._sem:
                    started = time.monotonic()
                    try:
                        secret = self._secret(endpoint)
                        headers = {
                            "Content-Type": "application/json",
                            "User-Agent": f"chargepath-webhooks/{__version__}",
                            EVENT_ID_HEADER: event.id,
                            EVENT_TYPE_HEADER: event.type,
                            "Chargepath-Delivery-Attempt": str(attempt),
                            SIGNATURE_HEADER: signature_header(
                                secret, self._wall_ms() // 1000, body
                            ),
                        }
                        status = await self._post(
                            endpoint.url, body, headers, self.settings.timeout_s
                        )
                        if not 200 <= status < 300:
                            error = f"HTTP {status}"
                    except (DeliveryError, SecretUnavailableError) as exc:
                        error = str(exc)
                    took_ms = int((time.monotonic() - started) * 1000)
                if not error:
                    outcome, wait_s = "delivered", 0.0
                elif attempt >= schedule.max_attempts:
                    outcome, wait_s = "failed", 0.0
                else:
                    outcome, wait_s = "retry", schedule.wait_s(attempt, self._rand)
                self._record(event, endpoint, attempt, outcome, status, error, took_ms, wait_s)
                if outcome != "retry":
                    return
                await asyncio.sleep(wait_s)
        finally:
            self._finish(key)

    def _record(
        self,
        event: WebhookEvent,
        endpoint: Endpoint,
        attempt: int,
        outcome: str,
        status: int,
        error: str,
        took_ms: int,
        wait_s: float,
    ) -> None:
        self._log.append(
            DeliveryRecord(
                at_ms=self._wall_ms(),
                event_id=event.id,
                type=event.type,
                tenant=event.tenant,
                endpoint=endpoint.name,
                url=endpoint.url,
                attempt=attempt,
                outcome=outcome,
                status=status,
                error=error,
                duration_ms=took_ms,
                retry_in_ms=int(wait_s * 1000),
            )
        )
        level = {"delivered": logging.DEBUG, "retry": logging.INFO}.get(outcome, logging.WARNING)
        log.log(
            level,
            "webhook %s %s to %s: attempt %d %s%s",
            event.type,
            event.id,
            endpoint.name,
            attempt,
            outcome,
            f" ({error})" if error else "",
        )

    def _finish(self, key: str) -> None:
        held = self._held.get(key)
        if held is None:
            return
        held.remaining -= 1
        if held.remaining > 0:
            return
        del self._held[key]
        if held.entry is not None and self._running:
            self._done.setdefault(held.entry.outbox, []).append(held.entry.entry_id)

    async def _renew(self) -> None:
        """Renew the lease of the held events, every third of the lease."""
        now = time.monotonic()
        if now - self._last_renew < self.settings.lease_s / 3:
            return
        by_outbox: dict[str, list[str]] = {}
        for held in self._held.values():
            if held.entry is not None:
                by_outbox.setdefault(held.entry.outbox, []).append(held.entry.entry_id)
        for outbox, ids in by_outbox.items():
            await self.store.renew(outbox, self.consumer, ids)
        self._last_renew = now

    async def _flush(self) -> None:
        """Acknowledge finished events and write the delivery log; what fails is kept for
        the next round."""
        for outbox in list(self._done):
            ids = self._done[outbox]
            await self.store.done(outbox, ids)
            del self._done[outbox]
        if self._log:
            records = list(self._log)
            await self.store.log(records)
            for _ in records:
                self._log.popleft()
