"""Gateway settings: defaults, then ``CHARGEPATH_*`` environment variables, then CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any


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
    data_dir: str = ".chargepath"
    #: Policy file (YAML) to publish at start; empty: serve the policy already in the store.
    plans: str = ""
    #: Bound on every store call for one usage: past it the tenant's failure policy decides.
    store_timeout_ms: int = 50
    #: Added to the bound per further usage of a batch (a batch of 64: 50 + 63 x 0.5 ms),
    #: since a batch's script takes longer and the wait includes the process's own queue.
    store_timeout_per_usage_ms: float = 0.5
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 1000
    #: How long a request id's first verdict is kept for retries.
    dedup_window_s: int = 600
    #: How long an idle stream session is remembered for resends.
    session_ttl_s: int = 86_400
    #: Embedded Redis AOF fsync policy: everysec or always.
    redis_fsync: str = "everysec"
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
    #: Shorthand for the OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER defaults: none, console, otlp.
    otel: str = ""
    #: Port of the Prometheus scrape endpoint (/metrics); 0: none.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    #: asyncio event loop: "uvloop" (measured 5-7% less CPU per usage here) or "asyncio".
    event_loop: str = "uvloop"
    log_format: str = "json"
    log_level: str = "INFO"
    #: Testing only: shift the store clock (quota period tests).
    clock_offset_ms: int = 0

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
        return s


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
