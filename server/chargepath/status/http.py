"""The status page's HTTP server: a small, bounded HTTP/1.1 server on asyncio streams.

Why not a framework: the gateway has no HTTP server dependency (aiohttp and starlette are not
in it, and prometheus_client's WSGI server cannot stream server-sent events), and the page needs
five routes, all small: a server of its own is shorter than the glue to one, and every bound is
in sight:

* one request per connection (``Connection: close``); the request head at most
  ``max_head_bytes`` with at most ``max_headers`` headers, read within ``head_timeout_s``; a
  body only on the login form, at most ``max_body_bytes``, read within ``head_timeout_s``;
* at most ``max_connections`` connections at once (others get 503 at once), of which at most
  ``max_streams`` event streams; a write that a client does not take within
  ``write_timeout_s`` ends its connection.

Routes (every response has ``Cache-Control: no-store`` and a Content-Security-Policy that lets
the page load nothing but its own inline style and script, by nonce, and connect to itself):

* ``GET /``: the page; without a credential, the login form (401).
* ``POST /login``: form field ``key``; a viewer or operator key gets a session cookie
  (HttpOnly, SameSite=Strict, Secure over TLS; see :mod:`.session`) and a redirect to ``/``.
* ``POST /logout``: ends the cookie.
* ``GET /events``: server-sent events, one ``status`` event per snapshot (:mod:`.board`).
* ``GET /status.json``: one snapshot, for scripts (``Authorization: Bearer <key>``).

A credential is the session cookie or an ``Authorization: Bearer`` header; the key itself is
never taken from a URL. Refusals: 401 without a valid one (none, wrong, expired, revoked), 403
for a meter key, and for a viewer asking for another tenant (``?tenant=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Final

from chargepath.core.auth import Principal, Refusal, RefusalKind, Role, may_act_for
from chargepath.core.validation import check_tenant
from chargepath.status.board import Snapshot, StatusBoard
from chargepath.status.session import Session, SessionSigner
from chargepath.store.base import KeyStore, StoreUnavailableError
from chargepath.transport.auth import Authenticator
from chargepath.transport.tls import TlsFiles

log = logging.getLogger("chargepath.status")

COOKIE: Final = "cp_status"
#: The principal of every caller with ``--auth none`` (development only).
NO_AUTH: Final = Principal("auth-none", Role.OPERATOR, None)

_REASONS: Final = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_head_bytes: int = 8192
    max_headers: int = 50
    max_body_bytes: int = 2048
    head_timeout_s: float = 5.0
    write_timeout_s: float = 10.0
    max_connections: int = 64
    max_streams: int = 32
    #: a comment line on each open stream this often, so that proxies and the browser see it
    #: alive while no snapshot comes (the store slow or away)
    keepalive_s: float = 15.0


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    #: lower-case names; a header sent twice is refused, except Cookie (joined by "; ")
    headers: Mapping[str, str]


def parse_head(head: bytes, max_headers: int) -> Request:
    """The request line and headers of ``head`` (up to and including the blank line)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "the request head is not ASCII") from None
    line, *lines = text[:-4].split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, _ = parts
    if len(lines) > max_headers:
        raise BadRequest(431, f"more than {max_headers} headers")
    headers: dict[str, str] = {}
    for raw in lines:
        name, sep, value = raw.partition(":")
        name = name.strip().lower()
        if not sep or not name or name != name.rstrip() or " " in name:
            raise BadRequest(400, "malformed header")
        value = value.strip()
        if name in headers:
            if name != "cookie":
                raise BadRequest(400, f"header {name} sent twice")
            value = f"{headers[name]}; {value}"
        headers[name] = value
    url = urllib.parse.urlsplit(target)
    if url.scheme or url.netloc or not url.path.startswith("/"):
        raise BadRequest(400, "the request target must be a path")
    try:
        pairs = urllib.parse.parse_qsl(url.query, max_num_fields=4, strict_parsing=False)
    except ValueError:
        raise BadRequest(400, "too many query parameters") from None
    return Request(method, url.path, dict(pairs), headers)


def cookie(headers: Mapping[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>``; "" for another scheme; None: none."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class StatusGate:
    """Who may read the page: a viewer (its own tenant) or an operator (every tenant).

    ``authenticator`` None means ``--auth none``: everyone is :data:`NO_AUTH`. A Bearer key is
    checked as on the gRPC port (the same cache and failed-attempt limits); a session is
    checked against the key store on each request and each refresh of a stream, so a revoked
    or expired key ends it. While the store cannot say, a session signed by this process is
    trusted until it expires: its key was valid when last read, and the page is most needed
    during an outage."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        keys: KeyStore | None,
        signer: SessionSigner,
        *,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        lookup_timeout_s: float = 1.0,
    ) -> None:
        self.authenticator = authenticator
        self.keys = keys
        self.signer = signer
        self._wall_ms = wall_ms
        self._lookup_timeout_s = lookup_timeout_s

    async def login(self, key: str, peer: str) -> Principal | Refusal:
        """The principal of an API key typed into the login form."""
        if self.authenticator is None:
            return NO_AUTH
        return self._readers_only(await self.authenticator.authenticate(key.strip(), peer))

    async def caller(self, request: Request, peer: str) -> Principal | Refusal:
        """Who makes ``request``: its Bearer key, else its session cookie. Raises
        :class:`StoreUnavailableError` when a Bearer key is not cached and the store cannot
        say."""
        if self.authenticator is None:
            return NO_AUTH
        token = bearer(request.headers)
        if token is not None:
            return self._readers_only(await self.authenticator.authenticate(token, peer))
        value = cookie(request.headers, COOKIE)
        session = self.signer.verify(value) if value else None
        if session is None:
            return Refusal(
                RefusalKind.UNAUTHENTICATED,
                "log in with a viewer or operator API key"
                if not value
                else "your session has ended: log in again",
            )
        return await self.recheck(session)

    async def recheck(self, session: Session) -> Principal | Refusal:
        """``session``'s principal if its key is still valid (read from the store now)."""
        if self.keys is None:
            return session.principal
        if session.expires_ms <= self._wall_ms():
            return Refusal(RefusalKind.UNAUTHENTICATED, "your session has ended: log in again")
        try:
            record = await asyncio.wait_for(
                self.keys.get(session.principal.identity), self._lookup_timeout_s
            )
        except (StoreUnavailableError, TimeoutError):
            return session.principal
        ended = "unknown" if record is None else record.refusal_at(self._wall_ms())
        if ended is not None:
            return Refusal(RefusalKind.UNAUTHENTICATED, f"API key {ended}: log in again")
        return record.principal() if record is not None else session.principal

    def session(self, request: Request) -> Session | None:
        value = cookie(request.headers, COOKIE)
        return self.signer.verify(value) if value else None

    @staticmethod
    def _readers_only(who: Principal | Refusal) -> Principal | Refusal:
        if isinstance(who, Principal) and who.role is Role.METER:
            return Refusal(
                RefusalKind.PERMISSION_DENIED,
                "a meter key cannot read the status page: use a viewer or operator key",
            )
        return who


def _page(name: str) -> str:
    return resources.files("chargepath.status").joinpath(name).read_text(encoding="utf-8")


@dataclass
class _Counts:
    connections: int = 0
    streams: int = 0
    refused: dict[int, int] = field(default_factory=dict)


class StatusServer:
    """Serves the status page on ``host:port`` (0: a free port; :attr:`port` after
    :meth:`start`). ``tls``: an SSL context to serve HTTPS with (the gRPC port's certificate),
    None for plain HTTP."""

    def __init__(
        self,
        board: StatusBoard,
        gate: StatusGate,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        limits: HttpLimits | None = None,
        draining: asyncio.Event | None = None,
    ) -> None:
        self.board = board
        self.gate = gate
        self.host = host
        self.port = port
        self.tls = tls
        self.limits = limits or HttpLimits()
        self.draining = draining or asyncio.Event()
        self.counts = _Counts()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._page = _page("page.html")
        self._login = _page("login.html")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    async def start(self) -> None:
        self._reader = asyncio.create_task(self.board.run(), name="status-board")
        self._server = await asyncio.start_server(
            self._connection,
            self.host,
            self.port,
            ssl=self.tls,
            limit=self.limits.max_head_bytes,
            ssl_handshake_timeout=self.limits.head_timeout_s if self.tls else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, end every open stream and connection, stop the board."""
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._server is not None:
            await self._server.wait_closed()

    # -- one connection -----------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counts.connections += 1
        try:
            if self.counts.connections > self.limits.max_connections:
                await self._send(writer, 503, "text/plain", b"too many connections\n")
                return
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to answer
        except asyncio.CancelledError:
            # close() ends the connections this way; the task ends here, and asyncio's stream
            # callback would otherwise log every cancelled connection task as an error
            pass
        finally:
            self.counts.connections -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.limits
        try:
            async with asyncio.timeout(limits.head_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
            request = parse_head(head, limits.max_headers)
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, "text/plain", b"request head too large\n")
            return
        except asyncio.IncompleteReadError:
            return
        except TimeoutError:
            await self._send(writer, 408, "text/plain", b"request head not sent in time\n")
            return
        except BadRequest as exc:
            await self._send(writer, exc.status, "text/plain", f"{exc}\n".encode())
            return
        peer = _peer(writer)
        route = (request.method, request.path)
        if route == ("GET", "/"):
            await self._index(writer, request, peer)
        elif route == ("POST", "/login"):
            await self._login_form(reader, writer, request, peer)
        elif route == ("POST", "/logout"):
            await self._redirect(writer, clear=True)
        elif route == ("GET", "/events"):
            await self._events(writer, request, peer)
        elif route == ("GET", "/status.json"):
            await self._json(writer, request, peer)
        elif request.path in ("/", "/login", "/logout", "/events", "/status.json"):
            await self._send(writer, 405, "text/plain", b"method not allowed\n")
        else:
            await self._send(writer, 404, "text/plain", b"not found\n")

    async def _caller(
        self, writer: asyncio.StreamWriter, request: Request, peer: str
    ) -> tuple[Principal, str | None] | None:
        """The caller and the tenant it asks for, or None once it was refused (answered)."""
        try:
            who = await self.gate.caller(request, peer)
        except StoreUnavailableError:
            await self._send(writer, 503, "text/plain", b"the key store is unavailable\n")
            return None
        if isinstance(who, Refusal):
            await self._refuse(writer, request, who)
            return None
        tenant = request.query.get("tenant") or None
        if tenant is not None and (check_tenant(tenant, "tenant") is not None):
            await self._send(writer, 400, "text/plain", b"tenant: not a valid tenant name\n")
            return None
        if tenant is not None and not may_act_for(who, tenant):
            refusal = Refusal(
                RefusalKind.PERMISSION_DENIED,
                f"a viewer of {who.tenant} cannot read another tenant",
            )
            await self._refuse(writer, request, refusal)
            return None
        return who, tenant

    async def _refuse(self, writer: asyncio.StreamWriter, request: Request, why: Refusal) -> None:
        status = 401 if why.kind is RefusalKind.UNAUTHENTICATED else 403
        self.counts.refused[status] = self.counts.refused.get(status, 0) + 1
        if request.path == "/" or request.path == "/login":
            await self._login_page(writer, status, why.message)
        else:
            body = json.dumps({"error": why.message}).encode()
            await self._send(writer, status, "application/json", body)

    async def _index(self, writer: asyncio.StreamWriter, request: Request, peer: str) -> None:
        caller = await self._caller(writer, request, peer)
        if caller is None:
            return
        who, _ = caller
        nonce = secrets.token_urlsafe(16)
        text = (
            self._page.replace("__NONCE__", nonce)
            .replace("__WHO__", html.escape(_describe(who)))
            .replace("__LOGOUT__", "" if self.gate.authenticator is not None else "hidden")
        )
        await self._send(writer, 200, "text/html; charset=utf-8", text.encode(), nonce=nonce)

    async def _login_page(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        nonce = secrets.token_urlsafe(16)
        text = self._login.replace("__NONCE__", nonce).replace("__MESSAGE__", html.escape(message))
        await self._send(writer, status, "text/html; charset=utf-8", text.encode(), nonce=nonce)

    async def _login_form(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: Request,
        peer: str,
    ) -> None:
        h = request.headers
        origin = h.get("origin")
        if h.get("sec-fetch-site") == "cross-site" or (
            origin is not None and origin not in self._origins(h)
        ):
            await self._login_page(writer, 403, "a login must come from this page")
            return
        if "content-length" not in h:
            await self._send(writer, 411, "text/plain", b"Content-Length required\n")
            return
        if not h["content-length"].isdigit():
            await self._send(writer, 400, "text/plain", b"bad Content-Length\n")
            return
        length = int(h["content-length"])
        if length > self.limits.max_body_bytes:
            await self._send(writer, 413, "text/plain", b"login form too large\n")
            return
        if h.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            await self._send(writer, 415, "text/plain", b"expected a form\n")
            return
        async with asyncio.timeout(self.limits.head_timeout_s):
            body = await reader.readexactly(length)
        try:
            form = dict(urllib.parse.parse_qsl(body.decode("ascii"), max_num_fields=4))
        except (UnicodeDecodeError, ValueError):
            await self._login_page(writer, 400, "malformed form")
            return
        try:
            who = await self.gate.login(form.get("key", ""), peer)
        except StoreUnavailableError:
            await self._login_page(writer, 503, "the key store is unavailable: try again soon")
            return
        if isinstance(who, Refusal):
            await self._refuse(writer, request, who)
            return
        await self._redirect(writer, token=self.gate.signer.issue(who))

    def _origins(self, headers: Mapping[str, str]) -> set[str]:
        host = headers.get("host", "")
        return {f"{'https' if self.tls else 'http'}://{host}"}

    async def _redirect(
        self, writer: asyncio.StreamWriter, *, token: str | None = None, clear: bool = False
    ) -> None:
        attributes = "; HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if self.tls else "")
        extra = [("Location", "/")]
        if token is not None:
            extra.append(
                ("Set-Cookie", f"{COOKIE}={token}; Max-Age={self.gate.signer.ttl_s}{attributes}")
            )
        if clear:
            extra.append(("Set-Cookie", f"{COOKIE}=; Max-Age=0{attributes}"))
        await self._send(writer, 303, "text/plain", b"", extra=extra)

    async def _json(self, writer: asyncio.StreamWriter, request: Request, peer: str) -> None:
        caller = await self._caller(writer, request, peer)
        if caller is None:
            return
        who, tenant = caller
        mine = tenant if who.role is Role.OPERATOR else who.tenant
        with self.board.wanting(mine):
            snapshot = await self.board.fresh(mine)
        body = json.dumps(snapshot.view(who, tenant)).encode()
        await self._send(writer, 200, "application/json", body)

    async def _events(self, writer: asyncio.StreamWriter, request: Request, peer: str) -> None:
        caller = await self._caller(writer, request, peer)
        if caller is None:
            return
        who, tenant = caller
        if self.counts.streams >= self.limits.max_streams:
            await self._send(writer, 503, "text/plain", b"too many open status pages\n")
            return
        session = self.gate.session(request) if bearer(request.headers) is None else None
        self.counts.streams += 1
        try:
            await self._write(
                writer,
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-store\r\nConnection: close\r\n"
                b"X-Content-Type-Options: nosniff\r\n\r\nretry: 2000\n\n",
            )
            await self._stream(writer, who, tenant, session)
        finally:
            self.counts.streams -= 1

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        who: Principal,
        tenant: str | None,
        session: Session | None,
    ) -> None:
        """One ``status`` event per snapshot until the client leaves, the gateway drains, or the
        session ends (an ``end`` event says why; the page then asks to log in again)."""
        mine = tenant if who.role is Role.OPERATOR else who.tenant
        seq = 0
        with self.board.wanting(mine):
            while not (self.draining.is_set() or self._stop.is_set()):
                if session is not None:
                    checked = await self.gate.recheck(session)
                    if isinstance(checked, Refusal):
                        end = json.dumps({"reason": checked.message})
                        await self._write(writer, f"event: end\ndata: {end}\n\n".encode())
                        return
                    who = checked
                # the first event is read less than a period ago, each next one is newer
                wait = self.board.fresh(mine) if seq == 0 else self.board.after(seq, mine)
                try:
                    snapshot: Snapshot = await asyncio.wait_for(wait, self.limits.keepalive_s)
                except TimeoutError:
                    await self._write(writer, b": waiting for the store\n\n")
                    continue
                seq = snapshot.seq
                data = json.dumps(snapshot.view(who, tenant), separators=(",", ":"))
                await self._write(writer, f"id: {seq}\nevent: status\ndata: {data}\n\n".encode())

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout_s)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: bytes,
        *,
        nonce: str | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        script = f"'nonce-{nonce}'" if nonce else "'none'"
        csp = (
            f"default-src 'none'; script-src {script}; style-src {script}; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
            ("Content-Security-Policy", csp),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "same-origin"),
            *(extra or []),
        ]
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers
        )
        await self._write(writer, head.encode("latin-1") + b"\r\n" + body)


def _peer(writer: asyncio.StreamWriter) -> str:
    """The client's address without its port, as failed attempts count it on the gRPC port."""
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and address:
        host = str(address[0])
        return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"
    return "unknown"


def _describe(who: Principal) -> str:
    if who is NO_AUTH:
        return "no authentication (--auth none)"
    scope = f"tenant {who.tenant}" if who.tenant else "every tenant"
    return f"{who.role.value} key {who.identity} ({scope})"


def server_tls(files: TlsFiles) -> ssl.SSLContext:
    """An SSL context for the status page from the gRPC port's certificate and key (read
    once, at start: unlike the gRPC port, the page does not follow a change of the files)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert_chain, files.private_key)
    return context
