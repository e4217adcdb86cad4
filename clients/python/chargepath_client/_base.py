"""Everything `Client` and `AsyncClient` share that is not I/O (httpx's `BaseClient` pattern).

`BaseClient` takes and checks the options, works out the channel's credentials and options and
the metadata of every call, and builds each call's `CheckAttempts`: the request every attempt
sends, the deadline bookkeeping, the retry decisions and the mapping of failures and verdicts.
A subclass opens its kind of channel (`_connect`) and runs the attempts: sending and sleeping
are all it does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import grpc

from chargepath_client import _wire
from chargepath_client._errors import ChargepathError, DeadlineExceeded, from_rpc_error
from chargepath_client._retry import Attempts, RetryPolicy
from chargepath_client._verdict import Mode, Verdict
from chargepath_protos.v1 import metering_pb2 as pb

logger = logging.getLogger("chargepath_client")

#: PEM material: the PEM bytes themselves, or the path of a file holding them.
Pem = bytes | str | os.PathLike[str]

AUTHORIZATION = "authorization"


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    *,
    tls_ca: Pem | None,
    tls_cert: Pem | None,
    tls_key: Pem | None,
) -> grpc.ChannelCredentials | None:
    """The credentials of the channel; None for plaintext (no TLS option given)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (mutual TLS needs both)")
    wants_tls = tls_ca is not None or tls_cert is not None
    if credentials is not None and wants_tls:
        raise ValueError("give either credentials or tls_ca/tls_cert/tls_key, not both")
    if not wants_tls:
        return credentials
    # tls_ca None: the server is verified against the system's roots (grpc's default).
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca),
        private_key=_pem(tls_key),
        certificate_chain=_pem(tls_cert),
    )


def call_metadata(metadata: Sequence[tuple[str, str]], api_key: str | None) -> _wire.Metadata:
    """The metadata of every call and stream: `metadata`, and the api key as a bearer token."""
    joined = _wire.metadata(metadata)
    if api_key is None:
        return joined
    # Messages name neither the key nor the metadata value: both are secrets.
    if not (api_key.isascii() and api_key.isprintable() and api_key.strip() == api_key != ""):
        raise ValueError("api_key must be printable ASCII, without surrounding spaces")
    if any(key == AUTHORIZATION for key, _ in joined):
        raise ValueError("give the api key as api_key or as authorization metadata, not both")
    return ((AUTHORIZATION, f"Bearer {api_key}"), *joined)


#: Metadata sent on every attempt of a Check after the first: the gateway then never answers
#: it from its over-limit cache (a retry of a request that may have been allowed must get the
#: store's answer from the request id's dedup record).
RETRY_METADATA = "chargepath-retry"


class CheckAttempts:
    """One Check (admit or report) across its attempts.

    It holds what every attempt sends (`request`, `metadata`: the same request id each time)
    and decides, between attempts, whether and when to try again. The client's loop:

        while (timeout := attempts.next_timeout()) is not None:
            try: response = <send attempts.request with timeout and attempts.metadata>
            except <the call failed> as error: <sleep attempts.pause_after(error)>
            else: return attempts.verdict(response)
        raise attempts.exhausted()
    """

    def __init__(
        self, request: pb.CheckRequest, metadata: _wire.Metadata, attempts: Attempts
    ) -> None:
        self.request = request
        self.metadata = metadata
        self.request_id = request.usage.request_id
        self._attempts = attempts
        self._last_error: ChargepathError | None = None

    def next_timeout(self) -> float | None:
        """Count an attempt and return its timeout in seconds; None once the deadline is gone."""
        return self._attempts.start()

    def pause_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt after `error`; raises the matching
        `ChargepathError` when the failure is final or no retry is left."""
        self._last_error = from_rpc_error(error, request_id=self.request_id)
        pause = self._attempts.retry_after(error.code(), error.details())
        if pause is None:
            raise self._last_error from error
        if not any(key == RETRY_METADATA for key, _ in self.metadata):
            # the next attempt may repeat a request id the gateway already decided: a gateway's
            # over-limit cache must not answer it (the store's dedup record does)
            self.metadata = (*self.metadata, (RETRY_METADATA, "1"))
        logger.info(
            "check %s: attempt %d failed with %s, retrying in %.3fs",
            self.request_id,
            self._attempts.made,
            error.code().name,
            pause,
        )
        return pause

    def verdict(self, response: pb.CheckResponse) -> Verdict:
        return Verdict.from_pb(response.verdict)

    def exhausted(self) -> ChargepathError:
        """What to raise when the deadline ran out between attempts."""
        return self._last_error or DeadlineExceeded("deadline exceeded", request_id=self.request_id)


class BaseClient:
    """The options and the non-I/O work of `Client` and `AsyncClient`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        default_deadline: float = 2.0,
        retry: RetryPolicy | None = None,
        validate: bool = True,
        options: Sequence[tuple[str, int | str]] = (),
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        tls_server_name: str | None = None,
        api_key: str | None = None,
    ) -> None:
        """Options of a client of the gateway at `target` (the channel connects lazily).

        - `target`: "host:port" of the gateway.
        - `credentials`: `grpc.ssl_channel_credentials(...)` (and friends) for TLS/mTLS; None
          for a plaintext channel (unless a `tls_*` option is given).
        - `metadata`: (key, value) pairs sent with every call, e.g. a tenant credential.
        - `default_deadline`: seconds a `check`/`report` may take in all, retries included.
        - `retry`: what is retried and how (see `RetryPolicy`).
        - `validate`: check arguments client-side before sending (turn off only to exercise
          the server's own validation).
        - `options`: extra grpc channel options.
        - `tls_ca`: the CA certificate(s) that the gateway's certificate must chain to, as PEM
          bytes or the path of a PEM file; turns TLS on. Without it (but with `tls_cert`),
          the system's roots.
        - `tls_cert`, `tls_key`: this client's certificate chain and private key (PEM bytes or
          file paths), for mutual TLS; both or neither. Turns TLS on.
        - `tls_server_name`: the name the gateway's certificate is checked against, when it is
          not the host of `target` (an address, a tunnel).
        - `api_key`: sent as `authorization: Bearer <api_key>` with every call and stream.
          Kept only in the private call metadata: no public attribute, repr, log line or
          error message shows it.
        """
        if default_deadline <= 0:
            raise ValueError("default_deadline must be positive")
        self.target = target
        self.default_deadline = default_deadline
        self.retry = retry if retry is not None else RetryPolicy()
        self.validate = validate
        self._metadata = call_metadata(metadata, api_key)
        channel_creds = channel_credentials(
            credentials, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        channel_options: list[tuple[str, int | str]] = [*_wire.DEFAULT_CHANNEL_OPTIONS]
        if tls_server_name is not None:
            if channel_creds is None:
                raise ValueError("tls_server_name needs TLS (tls_ca, tls_cert or credentials)")
            channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        channel_options.extend(options)
        self._connect(channel_creds, channel_options)

    def _connect(
        self,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, int | str]],
    ) -> None:
        """Open the channel (plaintext when `credentials` is None) and its method stubs."""
        raise NotImplementedError

    def _usage(
        self,
        mode: Mode,
        tenant: str,
        metric: str,
        amount: int,
        slice: str,
        key: str,
        labels: Mapping[str, str] | None,
        request_id: str | None,
        occurred_at: datetime | None,
    ) -> pb.Usage:
        """The usage of one `check`/`report`, validated unless the client was told not to."""
        return _wire.usage(
            mode,
            tenant,
            metric,
            amount,
            slice,
            key,
            labels,
            request_id,
            occurred_at,
            validate=self.validate,
        )

    def _check_attempts(
        self,
        usage: pb.Usage,
        deadline: float | None,
        metadata: Sequence[tuple[str, str]] | None,
    ) -> CheckAttempts:
        """One `check`/`report` call: its request, its metadata and its deadline."""
        return CheckAttempts(
            pb.CheckRequest(usage=usage),
            _wire.metadata(self._metadata, metadata),
            Attempts(self.retry, deadline if deadline is not None else self.default_deadline),
        )
