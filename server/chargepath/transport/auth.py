"""Authentication on the gRPC port: API keys in metadata, a cache of verified keys, the interceptor.

A caller sends ``authorization: Bearer cpk_<key_id>_<secret>``. :class:`Authenticator` checks it
against the key store once, then answers from an in-process cache: after the first call a key
costs no Redis round trip. A key change (revocation, rotation) reaches the cache within a
second: a pub/sub subscriber evicts the key on each change message, and a poll of the store's
auth epoch every ``poll_interval_s`` clears the cache when the epoch moved (a missed message, a
reconnect, a Redis restart). Expiry and a revocation scheduled by a rotation's grace period are
read from the cached record on each call, against this process' wall clock.

Failed attempts are counted per peer address (:class:`~chargepath.core.auth.FailedAttempts`):
once a peer's bucket is empty its unknown keys are refused without a lookup. A key already in
the cache is still accepted from that peer, so a flood of bad keys does not lock out a good
client behind the same address. Nothing is remembered about unknown keys: memory is the cache
(at most ``cache_size`` verified keys) plus the bounded table of peers.

:class:`AuthInterceptor` wraps every handler that needs a credential, so it can read the peer
and the TLS auth context of the call; it refuses with UNAUTHENTICATED or PERMISSION_DENIED (the
permission table is :data:`chargepath.core.auth.PERMISSIONS`) and puts the caller in a context
variable, :func:`current_principal`, for the servicers' per-tenant checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from chargepath.core.auth import (
    KEY_ID_LENGTH,
    KEY_LENGTH,
    KEY_PREFIX,
    MISSING_CREDENTIAL,
    FailedAttempts,
    KeyFormatError,
    KeyRecord,
    Principal,
    Refusal,
    RefusalKind,
    authorize,
    may_act_for,
    needs_credential,
    parse_key,
    secret_digest,
    secret_matches,
)
from chargepath.store.base import KeyStore, StoreUnavailableError
from chargepath.transport.errors import abort

log = logging.getLogger("chargepath.auth")

_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "chargepath_principal", default=None
)

# The identity hook of the TLS work: a client certificate's identity (from the call's auth
# context, e.g. {"x509_common_name": [b"tenant-a"]}) to a principal, or None.
IdentityPrincipal = Callable[[Mapping[str, Sequence[bytes]]], Principal | None]

_CODES = {
    RefusalKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    RefusalKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}
_KEY_ID_START = len(KEY_PREFIX)
_KEY_ID_END = _KEY_ID_START + KEY_ID_LENGTH
_INVALID = Refusal(RefusalKind.UNAUTHENTICATED, "invalid API key")
_NOT_BEARER = Refusal(
    RefusalKind.UNAUTHENTICATED,
    "invalid credential: the metadata must be one 'authorization: Bearer <api key>'",
)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being served (None outside one, or on an open RPC
    such as a health check)."""
    return _PRINCIPAL.get()


def caller_may_act_for(tenant: str) -> bool:
    """True if the caller of the RPC being served may act for ``tenant``
    (:func:`~chargepath.core.auth.may_act_for`). With no principal, True: the gateway runs
    without authentication (``--auth none``), since with it every RPC that names a tenant needs
    a credential and the interceptor sets the principal before the servicer runs."""
    principal = _PRINCIPAL.get()
    return principal is None or may_act_for(principal, tenant)


def peer_address(peer: str) -> str:
    """The address of a gRPC peer string without its port ("ipv4:10.0.0.7:51234" ->
    "ipv4:10.0.0.7", "ipv6:[::1]:51234" -> "ipv6:[::1]"): failed attempts count per address, as
    a new connection gets a new port."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        if sep and port.isdigit() and host not in ("ipv4", "ipv6"):
            return host
    return peer


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The credential of ``authorization: Bearer <token>``; "" if the header is present but not
    a single Bearer header; None if there is none."""
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        return ""
    value = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


@dataclass(frozen=True, slots=True)
class _Verified:
    """A cache entry: a key that was valid when looked up, with what each call needs ready."""

    record: KeyRecord
    principal: Principal
    digest: bytes  # SHA-256 of the secret
    until_ms: int | None  # expiry or scheduled revocation, whichever is first


def _verified(record: KeyRecord) -> _Verified | None:
    try:
        digest = bytes.fromhex(record.secret_hash)
    except ValueError:
        return None  # a damaged record never matches; it is not cached
    ends = [t for t in (record.expires_ms, record.revoked_ms) if t is not None]
    return _Verified(record, record.principal(), digest, min(ends) if ends else None)


class Authenticator:
    """Verifies API keys against a :class:`~chargepath.store.base.KeyStore`, with a cache of
    verified keys.

    ``await start()`` runs the change subscriber and the epoch poll; ``await close()`` stops
    them. :meth:`authenticate` works without ``start()`` too (tests), but then nothing evicts
    the cache. Not thread-safe: call from one event loop. ``cache_hits`` counts calls answered
    without Redis, ``cache_misses`` calls that looked a key up.
    """

    def __init__(
        self,
        keys: KeyStore,
        *,
        attempts: FailedAttempts | None = None,
        cache_size: int = 10_000,
        poll_interval_s: float = 0.5,
        lookup_timeout_s: float = 1.0,
        subscribe: bool = True,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._keys = keys
        self._attempts = (
            attempts
            if attempts is not None
            else FailedAttempts(lambda: time.monotonic_ns() // 1_000_000)
        )
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._cache_size = cache_size
        self._poll_interval_s = poll_interval_s
        self._lookup_timeout_s = lookup_timeout_s
        self._subscribe = subscribe
        self._wall_ms = wall_ms
        # Bumped by every eviction: a lookup that began before one must not cache what it read,
        # which may predate the change that caused it.
        self._generation = 0
        self._epoch: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self.cache_hits = 0
        self.cache_misses = 0

    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailableError, TimeoutError):
            self._epoch = await asyncio.wait_for(self._keys.epoch(), self._lookup_timeout_s)
        self._tasks.append(asyncio.create_task(self._poll_epoch(), name="auth-epoch-poll"))
        if self._subscribe:
            self._tasks.append(asyncio.create_task(self._listen(), name="auth-events"))
            # Wait (briefly) until subscribed, so a change made right after start() is heard.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), self._lookup_timeout_s)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def evict(self, key_id: str) -> None:
        self._generation += 1
        self._cache.pop(key_id, None)

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    async def authenticate(self, token: str | None, peer: str) -> Principal | Refusal:
        """The principal of ``token`` (the Bearer credential; None: none sent), or why it is
        refused. ``peer`` is the caller's address, for failed-attempt limits. Raises
        :class:`StoreUnavailableError` if the key is not cached and the store cannot say."""
        if token is None:
            return MISSING_CREDENTIAL
        principal = self.cached(token)
        if principal is not None:
            return principal
        # The path of nearly every call: a cached key id whose secret hashes to the cached
        # digest (which also proves the text is a well-formed key). No parsing, no Redis.
        entry = self._cache.get(token[_KEY_ID_START:_KEY_ID_END])
        if (
            entry is not None
            and len(token) == KEY_LENGTH
            and token.startswith(KEY_PREFIX)
            and token[_KEY_ID_END] == "_"
            and hmac.compare_digest(secret_digest(token[_KEY_ID_END + 1 :]), entry.digest)
        ):
            self.cache_hits += 1
            if entry.until_ms is not None and entry.until_ms <= (now := self._wall_ms()):
                return self._refuse_ended(entry.record, peer, now)
            self._cache.move_to_end(entry.record.key_id)
            return entry.principal
        if not token:
            self._attempts.record(peer)
            return _NOT_BEARER
        try:
            key = parse_key(token)
        except KeyFormatError as exc:
            self._attempts.record(peer)
            return Refusal(RefusalKind.UNAUTHENTICATED, f"invalid credential: {exc}")
        wait_ms = self._attempts.retry_after_ms(peer)
        if wait_ms:
            return Refusal(
                RefusalKind.UNAUTHENTICATED,
                "too many failed authentication attempts from this address; "
                f"retry in {-(-wait_ms // 1000)} s",
            )
        if entry is not None:  # a cached key id with a wrong secret
            self.cache_hits += 1
            self._attempts.record(peer)
            return _INVALID
        self.cache_misses += 1
        generation = self._generation
        try:
            record = await asyncio.wait_for(self._keys.get(key.key_id), self._lookup_timeout_s)
        except TimeoutError as exc:
            raise StoreUnavailableError("key lookup timed out") from exc
        if record is None or not secret_matches(key.secret, record.secret_hash):
            self._attempts.record(peer)
            return _INVALID
        now = self._wall_ms()
        if record.refusal_at(now) is not None:
            return self._refuse_ended(record, peer, now)
        verified = _verified(record)
        if verified is not None and generation == self._generation:
            self._cache[key.key_id] = verified
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return record.principal()

    def cached(self, token: str) -> Principal | None:
        """The principal of ``token`` if it is a cached key, with its secret, still valid now;
        None otherwise (then :meth:`authenticate` says what it is). No I/O, no failed attempt
        counted: the path of nearly every call, which needs no peer address."""
        entry = self._cache.get(token[_KEY_ID_START:_KEY_ID_END])
        if (
            entry is None
            or len(token) != KEY_LENGTH
            or not token.startswith(KEY_PREFIX)
            or token[_KEY_ID_END] != "_"
            or not hmac.compare_digest(secret_digest(token[_KEY_ID_END + 1 :]), entry.digest)
            or (entry.until_ms is not None and entry.until_ms <= self._wall_ms())
        ):
            return None
        self.cache_hits += 1
        self._cache.move_to_end(entry.record.key_id)
        return entry.principal

    def _refuse_ended(self, record: KeyRecord, peer: str, now_ms: int) -> Refusal:
        """A key past its expiry or revocation at ``now_ms``. Only the holder of the secret gets
        here, so saying which tells nothing to anyone else, and tells the operator what to fix."""
        self._cache.pop(record.key_id, None)
        self._attempts.record(peer)
        return Refusal(RefusalKind.UNAUTHENTICATED, f"API key {record.refusal_at(now_ms)}")

    async def _poll_epoch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self._check_epoch()

    async def _check_epoch(self) -> None:
        """Clear the cache if the epoch moved since last seen (a change this process may not
        have heard of). If the store cannot say, keep serving cached keys; the next check
        that works catches up."""
        try:
            epoch = await asyncio.wait_for(self._keys.epoch(), self._lookup_timeout_s)
        except (StoreUnavailableError, TimeoutError):
            return
        if epoch != self._epoch:
            self._epoch = epoch
            self.clear()

    async def _listen(self) -> None:
        while True:
            try:
                async with self._keys.changes() as changed:
                    # Changes made while not subscribed were not heard, but each moved the
                    # epoch. Clearing the cache on every resubscription instead would make
                    # every call after a Redis blip look its key up again, while the store
                    # may still be recovering (UNAVAILABLE for calls that were fine).
                    await self._check_epoch()
                    self._subscribed.set()
                    async for key_id in changed:
                        self.evict(key_id)
            except StoreUnavailableError as exc:
                log.debug("auth events: %s; resubscribing", exc)
            finally:
                self._subscribed.clear()
            await asyncio.sleep(self._poll_interval_s)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates and authorizes every call that needs a credential, before its handler.

    A Bearer key in the metadata is used when there is one; otherwise ``identity_principal``
    (if given) may name the caller from the call's TLS auth context (mTLS). Open methods (health
    checks) pass untouched. Refusals: UNAUTHENTICATED (no, malformed, unknown, wrong, expired or
    revoked credential; too many failures from the address), PERMISSION_DENIED (the role may
    not call the method), UNAVAILABLE (an uncached key while the store is unreachable).
    """

    def __init__(
        self,
        authenticator: Authenticator,
        identity_principal: IdentityPrincipal | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._identity_principal = identity_principal
        # method -> (the handler, its guarded version): built once per method, not per call.
        # Bounded by the methods that have a handler.
        self._guarded: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not needs_credential(method):
            return handler
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = _guarded(handler, lambda context: self._admit(method, context))
        self._guarded[method] = (handler, guarded)
        return guarded

    async def _admit(self, method: str, context: Any) -> None:
        token = bearer_token(context.invocation_metadata())
        principal: Principal | Refusal | None = None
        if token:
            principal = self._authenticator.cached(token)
        if principal is None and token is None and self._identity_principal is not None:
            principal = self._identity_principal(context.auth_context())
        if principal is None:
            try:
                principal = await self._authenticator.authenticate(
                    token, peer_address(context.peer())
                )
            except StoreUnavailableError:
                await abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    "the credential cannot be verified now: the key store is unavailable",
                )
        if isinstance(principal, Refusal):
            await abort(context, _CODES[principal.kind], principal.message)
        # grpc.aio serves each call in a task of its own, with its own copy of the context:
        # the principal is seen by this call's handler only. Set before the role check, so
        # that an outer interceptor (the audit) can name the caller of a refused call.
        _PRINCIPAL.set(principal)
        refusal = authorize(principal, method)
        if refusal is not None:
            await abort(context, _CODES[refusal.kind], refusal.message)


def _guarded(handler: Any, admit: Callable[[Any], Awaitable[None]]) -> Any:
    """``handler`` with ``admit(context)`` awaited before its behaviour, for each of the four
    kinds of RPC and for both styles of streaming handler (async generator, or a coroutine that
    writes with ``context.write``)."""
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await admit(context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await admit(context)
            return await inner(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    streaming = handler.unary_stream or handler.stream_stream
    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    if inspect.iscoroutinefunction(streaming):

        async def writes(request: Any, context: Any) -> None:
            await admit(context)
            await streaming(request, context)

        return make(writes, handler.request_deserializer, handler.response_serializer)

    async def yields(request: Any, context: Any) -> AsyncIterator[Any]:
        await admit(context)
        responses = streaming(request, context)
        if hasattr(responses, "__aiter__"):
            async for response in responses:
                yield response
        else:
            for response in responses:
                yield response

    return make(yields, handler.request_deserializer, handler.response_serializer)
