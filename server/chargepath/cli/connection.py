"""How every CLI command that calls the gateway reaches it: the address, TLS, and the credential.

The credential is the first of: ``--api-key``; ``CHARGEPATH_API_KEY``; the operator key that
``chargepath serve`` writes to ``<data dir>/operator.key`` on first start, where the data dir is
``--data-dir``, else ``CHARGEPATH_DATA_DIR``, else ``.chargepath`` (serve's default). So on the
gateway's own machine, in the folder it was started from, every command works with no option.
It travels as ``authorization: Bearer <key>`` metadata on every call. The key is never printed.

TLS: ``--tls-ca`` (the CA that issued the gateway's certificate; without it, with ``--tls-cert``,
the system roots), ``--tls-cert``/``--tls-key`` (a client certificate, for mTLS).

Every problem with these options is a :class:`ConnectionOptionError`: one line naming the option.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

from chargepath.core.auth import KeyFormatError, parse_key

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_DATA_DIR: Final = ".chargepath"
OPERATOR_KEY_FILE: Final = "operator.key"  # chargepath.store.keys writes it; kept in step


class ConnectionOptionError(Exception):
    """A connection option that cannot be used: printed as one line, exit status 2."""


def add_options(p: argparse.ArgumentParser) -> None:
    """Add ``--target``, the credential options and the TLS options to a command's parser."""
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"gateway address ({DEFAULT_TARGET})")
    g = p.add_argument_group(
        "credentials",
        "The API key is --api-key, else CHARGEPATH_API_KEY, else <data-dir>/operator.key "
        "(written by `chargepath serve` on this machine).",
    )
    g.add_argument("--api-key", help="API key (prefer CHARGEPATH_API_KEY: argv is visible)")
    g.add_argument(
        "--data-dir",
        help="the gateway's data dir whose operator.key to use "
        f"(default: CHARGEPATH_DATA_DIR, else {DEFAULT_DATA_DIR})",
    )
    g.add_argument("--tls-ca", help="PEM CA bundle to verify the gateway's certificate (TLS)")
    g.add_argument("--tls-cert", help="PEM client certificate (mTLS); needs --tls-key")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")


@dataclass(frozen=True, slots=True)
class Credential:
    """An API key and where it came from (for messages; never the key itself)."""

    key: str = field(repr=False)
    source: str


def find_credential(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> Credential | None:
    """The API key the options, the environment or the data dir give, or None (then calls go
    without one; the gateway refuses them unless it runs with ``--auth none``)."""
    env = os.environ if env is None else env
    if getattr(args, "api_key", None):
        return _checked(args.api_key, "--api-key")
    if env.get("CHARGEPATH_API_KEY"):
        return _checked(env["CHARGEPATH_API_KEY"], "CHARGEPATH_API_KEY")
    explicit = getattr(args, "data_dir", None)
    data_dir = explicit or env.get("CHARGEPATH_DATA_DIR") or DEFAULT_DATA_DIR
    path = Path(data_dir) / OPERATOR_KEY_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if explicit:
            raise ConnectionOptionError(
                f"--data-dir: no {OPERATOR_KEY_FILE} in {data_dir} (is it the folder of "
                "`chargepath serve --data-dir`?)"
            ) from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise ConnectionOptionError(f"{path}: cannot read the operator key: {reason}") from None
    return _checked(text, str(path))


def _checked(key: str, source: str) -> Credential:
    try:
        parse_key(key.strip())
    except KeyFormatError as exc:
        raise ConnectionOptionError(f"{source}: {exc}") from None
    return Credential(key.strip(), source)


def _read(path: str | None, option: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConnectionOptionError(f"{option}: cannot read {path}: {exc.strerror}") from None


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from ``--tls-ca``/``--tls-cert``/``--tls-key``; None: plaintext."""
    ca_path = getattr(args, "tls_ca", None)
    cert_path = getattr(args, "tls_cert", None)
    key_path = getattr(args, "tls_key", None)
    if bool(cert_path) != bool(key_path):
        missing = "--tls-key" if cert_path else "--tls-cert"
        raise ConnectionOptionError(f"{missing}: --tls-cert and --tls-key go together")
    if not (ca_path or cert_path):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_path, "--tls-ca"),
        private_key=_read(key_path, "--tls-key"),
        certificate_chain=_read(cert_path, "--tls-cert"),
    )


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``--target`` with the TLS options and the credential of ``args``; use it
    as a context manager. Raises :class:`ConnectionOptionError`."""
    credentials = channel_credentials(args)
    credential = find_credential(args)
    channel = (
        grpc.insecure_channel(args.target)
        if credentials is None
        else grpc.secure_channel(args.target, credentials)
    )
    if credential is None:
        return channel
    return with_api_key(channel, credential.key)


def with_api_key(channel: grpc.Channel, key: str) -> grpc.Channel:
    """``channel`` sending ``authorization: Bearer <key>`` with every call and stream."""
    return grpc.intercept_channel(channel, _Bearer(key))


def describe_error(err: grpc.RpcError, args: argparse.Namespace) -> str:
    """One line for a failed call: its status and details, and for UNAUTHENTICATED, where the
    credential came from (or how to give one)."""
    code = err.code()
    line = f"{code.name}: {err.details()}"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        try:
            credential = find_credential(args)
        except ConnectionOptionError:
            credential = None
        if credential is None:
            line += (
                " (no API key: pass --api-key, set CHARGEPATH_API_KEY, or point --data-dir at "
                "the gateway's data dir)"
            )
        else:
            line += f" (the key from {credential.source})"
    return line


# grpcio ships no type information: its interceptor bases are Any to mypy.
class _Bearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <key>`` to the metadata of every call."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata)

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call
