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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from chargepath.core.auth import Principal, Role
from chargepath.core.overlimit import OverLimitCache
from chargepath.core.validation import OccurredAtWindow
from chargepath.engine import (
    LATE_REPLY_WAIT_S,
    REVERSE_TIMEOUT_S,
    Engine,
    EngineSettings,
    monotonic_ms,
    new_decision_id,
)
from chargepath.gateway_leases import GatewayLeases
from chargepath.jobs import (
    AggregateFlush,
    Job,
    LeaseSweep,
    LedgerLag,
    PolicyWatch,
    QuotaBurn,
    RedisMemory,
    SpoolReplay,
    StoreProbe,
    StoreTimeoutSizing,
)
from chargepath.leasing import Leasing
from chargepath.policy_sync import PLANS_MODES, PlansMode, apply_plan_file
from chargepath.room_watch import RoomWatch
from chargepath.settings import Settings
from chargepath.spool_replay import RedisSessionSlots, SpoolReplayer
from chargepath.status.board import BoardLimits, BoardSources, StatusBoard
from chargepath.status.http import StatusGate, StatusServer, server_tls
from chargepath.status.session import SessionSigner
from chargepath.store.admin import AdminStore
from chargepath.store.audit import AuditStream
from chargepath.store.base import LedgerStore, StoreUnavailableError
from chargepath.store.connect import RedisTarget, ReplicaWait
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.gateway_report import RedisGatewayReports
from chargepath.store.keys import RedisKeyStore, bootstrap_operator_key
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.ledger import Ledger
from chargepath.store.redis_store import RedisStore
from chargepath.store.room import RedisRoomEvents
from chargepath.store.spool import SPOOL_FILE, Spool
from chargepath.store.webhooks import WebhookStore
from chargepath.telemetry import Telemetry
from chargepath.transport import services
from chargepath.transport.admin import AdminServicer
from chargepath.transport.audit import AuditInterceptor
from chargepath.transport.auth import Authenticator, AuthInterceptor, IdentityPrincipal
from chargepath.transport.envoy import RLQS_SERVICE, RLS_SERVICE, add_envoy_services
from chargepath.transport.keys import KeyServicer
from chargepath.transport.leases import LeaseServicer
from chargepath.transport.metering import MeteringServicer, OpenStreams
from chargepath.transport.tls import IdentityMap, ServerCertificates, TlsFiles
from chargepath.transport.tracing import InstrumentedServices
from chargepath.webhooks import WebhookDispatcher, WebhookSettings, process_identity
from chargepath_protos.v1 import admin_pb2, keys_pb2, lease_pb2, metering_pb2

#: The GC's thresholds once serving (see :meth:`Gateway.start`).
GC_GEN0 = 2_000
GC_GEN2 = 2_500

log = logging.getLogger("chargepath")

METERING = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name
LEASE = lease_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
KEYS = keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
#: How long a drain waits for the late store replies still followed: the wait for a reply,
#: then a first round of its reversals' attempts (a store that is still away past it leaves
#: them billed, as the log says; the supervisor ends a worker 5 s after its drain grace anyway).
LATE_DRAIN_S = LATE_REPLY_WAIT_S + 3 * REVERSE_TIMEOUT_S + 1.0


class ListenError(RuntimeError):
    """The gRPC server could not listen on its address; the message is one line naming it."""


class ServingStatus:
    """What the gRPC health service answers for the server ("") and the metering service:
    SERVING while the store answers. Each change is logged, with ``detail()`` (the spool's
    line) when given; setting the same status again is a no-op."""

    def __init__(self, health: HealthServicer, detail: Callable[[], str] | None = None) -> None:
        self.health = health
        self.detail = detail
        self._serving: bool | None = None
        #: Told of each change, after the health service (the webhooks' degraded events).
        self.listeners: list[Callable[[bool], None]] = []

    @property
    def name(self) -> str:
        """SERVING, NOT_SERVING, or UNKNOWN before the first probe (for the status page)."""
        return {True: "SERVING", False: "NOT_SERVING", None: "UNKNOWN"}[self._serving]

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
        for listener in self.listeners:
            listener(serving)
        log.log(
            logging.INFO if serving else logging.ERROR,
            "health: %s%s",
            "SERVING" if serving else "NOT_SERVING (store unreachable)",
            f"; {self.detail()}" if self.detail is not None else "",
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
    #: The redis-server this process starts and stops; None when the settings name a Redis
    #: (URL, cluster or sentinels).
    embedded: EmbeddedRedis | None
    #: Where the store's Redis is: the settings' target or the embedded server's URL.
    redis_target: RedisTarget
    store: RedisStore
    #: The outage spool (``<data_dir>/spool.sqlite3``), not open yet; None when disabled.
    spool: Spool | None
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
    #: Quota leases (LeaseService), on the same Redis and beside the engine.
    leases: LeaseServicer
    admin: AdminServicer
    key_service: KeyServicer
    server: grpc.aio.Server
    jobs: tuple[Job, ...]
    #: Sizes the store timeout from how Redis persists (one of ``jobs``; also run at start).
    timeout_sizing: StoreTimeoutSizing
    #: The status page (``http_port``), served by worker 0 only; None otherwise.
    status: StatusServer | None = None


def embedded_redis(settings: Settings) -> EmbeddedRedis | None:
    """The embedded redis-server the settings ask for, not started: one with its data and AOF
    under ``data_dir`` when no Redis URL is set, else None. Its password (part of its URL) is
    read from the data dir if one was kept there, the only I/O of :func:`build`. Raises
    FileNotFoundError when no redis-server binary can be found."""
    if not settings.redis_target().embedded:
        return None
    maxmemory = settings.redis_maxmemory.strip()
    return EmbeddedRedis(
        Path(settings.data_dir) / "redis",
        fsync=settings.redis_fsync,
        maxmemory=None if maxmemory in ("", "0") else maxmemory,
    )


def build(settings: Settings, telemetry: Telemetry | None = None, worker: int = 0) -> Components:
    """Construct every collaborator of one gateway process from its settings. No I/O but
    reading the TLS files (:func:`load_trust`, whose errors it raises); call it with an event
    loop running (the gRPC server binds to it). ``telemetry``: the process's, from
    :func:`chargepath.telemetry.setup`; default the global providers'. ``worker``: this
    process's index under ``--workers`` (0 when alone)."""
    s = settings
    trust = load_trust(s)
    telemetry = telemetry or Telemetry(top_tenants=s.metrics_top_tenants)
    embedded = embedded_redis(s)
    target = RedisTarget(url=embedded.url) if embedded is not None else s.redis_target()
    store = RedisStore.connect(
        target,
        connect_timeout=max(s.store_timeout_floor_ms / 1000, 0.5),
        dedup_window_ms=s.dedup_window_s * 1000,
        session_ttl_ms=s.session_ttl_s * 1000,
        recent_length=s.recent_decisions,
        explain_window_ms=s.explain_window_ms,
        clock_offset_ms=s.clock_offset_ms,
        replica_wait=ReplicaWait(
            s.redis_wait_replicas,
            s.redis_wait_timeout_ms,
            meter=telemetry.meter_provider.get_meter("chargepath"),
        )
        if s.redis_wait_replicas
        else None,
    )
    # -- the outage spool (issue #13, item 4): written by the engine's degraded path,
    # replayed by the SpoolReplay job, exported by telemetry, summed up in the health log.
    spool = (
        Spool(
            Path(s.data_dir) / SPOOL_FILE,
            max_entries=s.spool_max_entries,
            max_bytes=s.spool_max_bytes,
        )
        if s.spool_max_entries > 0
        else None
    )
    # -- the over-limit cache (issue #16, item 5): on only while the RoomWatch job is
    # subscribed to the store's room events.
    overlimit = (
        OverLimitCache(
            monotonic_ms,
            lambda: time.time_ns() // 1_000_000,
            new_decision_id,
            max_entries=s.overlimit_max_entries,
            dedup_window_ms=s.dedup_window_s * 1000,
            seen_capacity=s.overlimit_seen_ids,
        )
        if s.overlimit_cache
        else None
    )
    engine = Engine(
        store,
        EngineSettings(
            store_timeout_s=s.store_timeout_floor_ms / 1000,
            store_timeout_per_usage_s=s.store_timeout_per_usage_ms / 1000,
            breaker_failures=s.breaker_failures,
            breaker_cooldown_s=s.breaker_cooldown_ms / 1000,
            spool_timeout_s=s.spool_timeout_ms / 1000,
        ),
        telemetry,
        spool=spool,
        overlimit=overlimit,
    )
    overlimit_jobs: tuple[Job, ...] = ()
    if overlimit is not None:
        telemetry.observe_overlimit(overlimit.snapshot)
        overlimit_jobs = (RoomWatch(RedisRoomEvents(store.client), overlimit),)
    spool_jobs: tuple[Job, ...] = ()
    if spool is not None:
        telemetry.observe_spool(spool.snapshot)
        spool_jobs = (
            SpoolReplay(
                SpoolReplayer(
                    spool,
                    store,
                    lambda: engine.policy,
                    engine.reload_policy,
                    session_slots=RedisSessionSlots(store.client, store.session_window),
                    store_timeout_s=max(s.store_timeout_floor_ms / 1000 * 20, 1.0),
                    dedup_window_ms=s.dedup_window_s * 1000,
                )
            ),
        )
    keys = RedisKeyStore(store.client)
    authenticator = Authenticator(keys) if s.auth == "keys" else None
    ledger: LedgerStore = Ledger.of_store(store)
    # Quota leases (issue #16): on the store's Redis, beside the engine.
    lease_store = RedisLeaseStore(store)
    # Gateway-held leases (issue #16, item 5): admits of hot subjects whose limits say
    # lease: {gateway: true} answered from a lease this process holds.
    gateway_leases = GatewayLeases(engine, Leasing(engine, lease_store), RedisGatewayReports(store))
    engine.leased = gateway_leases
    # The audit trail of admin calls; its interceptor comes first, outside authentication,
    # so that refused calls are audited too (transport/audit.py).
    audit = AuditStream.of_store(store)
    state = AdminStore(store)
    draining = asyncio.Event()
    serving = ServingStatus(
        HealthServicer(),
        (lambda: spool.snapshot().health_detail()) if spool is not None else None,
    )
    # The audit interceptor first, outside authentication, so that refused calls are audited
    # too (transport/audit.py); then authentication: a refused call costs no span and reaches
    # no servicer.
    interceptors: list[grpc.aio.ServerInterceptor] = [AuditInterceptor(audit)]
    if authenticator is not None:
        interceptors.append(
            AuthInterceptor(
                authenticator,
                certificate_principal(trust.identities) if trust.identities is not None else None,
            )
        )
    # The metering, lease and Envoy services make their own server spans (transport.tracing.
    # server_span: one per Check, Lease, RLS call or stream message); the instrumentation
    # traces the admin, health and reflection services. With tracing off (no span could be
    # sampled) it is left out: it would only build spans that record nothing, on every call.
    if telemetry.tracing:
        interceptors.append(
            InstrumentedServices(
                telemetry.tracer_provider,
                (f"/{METERING}/", f"/{LEASE}/", "/envoy.service."),
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
    webhooks = WebhookDispatcher(
        WebhookStore.of_store(store),
        lambda: engine.policy,
        WebhookSettings.of(s),
        consumer=process_identity(),
    )
    serving.listeners.append(webhooks.on_serving)
    timeout_sizing = StoreTimeoutSizing(store.persistence, engine, configured_ms=s.store_timeout_ms)
    jobs: tuple[Job, ...] = (
        StoreProbe(
            store,
            serving.set,
            period_s=s.health_probe_ms / 1000,
            timeout_s=max(s.store_timeout_floor_ms / 1000, 0.2),
        ),
        PolicyWatch(store, engine, period_s=s.policy_poll_ms / 1000),
        AggregateFlush(ledger, engine, clock_offset_ms=s.clock_offset_ms),
        LedgerLag(ledger, engine, telemetry, period_s=s.ledger_lag_interval_ms / 1000),
        QuotaBurn(state, engine, telemetry, period_s=s.quota_burn_interval_ms / 1000),
        LeaseSweep(lease_store, engine),
        gateway_leases,
        RedisMemory(store.memory, telemetry, period_s=s.redis_memory_interval_ms / 1000),
        timeout_sizing,
        webhooks,
        *spool_jobs,
        *overlimit_jobs,
    )
    # -- the status page (issue #15, item 3): one page for the gateway, so worker 0 serves it
    # (the supervisor has no store or engine); its Redis figures are the whole gateway's, its
    # decision rates worker 0's.
    status = None
    if s.http_port and worker == 0:
        status = StatusServer(
            StatusBoard(
                engine,
                store,
                state,
                BoardSources(
                    health=lambda: "DRAINING" if draining.is_set() else serving.name,
                    totals=telemetry.decision_totals,
                    spool_depth=(lambda: spool.snapshot().depth) if spool is not None else None,
                    worker=worker,
                    workers=max(s.workers, 1),
                ),
                BoardLimits(refresh_s=s.status_refresh_ms / 1000),
            ),
            StatusGate(authenticator, keys if authenticator is not None else None, SessionSigner()),
            host=s.host,
            port=s.http_port,
            tls=server_tls(trust.certificates.files) if trust.certificates is not None else None,
            draining=draining,
        )
    return Components(
        settings=s,
        telemetry=telemetry,
        embedded=embedded,
        redis_target=target,
        store=store,
        spool=spool,
        keys=keys,
        authenticator=authenticator,
        trust=trust,
        engine=engine,
        ledger=ledger,
        draining=draining,
        serving=serving,
        metering=MeteringServicer(
            engine,
            draining,
            OccurredAtWindow(s.occurred_at_max_age_s, s.occurred_at_max_ahead_s),
            streams=OpenStreams(s.max_streams, s.max_streams_per_credential),
        ),
        leases=LeaseServicer(
            Leasing(engine, lease_store),
            draining,
            streams=OpenStreams(s.max_streams, s.max_streams_per_credential),
        ),
        admin=AdminServicer(engine, store, state, audit, lease_store),
        key_service=KeyServicer(keys),
        server=server,
        jobs=jobs,
        timeout_sizing=timeout_sizing,
        status=status,
    )


class Gateway:
    """One gateway process's server. ``await start()`` builds, wires and starts it; ``await
    stop()`` drains and stops it (what SIGTERM does), also after a start that failed."""

    def __init__(
        self, settings: Settings, telemetry: Telemetry | None = None, *, worker: int = 0
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.worker = worker
        self.parts: Components | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Absolute, so the log line that says where the operator key is needs no context.
        self._data_dir = Path(settings.data_dir).resolve()

    async def start(self) -> None:
        parts = self.parts = build(self.settings, self.telemetry, self.worker)
        await self._open_store(parts)
        if parts.spool is not None:
            # before the server serves (the engine writes it); usages an earlier run left in
            # it are replayed by the SpoolReplay job like any other
            stats = await parts.spool.open()
            log.info("outage spool %s: %s", parts.spool.path, stats.health_detail())
        await self._open_keys(parts)
        self._wire(parts)
        await parts.server.start()
        await parts.serving.set(True)
        self._tasks = [
            asyncio.create_task(job.run(parts.draining), name=job.name) for job in parts.jobs
        ]
        # Long-lived objects (modules, the policy, the servicers) leave the GC's view, and full
        # collections run rarely: with thousands of open streams a full collection otherwise
        # stalls every stream for hundreds of milliseconds. Young collections stay small: each
        # call leaves a few cyclic objects (grpc.aio's call state, tasks), and the pause of a
        # young collection grows with its threshold (50,000 stalled the loop 25 to 60 ms every
        # few seconds at 800 checks/s; 2,000 stalls it about 1 ms for the same CPU). Full
        # collections still wait for GC_GEN0 x 20 x GC_GEN2 allocations (100 million, as before).
        if parts.status is not None:
            await parts.status.start()
            log.info("status page on %s (worker %d serves it)", parts.status.url, self.worker)
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0, 20, GC_GEN2)
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
                "embedded redis-server %s started on %s (binary %s); data and AOF in %s; "
                "maxmemory %s, noeviction",
                _redis_version(parts.embedded.binary),
                parts.embedded.redacted_url,
                parts.embedded.binary,
                parts.embedded.data_dir,
                parts.embedded.maxmemory or "none",
            )
        else:
            log.info("using Redis at %s", parts.redis_target.describe())
        await _wait_for_store(parts.store)
        # without --store-timeout-ms: sized from how Redis persists (again every minute)
        await parts.timeout_sizing.size()
        # scripts loaded and connections open before the first Check (the gateway serves,
        # and reports SERVING, only after this)
        await parts.store.prepare()
        if s.plans:
            await apply_plan_file(parts.store, s.plans, _plans_mode(s))
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
        # deserializers that never raise: undecodable bytes are INVALID_ARGUMENT (services.py)
        services.add_service(parts.server, parts.metering, services.METERING)
        services.add_service(parts.server, parts.leases, services.LEASE)
        services.add_service(parts.server, parts.admin, services.ADMIN)
        services.add_service(parts.server, parts.key_service, services.KEYS)
        add_envoy_services(parts.server, parts.engine, parts.draining)
        health_pb2_grpc.add_HealthServicer_to_server(
            parts.serving.health,
            services.GenericOnly(parts.server),
        )
        reflection.enable_server_reflection(
            (
                METERING,
                LEASE,
                ADMIN,
                KEYS,
                RLS_SERVICE,
                RLQS_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            parts.server,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        certificates = parts.trust.certificates
        try:
            if certificates is None:
                self.port = parts.server.add_insecure_port(address)
            else:
                self.port = parts.server.add_secure_port(address, certificates.credentials())
        except RuntimeError as exc:  # grpc says "Failed to bind to address ..."
            raise ListenError(
                f"--port {self.settings.port}: cannot listen on {address}: address already in "
                "use by another program, or not an address of this machine"
            ) from exc

    async def stop(self) -> None:
        """Drain: NOT_SERVING, streams end after the batch in hand, unary calls finish within
        the grace period; then the jobs, the store and the embedded Redis stop."""
        log.info("draining (grace %.1fs)", self.settings.drain_grace_s)
        parts = self.parts
        if parts is not None:
            parts.draining.set()
            if parts.status is not None:
                await parts.status.close()
            await parts.serving.health.enter_graceful_shutdown()
            await parts.server.stop(self.settings.drain_grace_s)
            await _settle_late_replies(parts.engine)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if parts.authenticator is not None:
                await parts.authenticator.close()
            # The key store shares the store's client: closing the store closes both.
            if parts.spool is not None:  # after the server and the replay: nobody writes now
                await parts.spool.close()
            await parts.engine.close()
            await parts.store.close()
            if parts.embedded is not None:
                await asyncio.to_thread(parts.embedded.stop)
                log.info("embedded redis-server stopped")
        log.info("stopped")


async def _settle_late_replies(engine: Engine, bound_s: float = LATE_DRAIN_S) -> None:
    """On drain, once no call is served: read and reconcile the store calls still followed in
    the background (reversals, spool holds), for ``bound_s`` at most. Past it they are
    cancelled with the store: their spooled usages' holds lapse and the replay (this
    process's successor's) finds the store's records; a refused admit recorded late then
    stays billed, as the log says."""
    try:
        await asyncio.wait_for(engine.late_replies_settled(), bound_s)
    except TimeoutError:
        log.warning(
            "drain: late store replies still unread after %.1f s, left to the spool's holds "
            "and the store's records",
            bound_s,
        )


#: A PING at start that takes longer than this is tried again (and logged): a store that
#: accepts connections but does not answer must not hang a starting gateway in silence.
START_PING_S = 2.0


async def _wait_for_store(store: RedisStore, attempts: int = 100) -> None:
    for i in range(attempts):
        try:
            await asyncio.wait_for(store.ping(), START_PING_S)
            return
        except (StoreUnavailableError, TimeoutError) as exc:
            if i == attempts - 1:
                if isinstance(exc, TimeoutError):
                    raise StoreUnavailableError(
                        f"no answer to PING within {START_PING_S:.0f} s"
                    ) from None
                raise
            if i % 10 == 0:
                log.warning(
                    "waiting for the store: %s",
                    exc if isinstance(exc, StoreUnavailableError) else "PING not answered",
                )
            await asyncio.sleep(0.1)


async def apply_plans(settings: Settings) -> int:
    """Apply the plan file ``settings.plans`` through a store of its own, closed on return, as
    a gateway does at start (:mod:`chargepath.policy_sync`); the live version. What the
    supervisor does once for all its workers before they start."""
    store = RedisStore.connect(settings.redis_target(), connect_timeout=2.0)
    try:
        await _wait_for_store(store)
        return await apply_plan_file(store, settings.plans, _plans_mode(settings))
    finally:
        await store.close()


def _plans_mode(settings: Settings) -> PlansMode:
    for mode in PLANS_MODES:
        if settings.plans_mode == mode:
            return mode
    raise ValueError(
        f"plans mode {settings.plans_mode!r}: expected one of {', '.join(PLANS_MODES)}"
    )


def _redis_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
        return next((w[2:] for w in out.stdout.split() if w.startswith("v=")), "?")
    except (OSError, subprocess.SubprocessError):
        return "?"
