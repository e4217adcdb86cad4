"""The one place that wires the gateway together: store, engine, telemetry, servicers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import subprocess
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from redis.exceptions import RedisError

from chargepath.core.validation import OccurredAtWindow
from chargepath.engine import Engine, EngineSettings
from chargepath.policy_files import load_policy_file
from chargepath.settings import Settings
from chargepath.store.admin import AdminStore
from chargepath.store.base import LedgerStore, StoreUnavailableError
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.ledger import Ledger
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from chargepath.transport import services
from chargepath.transport.admin import AdminServicer
from chargepath.transport.metering import MeteringServicer
from chargepath_protos.v1 import admin_pb2, metering_pb2

log = logging.getLogger("chargepath")

METERING = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


class Gateway:
    """A running gateway. ``await start()``, then ``await stop()`` (what SIGTERM does)."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.embedded: EmbeddedRedis | None = None
        self.draining = asyncio.Event()
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: bool | None = None
        self.telemetry = telemetry or Telemetry()

    async def start(self) -> None:
        s = self.settings
        url = s.redis_url
        if not url:
            self.embedded = EmbeddedRedis(Path(s.data_dir) / "redis", fsync=s.redis_fsync)
            await asyncio.to_thread(self.embedded.start)
            version = _redis_version(self.embedded.binary)
            log.info(
                "embedded redis-server %s started on %s (binary %s); data and AOF in %s",
                version,
                self.embedded.url,
                self.embedded.binary,
                self.embedded.data_dir,
            )
            url = self.embedded.url
        else:
            log.info("using Redis at %s", _redact(url))
        self.store = RedisStore.from_url(
            url,
            cluster=s.redis_cluster,
            connect_timeout=max(s.store_timeout_ms / 1000, 0.5),
            dedup_window_ms=s.dedup_window_s * 1000,
            session_ttl_ms=s.session_ttl_s * 1000,
            recent_length=s.recent_decisions,
            clock_offset_ms=s.clock_offset_ms,
        )
        self.engine = Engine(
            self.store,
            EngineSettings(
                store_timeout_s=s.store_timeout_ms / 1000,
                store_timeout_per_usage_s=s.store_timeout_per_usage_ms / 1000,
                breaker_failures=s.breaker_failures,
                breaker_cooldown_s=s.breaker_cooldown_ms / 1000,
            ),
            self.telemetry,
        )
        await self._wait_for_store()
        if s.plans:
            document = load_policy_file(s.plans)
            published = await self.store.publish_policy(document)
            log.info(
                "policy from %s is version %d (%s)",
                s.plans,
                published.version,
                "published" if published.changed else "unchanged",
            )
        await self.engine.reload_policy()
        if self.engine.policy.version == 0:
            log.warning(
                "no policy in the store: every usage is DENY NO_ENTITLEMENT until one is published"
            )

        self.server = grpc.aio.server(
            # The metering service makes its own server spans (transport.tracing.server_span:
            # one per Check, one per stream batch); the instrumentation traces the admin, health
            # and reflection services.
            interceptors=[
                aio_server_interceptor(
                    tracer_provider=self.telemetry.tracer_provider,
                    filter_=filters.negate(filters.service_name(METERING)),
                )
            ],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 1),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        # deserializers that never raise: undecodable bytes are INVALID_ARGUMENT (services.py)
        window = OccurredAtWindow(s.occurred_at_max_age_s, s.occurred_at_max_ahead_s)
        metering = MeteringServicer(self.engine, self.draining, window)
        services.add_service(self.server, metering, services.METERING)
        admin = AdminServicer(self.engine, self.store, AdminStore(self.store))
        services.add_service(self.server, admin, services.ADMIN)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                METERING,
                ADMIN,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{s.host}:{s.port}")
        await self.server.start()
        await self._set_serving(True)
        self._tasks = [
            asyncio.create_task(self._probe_store(), name="probe-store"),
            asyncio.create_task(self._poll_policy(), name="poll-policy"),
            asyncio.create_task(self._flush_aggregates(), name="flush-aggregates"),
            asyncio.create_task(self._measure_ledger_lag(), name="ledger-lag"),
        ]
        # Long-lived objects (modules, the policy, the servicers) leave the GC's view, and
        # young collections run less often: with thousands of open streams a full collection
        # otherwise stalls every stream for hundreds of milliseconds.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info(
            "serving chargepath.v1 on %s:%d (policy version %d)",
            s.host,
            self.port,
            self.engine.policy.version,
        )

    async def _wait_for_store(self, attempts: int = 100) -> None:
        for i in range(attempts):
            try:
                await self.store.ping()
                return
            except StoreUnavailableError as exc:
                if i == attempts - 1:
                    raise
                if i % 10 == 0:
                    log.warning("waiting for the store: %s", exc)
                await asyncio.sleep(0.1)

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", METERING):
            await self.health.set(name, status)
        log.log(
            logging.INFO if serving else logging.ERROR,
            "health: %s",
            "SERVING" if serving else "NOT_SERVING (store unreachable)",
        )

    async def _probe_store(self) -> None:
        period = self.settings.health_probe_ms / 1000
        timeout = max(self.settings.store_timeout_ms / 1000, 0.2)
        while not self.draining.is_set():
            try:
                await asyncio.wait_for(self.store.ping(), timeout)
                ok = True
            except (StoreUnavailableError, TimeoutError):
                ok = False
            if not self.draining.is_set():
                await self._set_serving(ok)
            await asyncio.sleep(period)

    async def _poll_policy(self) -> None:
        period = self.settings.policy_poll_ms / 1000
        while not self.draining.is_set():
            await asyncio.sleep(period)
            with contextlib.suppress(StoreUnavailableError, TimeoutError):
                version = await asyncio.wait_for(self.store.policy_version(), 1.0)
                if version > self.engine.policy.version:
                    await asyncio.wait_for(self.engine.reload_policy(version), 2.0)

    async def _flush_aggregates(self) -> None:
        """Move closed ledger aggregates into the ledger, every second, for tenants whose plans
        aggregate admits. Atomic in Redis, so every process may do it."""
        ledger: LedgerStore = Ledger.of_store(self.store)
        while not self.draining.is_set():
            await asyncio.sleep(1.0)
            tenants = [t for t, ms in self.engine.policy.aggregate_ms.items() if ms]
            for tenant in tenants:
                try:
                    await asyncio.wait_for(
                        ledger.flush_aggregates(
                            tenant, clock_offset_ms=self.settings.clock_offset_ms
                        ),
                        1.0,
                    )
                except (RedisError, OSError, TimeoutError) as exc:
                    log.warning("ledger aggregates of %s not flushed yet: %s", tenant, exc)
                    break

    async def _measure_ledger_lag(self, max_tenants: int = 1000) -> None:
        """Keep the ``chargepath.ledger.lag`` gauge: per tenant and consumer group, the entries
        billing has not acknowledged yet (the figure to alert on: it grows when billing stops
        reading, and so does Redis memory)."""
        ledger: LedgerStore = Ledger.of_store(self.store)
        while not self.draining.is_set():
            lags: dict[tuple[str, str], int] = {}
            for tenant in sorted(self.engine.policy.entitlements)[:max_tenants]:
                try:
                    for name in await ledger.groups(tenant):
                        lags[(tenant, name)] = await ledger.lag(tenant, name)
                except (RedisError, OSError, LookupError):
                    continue  # no ledger yet, or the store is away: keep the last figures
            if lags:
                self.telemetry.ledger_lag = lags
            await asyncio.sleep(self.settings.ledger_lag_interval_ms / 1000)

    async def stop(self) -> None:
        """Drain: NOT_SERVING, streams end after the batch in hand, unary calls finish within
        the grace period; then the store and the embedded Redis stop."""
        log.info("draining (grace %.1fs)", self.settings.drain_grace_s)
        self.draining.set()
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.settings.drain_grace_s)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if hasattr(self, "store"):
            await self.store.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            log.info("embedded redis-server stopped")
        log.info("stopped")


def _redis_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
        return next((w[2:] for w in out.stdout.split() if w.startswith("v=")), "?")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _redact(url: str) -> str:
    """A URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
