"""``chargepath serve``: run the gateway, in this process or as ``--workers`` processes on one
port. A start that cannot go on prints one line on stderr, naming the option at fault, and
exits non-zero: 2 for invalid settings, TLS files, identity map, Redis URL or plan file (then
nothing was started and nothing written); 1 when the port or the data dir is another server's,
Redis does not answer, no redis-server can be found, or the gateway fails to start."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from chargepath.logs import configure_logging
from chargepath.settings import Settings


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Without --redis-url it starts an embedded redis-server "
        "with its data and AOF under --data-dir. Flags override CHARGEPATH_* variables.",
    )
    p.add_argument("--plans", help="policy file (YAML) to apply at start")
    p.add_argument(
        "--plans-mode",
        choices=["merge", "replace"],
        help="merge (default): apply only what the file changed since it was last applied, "
        "keeping changes made through the admin API; replace: the file wins wholesale",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 50051; 0 picks one)")
    p.add_argument(
        "--workers", type=int, help="gateway processes sharing the port (default: one per core)"
    )
    p.add_argument("--redis-url", help="use this Redis/Valkey instead of the embedded one")
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        default=None,
        help="--redis-url is a Redis Cluster node",
    )
    p.add_argument("--data-dir", help="folder of the embedded Redis (default .chargepath)")
    p.add_argument(
        "--store-timeout-ms",
        type=int,
        help="bound on every store call (default: from how Redis persists, 50 to 200; see README)",
    )
    p.add_argument("--dedup-window-s", type=int, help="request id dedup window (default 600)")
    p.add_argument(
        "--explain-window-s",
        type=int,
        help="how long explain finds every decision by id (0 to --dedup-window-s; default the "
        "dedup window); beyond it, the tenant's last CHARGEPATH_RECENT_DECISIONS (1,000)",
    )
    p.add_argument(
        "--overlimit-cache",
        action="store_true",
        default=None,
        help="answer a Check admit the store refused with a retry_after again without the "
        "store, until it can fit (this process only; README: the over-limit cache)",
    )
    p.add_argument("--redis-sentinel", help="Redis Sentinel instead: host:port,host:port,...")
    p.add_argument("--redis-master", help="with --redis-sentinel: the monitored master's name")
    p.add_argument("--redis-wait-replicas", type=int, help="WAIT for N replicas per decision batch")
    p.add_argument("--redis-wait-timeout-ms", type=int, help="WAIT's timeout (default 20)")
    p.add_argument("--redis-fsync", choices=["everysec", "always"], help="embedded AOF fsync")
    p.add_argument(
        "--redis-maxmemory",
        help="maxmemory of the embedded Redis (noeviction), e.g. 512mb, 2gb; 0: none (default 1gb)",
    )
    p.add_argument(
        "--max-streams", type=int, help="open streams this process serves at most (default 4096)"
    )
    p.add_argument(
        "--max-streams-per-credential",
        type=int,
        help="open streams per API key or client identity, per process (default 1024)",
    )
    p.add_argument(
        "--spool-max-entries",
        type=int,
        help="usages the outage spool (under --data-dir) holds at most; past it they are "
        "refused, not evicted (default 1000000; 0: no spool)",
    )
    p.add_argument(
        "--spool-max-bytes", type=int, help="bytes of usages the spool holds at most (512 MiB)"
    )
    p.add_argument(
        "--otel",
        choices=["none", "console", "otlp"],
        help="trace and metric exporter when OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER are unset",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--http-port",
        type=int,
        help="serve the status page on this port, on --host (worker 0 of --workers serves it; "
        "it asks for a viewer or operator key)",
    )
    p.add_argument("--log-format", choices=["json", "text"])
    sec = p.add_argument_group(
        "security",
        "By default every call but health checks needs an API key. On first start the gateway "
        "writes an operator key to <data-dir>/operator.key (mode 0600).",
    )
    sec.add_argument(
        "--auth",
        choices=["keys", "none"],
        help="keys (default): API keys or mTLS identities; none: no authentication "
        "(development only, loopback addresses only)",
    )
    sec.add_argument(
        "--insecure-allow-no-auth",
        action="store_true",
        default=None,
        help="allow --auth none on a non-loopback address",
    )
    sec.add_argument("--tls-cert", help="PEM certificate chain of the gRPC port (enables TLS)")
    sec.add_argument("--tls-key", help="PEM private key of --tls-cert")
    sec.add_argument(
        "--tls-client-ca", help="PEM CA bundle client certificates must chain to (mTLS)"
    )
    sec.add_argument(
        "--tls-identities",
        metavar="FILE",
        help="YAML map of client certificate identities to tenant and role (mTLS)",
    )
    p.add_argument("--log-level")


def run(args: argparse.Namespace) -> int:
    # Start-up time: the gateway stack (redis-py, pydantic, the OpenTelemetry SDK, the servicers:
    # about half a second of imports) loads only when ``serve`` runs, not for the other commands.
    from chargepath import app, preflight, supervisor
    from chargepath.core.plans import PolicyError
    from chargepath.policy_files import refusal_lines
    from chargepath.policy_sync import PLANS_MODES
    from chargepath.store.base import StoreUnavailableError
    from chargepath.store.embedded import RedisStartError
    from chargepath.transport.tls import IdentityMapError, TlsConfigError

    try:
        settings = Settings.from_env(
            plans=args.plans,
            plans_mode=args.plans_mode,
            host=args.host,
            port=args.port,
            workers=args.workers,
            redis_url=args.redis_url,
            redis_cluster=args.redis_cluster,
            redis_sentinel=args.redis_sentinel,
            redis_master=args.redis_master,
            redis_wait_replicas=args.redis_wait_replicas,
            redis_wait_timeout_ms=args.redis_wait_timeout_ms,
            data_dir=args.data_dir,
            store_timeout_ms=args.store_timeout_ms,
            dedup_window_s=args.dedup_window_s,
            explain_window_s=args.explain_window_s,
            overlimit_cache=args.overlimit_cache,
            redis_fsync=args.redis_fsync,
            redis_maxmemory=args.redis_maxmemory,
            max_streams=args.max_streams,
            max_streams_per_credential=args.max_streams_per_credential,
            spool_max_entries=args.spool_max_entries,
            spool_max_bytes=args.spool_max_bytes,
            log_format=args.log_format,
            log_level=args.log_level,
            otel=args.otel,
            metrics_port=args.metrics_port,
            http_port=args.http_port,
            auth=args.auth,
            insecure_allow_no_auth=args.insecure_allow_no_auth,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            tls_identities=args.tls_identities,
        )
    except ValueError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    if settings.plans_mode not in PLANS_MODES:
        print(
            f"chargepath: plans mode {settings.plans_mode!r}: expected one of "
            f"{', '.join(PLANS_MODES)}",
            file=sys.stderr,
        )
        return 2
    problem = settings.problem()
    if problem is not None:
        print(f"chargepath: {problem}", file=sys.stderr)
        return 2
    try:
        app.load_trust(settings)
    except IdentityMapError as exc:
        where = "; ".join(issue.render(exc.source) for issue in exc.issues)
        print(f"chargepath: --tls-identities: {where}", file=sys.stderr)
        return 2
    except TlsConfigError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    if settings.workers == 0:
        settings.workers = os.cpu_count() or 1
    try:
        preflight.check_workers(settings)
        # Nothing has started yet, and nothing is logged: a refusal is the only line.
        claims = preflight.claim(settings)
    except preflight.StartupError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return exc.status
    with claims:
        configure_logging(settings.log_format, settings.log_level)
        try:
            if settings.workers > 1:
                return supervisor.supervise(settings)
            supervisor.run_gateway(settings)
        except PolicyError as exc:  # the file merged onto the live policy does not validate
            print("chargepath: " + "\n".join(refusal_lines(exc, "--plans")), file=sys.stderr)
            return 2
        except (app.ListenError, RedisStartError, StoreUnavailableError) as exc:
            print(f"chargepath: {exc}", file=sys.stderr)
            return 1
    return 0
