"""Gateway settings: defaults, then ``CHARGEPATH_*`` environment variables, then CLI flags."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from chargepath.store.base import StorePersistence
    from chargepath.store.connect import RedisTarget

AUTH_MODES: Final = ("keys", "none")


#: The store timeout when Redis neither fsyncs each write nor forks (no AOF, no RDB ``save``
#: rules): it answers in well under a millisecond, so 50 ms is far past any healthy reply and
#: short enough to answer from the failure policy inline.
STORE_TIMEOUT_MS = 50
#: The store timeout when Redis persists in the background (AOF with ``appendfsync everysec``
#: or ``no``, or RDB snapshots), or does not say how (CONFIG refused): it forks now and then
#: (an AOF rewrite, a snapshot), and the fork stops its main thread while the kernel copies its
#: page tables, on top of whatever else the machine does then. On this project's VM, a fork
#: of 25 ms in a 10-minute run at 80 % of the highest rate coincided with Checks taking up to
#: 63 ms, 4 of them past a 50 ms timeout (loadtest/figures/healthy-run-everysec-2765-after-gc).
STORE_TIMEOUT_FORKS_MS = 100
#: The store timeout when Redis fsyncs its AOF before it answers each write (``appendonly
#: yes`` with ``appendfsync always``): every decision then waits for the disk, and Redis' main
#: thread waits with it. A disk flush now and then takes far longer than usual, on a healthy
#: disk and a quiet machine: on this project's VM, up to 60 ms in one 10-minute run at 80 % of
#: the highest rate, and 231 ms in the next (loadtest/figures/healthy-run-always-2765-fork-
#: aware): 250 verdicts of that run were degraded past a 200 ms timeout, 25 of them refused
#: admits, with Redis doing what it was told, not failing. An operator who chose a flush per
#: write chose to wait for the disk; a timeout of twice the worst flush seen keeps its hiccups
#: from turning into refusals. The price is paid in a real outage of a Redis that does not
#: drop its connections (a stopped process, a lost network): a caller then waits this long
#: for its degraded verdict, until the breaker's probe (which waits as long) opens.
STORE_TIMEOUT_FSYNC_ALWAYS_MS = 500
#: A fork's stall grows with the data set (about 10 to 20 ms per GB of memory on a VM), and a
#: disk that took long to flush once will again: the timeout is at least this many times the
#: longest of Redis' latest fork and (with ``appendfsync always``) the worst flush its latency
#: monitor recorded in the last day (``store.base.FSYNC_HISTORY_S``), plus
#: :data:`STORE_TIMEOUT_MS`.
STALL_FACTOR = 2
#: ... and at most this (a larger stall is an outage to the callers, whatever its cause).
STORE_TIMEOUT_AUTO_MAX_MS = 1_000


def store_timeout_ms_for(configured: int, persistence: StorePersistence | None) -> tuple[int, str]:
    """The store timeout a gateway uses, and why: ``configured`` (``--store-timeout-ms``) when
    set (> 0); else by how Redis persists (:class:`~chargepath.store.base.StorePersistence`;
    None: Redis did not answer): :data:`STORE_TIMEOUT_FSYNC_ALWAYS_MS` if it fsyncs every
    write, :data:`STORE_TIMEOUT_FORKS_MS` if it forks or does not say,
    :data:`STORE_TIMEOUT_MS` if neither; never below :data:`STALL_FACTOR` times its latest
    fork or its worst recorded flush, plus :data:`STORE_TIMEOUT_MS`; never above
    :data:`STORE_TIMEOUT_AUTO_MAX_MS`."""
    if configured > 0:
        return configured, "--store-timeout-ms"
    if persistence is None:
        return STORE_TIMEOUT_FORKS_MS, "Redis did not say how it persists"
    if persistence.fsyncs_every_write:
        ms, why = STORE_TIMEOUT_FSYNC_ALWAYS_MS, "Redis fsyncs every write (appendfsync always)"
    elif persistence.forks:
        ms, why = STORE_TIMEOUT_FORKS_MS, "Redis persists in the background, forking to do so"
    elif persistence.forks is None:
        ms, why = STORE_TIMEOUT_FORKS_MS, "Redis refused CONFIG GET, so how it persists is unknown"
    else:
        ms, why = STORE_TIMEOUT_MS, "Redis neither fsyncs every write nor forks"
    for stall, what in (
        (persistence.latest_fork_ms, "its latest fork stopped it"),
        (persistence.worst_fsync_ms, "its worst flush of the last 24 h stopped it"),
    ):
        if stall and STALL_FACTOR * stall + STORE_TIMEOUT_MS > ms:
            ms = min(STALL_FACTOR * stall + STORE_TIMEOUT_MS, STORE_TIMEOUT_AUTO_MAX_MS)
            why += f"; {what} {stall} ms"
    return ms, why


@dataclass(slots=True)
class Settings:
    """Every knob of ``chargepath serve``. Durations carry their unit in the name."""

    host: str = "127.0.0.1"
    port: int = 50051
    #: Gateway processes sharing the port (SO_REUSEPORT); 0: one per core.
    workers: int = 0
    #: Redis (or Valkey) URL; empty: start an embedded redis-server with AOF in ``data_dir``.
    redis_url: str = ""
    #: Treat ``redis_url`` as a Redis Cluster seed node.
    redis_cluster: bool = False
    #: Redis Sentinel instead of ``redis_url``: the sentinels as ``host:port,host:port``...
    redis_sentinel: str = ""
    #: ... and the name of the master they monitor (``sentinel monitor <name> ...``).
    redis_master: str = ""
    #: Credentials of the master a sentinel names (with ``redis_url`` they are in the URL).
    redis_username: str = ""
    redis_password: str = ""
    #: Credentials of the sentinels themselves (``requirepass`` or an ACL user).
    redis_sentinel_username: str = ""
    redis_sentinel_password: str = ""
    #: After each decision batch, WAIT for this many replicas (0: no WAIT). A verdict says
    #: recorded only once they hold the batch; past ``redis_wait_timeout_ms`` it is committed
    #: on the master, answered by the failure policy and spooled, counted as unreplicated
    #: (store.connect.ReplicaWait).
    redis_wait_replicas: int = 0
    #: WAIT's timeout; must stay below ``store_timeout_ms``.
    redis_wait_timeout_ms: int = 20
    data_dir: str = ".chargepath"
    #: Policy file (YAML) to publish at start; empty: serve the policy already in the store.
    plans: str = ""
    #: How the plan file meets the live policy at start (chargepath.policy_sync): "merge"
    #: keeps the changes made through the admin API unless the file changes the same field;
    #: "replace" makes the file win wholesale.
    plans_mode: str = "merge"
    #: Bound on every store call for one usage: past it the tenant's failure policy decides.
    #: 0: chosen from what Redis says of its persistence, at start and every minute after
    #: (:func:`store_timeout_ms_for`): 500 ms when it fsyncs its AOF before answering each
    #: write (``appendfsync always``), 100 ms when it forks to persist (AOF, RDB snapshots),
    #: 50 ms when it does neither; at least twice its latest fork (and its worst recorded
    #: flush) plus 50 ms.
    store_timeout_ms: int = 0
    #: Added to the bound per further usage of a batch (a batch of 64: 50 + 63 x 0.5 ms),
    #: since a batch's script takes longer.
    store_timeout_per_usage_ms: float = 0.5
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 250
    #: How long a request id's first verdict is kept for retries.
    dedup_window_s: int = 600
    #: How long the decision trail keeps every decision, so that ``explain ID`` finds it by
    #: id alone whatever the tenant's rate (about 240 to 300 bytes of Redis per decision;
    #: README "Sizing"). -1: the dedup window; 0 up to ``dedup_window_s``; 0 keeps only about
    #: ``recent_decisions`` per tenant.
    explain_window_s: int = -1
    #: The over-limit cache (chargepath.core.overlimit): a Check admit of a subject and metric
    #: the store refused with a retry_after is answered by this process, without the store,
    #: for any amount at least as large, until retry_after passes or room is announced. Off
    #: by default: a client that retries on another gateway without the retry marker can be
    #: refused a request that was allowed (README, "The over-limit cache").
    overlimit_cache: bool = False
    #: (subject, metric) entries it keeps at most (least recently used out first).
    overlimit_max_entries: int = 100_000
    #: Allowed request ids per dedup window the cache's filter is sized for (about 2.2 MB
    #: per million); past it more Checks go to the store, never fewer.
    overlimit_seen_ids: int = 1_000_000
    #: How long an idle stream session is remembered for resends.
    session_ttl_s: int = 86_400
    #: Embedded Redis AOF fsync policy: everysec or always.
    redis_fsync: str = "everysec"
    #: The embedded Redis' ``maxmemory`` (Redis syntax: 512mb, 2gb, bytes; "0": none). It runs
    #: with ``maxmemory-policy noeviction``: past the limit a write is refused (the decision
    #: is degraded, by the tenant's failure policy; reports go to the spool) and nothing is
    #: ever evicted (an evicted dedup record or ledger entry would be a lost or double
    #: charge). The ``chargepath.redis.memory.*`` gauges say how close it is.
    redis_maxmemory: str = "1gb"
    #: How often the gateway reads Redis' INFO memory for those gauges.
    redis_memory_interval_ms: int = 5000
    #: Open StreamUsage streams this process serves at most, and per credential (API key or
    #: client certificate identity; an operator's included); past either a new stream gets
    #: RESOURCE_EXHAUSTED. Each open stream holds at most one message of usages and its
    #: verdicts in this process (see MeteringServicer.StreamUsage), plus its HTTP/2 buffers.
    max_streams: int = 4096
    max_streams_per_credential: int = 1024
    #: On SIGTERM: how long open calls get to finish.
    drain_grace_s: float = 10.0
    #: How often the policy version is polled (a stale decision is refused by the store anyway).
    policy_poll_ms: int = 1000
    #: How often the store's health is probed for the gRPC health service.
    health_probe_ms: int = 500
    #: Decisions kept per tenant for state, explain and tail (0: none, which saves about
    #: 40 µs of Redis time per decision).
    recent_decisions: int = 1000
    #: How often the ledger lag of every consumer group is measured for the metrics.
    ledger_lag_interval_ms: int = 10_000
    #: The largest message received or sent. A StreamUsageRequest of MAX_BATCH (1000) usages
    #: with every field at its bound is 6,009,002 bytes; 8 MiB takes it with room for fields
    #: added later, and grpc refuses anything larger (RESOURCE_EXHAUSTED) before parsing it.
    max_message_bytes: int = 8 * 1024 * 1024
    #: How far before the gateway's clock a usage's occurred_at may lie (35 days) ...
    occurred_at_max_age_s: int = 35 * 86_400
    #: ... and how far after it (5 minutes: clock skew). core/validation.py has the rules.
    occurred_at_max_ahead_s: int = 300
    # -- the outage spool (<data_dir>/spool.sqlite3; chargepath.store.spool) --
    #: Usages answered during a store outage and kept on disk until replayed; past it (or
    #: past ``spool_max_bytes`` of encoded usages) a usage is refused, not spooled, and its
    #: verdict says so. 0: no spool (an outage's verdicts are neither recorded nor spooled).
    spool_max_entries: int = 1_000_000
    spool_max_bytes: int = 512 * 1024 * 1024
    #: Bound on the spool write (one fsync, shared by the usages answered meanwhile) that a
    #: degraded verdict waits for; past it the usage counts as not spooled.
    spool_timeout_ms: int = 500
    #: Webhooks (the policy's ``webhooks:``): each attempt's HTTP timeout; the wait after a
    #: failed attempt, doubling from the base up to the max (with jitter); attempts before an
    #: event is given up for an endpoint; how long an event held by a silent process stays
    #: with it before another process claims it; at most one degraded-mode event per
    #: process per interval.
    webhook_timeout_ms: int = 5000
    webhook_retry_base_ms: int = 1000
    webhook_retry_max_ms: int = 300_000
    webhook_max_attempts: int = 12
    webhook_lease_ms: int = 30_000
    webhook_degraded_interval_s: int = 60
    #: Shorthand for the OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER defaults: none, console, otlp.
    otel: str = ""
    #: Port of the Prometheus scrape endpoint (/metrics); 0: none. Worker i of ``--workers``
    #: serves on ``metrics_port + i`` and announces it in ``<data_dir>/metrics/worker-<i>.json``.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    #: How many tenants keep their own label on the per-tenant metrics (the busiest of each
    #: process); the others are grouped under tenant="other".
    metrics_top_tenants: int = 20
    #: How often the tenant-scope quotas of those tenants are read for the chargepath.quota.*
    #: gauges.
    quota_burn_interval_ms: int = 10_000
    #: The status page (chargepath.status): its port (0: none), on ``host``; with
    #: ``--workers N`` worker 0 serves it. Its figures are read from Redis every
    #: ``status_refresh_ms`` while a page is open.
    http_port: int = 0
    status_refresh_ms: int = 1000
    #: asyncio event loop: "uvloop" (measured 5-7% less CPU per usage here) or "asyncio".
    event_loop: str = "uvloop"
    log_format: str = "json"
    log_level: str = "INFO"
    #: Testing only: shift the store clock (quota period tests).
    clock_offset_ms: int = 0
    #: "keys": every call but health checks needs an API key (or, with mTLS, a client
    #: certificate the identity map names); "none": no authentication (development only).
    auth: str = "keys"
    #: Allow ``auth = "none"`` on an address other than loopback.
    insecure_allow_no_auth: bool = False
    #: PEM certificate chain and private key of the gRPC port; both empty: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    #: PEM CA bundle that client certificates must chain to (mTLS); needs tls_cert.
    tls_client_ca: str = ""
    #: YAML identity map: which client certificate identity is which tenant and role (mTLS).
    tls_identities: str = ""

    def problem(self) -> str | None:
        """None if the settings make a gateway that may start; else why not, in one line
        naming the setting. Checks the combinations only; the files are read at start."""
        if self.auth not in AUTH_MODES:
            return f"--auth: must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}"
        if self.auth == "none" and not self.insecure_allow_no_auth and not is_loopback(self.host):
            return (
                f"--auth none: refused on the non-loopback address {self.host!r}: anyone who "
                "can reach it could meter, read and change every tenant "
                "(add --insecure-allow-no-auth to force it)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "--tls-key" if self.tls_cert else "--tls-cert"
            return f"{missing}: --tls-cert and --tls-key go together"
        if self.tls_client_ca and not self.tls_cert:
            return "--tls-client-ca: mTLS needs --tls-cert and --tls-key too"
        if self.tls_identities and not self.tls_client_ca:
            return "--tls-identities: needs --tls-client-ca (it names client certificates)"
        if self.explain_window_s != -1 and not 0 <= self.explain_window_s <= self.dedup_window_s:
            return (
                f"--explain-window-s: {self.explain_window_s} must be between 0 and "
                f"--dedup-window-s ({self.dedup_window_s}): the trail cannot explain a decision "
                "whose request id the gateway has already forgotten"
            )
        return None

    @property
    def store_timeout_floor_ms(self) -> int:
        """The store timeout before Redis was asked (``store_timeout_ms``, or the default for a
        Redis that does not fsync every write): what bounds derived from it start from."""
        return self.store_timeout_ms or STORE_TIMEOUT_MS

    @property
    def explain_window_ms(self) -> int:
        """The trail's window in ms: ``explain_window_s``, or the dedup window if unset."""
        if self.explain_window_s == -1:
            return self.dedup_window_s * 1000
        return self.explain_window_s * 1000

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ) if env is None else env
        s = cls()
        for f in fields(cls):
            raw = env.get(f"CHARGEPATH_{f.name.upper()}")
            if raw is not None:
                setattr(s, f.name, _convert(f.name, raw, getattr(s, f.name)))
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        if s.store_timeout_ms < 0:
            raise ValueError(
                f"--store-timeout-ms: {s.store_timeout_ms} is negative (0: chosen from Redis' "
                "appendfsync at start)"
            )
        s.redis_target()
        s.validate_replica_wait()
        return s

    def redis_target(self) -> RedisTarget:
        """Where Redis is, validated (a :class:`RedisSettingsError`, a ``ValueError`` whose
        one-line message names the option)."""
        from chargepath.store.connect import RedisTarget, parse_sentinels

        sentinels = parse_sentinels(self.redis_sentinel) if self.redis_sentinel.strip() else ()
        return RedisTarget(
            url=self.redis_url,
            cluster=self.redis_cluster,
            sentinels=sentinels,
            master=self.redis_master,
            username=self.redis_username,
            password=self.redis_password,
            sentinel_username=self.redis_sentinel_username,
            sentinel_password=self.redis_sentinel_password,
        ).validate()

    def validate_replica_wait(self) -> None:
        """One-line errors for the WAIT options."""
        if not self.redis_wait_replicas:
            return
        if self.redis_wait_replicas < 0:
            raise ValueError(f"--redis-wait-replicas: {self.redis_wait_replicas} is negative")
        if self.redis_cluster:
            raise ValueError("--redis-wait-replicas: not supported with --redis-cluster")
        if not 0 < self.redis_wait_timeout_ms < self.store_timeout_floor_ms:
            raise ValueError(
                f"--redis-wait-timeout-ms: {self.redis_wait_timeout_ms} must be between 1 and "
                f"--store-timeout-ms ({self.store_timeout_floor_ms}) - 1, or the store timeout "
                "answers before WAIT does"
            )


def _convert(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return type(default)(raw)
    except ValueError:
        raise ValueError(
            f"CHARGEPATH_{name.upper()}={raw!r}: expected {type(default).__name__}"
        ) from None


def is_loopback(host: str) -> bool:
    """True for an address that only this machine can reach: 127.0.0.0/8, ::1, localhost.
    An empty host or a wildcard (0.0.0.0, ::) listens on every interface: not loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
