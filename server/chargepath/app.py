"""The one place that builds the gateway and wires it together, as envoyproxy/ratelimit's
``runner.go`` does: :func:`build` constructs every collaborator (store, engine, ledger,
servicers, the gRPC server, the background jobs) and nothing else in the gateway constructs
one; :class:`Gateway` then starts them in order, wires the servicers to the server, serves and
stops. The process layer (:mod:`chargepath.supervisor`, :mod:`chargepath.cli`) sits on top:
nothing here imports it."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from chargepath.core.auth import Principal, Role
from chargepath.core.plans import PolicyDocument
from chargepath.engine import Engine, EngineSettings
from chargepath.jobs import AggregateFlush, Job, LedgerLag, PolicyWatch, StoreProbe
from chargepath.policy_files import load_policy_file
from chargepath.settings import Settings
from chargepath.store.admin import AdminStore
from chargepath.store.base import LedgerStore, StoreUnavailableError
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import RedisKeyStore, bootstrap_operator_key
from chargepath.store.ledger import Ledger
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from chargepath.transport.admin import AdminServicer
from chargepath.transport.auth import Authenticator, AuthInterceptor, IdentityPrincipal
from chargepath.transport.keys import KeyServicer
from chargepath.transport.metering import MeteringServicer
from chargepath.transport.tls import IdentityMap, ServerCertificates, TlsFiles
from chargepath_protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
)

log = logging.getLogger("chargepath")

METERING = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
KEYS = keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name


class ServingStatus:
    """What the gRPC health service answers for the server ("") and the metering service:
    SERVING while the store answers. Each change is logged; setting the same status again is
    a no-op."""

    def __init__(self, health: HealthServicer) -> None:
        self.health = health
        self._serving: bool | None = None

    async def set(self, serving: bool) -> None:
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


@dataclass(frozen=True, slots=True)
class Trust:
    """Who the gateway trusts, from its settings' files: the TLS configuration of the gRPC
    port (None: plaintext) and the identity map of client certificates (None: a client
    certificate names nobody, so every caller needs an API key)."""

    certificates: ServerCertificates | None
    identities: IdentityMap | None

    def describe(self) -> str:
        if self.certificates is None:
            return "plaintext"
        return "mTLS" if self.certificates.files.mutual else "TLS"


def load_trust(settings: Settings) -> Trust:
    """Read and check the TLS files and the identity map that ``settings`` name. Raises
    :class:`~chargepath.transport.tls.TlsConfigError` or
    :class:`~chargepath.transport.tls.IdentityMapError`; ``chargepath serve`` calls it before
    anything starts, so a bad file stops the start."""
    certificates = None
    if settings.tls_cert:
        certificates = ServerCertificates(
            TlsFiles(
                Path(settings.tls_cert),
                Path(settings.tls_key),
                Path(settings.tls_client_ca) if settings.tls_client_ca else None,
            )
        )
    identities = IdentityMap.from_file(settings.tls_identities) if settings.tls_identities else None
    return Trust(certificates, identities)


def certificate_principal(identities: IdentityMap) -> IdentityPrincipal:
    """The AuthInterceptor's hook for mTLS: the principal that a call's verified client
    certificate stands for in ``identities``, or None (the call then needs an API key)."""

    def principal(auth_context: Mapping[str, Sequence[bytes]]) -> Principal | None:
        peer = identities.peer(auth_context)
        if peer is None:
            return None
        return Principal(peer.identity, Role(peer.role), peer.tenant)

    return principal


@dataclass(frozen=True, slots=True)
class Components:
    """Everything one gateway process is made of, as :func:`build` made it: constructed but not
    started. No connection is open, no process runs, no port is bound, no job runs yet."""

    settings: Settings
    telemetry: Telemetry
    #: The redis-server this process starts and stops; None when ``settings.redis_url`` is set.
    embedded: EmbeddedRedis | None
    #: The Redis URL the store uses: ``settings.redis_url`` or the embedded server's.
    redis_url: str
    store: RedisStore
    #: API keys, on the same Redis as the store (and its connection pool).
    keys: RedisKeyStore
    #: None with ``auth = "none"``: no call is authenticated.
    authenticator: Authenticator | None
    trust: Trust
    engine: Engine
    ledger: LedgerStore
    #: Set when the gateway starts to drain (SIGTERM): streams and jobs end on it.
    draining: asyncio.Event
    serving: ServingStatus
    metering: MeteringServicer
    admin: AdminServicer
    key_service: KeyServicer
    server: grpc.aio.Server
    jobs: tuple[Job, ...]


def embedded_redis(settings: Settings) -> EmbeddedRedis | None:
    """The embedded redis-server the settings ask for, not started: one with its data and AOF
    under ``data_dir`` when no Redis URL is set, else None. Raises FileNotFoundError when no
    redis-server binary can be found."""
    if settings.redis_url:
        return None
    return EmbeddedRedis(Path(settings.data_dir) / "redis", fsync=settings.redis_fsync)


def build(settings: Settings, telemetry: Telemetry | None = None) -> Components:
    """Construct every collaborator of one gateway process from its settings. No I/O but
    reading the TLS files (:func:`load_trust`, whose errors it raises); call it with an event
    loop running (the gRPC server binds to it). ``telemetry``: the process's, from
    :func:`chargepath.telemetry.setup`; default the global providers'."""
    s = settings
    trust = load_trust(s)
    telemetry = telemetry or Telemetry()
    embedded = embedded_redis(s)
    url = embedded.url if embedded is not None else s.redis_url
    store = RedisStore.from_url(
        url,
        cluster=s.redis_cluster,
        connect_timeout=max(s.store_timeout_ms / 1000, 0.5),
        dedup_window_ms=s.dedup_window_s * 1000,
        session_ttl_ms=s.session_ttl_s * 1000,
        recent_length=s.recent_decisions,
        clock_offset_ms=s.clock_offset_ms,
    )
    engine = Engine(
        store,
        EngineSettings(
            store_timeout_s=s.store_timeout_ms / 1000,
            store_timeout_per_usage_s=s.store_timeout_per_usage_ms / 1000,
            breaker_failures=s.breaker_failures,
            breaker_cooldown_s=s.breaker_cooldown_ms / 1000,
        ),
        telemetry,
    )
    keys = RedisKeyStore(store.client)
    authenticator = Authenticator(keys) if s.auth == "keys" else None
    ledger: LedgerStore = Ledger.of_store(store)
    draining = asyncio.Event()
    serving = ServingStatus(HealthServicer())
    # Authentication first: a refused call costs no span and reaches no servicer.
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if authenticator is not None:
        interceptors.append(
            AuthInterceptor(
                authenticator,
                certificate_principal(trust.identities) if trust.identities is not None else None,
            )
        )
    # The metering service makes its own server spans (transport.tracing.server_span: one per
    # Check, one per stream batch); the instrumentation traces the admin, health and reflection
    # services.
    interceptors.append(
        aio_server_interceptor(
            tracer_provider=telemetry.tracer_provider,
            filter_=filters.negate(filters.service_name(METERING)),
        )
    )
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    jobs: tuple[Job, ...] = (
        StoreProbe(
            store,
            serving.set,
            period_s=s.health_probe_ms / 1000,
            timeout_s=max(s.store_timeout_ms / 1000, 0.2),
        ),
        PolicyWatch(store, engine, period_s=s.policy_poll_ms / 1000),
        AggregateFlush(ledger, engine, clock_offset_ms=s.clock_offset_ms),
        LedgerLag(ledger, engine, telemetry, period_s=s.ledger_lag_interval_ms / 1000),
    )
    return Components(
        settings=s,
        telemetry=telemetry,
        embedded=embedded,
        redis_url=url,
        store=store,
        keys=keys,
        authenticator=authenticator,
        trust=trust,
        engine=engine,
        ledger=ledger,
        draining=draining,
        serving=serving,
        metering=MeteringServicer(engine, draining),
        admin=AdminServicer(engine, store, AdminStore(store)),
        key_service=KeyServicer(keys),
        server=server,
        jobs=jobs,
    )


class Gateway:
    """One gateway process's server. ``await start()`` builds, wires and starts it; ``await
    stop()`` drains and stops it (what SIGTERM does), also after a start that failed."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.parts: Components | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Absolute, so the log line that says where the operator key is needs no context.
        self._data_dir = Path(settings.data_dir).resolve()

    async def start(self) -> None:
        parts = self.parts = build(self.settings, self.telemetry)
        await self._open_store(parts)
        await self._open_keys(parts)
        self._wire(parts)
        await parts.server.start()
        await parts.serving.set(True)
        self._tasks = [
            asyncio.create_task(job.run(parts.draining), name=job.name) for job in parts.jobs
        ]
        # Long-lived objects (modules, the policy, the servicers) leave the GC's view, and
        # young collections run less often: with thousands of open streams a full collection
        # otherwise stalls every stream for hundreds of milliseconds.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info(
            "serving chargepath.v1 on %s:%d (%s, auth %s, policy version %d)",
            self.settings.host,
            self.port,
            parts.trust.describe(),
            self.settings.auth,
            parts.engine.policy.version,
        )

    async def _open_store(self, parts: Components) -> None:
        """Start the embedded Redis (if any), wait for the store, publish the plan file (if
        any) and load the live policy into the engine."""
        s = self.settings
        if parts.embedded is not None:
            await asyncio.to_thread(parts.embedded.start)
            log.info(
                "embedded redis-server %s started on %s (binary %s); data and AOF in %s",
                _redis_version(parts.embedded.binary),
                parts.embedded.url,
                parts.embedded.binary,
                parts.embedded.data_dir,
            )
        else:
            log.info("using Redis at %s", _redact(parts.redis_url))
        await _wait_for_store(parts.store)
        if s.plans:
            document = load_policy_file(s.plans)
            published = await parts.store.publish_policy(document)
            log.info(
                "policy from %s is version %d (%s)",
                s.plans,
                published.version,
                "published" if published.changed else "unchanged",
            )
        await parts.engine.reload_policy()
        if parts.engine.policy.version == 0:
            log.warning(
                "no policy in the store: every usage is DENY NO_ENTITLEMENT until one is published"
            )

    async def _open_keys(self, parts: Components) -> None:
        """With authentication: make sure the data dir holds a valid operator key (the CLI on
        this machine reads it), say where (never the key), and start the authenticator's
        cache eviction."""
        if parts.authenticator is None:
            log.warning(
                "--auth none: every caller may meter, read and change every tenant "
                "(development only)"
            )
            return
        path = await bootstrap_operator_key(parts.keys, self._data_dir)
        log.info(
            "operator key in %s (mode 0600): the CLI on this machine uses it; other clients "
            "send a key as 'authorization: Bearer <key>'",
            path,
        )
        await parts.authenticator.start()

    def _wire(self, parts: Components) -> None:
        """Put the servicers on the server and bind its port."""
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(parts.metering, parts.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(parts.admin, parts.server)
        keys_pb2_grpc.add_KeyServiceServicer_to_server(parts.key_service, parts.server)
        health_pb2_grpc.add_HealthServicer_to_server(parts.serving.health, parts.server)
        reflection.enable_server_reflection(
            (
                METERING,
                ADMIN,
                KEYS,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            parts.server,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        certificates = parts.trust.certificates
        if certificates is None:
            self.port = parts.server.add_insecure_port(address)
        else:
            self.port = parts.server.add_secure_port(address, certificates.credentials())

    async def stop(self) -> None:
        """Drain: NOT_SERVING, streams end after the batch in hand, unary calls finish within
        the grace period; then the jobs, the store and the embedded Redis stop."""
        log.info("draining (grace %.1fs)", self.settings.drain_grace_s)
        parts = self.parts
        if parts is not None:
            parts.draining.set()
            await parts.serving.health.enter_graceful_shutdown()
            await parts.server.stop(self.settings.drain_grace_s)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if parts.authenticator is not None:
                await parts.authenticator.close()
            # The key store shares the store's client: closing the store closes both.
            await parts.store.close()
            if parts.embedded is not None:
                await asyncio.to_thread(parts.embedded.stop)
                log.info("embedded redis-server stopped")
        log.info("stopped")


async def _wait_for_store(store: RedisStore, attempts: int = 100) -> None:
    for i in range(attempts):
        try:
            await store.ping()
            return
        except StoreUnavailableError as exc:
            if i == attempts - 1:
                raise
            if i % 10 == 0:
                log.warning("waiting for the store: %s", exc)
            await asyncio.sleep(0.1)


async def publish_policy(redis_url: str, document: PolicyDocument) -> int:
    """Publish ``document`` through a store of its own, closed on return; the live version.
    What the supervisor does once for all its workers before they start."""
    store = RedisStore.from_url(redis_url, connect_timeout=2.0)
    try:
        return (await store.publish_policy(document)).version
    finally:
        await store.close()


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
